"""Publishing to Redis: versions, retention, rollback, failures half-way, concurrency, feature store.

Everything runs against real private redis-servers (tests/fixtures/redis_fixtures.py),
never the shared instance on 6379, with real exported bundles. Failures are real too:
a TCP proxy that cuts the connection mid-write, and a server out of memory.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mvke.runtime.versions import published_versions
from model_export.publish import (PublishError, canary_of, promote, publish, rollback,
                                  set_canary_percent)
from mvke.runtime.contract import (MANIFEST_FILE, ONNX_FILE, TAGS_FILE, BundleError, FileEntry, Manifest,
                                   content_version, decode_array, read_bundle, sha256_bytes)
from mvke.runtime.keys import Keys
from mvke.runtime.versions import active_version, read_version
from tests.fixtures.tcp_proxy import CuttingProxy

pytestmark = pytest.mark.integration

KEYS = Keys()


# ---- helpers -----------------------------------------------------------------------------------
def make_variant(src: Path, out: Path, i: int) -> Path:
    """A copy of a bundle whose every file differs (so a new version id) but scores identically.

    The ONNX graph gets a doc string, gates and tag embeddings are scaled by a positive
    constant (cosine scoring is invariant to both), tags.json gets trailing blanks.
    """
    import onnx
    manifest, blobs = read_bundle(src)
    proto = onnx.load_model_from_string(blobs[ONNX_FILE])
    proto.doc_string = f"test variant {i}"
    blobs[ONNX_FILE] = proto.SerializeToString()
    blobs[TAGS_FILE] = blobs[TAGS_FILE] + b" " * i
    factor = np.float32(1.0 + 0.001 * i)
    for name, entry in manifest.files.items():
        if entry.shape is not None:
            blobs[name] = (decode_array(blobs[name], entry) * factor).astype("<f4").tobytes()
    for name, data in blobs.items():
        old = manifest.files[name]
        manifest.files[name] = FileEntry(sha256_bytes(data), len(data), old.shape, old.dtype)
    manifest.version = content_version({k: v.sha256 for k, v in manifest.files.items()}, manifest.model)
    out.mkdir(parents=True)
    for name, data in blobs.items():
        (out / name).write_bytes(data)
    (out / MANIFEST_FILE).write_text(manifest.to_json())
    return out


def version_of(bundle_dir: Path) -> str:
    return json.loads((bundle_dir / MANIFEST_FILE).read_text())["version"]


def keys_of(r: redis.Redis, version: str) -> set[str]:
    return {k.decode() for k in r.scan_iter(match=f"{KEYS.version_prefix(version)}:*", count=1000)}


def all_version_keys(r: redis.Redis) -> set[str]:
    return {k.decode() for k in r.scan_iter(match=f"{KEYS.models}:v*:*", count=1000)}


def expected_keys(bundle_dir: Path) -> set[str]:
    m = Manifest.from_json((bundle_dir / MANIFEST_FILE).read_text())
    return {KEYS.manifest(m.version)} | {KEYS.file(m.version, n) for n in m.files}


def versions_set(r: redis.Redis) -> list[str]:
    return [v.decode() for v in r.zrange(KEYS.versions, 0, -1)]


def assert_consistent(r: redis.Redis) -> None:
    """Active is a complete listed version; every listed version is complete; no other version keys."""
    listed = versions_set(r)
    active = active_version(r)
    assert active in listed
    want = set()
    for v in listed:
        manifest, blobs = read_version(r, KEYS, v, verify=True)
        assert manifest.version == v and set(blobs) == set(manifest.files)
        want |= {KEYS.manifest(v)} | {KEYS.file(v, n) for n in manifest.files}
    assert all_version_keys(r) == want
    assert {v.decode() for v in r.smembers(KEYS.stored)} == set(listed)   # what orphan collection reads
    assert not r.exists(KEYS.lock)


def no_retry_client(port: int) -> redis.Redis:
    """A client that reports a dropped connection instead of retrying (the default client retries)."""
    return redis.Redis(port=port, retry=Retry(NoBackoff(), 0), socket_timeout=5)


@pytest.fixture(scope="module")
def variants(bundle, tmp_path_factory) -> list[Path]:
    """Six distinct versions of the tiny MVKE bundle (v0 is the exported bundle itself)."""
    src = bundle("mvke-mt")
    root = tmp_path_factory.mktemp("variants")
    out = [src] + [make_variant(src, root / f"v{i}", i) for i in range(1, 6)]
    assert len({version_of(p) for p in out}) == len(out)
    return out


# ---- publish / read back / list ------------------------------------------------------------------
def test_publish_then_read_back_equals_bundle(redis_client, variants):
    src = variants[0]
    manifest, blobs = read_bundle(src)
    report = publish(src, redis_client)
    assert report["version"] == manifest.version
    assert (report["previous"], report["reused"], report["removed"]) == (None, False, [])
    assert report["bytes"] == sum(len(b) for b in blobs.values())
    assert active_version(redis_client) == manifest.version

    got_manifest, got_blobs = read_version(redis_client, KEYS, manifest.version, verify=True)
    assert got_manifest == manifest
    assert got_blobs == blobs
    assert redis_client.get(KEYS.manifest(manifest.version)).decode() == (src / MANIFEST_FILE).read_text()
    # Exactly the documented keys, and the lock is released.
    assert {k.decode() for k in redis_client.keys("*")} == expected_keys(src) | {KEYS.active, KEYS.versions,
                                                                                  KEYS.stored}
    assert_consistent(redis_client)

    [info] = published_versions(redis_client)
    assert (info.version, info.model, info.active) == (manifest.version, "mvke-mt", True)
    assert info.bytes == report["bytes"]


def test_cli_publish_models_rollback(redis_server, redis_client, variants, capsys, monkeypatch):
    from mvke.cli import main
    monkeypatch.setenv("REDIS_URL", redis_server.url)   # belt and braces: never the shared 6379
    url = ["--redis", redis_server.url]
    v0, v1 = version_of(variants[0]), version_of(variants[1])
    for b in variants[:2]:
        assert main(["publish", str(b), *url, "--keep", "3"]) == 0
    capsys.readouterr()

    assert main(["models", *url]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if (v0 in line or v1 in line) and not line.startswith("active:")]
    assert len(rows) == 2
    assert rows[0].startswith("* ") and v1 in rows[0]          # newest first, active starred
    assert rows[1].startswith("  ") and v0 in rows[1] and "mvke-mt" in rows[1]
    assert out[-1] == f"active: {v1}"

    assert main(["publish", "--rollback", *url]) == 0
    assert json.loads(capsys.readouterr().out) == {"active": v0, "previous": v1}
    assert main(["models", *url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"active: {v0}"
    assert [line for line in out if v1 in line][0].endswith("(rolled back)")
    # Nothing older than v0: a second rollback is refused with a clear error (exit 2).
    assert main(["publish", "--rollback", *url]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
    assert active_version(redis_client) == v0


def test_canary_publish_ramp_promote_and_rollback(redis_server, redis_client, variants, capsys, monkeypatch):
    """`mvke publish B --canary 10` leaves A active and sets the canary in one script; --canary 50
    ramps it; promote makes it active; --rollback with a canary drops it. Retention keeps the canary."""
    from mvke.cli import main
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    url = ["--redis", redis_server.url]
    v0, v1, v2 = (version_of(b) for b in variants[:3])
    assert main(["publish", str(variants[0]), *url]) == 0
    capsys.readouterr()
    assert main(["publish", str(variants[1]), *url, "--canary", "10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["version"], report["canary_percent"], report["active"]) == (v1, 10.0, v0)
    assert active_version(redis_client) == v0 and canary_of(redis_client, KEYS) == (v1, 10.0)
    assert redis_client.get(KEYS.canary) == f"{v1}:10".encode()
    assert main(["models", *url]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if v1 in ln][0].endswith("(canary, 10% of users)")
    # the active version cannot be its own canary; a percent out of range is refused before any write
    with pytest.raises(PublishError, match="active version"):
        publish(variants[0], redis_client, canary_percent=5)
    with pytest.raises(PublishError, match="percent"):
        publish(variants[2], redis_client, canary_percent=0)
    assert main(["publish", "--canary", "50", *url]) == 0
    assert json.loads(capsys.readouterr().out) == {"canary": v1, "percent": 50.0, "previous_percent": 10.0}
    # retention (keep 1) trims neither the active version nor the canary
    publish(variants[2], redis_client, keep=1, activate=False)
    assert {v0, v1} <= set(versions_set(redis_client)) and keys_of(redis_client, v1)
    assert main(["promote", *url]) == 0
    assert json.loads(capsys.readouterr().out) == {"active": v1, "previous": v0}
    assert active_version(redis_client) == v1 and canary_of(redis_client, KEYS) is None
    assert main(["promote", *url]) == 2 and "no canary" in capsys.readouterr().err
    # a new canary, rolled back: dropped and marked, the active version untouched
    publish(variants[2], redis_client, canary_percent=1)
    assert rollback(redis_client) == {"active": v1, "canary_dropped": v2}
    assert canary_of(redis_client, KEYS) is None and active_version(redis_client) == v1
    assert [v.rolled_back for v in published_versions(redis_client) if v.version == v2] == [True]
    with pytest.raises(PublishError, match="no canary"):
        set_canary_percent(redis_client, 20)
    assert not redis_client.exists(KEYS.lock)


def test_republish_is_idempotent(redis_client, variants):
    a, b = variants[0], variants[1]
    first = publish(a, redis_client)
    snapshot = {k: redis_client.get(k) for k in expected_keys(a)}
    again = publish(a, redis_client)
    assert again["version"] == first["version"] and again["reused"] is True
    assert again["previous"] == first["version"]
    assert versions_set(redis_client) == [first["version"]]
    assert {k: redis_client.get(k) for k in expected_keys(a)} == snapshot
    # Republishing an older, kept version re-activates it without rewriting it.
    publish(b, redis_client)
    back = publish(a, redis_client)
    assert back["reused"] is True and active_version(redis_client) == version_of(a)
    assert versions_set(redis_client) == [version_of(b), version_of(a)]
    assert_consistent(redis_client)


def test_retention_keeps_newest_n_and_deletes_older_keys(redis_client, variants):
    vs = [version_of(p) for p in variants[:5]]
    for i, p in enumerate(variants[:5]):
        report = publish(p, redis_client, keep=2)
        assert report["removed"] == ([] if i < 2 else [vs[i - 2]])
    assert versions_set(redis_client) == vs[3:]
    assert active_version(redis_client) == vs[4]
    for old in vs[:3]:
        assert keys_of(redis_client, old) == set()
    for kept, p in zip(vs[3:], variants[3:5]):
        assert keys_of(redis_client, kept) == expected_keys(p)
    assert_consistent(redis_client)


def test_rollback_goes_further_back_then_errors(redis_client, variants):
    vs = [version_of(p) for p in variants[:3]]
    for p in variants[:3]:
        publish(p, redis_client, keep=3)
    assert rollback(redis_client) == {"active": vs[1], "previous": vs[2]}
    assert active_version(redis_client) == vs[1]
    assert rollback(redis_client) == {"active": vs[0], "previous": vs[1]}   # further back, no toggling
    assert active_version(redis_client) == vs[0]
    with pytest.raises(PublishError, match="nothing to roll back to"):
        rollback(redis_client)
    assert active_version(redis_client) == vs[0]
    # Rolled-back versions stay kept (and readable) until retention drops them, oldest-marked first.
    assert set(versions_set(redis_client)) == set(vs)
    assert_consistent(redis_client)
    infos = {i.version: i for i in published_versions(redis_client)}
    assert infos[vs[0]].active and not infos[vs[2]].active
    assert [infos[v].rolled_back for v in vs] == [False, True, True]
    assert all(i.published_at > 1e9 for i in infos.values())   # real publish times for `mvke models`
    # A new publish after rollbacks: retention removes the rolled-back-from versions first.
    publish(variants[3], redis_client, keep=2)
    assert versions_set(redis_client) == [vs[0], version_of(variants[3])]
    assert_consistent(redis_client)


def test_rollback_with_two_versions_does_not_toggle(redis_client, variants):
    v0, v1 = version_of(variants[0]), version_of(variants[1])
    publish(variants[0], redis_client)
    publish(variants[1], redis_client)
    assert rollback(redis_client)["active"] == v0
    with pytest.raises(PublishError):
        rollback(redis_client)          # v1 was rolled back from: never re-activated by a rollback
    assert active_version(redis_client) == v0
    # Publishing v1 again is an explicit decision: it becomes active and a normal version again.
    assert publish(variants[1], redis_client)["reused"] is True
    assert active_version(redis_client) == v1
    assert rollback(redis_client)["active"] == v0


def test_rollback_without_versions_errors(redis_client):
    with pytest.raises(PublishError, match="no active version"):
        rollback(redis_client)


# ---- refusing bad bundles ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "delete"])
def test_publisher_refuses_tampered_bundle_and_writes_nothing(redis_client, variants, tmp_path, damage):
    publish(variants[0], redis_client)
    before = {k: redis_client.dump(k) for k in redis_client.keys("*")}
    bad = tmp_path / "bad"
    shutil.copytree(variants[1], bad)
    name = "task_intention_gates.f32"
    data = bytearray((bad / name).read_bytes())
    if damage == "flip-a-byte":
        data[len(data) // 2] ^= 0x01      # same size, different sha256
        (bad / name).write_bytes(bytes(data))
    elif damage == "truncate":
        (bad / name).write_bytes(bytes(data[:-4]))
    else:
        (bad / name).unlink()
    with pytest.raises(BundleError, match=name):
        publish(bad, redis_client)
    assert {k: redis_client.dump(k) for k in redis_client.keys("*")} == before


# ---- concurrency ----------------------------------------------------------------------------------------
def test_reader_never_mixes_versions_while_two_publishers_flip(redis_server, redis_client, variants):
    """Two publishers alternately publish / re-activate versions (keep=3, so versions are also
    trimmed and rewritten); a reader polls the alias and reads the active version with checksum
    verification. Every read is one complete version; nothing errors."""
    rounds = 6
    errors: list[BaseException] = []
    stop = threading.Event()
    reads: list[str] = []
    vanished: list[str] = []

    def publisher(mine: list[Path]) -> None:
        r = redis_server.client()
        try:
            for i in range(rounds):
                publish(mine[i % len(mine)], r, keep=3)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            r.close()

    def reader() -> None:
        r = redis_server.client()
        try:
            while not stop.is_set():
                v = active_version(r)
                if v is None:
                    continue
                try:
                    manifest, blobs = read_version(r, KEYS, v, verify=True)
                except BundleError:
                    # Only legitimate if that version was retired (trimmed) after we resolved it.
                    if r.zscore(KEYS.versions, v) is not None:
                        raise
                    vanished.append(v)
                    continue
                assert manifest.version == v
                assert set(blobs) == set(manifest.files)   # verify_files checked every sha256
                reads.append(v)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            r.close()

    publish(variants[0], redis_client, keep=3)
    threads = [threading.Thread(target=publisher, args=(variants[0:3],)),
               threading.Thread(target=publisher, args=(variants[3:6],))]
    rd = threading.Thread(target=reader)
    rd.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    time.sleep(0.05)
    stop.set()
    rd.join(10)
    assert not errors, errors
    assert len(reads) >= 5 and len(set(reads)) >= 2, (len(reads), set(reads))
    assert len(vanished) <= len(reads) // 10 + 1
    assert_consistent(redis_client)


def test_two_publishers_at_once_end_consistent(redis_server, redis_client, variants):
    publish(variants[0], redis_client)
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def run(p: Path) -> None:
        r = redis_server.client()
        try:
            barrier.wait(5)
            results[p] = publish(p, r, keep=3)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            r.close()

    threads = [threading.Thread(target=run, args=(p,)) for p in variants[1:3]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    v0, a, b = (version_of(p) for p in variants[:3])
    # They ran one after the other (the lock): the second saw the first as its previous version.
    previous = {version_of(p): results[p]["previous"] for p in variants[1:3]}
    first = next(v for v, prev in previous.items() if prev == v0)
    second = next(v for v in previous if v != first)
    assert previous[second] == first
    assert active_version(redis_client) == second
    assert set(versions_set(redis_client)) == {version_of(variants[0]), a, b}
    assert_consistent(redis_client)


# ---- failures half-way ---------------------------------------------------------------------------------
@pytest.fixture
def proxy(redis_server):
    p = CuttingProxy(redis_server.port).start()
    yield p
    p.stop()


def test_connection_cut_mid_write_leaves_old_version_active(redis_client, proxy, variants):
    old, new = variants[0], variants[1]
    publish(old, redis_client)
    r = no_retry_client(proxy.port)
    payload = sum(len(b) for b in read_bundle(new)[1].values())
    proxy.arm(cut_after=payload // 2)     # well inside the MULTI carrying the version's bytes
    with pytest.raises((PublishError, redis.ConnectionError)) as err:
        publish(new, r)
    assert proxy.cuts == 1
    assert "nothing activated" in str(err.value)
    # MULTI never reached EXEC: nothing of the new version exists; the lock was released.
    assert active_version(redis_client) == version_of(old)
    assert keys_of(redis_client, version_of(new)) == set()
    assert_consistent(redis_client)
    # The same publisher succeeds once the network is back.
    assert publish(new, r)["orphans_collected"] == []
    assert active_version(redis_client) == version_of(new)
    assert_consistent(redis_client)
    r.close()


def test_connection_cut_after_exec_orphans_collected_by_next_publish(redis_client, proxy, variants):
    """The EXEC reaches Redis but the reply and Redis itself are lost to the publisher:
    the version is written but never listed or activated; the next publish deletes it."""
    old, new, later = variants[0], variants[1], variants[2]
    publish(old, redis_client)
    r = no_retry_client(proxy.port)
    proxy.arm(cut_on=b"EXEC\r\n", down_after_cut=True)
    with pytest.raises((PublishError, redis.ConnectionError)):
        publish(new, r)
    assert proxy.cuts == 1
    assert active_version(redis_client) == version_of(old)
    assert versions_set(redis_client) == [version_of(old)]
    orphan = keys_of(redis_client, version_of(new))
    assert orphan == expected_keys(new)       # applied by the EXEC, owned by no version
    assert [v.version for v in published_versions(redis_client)] == [version_of(old)]
    # The publisher could not release its lock either; its TTL frees it (fast-forwarded here).
    assert redis_client.exists(KEYS.lock)
    redis_client.pexpire(KEYS.lock, 1)
    time.sleep(0.01)
    proxy.heal()
    report = publish(later, r)
    assert report["orphans_collected"] == [version_of(new)]
    assert keys_of(redis_client, version_of(new)) == set()
    assert active_version(redis_client) == version_of(later)
    assert_consistent(redis_client)
    r.close()


def test_transient_cut_is_retried_whole_by_default_client(redis_server, redis_client, proxy, variants):
    """redis-py's default retry re-sends the whole MULTI on a new connection: the publish completes."""
    publish(variants[0], redis_client)
    r = redis.Redis(port=proxy.port)
    payload = sum(len(b) for b in read_bundle(variants[1])[1].values())
    proxy.arm(cut_after=payload // 2)
    report = publish(variants[1], r)
    assert proxy.cuts == 1
    assert report["version"] == active_version(redis_client) == version_of(variants[1])
    assert_consistent(redis_client)
    r.close()


def test_redis_write_failure_leaves_old_version_active(private_redis, variants):
    """noeviction + a small maxmemory: the MULTI is refused with OOM; nothing of it is applied."""
    r = private_redis.client()
    old, new = variants[0], variants[1]
    publish(old, r)
    saved = r.config_get("maxmemory*")
    payload = sum(len(b) for b in read_bundle(new)[1].values())
    try:
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + payload // 3)
        with pytest.raises(PublishError, match="OOM|maxmemory|nothing activated"):
            publish(new, r)
        assert active_version(r) == version_of(old)
        assert keys_of(r, version_of(new)) == set()
    finally:
        r.config_set("maxmemory", saved["maxmemory"])
        r.config_set("maxmemory-policy", saved["maxmemory-policy"])
    # checked with memory back: while Redis is over maxmemory it refuses every MULTI, readers' included
    assert_consistent(r)
    assert publish(new, r)["orphans_collected"] == []
    assert active_version(r) == version_of(new)
    assert_consistent(r)
    r.close()


# ---- feature store -----------------------------------------------------------------------------------
def test_features_load_dataset_users(redis_client, dataset_dir):
    import pandas as pd

    from model_export.feature_store import load_dataset_users, read_user
    data = dataset_dir("synthetic")
    kinds = json.loads((data / "meta.json").read_text())["fields"]
    users = pd.read_parquet(data / "users.parquet")
    report = load_dataset_users(data, redis_client, progress=False)
    assert (report.loaded, report.bad_rows) == (len(users), [])
    assert report.users_per_second > 0
    assert len(list(redis_client.scan_iter(match=KEYS.user("*"), count=1000))) == len(users)
    for row in users.sample(20, random_state=0).to_dict("records"):
        stored = read_user(redis_client, row["user_id"])
        assert set(stored) == set(kinds)
        for name, kind in kinds.items():
            want = "|".join(map(str, row[name])) if kind == "multi" else str(row[name])
            assert stored[name] == want, (row["user_id"], name)
    assert read_user(redis_client, "no-such-user") is None


def test_features_reload_updates_in_place(redis_client):
    from model_export.feature_store import load_rows, read_user
    kinds = {"gender": "cat", "age": "cat", "tags": "multi"}
    first = [{"user_id": "u1", "gender": "f", "age": "a3", "tags": ["x", "y"]},
             {"user_id": "u2", "gender": "m", "age": "a1", "tags": []},
             {"user_id": 7, "gender": "m", "age": 30, "tags": np.array(["p", "q", "r"])}]
    assert load_rows(first, kinds, redis_client, progress=False).loaded == 3
    assert read_user(redis_client, "u1") == {"gender": "f", "age": "a3", "tags": "x|y"}
    assert read_user(redis_client, "u2") == {"gender": "m", "age": "a1", "tags": ""}
    assert read_user(redis_client, "7") == {"gender": "m", "age": "30", "tags": "p|q|r"}

    second = [{"user_id": "u1", "gender": "f", "age": None, "tags": ["z"]},   # age gone, tags changed
              {"user_id": "u3", "gender": "x", "tags": ["w"]}]
    report = load_rows(second, kinds, redis_client, progress=False, batch_size=1)
    assert (report.loaded, report.bad_rows) == (2, [])
    assert read_user(redis_client, "u1") == {"gender": "f", "tags": "z"}   # stale field removed
    assert redis_client.hexists(KEYS.user("u1"), "age") is False
    assert read_user(redis_client, "u2") == {"gender": "m", "age": "a1", "tags": ""}   # untouched
    assert read_user(redis_client, "u3") == {"gender": "x", "tags": "w"}


def test_features_bad_rows_reported_rest_loaded(redis_client):
    from model_export.feature_store import load_rows, read_user
    kinds = {"gender": "cat", "tags": "multi"}
    load_rows([{"user_id": "keep", "gender": "f", "tags": ["a"]}], kinds, redis_client, progress=False)
    rows = [{"user_id": "ok1", "gender": "f", "tags": ["a", "b"]},
            {"gender": "m", "tags": ["a"]},                               # no user id
            {"user_id": "", "gender": "m", "tags": ["a"]},                # empty user id
            {"user_id": float("nan"), "gender": "m", "tags": ["a"]},      # NaN user id (pandas)
            {"user_id": "list-in-cat", "gender": ["f", "m"], "tags": ["a"]},
            {"user_id": "scalar-in-multi", "gender": "f", "tags": "a"},
            {"user_id": "sep-in-item", "gender": "f", "tags": ["a|b"]},
            {"user_id": "keep", "gender": {"x": 1}, "tags": ["zz"]},      # a bad re-load keeps the old row
            {"user_id": "ok2", "gender": None, "tags": None}]
    report = load_rows(rows, kinds, redis_client, progress=False, batch_size=2)
    assert report.loaded == 2
    bad = {(b["user_id"], b["field"]) for b in report.bad_rows}
    assert bad == {("None", "user_id"), ("", "user_id"), ("nan", "user_id"), ("list-in-cat", "gender"),
                   ("scalar-in-multi", "tags"), ("sep-in-item", "tags"), ("keep", "gender")}
    assert all(b["reason"] for b in report.bad_rows)
    assert read_user(redis_client, "ok1") == {"gender": "f", "tags": "a|b"}
    assert read_user(redis_client, "keep") == {"gender": "f", "tags": "a"}
    for uid in ("list-in-cat", "scalar-in-multi", "sep-in-item"):
        assert read_user(redis_client, uid) is None


def test_features_user_with_every_field_empty_stays_known(redis_client):
    """A user whose every feature is missing is still in the store (all OOV), not deleted."""
    from model_export.feature_store import load_rows, read_user
    kinds = {"gender": "cat", "tags": "multi"}
    report = load_rows([{"user_id": "blank", "gender": None, "tags": None}], kinds, redis_client, progress=False)
    assert report.loaded == 1
    assert redis_client.exists(KEYS.user("blank")) == 1
    assert read_user(redis_client, "blank") == {}
