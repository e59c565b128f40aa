"""Tag service under stress: hot swaps during traffic, a Redis outage, an exhausted Redis pool.

Real redis-server (private, never 6379), real ONNX Runtime, real HTTP (uvicorn
in a thread, httpx clients in other threads). Helpers come from test_service.py.
"""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from mvke.runtime.keys import Keys
from model_export.feature_store import load_dataset_users
from model_export.publish import publish
from mvke.localredis import LocalRedis
from tests.service.test_service import (ROUTE, LiveService, Reference, _sample, assert_matches, make_settings,
                                publish_dataset, stored_row, user_ids)

pytestmark = pytest.mark.integration


class Hammer:
    """`n` client threads posting to the service until stopped; every outcome is recorded."""

    def __init__(self, url: str, users: list[str], body: dict, n: int = 8, pause_s: float = 0.0):
        self.url, self.users, self.body, self.pause = url, users, body, pause_s
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.results: list[tuple[float, str, int, dict, dict]] = []   # (t, user, status, headers, doc)
        self.errors: list[str] = []                                     # transport errors: the server died
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        k = i
        with httpx.Client(base_url=self.url, timeout=10.0) as c:
            while not self.stop_event.is_set():
                user = self.users[k % len(self.users)]
                k += 1
                try:
                    r = c.post(ROUTE.format(user), json=self.body)
                    doc = r.json()
                    with self.lock:
                        self.results.append((time.monotonic(), user, r.status_code, dict(r.headers), doc))
                except Exception as e:  # noqa: BLE001 - any failure is a finding
                    with self.lock:
                        self.errors.append(f"{type(e).__name__}: {e}")
                if self.pause:
                    time.sleep(self.pause)

    def __enter__(self) -> "Hammer":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(15)

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> list[int]:
        with self.lock:
            return [s for t, _, s, _, _ in self.results if since <= t < until]


def _wait(pred, timeout: float, step: float = 0.02) -> float:
    """Seconds until pred() holds; fails after timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def test_hot_swap_under_concurrent_requests(private_redis, bundle, checkpoint, dataset_dir):
    """Versions A (mvke-mt) and B (nomtl) flipped back and forth while 8 clients hammer: no request
    fails, and every response's scores are the ones of the version it names."""
    r = private_redis.client()
    data = dataset_dir("synthetic")
    models = {"mvke-mt": bundle("mvke-mt", "synthetic"), "nomtl": bundle("nomtl", "synthetic")}
    va = publish_dataset(r, models["mvke-mt"], data, "swap")
    vb = publish(models["nomtl"], r, keys=Keys("swap"), activate=False)["version"]
    assert va != vb
    users = user_ids(data, 4, seed=3)
    rows = [stored_row(r, u, "swap") for u in users]
    expected = {}  # version -> user -> task -> {tag: p}
    for version, name in ((va, "mvke-mt"), (vb, "nomtl")):
        expected[version] = dict(zip(users, Reference(checkpoint(name, "synthetic")).by_tag(rows)))
    names = {va: "mvke-mt", vb: "nomtl"}

    with LiveService(make_settings(private_redis.url, "swap", model_poll_s=0.02)) as s:
        s.wait_version(va)
        flips = 0
        with Hammer(s.url, users, {"top_k": 5}, n=8) as h:
            t_end = time.monotonic() + 2.5
            order = [(vb, "nomtl"), (va, "mvke-mt")]
            while time.monotonic() < t_end:
                version, name = order[flips % 2]
                assert publish(models[name], r, keys=Keys("swap"))["version"] == version
                flips += 1
                time.sleep(0.15)
        metrics = s.client.get("/metrics").text
        assert s.thread.is_alive()

    assert not h.errors, h.errors[:5]
    assert len(h.results) > 50
    bad = [(st, d) for _, _, st, _, d in h.results if st != 200]
    assert not bad, f"{len(bad)} failed requests, e.g. {bad[:3]}"
    seen = {va: 0, vb: 0}
    for _, user, _, _, doc in h.results:
        v = doc["model_version"]
        assert v in expected, v
        assert doc["model"] == names[v]
        seen[v] += 1
        for task, ranked in doc["tasks"].items():
            assert len(ranked) == 5
            assert_matches(ranked, expected[v][user][task], full=False)
    assert seen[va] > 0 and seen[vb] > 0, seen
    assert _sample(metrics, "mvke_model_swaps_total") >= 4, "the service did not follow the flips"
    r.close()


def test_redis_restart_while_requests_run(bundle, dataset_dir):
    """Redis stops and comes back on the same port: 503 + Retry-After during the outage, 200 within
    seconds after, /readyz 503 then 200, and the server never dies."""
    server = LocalRedis(persist=True).start()
    try:
        r = server.client()
        data = dataset_dir("synthetic")
        version = publish_dataset(r, bundle("mvke-mt", "synthetic"), data, "mvke")
        r.save()  # the restarted server loads this dump: model and features survive
        r.close()
        users = user_ids(data, 4, seed=5)
        settings = make_settings(server.url, redis_timeout_s=0.3, request_timeout_s=1.0)
        with LiveService(settings) as s:
            s.wait_version(version)
            ready = lambda code: s.client.get("/readyz").status_code == code  # noqa: E731
            with Hammer(s.url, users, {"top_k": 3}, n=3, pause_s=0.01) as h:
                time.sleep(0.4)
                t_stop = time.monotonic()
                server.stop()
                _wait(lambda: ready(503), 5)
                reason = s.client.get("/readyz").json()["reason"]
                _wait(lambda: any(x == 503 for x in h.statuses(t_stop)), 5)
                time.sleep(1.2)
                t_start = time.monotonic()
                server.start()
                back = _wait(lambda: ready(200), 5)
                _wait(lambda: 200 in h.statuses(t_start), 5)
                t_back = time.monotonic()
                time.sleep(0.5)
            assert s.thread.is_alive(), "the server thread died"
            after = s.tag(users[0], {"top_k": 3})
            assert after.status_code == 200 and after.json()["model_version"] == version

        first_200 = min(t for t, _, st, _, _ in h.results if st == 200 and t >= t_start) - t_start
        assert "redis" in reason
        assert back < 5 and first_200 < 5
        assert not h.errors, h.errors[:5]
        statuses = [st for _, _, st, _, _ in h.results]
        assert set(statuses) <= {200, 503}, set(statuses)
        assert h.statuses(0, t_stop).count(200) > 0
        outage = [(st, hd, d) for t, _, st, hd, d in h.results if st == 503]
        assert outage, "no 503 during the outage"
        # once requests in flight at the stop are answered, nothing but 503 until Redis is back
        assert set(h.statuses(t_stop + 1.0, t_start)) == {503}
        for _, headers, doc in outage:
            assert int(headers["retry-after"]) >= 1
            assert doc["detail"] and doc["field"] is None
        assert any("unavailable" in d["detail"] for _, _, d in outage)
        settled = h.statuses(t_back + 0.1)
        assert settled and set(settled) == {200}, settled
    finally:
        server.stop()


def test_redis_pool_exhaustion_is_503_never_500(private_redis, bundle, dataset_dir):
    """Two pooled connections, 64 concurrent requests, no batching: every answer is a 200 or a 503."""
    r = private_redis.client()
    data = dataset_dir("synthetic")
    version = publish_dataset(r, bundle("mvke-mt", "synthetic"), data, "pool")
    users = user_ids(data, 16, seed=9)
    settings = make_settings(private_redis.url, "pool", redis_pool_size=2, batching=False, redis_pool_wait_s=0.05)
    with LiveService(settings) as s:
        s.wait_version(version)

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(base_url=s.url, timeout=20.0, limits=limits) as c:
                return await asyncio.gather(*[c.post(ROUTE.format(users[i % len(users)]), json={"top_k": 3})
                                              for i in range(64)])

        responses = []
        for _ in range(3):
            responses += asyncio.run(burst())
        codes = [x.status_code for x in responses]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) > 0
        for x in responses:
            if x.status_code == 503:
                assert x.headers["retry-after"] and "unavailable" in x.json()["detail"]
        assert s.client.get("/readyz").status_code == 200
        assert s.thread.is_alive()
    r.close()
