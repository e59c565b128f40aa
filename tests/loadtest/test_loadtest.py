"""Load-test tooling.

* `loadtest.run` (locust, headless) for ~3 s against a real tiny service
  (`mvke serve` in a subprocess, a private redis-server, the tiny bundle of
  tests/fixtures/model_fixtures.py): CSV, HTML and PNG written, summary parses.
* `loadtest.loadgen` (the bench's client) against the same service.
* `loadtest.bench`'s report from a canned result (no servers).
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from loadtest.harness import UserSampler, make_requests, parse_mix, run_load


# ---------------------------------------------------------------------------
# a real tiny service
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_service(served):
    return served[0]


@pytest.fixture(scope="module")
def lt_redis(served):
    return served[1]


@pytest.mark.integration
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


@pytest.mark.integration
def test_locust_mixes_events_with_tag_requests(tiny_service, lt_redis, tmp_path):
    """The event scenario (issue 22): EventUser batches to POST /events beside TagUser, both 2xx only."""
    from loadtest.run import main
    from mvke.runtime.keys import Keys
    out = tmp_path / "events"
    keys, r = Keys(), lt_redis.client()
    streams = [keys.events_stream(p) for p in range(8)]
    try:
        code = main(["--url", tiny_service.url, "--users", "4", "--duration", "3s", "--out", str(out),
                     "--redis", lt_redis.url, "--profile", "smoke", "--events-share", "0.5", "--events-batch", "20"])
        assert code == 0, (out / "locust.log").read_text()[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert {"/events", "/users/[id]/tags"} <= set(summary["by_name"]), summary["by_name"]
        assert summary["error_rate"] == 0.0, summary["failures_by_error"]
        assert sum(r.xlen(s) for s in streams) >= 20
    finally:
        r.delete(*streams)      # the shared store stays as the other tests expect it
        r.close()


@pytest.mark.integration
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


@pytest.mark.integration
def test_straightforward_endpoint_answers_like_the_service(tiny_service, lt_redis, bundle):
    """The bench's reference endpoint (loadtest/straight_app.py) must really tag users: a broken one
    answers errors fast and would pass for a fast endpoint in the c=1 table."""
    import httpx

    from loadtest.harness import Server, scan_user_ids
    ids = scan_user_ids(lt_redis.url)[:5]
    env = {"REDIS_URL": lt_redis.url, "MVKE_STRAIGHT_BUNDLE": str(bundle("mvke-mt")), "OPENBLAS_NUM_THREADS": "1"}
    with Server.asgi("loadtest.straight_app:app", env=env) as straight:
        for uid in ids:
            want = httpx.post(f"{tiny_service.url}/users/{uid}/tags", json={"top_k": 5}).json()
            got = httpx.post(f"{straight.url}/users/{uid}/tags", json={"top_k": 5})
            assert got.status_code == 200, got.text
            for task, tags in want["tasks"].items():
                assert [t["tag"] for t in got.json()["tasks"][task]] == [t["tag"] for t in tags]
                np.testing.assert_allclose([t["score"] for t in got.json()["tasks"][task]],
                                           [t["score"] for t in tags], atol=1e-5)


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
    assert "per machine" not in text                      # all met: no note

    # a machine slower than the one the targets were set on: the FAIL says they are per machine and how to set them
    res["rows"][1] = row("service mvke-mt (2w)", 32, 900, 30, 80)
    slow, checks = report(res, targets)
    assert not all(c["ok"] for c in checks)
    assert "per machine" in slow and "--targets YOUR_FILE --profile NAME" in slow and "loadtest.bench" in slow


def test_run_fail_note_names_the_file_and_profile():
    from loadtest.run import check_targets, targets_note
    checks = check_targets({"qps": 10.0, "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0, "error_rate": 0.0},
                           {"min_qps": 3000})
    assert checks[0]["ok"] is False
    note = targets_note("loadtest/targets.yaml", "locust")
    assert "loadtest/targets.yaml" in note and "'locust'" in note and "per machine" in note




def test_bench_command_lines_parse():
    """Every documented bench command line parses (one parser for the table, the curve and the soak)."""
    from loadtest.bench import build_parser
    p = build_parser()
    a = p.parse_args(["--tags", "1780,20000", "--rounds", "2", "--duration", "3"])
    assert a.tags == [1780, 20000] and a.rounds == 2 and a.duration == 3
    assert p.parse_args(["--quick", "--baseline", "/tmp/base", "--rounds", "3"]).baseline == "/tmp/base"
    assert p.parse_args(["--soak-only", "--soak", "60"]).soak == 60


def test_catalogue_report_from_a_canned_result():
    """`python -m loadtest.bench --tags ...`'s tables, from a canned result (no servers)."""
    from loadtest.catalogue import AFTER, BEFORE, STRAIGHT, report

    def mode(qps, p50, errors=None):
        return {"load_s": 1.0, "p50_c1_ms": p50, "p99_c1_ms": 2 * p50, "qps_c32": qps, "p50_c32_ms": 5.0,
                "p99_c32_ms": 20.0, "errors_c1": {}, "errors_c32": errors or {}, "rss_mb": [120.0],
                "tag_all_users_s": 1000.0}
    sizes = [{"tags": 1780, "export_s": 30, "bundle_mb": 4.0, "recall_at_20": 1.0, "publish_s": 1.0,
              "off": mode(2000, 1.0), "on": mode(100, 3.0, {"503": 7})}]
    c1 = {name: {"p50_c1": p50, "p99_c1": 5.0, "qps_c32": 1500, "p99_c32": 30.0, "not_200": bad}
          for name, p50, bad in ((BEFORE, 1.2, 0), (AFTER, 0.8, 0), (STRAIGHT, 1.0, 3))}
    text = report({"sizes": sizes, "c1": c1}, {"nproc": 2, "cpu": "cpu"}, [1, 2, 3], [4, 5, 6], "now", "--tags 1780", 1)
    assert "| 1,780 | exact | 2,000 | 1.00 |" in text and "c32 {'503': 7}" in text
    assert "| 1,780 | ANN / exact | 0.1x | 3.00x |" in text
    assert f"| {AFTER} | 0.80 | 5.00 | 1,500 | 30.0 | 0.80 | 0 |" in text
    assert f"| {STRAIGHT} | 1.00 | 5.00 | 1,500 | 30.0 | 1.00 | 3 |" in text


def test_ab_baseline_bundle_keeps_only_the_fields_the_baseline_knows(tmp_path):
    """loadtest.ab serves one bundle to an older checkout: fields it does not know are dropped only when empty."""
    import json

    from loadtest.ab import baseline_bundle
    old = tmp_path / "old"
    (old / "model_export").mkdir(parents=True)
    (old / "model_export" / "__init__.py").write_text("")
    (old / "model_export" / "contract.py").write_text(
        "from dataclasses import dataclass\n@dataclass\nclass Manifest:\n    version: str\n    files: dict\n")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "blob.f32").write_bytes(b"\0" * 8)
    (bundle / "manifest.json").write_text(json.dumps({"version": "v1", "files": {"blob.f32": "x"}, "ann": None}))
    out = baseline_bundle(bundle, old, tmp_path / "copy")
    assert json.loads((out / "manifest.json").read_text()) == {"version": "v1", "files": {"blob.f32": "x"}}
    assert (out / "blob.f32").read_bytes() == b"\0" * 8
    (bundle / "manifest.json").write_text(json.dumps({"version": "v1", "files": {}, "ann": {"index": "faiss"}}))
    with pytest.raises(SystemExit, match="ann"):
        baseline_bundle(bundle, old, tmp_path / "copy")


@pytest.mark.integration
def test_scoring_bench_measures_both_paths_on_the_same_answer(bundle, tmp_path):
    """scripts/scoring_bench.py on the tiny bundle: both variants measured per batch size, the fused graph's
    top 20 the same as numpy's, and its table written between the markers with the text around them kept."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    md, out = tmp_path / "scoring.md", tmp_path / "scoring.json"
    md.write_text("# kept heading\n\n<!-- scoring:begin -->\nold\n<!-- scoring:end -->\n\nkept tail\n")
    res = subprocess.run([sys.executable, "scripts/scoring_bench.py", "--bundles", str(bundle("mvke-mt")),
                          "--batches", "1,4", "--rounds", "2", "--block-s", "0.01", "--json", str(out), "--md", str(md)],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    (cat,) = doc["catalogues"]
    assert [r["batch"] for r in cat["batches"]] == [1, 4]
    for r in cat["batches"]:
        assert r["numpy_users_s"] > 0 and r["fused_users_s"] > 0 and len(r["rounds"]["fused"]) == 2
        assert r["top20_agreement"] == 1.0
    text = md.read_text()
    assert text.startswith("# kept heading") and text.rstrip().endswith("kept tail") and "\nold\n" not in text
    assert f"| {cat['tags']:,} | 4 |" in text and doc["cpu"] in text


def test_apply_lower_bounds_keep_the_real_functions_reply(tmp_path):
    """loadtest/apply_floor.py's variants answer like the real apply function: `floor` counts the same
    applied events and duplicates and the same counters; `noop` touches no key."""
    from loadtest.apply_floor import VARIANTS, using_library
    from loadtest.events_bench import RULES, make_events
    from mvke.localredis import LocalRedis
    from mvke.runtime import event_apply
    from mvke.runtime.events import EventRules
    from mvke.runtime.keys import Keys
    rules = EventRules.from_dict(RULES)
    events = make_events([f"u{i}" for i in range(30)], 400, "lb", seed=3)
    server = LocalRedis().start()
    libraries = {"real": event_apply.APPLY_LIBRARY, **VARIANTS}
    try:
        r = server.client()
        seen: dict[str, tuple] = {}
        for name in ("real", "floor", "noop"):
            keys = Keys(f"lb-{name}")
            with using_library(libraries[name]):
                applier = event_apply.EventApplier(r, keys, rules, apply="function")
            assert (name == "real") == (applier.library == event_apply.apply_library(rules.to_lua())[1])
            first, again = applier.apply(events), applier.apply(events[:100])
            counters = [r.hmget(keys.user(u), ["impressions_n", "clicks_n", "conversions_n"])
                        for u in sorted({e.user_id for e in events})]
            seen[name] = (first.applied, first.duplicate, again.duplicate, counters)
        assert seen["real"][:3] == (400, 0, 100) and seen["floor"] == seen["real"]
        assert seen["noop"][0] == 400 and seen["noop"][3] == [[None] * 3] * 30
    finally:
        server.stop()


def test_events_bench_variant_names():
    """`real-uN` means N users per call for N >= 1 only (what the consumer accepts); `real-u0` and bare
    numbers are refused before any run starts."""
    from loadtest.events_bench import ROOT, main, users_per_call, variant_consumer
    assert users_per_call("real-u16") == 16 and variant_consumer("real-u16", None) == (ROOT, "real", ("--users-per-call", "16"))
    assert users_per_call("real-u0") is None and users_per_call("16") is None and users_per_call("real") is None
    for bad in ("real-u0", "16", "real-ux"):
        with pytest.raises(SystemExit):
            main(["--work", "/nonexistent/never-made", "--event-rate", "100", "--variants", f"real,{bad}"])
