"""The service's hot-path shortcuts give the reference answers.

* The fast path of POST /users/{id}/tags (service/middleware.py) answers byte for byte
  like the FastAPI route (`MVKE_FAST_PATH=false`), on a real tiny service (the `served`
  fixture of tests/conftest.py: `mvke serve` in a subprocess, a private redis-server).
* The fast path's body parser accepts only what pydantic's `TagRequest` accepts, with the same values.
* The dynamic batcher (deque + one timer per request) coalesces, sheds and times out.
"""
from __future__ import annotations

import json

import pytest

from loadtest.harness import Server, scan_user_ids


def test_fast_path_answers_exactly_like_fastapi(served):
    """Status, headers and body bytes of the fast path == the FastAPI route (MVKE_FAST_PATH=false)."""
    import httpx
    tiny_service, redis_server = served
    uid = scan_user_ids(redis_server.url)[0]
    bodies = [None, {}, {"top_k": 5}, {"top_k": 3, "tasks": ["intention"]}, {"top_k": 0}, {"top_k": "5"},
              {"top_k": True}, {"min_score": 0.5, "top_k": 50}, {"min_score": 1}, {"exclude_tags": ["nope"]},
              {"topk": 1}, {"top_k": 1000}, {"tasks": []}, {"tasks": ["x"]}, {"features": {"zzz": 1}},
              {"features": {"age_bucket": "age1"}, "top_k": 2}, {"features": {"age_bucket": ["a"]}},
              {"features": {"clicked_tags": 17}}, {"features": {"clicked_tags": ["t0001", 3]}, "top_k": 4}]
    raws = [(b"{bad", "application/json"), (b"null", "application/json"), (b"[]", None), (b'{"top_k": 2}', None),
            (b'{"top_k": 2}', "text/plain"), (b'{"top_k": 2}', "application/json; charset=utf-8"),
            (b'{"top_k": 99999999999999999999999}', "application/json"), (b"\xff", "application/json")]

    def answers(url: str) -> list:
        out = []
        with httpx.Client(base_url=url, timeout=10) as c:
            for user in (uid, "nobody-here", "x" * 129):
                for b in bodies:
                    out.append(c.post(f"/users/{user}/tags", json=b) if b is not None else c.post(f"/users/{user}/tags"))
            for raw, ct in raws:
                out.append(c.post(f"/users/{uid}/tags", content=raw, headers={"content-type": ct} if ct else {}))
            out.append(c.get(f"/users/{uid}/tags"))
        return [(r.status_code, r.content, sorted((k, v) for k, v in r.headers.items()
                                                  if k not in ("date", "x-request-id"))) for r in out]
    fast = answers(tiny_service.url)
    with Server.service(redis_server.url, workers=1, env={"MVKE_FAST_PATH": "false"}) as slow_service:
        slow = answers(slow_service.url)
    assert [a[0] for a in fast].count(200) >= 8
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert a == b, (i, a, b)


BODIES = [{}, {"top_k": 5}, {"top_k": 0}, {"top_k": "5"}, {"top_k": True}, {"top_k": 2.0}, {"top_k": None},
          {"tasks": ["a", "b"]}, {"tasks": []}, {"tasks": "a"}, {"tasks": [1]}, {"min_score": 0}, {"min_score": 1},
          {"min_score": 0.5}, {"min_score": 1.5}, {"min_score": -0.1}, {"min_score": "0.5"}, {"min_score": False},
          {"exclude_tags": []}, {"exclude_tags": ["x"]}, {"exclude_tags": None}, {"exclude_tags": ["x"] * 2001},
          {"features": {}}, {"features": {"a": "x", "b": 3, "c": 1.5, "d": ["p", 2, 0.5]}}, {"features": None},
          {"features": {"a": True}}, {"features": {"a": None}}, {"features": {"a": [None]}}, {"features": {"a": {}}},
          {"features": ["a"]}, {"extra": 1}, {"top_k": 3, "tasks": ["i"], "min_score": 0.2, "exclude_tags": ["t"],
                                            "features": {"g": "m"}}]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: json.dumps(b)[:60])
def test_fast_body_parser_agrees_with_pydantic(body):
    """Whatever the fast path accepts, pydantic accepts with the same values; the rest falls back."""
    from pydantic import ValidationError

    from service.middleware import parse_fast
    from service.schemas import TagRequest
    fast = parse_fast(body)
    if fast is None:
        return  # FastAPI handles it (and produces its own error or result)
    try:
        model = TagRequest.model_validate(body)
    except ValidationError as e:
        pytest.fail(f"fast path accepted a body pydantic rejects: {e}")
    for name in ("top_k", "tasks", "min_score", "exclude_tags", "features"):
        a, b = getattr(fast, name), getattr(model, name)
        assert a == b and type(a) is type(b), (name, a, b)
        if name == "features" and a:
            assert all(type(a[k]) is type(b[k]) for k in a)


def test_fast_body_parser_accepts_the_common_bodies():
    from service.middleware import parse_fast
    for body in ({}, {"top_k": 20}, {"top_k": 5, "tasks": ["interest"], "min_score": 0.1, "exclude_tags": ["t"]},
                 {"features": {"age_bucket": "a3", "clicked_tags": ["t1", "t2"]}}):
        assert parse_fast(body) is not None, body


def test_batcher_coalesces_sheds_and_times_out():
    import asyncio

    from service.batcher import DynamicBatcher
    from service.metrics import ServiceMetrics
    from service.tagger import ServiceError, TagJob

    class SlowTagger:
        def __init__(self):
            self.batches: list[int] = []
            self.gate = asyncio.Event()

        async def process(self, jobs):
            self.batches.append(len(jobs))
            await self.gate.wait()
            return [f"ok:{j.user_id}" for j in jobs]

    def job(uid: str) -> TagJob:
        return TagJob(uid, None, 5, ["interest"], None, [])

    async def scenario():
        tagger, metrics = SlowTagger(), ServiceMetrics()
        b = DynamicBatcher(tagger, metrics, max_batch_size=4, max_wait_ms=0, max_queue=6, timeout_s=0.3)
        await b.start()
        first = asyncio.ensure_future(b.submit(job("a")))          # taken alone, then blocks in process
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(b.submit(job(f"u{i}"))) for i in range(6)]  # queued (max_queue 6)
        await asyncio.sleep(0.01)
        with pytest.raises(ServiceError) as full:
            await b.submit(job("over"))
        assert full.value.status == 503 and "overloaded" in full.value.message
        rest[0].cancel()                                           # its caller went away
        tagger.gate.set()
        assert await first == "ok:a"
        got = await asyncio.gather(*rest[1:])
        assert got == [f"ok:u{i}" for i in range(1, 6)]
        assert tagger.batches[0] == 1 and max(tagger.batches) <= 4 and sum(tagger.batches) == 6
        # a request stuck longer than timeout_s gets a 503 and the timer is counted
        tagger.gate.clear()
        with pytest.raises(ServiceError) as slow:
            await b.submit(job("slow"))
        assert slow.value.status == 503 and "timed out" in slow.value.message
        tagger.gate.set()
        await b.stop()
        samples = {(s.name, s.labels.get("reason")): s.value for m in metrics.registry.collect() for s in m.samples}
        assert samples[("mvke_shed_total", "queue_full")] == 1 and samples[("mvke_shed_total", "timeout")] == 1

    asyncio.run(scenario())
