"""A full Redis (docs/DEPLOY.md, "Memory"): with `volatile-lru` and a TTL on every feature hash,
a publish that needs room evicts users, never a model key; with `noeviction` a feature load
that finds no room stops with one clear error and the service's reads go on. A real
redis-server of the test's own, its `maxmemory` set just above what it holds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mvke.cli import main as mvke_main
from mvke.runtime.keys import Keys
from mvke.runtime.versions import active_version, read_version
from tests.export.test_publish import make_variant
from tests.service.test_service import LiveService, make_settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KEYS = Keys()


def _version(bundle_dir: Path) -> str:
    return json.loads((bundle_dir / "manifest.json").read_text())["version"]


def _users(r) -> list[bytes]:
    return list(r.scan_iter(match=KEYS.user("*"), count=1000))


def _fill_up(r, headroom: int, policy: str) -> None:
    r.config_set("maxmemory-policy", policy)
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + headroom)


def test_volatile_lru_with_feature_ttls_evicts_users_never_models(private_redis, bundle, dataset_dir, tmp_path):
    r, url = private_redis.client(), private_redis.url
    first, data = bundle("mvke-mt"), dataset_dir("synthetic")
    second = make_variant(first, tmp_path / "v1", 1)
    assert mvke_main(["publish", str(first), "--redis", url]) == 0
    assert mvke_main(["features", "load", "--data", str(data), "--redis", url, "--ttl", "3600", "--workers", "1",
                      "--job-dir", str(tmp_path / "job")]) == 0
    users = _users(r)
    assert users and all(0 < r.ttl(k) <= 3600 for k in users)
    assert all(r.ttl(k) == -1 for k in r.scan_iter(match=f"{KEYS.models}:*"))      # models never expire

    bundle_bytes = sum(f.stat().st_size for f in second.iterdir())
    _fill_up(r, headroom=bundle_bytes // 4, policy="volatile-lru")   # the new version does not fit without evicting
    assert mvke_main(["publish", str(second), "--redis", url]) == 0

    assert active_version(r, KEYS) == _version(second)
    for b in (first, second):                       # both versions whole: every file there, every sha256 right
        manifest, blobs = read_version(r, KEYS, _version(b), verify=True)
        assert set(blobs) == set(manifest.files)
    left = len(_users(r))
    assert 0 < left < len(users), (left, len(users))   # users made the room
    assert r.info("stats")["evicted_keys"] >= len(users) - left


def test_noeviction_full_memory_what_writes_and_reads_do(private_redis, bundle, dataset_dir, tmp_path):
    """Writes fail with one clear error; a running service keeps answering; a service that must
    (re)load a model cannot (a version is read in one MULTI, which Redis refuses above maxmemory)
    and says why on /readyz, then loads it by itself once there is room again."""
    r, url = private_redis.client(), private_redis.url
    first, data = bundle("mvke-mt"), dataset_dir("synthetic")
    assert mvke_main(["publish", str(first), "--redis", url]) == 0
    assert mvke_main(["features", "load", "--data", str(data), "--redis", url, "--workers", "1",
                      "--job-dir", str(tmp_path / "job0")]) == 0
    settings = make_settings(url)
    with LiveService(settings) as running:
        running.wait_version(_version(first))
        # Already above maxmemory: no write fits. The margin is wider than what client buffers and the
        # allocator move used_memory by between here and the writes (at -10 kB the writes sometimes fitted).
        _fill_up(r, headroom=-200_000, policy="noeviction")
        try:
            assert running.tag("u0000001", {"top_k": 2}).status_code == 200     # reads go on

            load = subprocess.run([sys.executable, "-m", "mvke.cli", "features", "load", "--data", str(data),
                                   "--redis", url, "--workers", "1", "--job-dir", str(tmp_path / "job1")],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            errors = [line for line in load.stderr.splitlines() if line.startswith("error:")]
            assert load.returncode == 2 and "Traceback" not in load.stderr, load.stderr[-2000:]
            assert len(errors) == 1 and "maxmemory" in errors[0], load.stderr[-2000:]
            assert mvke_main(["publish", str(make_variant(first, tmp_path / "v1", 1)), "--redis", url]) == 2
            assert active_version(r, KEYS) == _version(first)

            with LiveService(settings) as fresh:        # a new replica, a restart: the model cannot be read
                ready = fresh.client.get("/readyz")
                assert ready.status_code == 503 and "maxmemory" in ready.text, ready.text
                r.config_set("maxmemory", 0)            # room again: it recovers by itself
                fresh.wait_version(_version(first))
                assert fresh.tag("u0000001", {"top_k": 2}).status_code == 200
        finally:
            r.config_set("maxmemory", 0)
