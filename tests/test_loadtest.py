"""Load-test tooling and the service's hot-path shortcuts.

* `loadtest.run` (locust, headless) for ~3 s against a real tiny service
  (`mvke serve` in a subprocess, a private redis-server, the tiny bundle of
  tests/fixtures/model_fixtures.py): CSV, HTML and PNG written, summary parses.
* `loadtest.loadgen` (the bench's client) against the same service.
* The hot-path shortcuts give the reference results: the batch encoder of
  feature-store rows vs `FeatureSchema.encode_rows`, `top_k_logits` vs `top_k`,
  the fast path's body parser vs pydantic's `TagRequest`.
* `loadtest.bench`'s report from a canned result (no servers).
"""
from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest

from loadtest.harness import Server, UserSampler, make_requests, parse_mix, run_load


# ---------------------------------------------------------------------------
# a real tiny service
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lt_redis():
    from mvke.localredis import LocalRedis
    server = LocalRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_service(lt_redis, bundle, dataset_dir):
    from model_export.feature_store import load_dataset_users
    from model_export.publish import publish
    r = lt_redis.client()
    publish(bundle("mvke-mt"), r)
    assert load_dataset_users(dataset_dir("synthetic"), r, progress=False).loaded > 0
    r.close()
    with Server.service(lt_redis.url, workers=1, env={"MVKE_MODEL_POLL_S": "5"}) as s:
        yield s


def test_locust_run_writes_reports(tiny_service, lt_redis, tmp_path):
    from loadtest.run import main
    out = tmp_path / "run"
    code = main(["--url", tiny_service.url, "--users", "4", "--duration", "3s", "--out", str(out),
                 "--redis", lt_redis.url, "--profile", "smoke", "--new-share", "0.2", "--zipf", "1.1"])
    assert code == 0, (out / "locust.log").read_text()[-3000:]
    for name in ("locust_stats.csv", "locust_stats_history.csv", "report.html", "timeline.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in (out / "report.html").read_text()[:5000].lower()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["qps"] > 0 and summary["pass"] is True
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert summary["error_rate"] == 0.0, summary["failures_by_error"]
    assert "/users/[new]/tags" in summary["by_name"], "no request for a user outside the store"
    rows = list(csv.DictReader(open(out / "locust_stats.csv")))
    assert any(r["Name"] == "Aggregated" for r in rows)


def test_loadgen_against_the_service(tiny_service, lt_redis, dataset_dir):
    from loadtest.harness import sample_features, scan_user_ids
    ids = scan_user_ids(lt_redis.url)
    assert len(ids) > 100
    reqs = make_requests(ids, 256, zipf=1.0, topk_mix="5:1,20:2", new_share=0.1,
                         feature_examples=sample_features(lt_redis.url, ids, 5))
    reqs.append(["POST", "/users/nobody-at-all/tags", None])  # a 404 in the mix
    res = run_load(tiny_service.port, reqs, concurrency=4, duration=1.0, warmup=0.3)
    assert res["requests"] > 20 and res["qps"] > 0
    assert set(res["status"]) <= {"200", "404"} and res["status"]["200"] > 0
    assert res["p50_ms"] <= res["p99_ms"] <= res["max_ms"]
    assert tiny_service.alive() and max(tiny_service.rss_mb()) > 10


def test_fast_path_answers_exactly_like_fastapi(tiny_service, lt_redis, dataset_dir):
    """Status, headers and body bytes of the fast path == the FastAPI route (MVKE_FAST_PATH=false)."""
    import httpx
    uid = next(iter(__import__("loadtest.harness", fromlist=["x"]).scan_user_ids(lt_redis.url)))
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
    with Server.service(lt_redis.url, workers=1, env={"MVKE_FAST_PATH": "false"}) as slow_service:
        slow = answers(slow_service.url)
    assert [a[0] for a in fast].count(200) >= 8
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert a == b, (i, a, b)


# ---------------------------------------------------------------------------
# request mixes
# ---------------------------------------------------------------------------
def test_request_mix_skew_and_shares():
    ids = [f"u{i:04d}" for i in range(1000)]
    uniform, skewed = UserSampler(ids, 0.0, seed=1), UserSampler(ids, 1.2, seed=1)
    top = lambda s: max(np.unique([s.draw() for _ in range(5000)], return_counts=True)[1])  # noqa: E731
    assert top(skewed) > 5 * top(uniform)
    assert parse_mix("5:0.2,20:0.6,50") == [(5, 0.2), (20, 0.6), (50, 1.0)]
    reqs = make_requests(ids, 2000, topk_mix="5:1,50:1", new_share=0.25, feature_examples=[{"gender": "g1"}])
    bodies = [json.loads(b) for _, _, b in reqs]
    new = [b for b in bodies if "features" in b]
    assert 0.2 < len(new) / len(reqs) < 0.3
    assert {b["top_k"] for b in bodies} == {5, 50}
    assert all(p.startswith("/users/new-") for (_, p, b), d in zip(reqs, bodies) if "features" in d)


def test_duration_parsing():
    from loadtest.run import parse_duration
    assert parse_duration("60s") == 60 and parse_duration("2m") == 120 and parse_duration("1m30s") == 90
    assert parse_duration("3") == 3 and parse_duration("1h") == 3600
    with pytest.raises(ValueError):
        parse_duration("soon")


# ---------------------------------------------------------------------------
# hot-path shortcuts give the reference results
# ---------------------------------------------------------------------------
def test_store_row_encoder_matches_encode_rows(dataset_dir):
    import pyarrow.parquet as pq

    from mvke.features import FeatureSchema, to_store_value
    from service.encoding import StoreRowEncoder
    meta = json.loads((dataset_dir("synthetic") / "meta.json").read_text())
    users = pq.read_table(dataset_dir("synthetic") / "users.parquet").to_pylist()
    schema = FeatureSchema.build({k: [u[k] for u in users[:200]] for k in meta["fields"]}, meta["fields"],
                                 meta.get("max_lens"))
    rows = [{k: to_store_value(v) for k, v in u.items() if k != "user_id" and v is not None} for u in users]
    multi = schema.multi_fields[0].name
    rows[0][multi] = ""                                   # empty history
    rows[1][schema.cat_fields[0].name] = ""               # empty value
    rows[2][schema.cat_fields[0].name] = "never-seen"     # OOV
    del rows[3][schema.cat_fields[1].name]                # missing field
    rows[4][multi] = "|".join(["x", "", *schema.multi_fields[0].vocab[:3]] * 20)  # too long, blanks, OOV
    rows[5] = {}
    enc = StoreRowEncoder(schema)
    assert all(enc.accepts(r) for r in rows) and not enc.accepts({multi: ["a"]})
    for batch in (rows[:1], rows[:7], rows):
        want, got = schema.encode_rows(batch), enc.encode(batch)
        for w, g in zip(want, got):
            assert w.dtype == g.dtype and w.shape == g.shape
            np.testing.assert_array_equal(w, g)


def test_top_k_logits_ranks_like_top_k():
    from model_export.scoring import sigmoid, top_k, top_k_logits
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (9, 300)).astype(np.float32)
    for k in (1, 20, 299, 300, 1000):
        idx, best = top_k_logits(logits.copy(), k)
        ref = top_k(sigmoid(logits), k)
        for row in range(len(logits)):
            assert [t for t, _ in ref[row]] == idx[row].tolist()
            np.testing.assert_allclose([s for _, s in ref[row]], sigmoid(best[row]), rtol=0, atol=1e-7)
    excluded = logits.copy()
    excluded[:, :5] = -np.inf
    idx, best = top_k_logits(excluded, 300)
    assert not np.isfinite(best[:, -5:]).any() and set(idx[0, -5:].tolist()) == set(range(5))


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


# ---------------------------------------------------------------------------
# the bench's report
# ---------------------------------------------------------------------------
def test_bench_report_from_a_canned_result(tmp_path):
    import yaml

    from loadtest.bench import HERE, report, write_markdown

    def row(name, c, qps, p50, p99, status=None, alive=True):
        return {"row": name, "c": c, "qps": qps, "ok_qps": qps, "p50_ms": p50, "p99_ms": p99,
                "status": status or {"200": int(qps)}, "alive": alive}
    res = {"started": "now", "quick": True, "machine": {"nproc": 2, "cpu": "cpu", "python": "3", "onnxruntime": "1",
                                                        "fastapi": "0", "uvicorn": "0"},
           "load_before": [0.1, 0.2, 0.3], "load_after": [0.4, 0.5, 0.6], "duration_s": 3, "warmup_s": 1,
           "settings": {"workers": 2, "batching": True, "max_batch_size": 64, "max_wait_ms": 0, "ort_threads": 1,
                        "redis_pool_size": 64, "compute_offload_min_batch": 16, "fast_path": True},
           "rows": [row("service mvke-mt (2w)", 1, 1500, 0.6, 1.2), row("service mvke-mt (2w)", 32, 4000, 7, 20),
                    row("service mvke-mt (2w)", 256, 3500, 60, 240, {"200": 3000, "503": 500}),
                    row("service nomtl (2w)", 32, 4200, 7, 19), row("empty FastAPI (2w)", 32, 9000, 3, 8),
                    row("naive PyTorch (2w)", 32, 40, 700, 900)],
           "inprocess": {1: {"users_per_s": 3000, "ms_per_call_p50": 0.3}, 256: {"users_per_s": 20000,
                                                                                 "ms_per_call_p50": 12}},
           "steps": {1: {"fetch": 100, "encode": 20, "tower": 40, "score": 30, "rank": 10}},
           "rss_mb": {"idle": [150, 151], "after_load": [160, 161]}, "soak": None}
    targets = yaml.safe_load((HERE / "targets.yaml").read_text())["bench"]
    text, checks = report(res, targets)
    assert "| b. service mvke-mt (2w) | 32 | 4,000 |" in text
    assert "503: 500" in text and "load average before [0.1, 0.2, 0.3]" in text
    met = {c["target"].split(" ")[0]: c["ok"] for c in checks}
    assert all(c["ok"] for c in checks), checks
    assert len(checks) == 6 and met
    md = tmp_path / "perf.md"
    md.write_text("# Title\n\nhand-written notes\n")
    write_markdown(md, text)
    write_markdown(md, text.replace("4,000", "4,001"))
    out = md.read_text()
    assert "hand-written notes" in out and out.count("<!-- bench:begin -->") == 1 and "4,001" in out


# ---------------------------------------------------------------------------
# the batcher (deque + one timer per request)
# ---------------------------------------------------------------------------
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
