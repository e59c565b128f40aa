"""The service's hot-path shortcuts give the reference answers.

* The fast path of POST /users/{id}/tags (service/middleware.py) answers byte for byte
  like the FastAPI route (`MVKE_FAST_PATH=false`), on a real tiny service (the `served`
  fixture of tests/conftest.py: `mvke serve` in a subprocess, a private redis-server).
* The fast path's body parser accepts only what pydantic's `TagRequest` accepts, with the same values.
* The dynamic batcher (deque + one timer per request) coalesces, sheds and times out.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.harness import Server, scan_user_ids


@pytest.mark.integration
def test_fast_path_answers_exactly_like_fastapi(served):
    """Status, headers and body bytes of the fast path == the FastAPI route (MVKE_FAST_PATH=false), and of
    the Open Inference route read whole by the HTTP protocol == its ASGI path."""
    import httpx
    tiny_service, redis_server = served
    uid = scan_user_ids(redis_server.url)[0]
    bodies = [None, {}, {"top_k": 5}, {"top_k": 3, "tasks": ["intention"]}, {"top_k": 0}, {"top_k": "5"},
              {"top_k": True}, {"min_score": 0.5, "top_k": 50}, {"min_score": 1}, {"exclude_tags": ["nope"]},
              {"topk": 1}, {"top_k": 1000}, {"tasks": []}, {"tasks": ["x"]}, {"features": {"zzz": 1}},
              {"features": {"age_bucket": "age1"}, "top_k": 2}, {"features": {"age_bucket": ["a"]}},
              {"features": {"clicked_tags": 17}}, {"features": {"clicked_tags": ["t0001", 3]}, "top_k": 4},
              # pydantic's lax conversions: the fast path must convert exactly as the FastAPI route does
              {"top_k": 2.0}, {"top_k": "3"}, {"min_score": "0.25"}, {"min_score": True, "top_k": 2},
              {"features": {"age_bucket": True}, "top_k": 2}, {"features": {"age_bucket": 3}, "top_k": 2},
              {"features": {"clicked_tags": [1.0, "t0001", 2]}, "top_k": 2}, {"features": {"age_bucket": None}},
              {"features": {"clicked_tags": "t0001|t0002"}, "top_k": 2}, {"exclude_tags": None},
              {"tasks": ["interest", "interest"], "top_k": 1}, {"features": {"age_bucket": "\u00e9\u4e2d"}}]
    raws = [(b"{bad", "application/json"), (b"null", "application/json"), (b"[]", None), (b'{"top_k": 2}', None),
            (b'{"top_k": 2}', "text/plain"), (b'{"top_k": 2}', "application/json; charset=utf-8"),
            (b'{"top_k": 99999999999999999999999}', "application/json"), (b"\xff", "application/json"),
            (b'{"top_k": 2, "top_k": 3}', "application/json"), (b'{"features": {"age_bucket": 1e400}}', "application/json"),
            (b'{"features": {"age_bucket": NaN}}', "application/json"), (b'{"top_k": 1e0}', "application/json"),
            (b'{"features": {"age_bucket": 123456789012345678901234567890}}', "application/json"),
            (b'{"features": {"age_bucket": "\\ud800"}}', "application/json"), (b' {"top_k": 2} ', "application/json"),
            (b'{"top_k": 2}\n{"top_k": 3}', "application/json")]

    def tensor(users):
        return {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [len(users)], "data": users}]}
    oip = [("/v2/models/mvke/infer", tensor([uid])), ("/v2/models/mvke/infer", {**tensor([uid]), "parameters": {"top_k": 3}}),
           ("/v2/models/nope/infer", tensor([uid])), ("/v2/models/mvke/infer", tensor(["nobody-here"])),
           ("/v2/models/mvke/versions/nope/infer", tensor([uid])), ("/v2/models/mvke/infer", {"inputs": []}),
           ("/v2/models/mvke/infer", {**tensor([uid]), "parameters": {"top_k": "x"}})]

    def answers(url: str) -> list:
        out = []
        with httpx.Client(base_url=url, timeout=10) as c:
            for user in (uid, "nobody-here", "x" * 129):
                for b in bodies:
                    out.append(c.post(f"/users/{user}/tags", json=b) if b is not None else c.post(f"/users/{user}/tags"))
            for raw, ct in raws:
                out.append(c.post(f"/users/{uid}/tags", content=raw, headers={"content-type": ct} if ct else {}))
            out.append(c.get(f"/users/{uid}/tags"))
            for path, doc in oip:     # Open Inference inference: answers and errors in the protocol's shape
                out.append(c.post(path, json=doc))
            out.append(c.post("/v2/models/mvke/infer", content=b"{bad", headers={"content-type": "application/json"}))
        # headers in the order sent (a per-request id and the date are only placeholders)
        return [(r.status_code, r.content, [(k, b"*" if k in (b"date", b"x-request-id") else v)
                                            for k, v in r.headers.raw]) for r in out]
    fast = answers(tiny_service.url)
    # the reference also without the idle session (MVKE_ORT_IDLE_THREADS=1): the fast path's lone requests run
    # the fused graph on 2 threads (the idle bypass), the reference's on 1, and the bytes must not differ
    with Server.service(redis_server.url, workers=1, env={"MVKE_FAST_PATH": "false",
                                                          "MVKE_ORT_IDLE_THREADS": "1"}) as slow_service:
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


KINDS = {"a": "cat", "b": "cat", "c": "cat", "d": "multi", "g": "multi"}   # the stand-in model's fields


@pytest.fixture(scope="module")
def edge():
    """EdgeMiddleware in front of a stand-in for FastAPI, with a stand-in service whose `tag` echoes the job."""
    from types import SimpleNamespace

    from service.metrics import ServiceMetrics
    from service.middleware import EdgeMiddleware
    from service.settings import Settings
    from service.tagger import TagResult

    names = ["a", "b", "c", "d", "g"]
    schema = SimpleNamespace(names=names, fields=[SimpleNamespace(kind=KINDS[n], max_len=5) for n in names],
                             position={n: i for i, n in enumerate(names)}, value_ids=[{} for _ in names])
    model = SimpleNamespace(manifest=SimpleNamespace(task_names=["i", "a", "b"]), sides={"i": 0, "a": 0, "b": 0},
                            tag_index={"t": 0, "x": 1}, schema=schema)

    async def tag(job):
        q = job.query
        return TagResult(job.user_id, "v", "m", "store", {t: [(f"k{q.top_k}", q.min_score or 0.0)] for t in q.tasks})
    svc = SimpleNamespace(settings=Settings(log_level="WARNING"), tagger=SimpleNamespace(model=lambda: model), tag=tag,
                          registry=SimpleNamespace(route=lambda user_id, pinned=None: model, last_error=None))
    downstream = []

    async def fastapi_stand_in(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        downstream.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"fastapi"})
    app = SimpleNamespace(state=SimpleNamespace(svc=svc))
    return EdgeMiddleware(fastapi_stand_in, ServiceMetrics(), 65536, False), app, downstream


def _call(edge, body: bytes | None, chunks: int = 1) -> tuple[int, bytes, list[bytes]]:
    import asyncio
    middleware, app, downstream = edge
    downstream.clear()
    parts = [b""] if body is None else [body[len(body) * i // chunks:len(body) * (i + 1) // chunks]
                                        for i in range(chunks)]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "method": "POST", "path": "/users/u1/tags", "app": app, "root_path": "",
             "headers": [(b"content-type", b"application/json")] if body is not None else []}
    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), list(downstream)


@pytest.mark.parametrize("body", BODIES, ids=lambda b: json.dumps(b)[:60])
def test_fast_path_serves_what_the_schema_accepts_and_replays_the_rest(edge, body):
    """The fast path validates with TagRequest itself: a body the schema (and the model) accepts is served
    without FastAPI; any other reaches FastAPI with its bytes unchanged, even when it came in chunks."""
    from pydantic import ValidationError

    from mvke.runtime.feature_values import value_problem
    from service.schemas import TagRequest
    raw = json.dumps(body).encode()
    try:
        req = TagRequest.model_validate_json(raw)
    except ValidationError:
        req = None
    model_ok = req is not None and (req.top_k or 20) <= 200 and set(req.tasks or ["i"]) <= {"i", "a", "b"} \
        and set(req.exclude_tags) <= {"t", "x"} and set(req.features or {}) <= {"a", "b", "c", "d", "g"} \
        and not any(value_problem(KINDS[n], v) for n, v in (req.features or {}).items()) and req.features != {}
    for chunks in (1, 3):
        status, out, downstream = _call(edge, raw, chunks)
        if req is None:
            assert (status, out, downstream) == (299, b"fastapi", [raw])
        elif model_ok:
            assert status == 200 and not downstream
            doc = json.loads(out)
            assert doc["user_id"] == "u1" and set(doc["tasks"]) == set(dict.fromkeys(req.tasks or ["i", "a", "b"]))
        else:
            assert status == 422 and not downstream and json.loads(out)["field"]


def test_fast_path_serves_a_request_without_body(edge):
    status, out, downstream = _call(edge, None)
    assert status == 200 and not downstream and json.loads(out)["tasks"]["i"] == [{"tag": "k20", "score": 0.0}]


def _job(uid: str):
    """A tagging job for the batcher tests (the fake taggers never read its query)."""
    from mvke.runtime.model import Query
    from service.tagger import TagJob
    return TagJob(uid, None, Query(("interest",), 5))


class YieldingTagger:
    """Like the real one, the feature fetch yields to the event loop (requests arriving meanwhile queue);
    records each call's (batch size, idle)."""

    def __init__(self):
        self.calls: list[tuple[int, bool]] = []

    async def process(self, jobs, idle=False):
        import asyncio
        self.calls.append((len(jobs), idle))
        await asyncio.sleep(0)
        return ["ok"] * len(jobs)


def test_batcher_coalesces_sheds_and_times_out():
    import asyncio

    from service.batcher import DynamicBatcher
    from service.metrics import ServiceMetrics
    from service.tagger import ServiceError

    class SlowTagger:
        def __init__(self):
            self.batches: list[int] = []
            self.tasks: list = []
            self.gate = asyncio.Event()
            self.idle: list[bool] = []

        async def process(self, jobs, idle=False):
            self.batches.append(len(jobs))
            self.idle.append(idle)
            self.tasks.append(asyncio.current_task())
            await self.gate.wait()
            return [f"ok:{j.user_id}" for j in jobs]

    async def scenario():
        tagger, metrics = SlowTagger(), ServiceMetrics()
        b = DynamicBatcher(tagger, metrics, max_batch_size=4, max_wait_ms=0, max_queue=6, timeout_s=0.3)
        await b.start()
        first = asyncio.ensure_future(b.submit(_job("a")))          # model idle: runs inline, blocks in process
        await asyncio.sleep(0.01)
        assert tagger.tasks == [first]                              # in the request's own task, not the worker's
        rest = [asyncio.ensure_future(b.submit(_job(f"u{i}"))) for i in range(6)]  # queued (max_queue 6)
        await asyncio.sleep(0.01)
        assert tagger.batches == [1]                                # the worker waits for the inline batch
        with pytest.raises(ServiceError) as full:
            await b.submit(_job("over"))
        assert full.value.status == 503 and "overloaded" in full.value.message
        rest[0].cancel()                                           # its caller went away
        tagger.gate.set()
        assert await first == "ok:a"
        got = await asyncio.gather(*rest[1:])
        assert got == [f"ok:u{i}" for i in range(1, 6)]
        assert tagger.batches[0] == 1 and max(tagger.batches) <= 4 and sum(tagger.batches) == 6
        assert tagger.batches[1] == 4 and all(t is not first for t in tagger.tasks[1:])   # queued ones: batched
        # a request stuck longer than timeout_s gets a 503 and the timer is counted
        tagger.gate.clear()
        with pytest.raises(ServiceError) as slow:
            await b.submit(_job("slow"))
        assert slow.value.status == 503 and "timed out" in slow.value.message   # inline: the watchdog's 503
        gone = asyncio.ensure_future(b.submit(_job("gone")))        # inline, then its caller goes away:
        await asyncio.sleep(0.01)
        gone.cancel()                                              # a cancellation, not a timeout
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert not b._running                                      # the model is free again
        tagger.gate.set()
        await b.stop()
        samples = {(s.name, s.labels.get("reason")): s.value for m in metrics.registry.collect() for s in m.samples}
        assert samples[("mvke_shed_total", "queue_full")] == 1 and samples[("mvke_shed_total", "timeout")] == 1
        # MVKE_IDLE_BYPASS=false (or a max_wait_ms): even a lone request goes through the worker
        for kw in ({"max_wait_ms": 0, "idle_bypass": False}, {"max_wait_ms": 1, "idle_bypass": True}):
            tagger = SlowTagger()
            tagger.gate.set()
            b = DynamicBatcher(tagger, ServiceMetrics(), max_batch_size=4, max_queue=6, timeout_s=0.3, **kw)
            await b.start()
            lone = asyncio.ensure_future(b.submit(_job("z")))
            assert await lone == "ok:z" and tagger.tasks == [b._task] and tagger.idle == [False]
            await b.stop()

    asyncio.run(scenario())


def test_idle_bypass_keeps_closed_loop_clients_batched():
    """Clients that send their next request as soon as they have an answer (a closed loop, as at c=32):
    the first one back must not find the batcher 'idle' and run alone while the others queue behind it
    (the bypass is for a request with no other request anywhere in the batcher)."""
    import asyncio

    from service.batcher import DynamicBatcher
    from service.metrics import ServiceMetrics

    async def scenario():
        tagger = YieldingTagger()
        b = DynamicBatcher(tagger, ServiceMetrics(), max_batch_size=4, max_wait_ms=0, max_queue=100, timeout_s=1)
        await b.start()

        async def client(k: int):
            for i in range(5):
                assert await b.submit(_job(f"{k}-{i}")) == "ok"
        await asyncio.gather(*(client(k) for k in range(4)))
        alone = asyncio.ensure_future(b.submit(_job("alone")))
        assert await alone == "ok"
        await b.stop()
        return [n for n, _ in tagger.calls]

    batches = asyncio.run(scenario())
    # the first request runs inline (nobody else yet), then full batches; the lone request at the end inline
    assert batches == [1, 4, 4, 4, 4, 3, 1], batches


def test_idle_threads_only_after_a_streak_of_lone_requests():
    """`rank(idle=True)` (the idle session's threads) is asked only by a request running inline after
    IDLE_STREAK requests in a row found the batcher idle; one request that queues starts the count again,
    and batches from the worker never ask it."""
    import asyncio

    from service.batcher import IDLE_STREAK, DynamicBatcher
    from service.metrics import ServiceMetrics

    async def scenario():
        tagger, metrics = YieldingTagger(), ServiceMetrics()
        b = DynamicBatcher(tagger, metrics, max_batch_size=4, max_wait_ms=0, max_queue=100, timeout_s=1)
        await b.start()
        for i in range(IDLE_STREAK + 2):                           # one at a time, as at c=1
            await b.submit(_job(f"a{i}"))
        lone = [idle for _, idle in tagger.calls]
        assert lone == [False] * (IDLE_STREAK - 1) + [True] * 3, lone
        tagger.calls.clear()
        await asyncio.gather(b.submit(_job("p")), b.submit(_job("q")), b.submit(_job("r")))   # two of them queue
        await b.submit(_job("after"))
        await b.stop()
        counted = {s.name: s.value for m in metrics.registry.collect() for s in m.samples}
        assert counted["mvke_idle_calls_total"] == 4           # the 3 lone ones past the streak and "p": /metrics
        return tagger.calls

    calls = asyncio.run(scenario())
    # the first of the three runs inline (streak 17: idle), the other two queue (batch of 2, never idle)
    # and reset the count: the next lone request does not take the idle threads
    assert calls == [(1, True), (2, False), (1, False)], calls


def test_idle_threads_wait_for_the_other_workers_to_be_idle(tmp_path):
    """With a busy board (`mvke serve` with 2+ workers), a request counts as lone only while every other
    worker's slot reads 0: with the other worker busy no call asks for the idle threads, however long
    the streak of requests that found this batcher idle; once it is idle, IDLE_STREAK more do. This
    worker's own requests in flight are written to its slot while they run, 0 after."""
    import asyncio

    from service.batcher import IDLE_STREAK, DynamicBatcher
    from service.busy_board import SLOT, BusyBoard, create_board
    from service.metrics import ServiceMetrics

    path = create_board(2)
    try:
        board = BusyBoard(path)
        other = 1 - board._own
        seen_own: list[int] = []

        class PeekingTagger(YieldingTagger):
            async def process(self, jobs, idle=False):
                seen_own.append(path.read_bytes()[board._own * SLOT])
                return await super().process(jobs, idle)

        def set_other(n: int) -> None:      # what the other worker's set_inflight writes
            with open(path, "r+b") as f:
                f.seek(other * SLOT)
                f.write(bytes([n]))

        async def scenario():
            tagger = PeekingTagger()
            b = DynamicBatcher(tagger, ServiceMetrics(), max_batch_size=4, max_wait_ms=0, max_queue=100,
                               timeout_s=1, board=board)
            await b.start()
            set_other(1)
            for i in range(2 * IDLE_STREAK):
                await b.submit(_job(f"busy{i}"))
            set_other(0)
            for i in range(IDLE_STREAK + 1):
                await b.submit(_job(f"idle{i}"))
            after = path.read_bytes()[board._own * SLOT]
            await b.stop()
            return [idle for _, idle in tagger.calls], after

        calls, after = asyncio.run(scenario())
        assert calls == [False] * (2 * IDLE_STREAK + IDLE_STREAK - 1) + [True] * 2, calls
        assert set(seen_own) == {1}, seen_own                   # its own request, shown while it ran
        assert after == 0
    finally:
        path.unlink()


def test_busy_board_slots_are_claimed_once_and_taken_over_after_a_worker_dies(tmp_path):
    """Each worker claims its own slot (a lock on its byte range); a worker killed with requests in flight
    leaves its count behind until a new worker claims the freed slot and clears it."""
    import subprocess
    import sys

    from service.busy_board import BusyBoard, create_board

    worker = ("import sys; from service.busy_board import BusyBoard; b = BusyBoard(sys.argv[1]); "
              "print(b._own, flush=True)\n"
              "for line in sys.stdin: b.set_inflight(int(line)); print('ok', flush=True)")
    path = create_board(2)
    procs = []
    try:
        def start():
            p = subprocess.Popen([sys.executable, "-c", worker, str(path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[2]))
            procs.append(p)
            return p, int(p.stdout.readline())

        first, slot = start()
        board = BusyBoard(path)                     # this process: the other slot
        assert board._own == 1 - slot
        assert board.others_idle()
        first.stdin.write("2\n"); first.stdin.flush(); first.stdout.readline()
        assert not board.others_idle()
        first.kill(); first.wait()
        assert not board.others_idle()              # its count stays behind it ...
        _, again = start()                          # ... until a new worker takes its slot
        assert again == slot
        assert board.others_idle()
        board.close()
    finally:
        for p in procs:
            p.kill(); p.wait()
        path.unlink()
