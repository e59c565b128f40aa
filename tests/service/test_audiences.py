"""Audience routes over real HTTP and a private redis-server (service/audiences.py).

The index is built by batch/audiences.py from Parquet parts in tag-all's output layout
(batch/audience_synth.py; tests/batch/test_audiences.py does the same from a real `tag-all
--audiences` run), and every size is checked against a brute-force count over those Parquet rows.
"""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyroaring")

from batch.audience_synth import synth_parts  # noqa: E402
from batch.audiences import build_index, publish  # noqa: E402
from mvke.localredis import LocalRedis  # noqa: E402
from mvke.runtime.audience import AudienceRule  # noqa: E402
from mvke.runtime.keys import Keys  # noqa: E402
from tests.runtime.test_audience import brute, random_expression  # noqa: E402
from tests.service.test_service import LiveService, make_settings  # noqa: E402

pytestmark = pytest.mark.integration

KEY = "aud-key"
AUTH = {"authorization": f"Bearer {KEY}"}
TASKS = ["interest", "intention"]
USERS, N_TAGS, K = 3000, 40, 5


def brute_sets(files: list[Path], top_k: int = K, min_score: float | None = None) -> dict[tuple[str, str], set]:
    """(task, tag) -> user ids, straight from the Parquet rows (the oracle)."""
    out: dict[tuple[str, str], set] = {}
    for f in files:
        for row in pq.read_table(f).to_pylist():
            if row["rank"] <= top_k and (min_score is None or row["score"] >= min_score):
                out.setdefault((row["task"], row["tag"]), set()).add(row["user_id"])
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Parts, catalogue and two indexes (rule top 5, and top 2 for the version switch)."""
    root = tmp_path_factory.mktemp("aud")
    files, tags = synth_parts(root, USERS, n_tags=N_TAGS, k=K, tasks=TASKS, part_rows=700, seed=3)
    first = build_index(files, TASKS, tags, AudienceRule(K), "m1", {"test": 1})
    second = build_index(files, TASKS, tags, AudienceRule(2), "m1", {"test": 1})
    universe = {f"u{i:08d}" for i in range(USERS)}
    return {"files": files, "tags": tags, "first": first, "second": second, "universe": universe,
            "sets": brute_sets(files), "sets2": brute_sets(files, 2)}


@pytest.fixture(scope="module")
def redis_mod():
    server = LocalRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live(redis_mod, world):
    r = redis_mod.client()
    publish(world["first"], r, Keys("aud"))
    with LiveService(make_settings(redis_mod.url, "aud", api_keys=KEY, audience_poll_s=0.05)) as s:
        yield s, r
    r.close()


def estimate(s, expression: str, **kw) -> httpx.Response:
    return s.client.post("/audiences:estimate", json={"expression": expression, **kw}, headers=AUTH)


def test_sizes_equal_brute_force_over_the_parquet_rows(live, world):
    s, _ = live
    rng = random.Random(11)
    leaves = [(t, g) for t in TASKS for g in world["tags"]]
    for _ in range(60):
        text, tree = random_expression(rng, leaves, 3)
        want = brute(tree, world["sets"], world["universe"])
        res = estimate(s, text, sample=7)
        assert res.status_code == 200, res.text
        doc = res.json()
        assert doc["size"] == len(want), text
        assert set(doc["sample"]) <= want and len(doc["sample"]) == min(7, len(want))
        assert doc["users"] == USERS and doc["version"] == world["first"].meta.version
    info = s.client.get("/audiences", headers=AUTH).json()
    assert info["rule"]["top_k"] == K and info["rule"]["min_score"] is None
    assert info["tasks"]["interest"]["sizes"] == [len(world["sets"].get(("interest", g), ())) for g in world["tags"]]


def _page_all(s, tag: str, task: str, limit: int, first_cursor=None) -> tuple[list[str], list[dict]]:
    users, docs, cursor = [], [], first_cursor
    while True:
        params = {"task": task, "limit": limit, **({"cursor": cursor} if cursor else {})}
        res = s.client.get(f"/tags/{tag}/audience", params=params, headers=AUTH)
        assert res.status_code == 200, res.text
        doc = res.json()
        docs.append(doc)
        users += doc["users"]
        cursor = doc["cursor"]
        if cursor is None:
            return users, docs


def test_paging_returns_every_user_once(live, world):
    s, _ = live
    for task, tag in [("interest", world["tags"][0]), ("intention", world["tags"][7]), ("interest", world["tags"][30])]:
        want = world["sets"][(task, tag)]
        users, docs = _page_all(s, tag, task, 37)
        assert len(users) == len(set(users)) == len(want) and set(users) == want
        assert all(d["size"] == len(want) for d in docs) and all(len(d["users"]) == 37 for d in docs[:-1])


def test_tag_nobody_carries_is_zero_not_an_error(live, world):
    s, _ = live
    unused = world["tags"][-1]          # never drawn by batch/audience_synth.py
    assert ("interest", unused) not in world["sets"]
    res = s.client.get(f"/tags/{unused}/audience", params={"task": "interest"}, headers=AUTH)
    assert res.status_code == 200 and res.json() | {"version": None} == {
        "tag": unused, "task": "interest", "size": 0, "users": [], "cursor": None, "version": None}
    doc = estimate(s, f"interest:{unused}").json()
    assert (doc["size"], doc["sample"]) == (0, [])
    assert estimate(s, f"NOT interest:{unused}").json()["size"] == USERS


@pytest.mark.parametrize("expression, token, position", [
    ("interest:cat00/tag0000 AND", "end of expression", 26),
    ("interest:cat00/tag0000 OR OR intention:cat01/tag0001", "OR", 26),
    ("(interest:cat00/tag0000", "end of expression", 23),
    ("interest:cat00/tag0000 )", ")", 23),
    ("cat00/tag0000", "cat00/tag0000", 0),
    ("interest:cat00/tag0000 & intention:x", "&", 23),
])
def test_bad_expression_is_422_naming_token_and_position(live, expression, token, position):
    s, _ = live
    res = estimate(s, expression)
    assert res.status_code == 422, res.text
    doc = res.json()
    assert doc["field"] == "expression" and repr(token) in doc["detail"] and f"position {position}" in doc["detail"]
    assert doc["errors"][0]["ctx"] == {"token": token, "position": position}


def test_unknown_tag_and_task_are_named(live, world):
    s, _ = live
    res = estimate(s, "interest:cat00/tag0000 AND NOT interest:no/such-tag")
    assert res.status_code == 422 and "unknown tag 'no/such-tag'" in res.json()["detail"]
    assert res.json()["errors"][0]["ctx"] == {"token": "no/such-tag", "position": 31}
    res = estimate(s, "hobby:cat00/tag0000")
    assert res.status_code == 422 and "unknown task 'hobby'" in res.json()["detail"]
    res = s.client.get("/tags/no/such-tag/audience", params={"task": "interest"}, headers=AUTH)
    assert res.status_code == 404 and res.json()["field"] == "tag" and "no/such-tag" in res.json()["detail"]
    res = s.client.get(f"/tags/{world['tags'][0]}/audience", headers=AUTH)   # two tasks: which one?
    assert res.status_code == 422 and res.json()["field"] == "query.task"
    res = s.client.get(f"/tags/{world['tags'][0]}/audience", params={"cursor": "nonsense"}, headers=AUTH)
    assert res.status_code == 422 and res.json()["field"] == "query.cursor"
    res = s.client.get(f"/tags/{world['tags'][0]}/audience", params={"task": "interest", "limit": 0}, headers=AUTH)
    assert res.status_code == 422 and res.json()["field"] == "query.limit"


def test_api_key_required(live, world):
    s, _ = live
    for res in (s.client.post("/audiences:estimate", json={"expression": "interest:cat00/tag0000"}),
                s.client.get(f"/tags/{world['tags'][0]}/audience", params={"task": "interest"}),
                s.client.get("/audiences"),
                s.client.get("/audiences", headers={"authorization": "Bearer wrong"})):
        assert res.status_code == 401, res.text


def test_version_switch_is_atomic_for_readers_and_cursors_pin_their_version(live, world):
    """Readers hammer one expression while the second index (top 2) is published: every answer's size is the
    one of the version it names; a paging run begun before the switch finishes on its version."""
    s, r = live
    expr = f"interest:{world['tags'][0]} OR (intention:{world['tags'][1]} AND NOT interest:{world['tags'][2]})"
    tree = ("or", ("term", "interest", world["tags"][0]),
            ("and", ("term", "intention", world["tags"][1]), ("not", ("term", "interest", world["tags"][2]))))
    v1, v2 = world["first"].meta.version, world["second"].meta.version
    want = {v1: len(brute(tree, world["sets"], world["universe"])), v2: len(brute(tree, world["sets2"], world["universe"]))}
    assert want[v1] != want[v2]
    tag = world["tags"][0]
    first_page = s.client.get(f"/tags/{tag}/audience", params={"task": "interest", "limit": 50}, headers=AUTH).json()
    assert first_page["version"] == v1
    seen, stop = [], threading.Event()

    def reader():
        with httpx.Client(base_url=s.url, timeout=10) as c:
            while not stop.is_set():
                doc = c.post("/audiences:estimate", json={"expression": expr}, headers=AUTH).json()
                seen.append((doc["version"], doc["size"]))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while len(seen) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        publish(world["second"], r, Keys("aud"))
        n = len(seen)
        while (len(seen) < n + 10 or seen[-1][0] != v2) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert {v for v, _ in seen} == {v1, v2}, "readers saw both versions"
    assert all(size == want[v] for v, size in seen)
    last_v1 = max(i for i, (v, _) in enumerate(seen) if v == v1)
    first_v2 = min(i for i, (v, _) in enumerate(seen) if v == v2)
    assert len(seen) > 10 and first_v2 > 0 and last_v1 < len(seen)
    # the paging run begun on v1 goes on on v1 and returns each of v1's users once
    rest, docs = _page_all(s, tag, "interest", 50, first_page["cursor"])
    users = first_page["users"] + rest
    assert {d["version"] for d in docs} == {v1}
    assert len(users) == len(set(users)) and set(users) == world["sets"][("interest", tag)]
    assert estimate(s, expr).json() == estimate(s, expr).json() | {"version": v2, "size": want[v2]}
    publish(world["first"], r, Keys("aud"))     # back to v1 for the other tests (content-addressed: no rewrite)
    time.sleep(0.1)                             # > audience_poll_s: the service reads the pointer again


def test_retired_cursor_is_404_and_no_index_is_503(redis_mod, world):
    r = redis_mod.client()
    keys = Keys("aud-retire")
    try:
        with LiveService(make_settings(redis_mod.url, "aud-retire", audience_poll_s=0.05)) as s:
            res = s.client.post("/audiences:estimate", json={"expression": "interest:x"})
            assert res.status_code == 503 and "no audience index" in res.json()["detail"]
            publish(world["first"], r, keys)
            tag = world["tags"][0]
            page = s.client.get(f"/tags/{tag}/audience", params={"task": "interest", "limit": 5}).json()
            publish(world["second"], r, keys, keep=1)       # retires the first version
            res = s.client.get(f"/tags/{tag}/audience", params={"task": "interest", "cursor": page["cursor"]})
            assert res.status_code == 404 and res.json()["field"] == "query.cursor"
            assert not r.exists(keys.audience_meta(world["first"].meta.version))
            assert r.exists(keys.audience_meta(world["second"].meta.version))
    finally:
        r.close()


def test_redis_down_is_503_with_reason_then_recovers_by_itself(world, tmp_path):
    server = LocalRedis(persist=True, data_dir=tmp_path).start()
    r = server.client()
    publish(world["first"], r, Keys("aud"))
    r.save()
    r.close()
    expr = f"interest:{world['tags'][0]} AND intention:{world['tags'][3]}"
    try:
        with LiveService(make_settings(server.url, "aud", audience_poll_s=0.05)) as s:
            before = s.client.post("/audiences:estimate", json={"expression": expr})
            assert before.status_code == 200
            server.stop()
            down = s.client.post("/audiences:estimate", json={"expression": expr})
            assert down.status_code == 503 and down.json()["detail"].startswith("redis unavailable")
            assert down.headers.get("retry-after") == "1"
            assert s.client.get(f"/tags/{world['tags'][0]}/audience", params={"task": "interest"}).status_code == 503
            server.start()
            after = _until_answered(lambda: s.client.post("/audiences:estimate", json={"expression": expr}))
            assert after.json() == before.json()
    finally:
        server.stop()


def _until_answered(ask, timeout: float = 10.0) -> httpx.Response:
    """Ask again while the service answers 503 (what a client told Retry-After does), up to `timeout`; any
    other status ends the wait, and a 503 that outlasts it fails with the service's reason."""
    deadline = time.monotonic() + timeout
    while (res := ask()).status_code == 503:
        assert "retry-after" in res.headers and time.monotonic() < deadline, res.text
        time.sleep(0.05)
    return res


def test_bitmap_cache_keeps_the_most_recently_used_within_its_budget():
    from pyroaring import BitMap

    from service.audiences import BitmapCache
    c = BitmapCache(100)
    for i in range(4):
        c.put(("v", "t", str(i)), BitMap([i]), 30)
    assert c.get(("v", "t", "0")) is None and c.used == 90        # the oldest went first
    assert c.get(("v", "t", "1")) == BitMap([1])                   # ... and a hit moves it to the back
    c.put(("v", "t", "4"), BitMap([4]), 30)
    assert c.get(("v", "t", "2")) is None and c.get(("v", "t", "1")) is not None
    c.put(("v", "t", "big"), BitMap([5]), 101)                     # larger than the budget: never kept
    assert c.get(("v", "t", "big")) is None and c.used <= 100


def test_on_a_redis_cluster_each_version_is_one_slot(redis_cluster, cluster_client, world):
    """Publish and query on a 3-master cluster: the version's keys share a slot (the MULTI of the flip and the
    deletes are legal), and the answers equal the single-node ones."""
    from redis.cluster import key_slot
    keys = Keys("aud-c")
    publish(world["first"], cluster_client, keys)
    v = world["first"].meta.version
    slots = {key_slot(k.encode()) for k in keys.audience_keys(v, TASKS)}
    assert len(slots) == 1
    expr = f"interest:{world['tags'][0]} AND NOT intention:{world['tags'][1]}"
    tree = ("and", ("term", "interest", world["tags"][0]), ("not", ("term", "intention", world["tags"][1])))
    with LiveService(make_settings(redis_cluster.url, "aud-c", audience_poll_s=0.05)) as s:
        # The service's first cluster round trips (slot map, then the nodes) may pass its Redis timeout on a
        # loaded box: that is a 503 with Retry-After, which a client answers by asking again.
        res = _until_answered(lambda: s.client.post("/audiences:estimate", json={"expression": expr}))
        assert res.status_code == 200, res.text
        doc = res.json()
        assert doc["size"] == len(brute(tree, world["sets"], world["universe"])) and doc["version"] == v
        users, _ = _page_all(s, world["tags"][3], "intention", 500)
        assert set(users) == world["sets"][("intention", world["tags"][3])]
        publish(world["second"], cluster_client, keys, keep=1)     # flip + retire on the cluster
        assert not cluster_client.exists(keys.audience_meta(v))
