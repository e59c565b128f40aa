"""`python -m loadtest.bench --tags 1780,20000,100000,1000000`: the service against catalogue size.

One run, side by side per catalogue size: the service scoring every tag (MVKE_ANN=off) and
ranking the candidates of the version's index (MVKE_ANN=on): QPS at c=32, p50 at c=1, p99,
RSS per worker after the load, bundle size, export / publish / load seconds, recall@20 (the
export's gate over 1,000 users) and the ranking step of `mvke tag-all` (users/s of
batch.tag_all.rank_users, one thread, 512 users: the code tag-all's actors run per batch).
At the smallest size it also serves, interleaved over rounds, the service with numpy scoring
(the path before the fused ONNX graph), the fused path and the straightforward FastAPI + ORT +
redis-py endpoint (loadtest/straight_app.py): the c=1 latency table.

Catalogues: the mvke-mt checkpoint of `mvke pipeline` under --work (trained 1 epoch on the
default synthetic data, 1,780 tags) exported with `mvke export --synthetic-tags N --ann on`: its
trained tag tower run on synthetic tag ids (model_export/synthetic_tags.py). Everything goes
through the `mvke` command and HTTP (export, publish, features load, serve). Output:
docs/results/large_catalogues.md (+ .json).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from loadtest.harness import PY, ROOT, Server, make_requests, mvke, run_load, scan_user_ids, start_redis


def export(ck: Path, out: Path, tags: int, log) -> dict:
    if not (out / "manifest.json").exists():
        log(f"exporting {tags:,} tags to {out}")
        t0 = time.perf_counter()
        stdout = mvke("export", str(ck), "--out", str(out), "--ann", "on", "--synthetic-tags", str(tags))
        doc = json.loads(stdout[stdout.index("{"):stdout.rindex("}") + 1])
        (out.parent / f"{out.name}.export.json").write_text(json.dumps({**doc, "wall_s": time.perf_counter() - t0}))
    info = json.loads((out.parent / f"{out.name}.export.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    recall = [t.get("recall_at_k") for t in manifest.get("ann", {}).get("tasks", {}).values()]
    return {"export_s": info["export_seconds"], "bundle_mb": info["bundle_bytes"] / 1e6,
            "recall_at_20": min(recall) if recall and None not in recall else None,
            "ann_status": {k: v["status"] for k, v in manifest.get("ann", {}).get("tasks", {}).items()},
            "nprobe": {k: v.get("nprobe") for k, v in manifest.get("ann", {}).get("tasks", {}).items()}}


def tag_all_users_per_s(bundle: Path, mode: str, users: int = 512) -> float:
    """Users/s of tag-all's ranking step on the CPU (tower, then mvke.runtime's `rank`, top 20 per task,
    one batch of `users`: what batch.tag_all.rank_users runs per chunk), one thread, in a subprocess."""
    code = f"""
import time, numpy as np
from mvke.runtime.contract import read_bundle
from mvke.runtime.model import build_model
from mvke.runtime.encoded import EncodedBatch
from mvke.runtime.system import limit_threads
from mvke.runtime.features import random_users
limit_threads(1)
m, b = read_bundle("{bundle}", verify=False)
model = build_model(m, b, "cpu", ann_mode="{mode}", scoring="numpy")
cat, multi = random_users(model.schema, {users}, np.random.default_rng(0))
model.rank(EncodedBatch(cat[:64], multi[:64]), 20)
t0 = time.perf_counter(); model.rank(EncodedBatch(cat, multi), 20)
print({users} / (time.perf_counter() - t0))
"""
    res = subprocess.run([PY, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    return float(res.stdout.strip().splitlines()[-1])


def not_ok(load: dict) -> dict[str, int]:
    """A load run's answers other than 200 (status or failure kind -> count)."""
    return {k: v for k, v in load["status"].items() if k != "200"}


def serve(redis_url: str, env: dict, log_dir: Path, workers: int) -> tuple[Server, float]:
    t0 = time.perf_counter()
    svc = Server.service(redis_url, workers=workers, env=env, log=log_dir / "catalogue-service.log")
    svc.start(timeout=600)
    return svc, time.perf_counter() - t0


def run(tags: list[int], work: Path, ck: Path, data: Path, duration: float, workers: int, rounds: int, log) -> dict:
    logs = work / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    sizes, c1 = [], {}
    for n in tags:
        bundle = work / f"bundle_cat{n}"
        row = {"tags": n, **export(ck, bundle, n, log)}
        redis = start_redis()
        try:
            t0 = time.perf_counter()
            mvke("publish", str(bundle), "--redis", redis.url)
            row["publish_s"] = time.perf_counter() - t0
            mvke("features", "load", "--data", str(data), "--redis", redis.url)
            reqs = make_requests(scan_user_ids(redis.url), 8192, zipf=0.0, topk_mix="20:1", seed=1)
            for mode in ("off", "on"):
                svc, load_s = serve(redis.url, {"MVKE_ANN": mode}, logs, workers)
                try:
                    r1 = run_load(svc.port, reqs, 1, duration, 1.0)
                    r32 = run_load(svc.port, reqs, 32, duration, 1.0, grace=30.0)
                    row[mode] = {"load_s": load_s, "p50_c1_ms": r1["p50_ms"], "p99_c1_ms": r1["p99_ms"],
                                 "qps_c32": r32["qps"], "p50_c32_ms": r32["p50_ms"], "p99_c32_ms": r32["p99_ms"],
                                 "errors_c1": not_ok(r1), "errors_c32": not_ok(r32),
                                 "rss_mb": svc.rss_mb()}
                finally:
                    svc.stop()
                row[mode]["tag_all_users_s"] = tag_all_users_per_s(bundle, mode)
                log(f"{n:>9,} tags ANN {mode:3}: {row[mode]['qps_c32']:8.0f} QPS c32, p50 c1 "
                    f"{row[mode]['p50_c1_ms']:.2f} ms, p99 c32 {row[mode]['p99_c32_ms']:.1f} ms, RSS "
                    f"{row[mode]['rss_mb']} MB, tag-all {row[mode]['tag_all_users_s']:.0f} users/s")
            if n == tags[0]:
                c1 = latency_rounds(redis.url, bundle, reqs, duration, rounds, logs, log)
        finally:
            redis.stop()
        sizes.append(row)
    return {"sizes": sizes, "c1": c1}


BEFORE = "service before: numpy scoring, via the batch worker"
AFTER = "service after: fused ONNX + idle bypass (defaults)"
STRAIGHT = "straightforward FastAPI + ORT + redis-py"


def latency_rounds(redis_url: str, bundle: Path, reqs: list, duration: float, rounds: int, logs: Path, log) -> dict:
    """c=1 and c=32, interleaved rounds, of: the service as it was (numpy scoring, every request through
    the batch worker), with the fused ONNX graph only, with the fused graph and the idle bypass (the
    defaults), and the straightforward endpoint."""
    def service(env: dict) -> Server:
        return Server.service(redis_url, workers=1, env=env, log=logs / "c1.log")
    servers = {
        BEFORE: lambda: service({"MVKE_SCORING": "numpy", "MVKE_IDLE_BYPASS": "false"}),
        "service, fused ONNX, no idle bypass": lambda: service({"MVKE_SCORING": "onnx", "MVKE_IDLE_BYPASS": "false"}),
        AFTER: lambda: service({"MVKE_SCORING": "onnx", "MVKE_IDLE_BYPASS": "true"}),
        STRAIGHT: lambda: Server.asgi(
            "loadtest.straight_app:app", env={"REDIS_URL": redis_url, "MVKE_STRAIGHT_BUNDLE": str(bundle),
                                             "OPENBLAS_NUM_THREADS": "1"}, log=logs / "c1.log"),
    }
    out: dict = {name: {"p50_c1": [], "p99_c1": [], "qps_c32": [], "p99_c32": [], "not_200": []} for name in servers}
    for rnd in range(rounds):
        for name, make in servers.items():
            with make() as s:
                r1 = run_load(s.port, reqs, 1, duration, 1.0)
                r32 = run_load(s.port, reqs, 32, duration, 1.0)
            out[name]["p50_c1"].append(r1["p50_ms"])
            out[name]["p99_c1"].append(r1["p99_ms"])
            out[name]["qps_c32"].append(r32["qps"])
            out[name]["p99_c32"].append(r32["p99_ms"])
            # an endpoint that fails answers fast: its figures would pass for speed
            out[name]["not_200"].append(sum(not_ok(r1).values()) + sum(not_ok(r32).values()))
            log(f"round {rnd + 1}: {name:52} p50 c1 {r1['p50_ms']:.2f} ms, c32 {r32['qps']:.0f} QPS")
    return {name: {k: sum(v) if k == "not_200" else statistics.median(v) for k, v in d.items()} | {"rounds": d}
            for name, d in out.items()}


def report(res: dict, machine: dict, load_before, load_after, started: str, args: str, workers: int) -> str:
    lines = [f"Run {started}: `python -m loadtest.bench {args}`; {machine['nproc']} CPUs ({machine['cpu']}), load "
             f"average before {load_before}, after {load_after} (1, 5, 15 min; the machine is shared with other "
             f"helpers' jobs: absolute figures are depressed, the columns of one row are comparable). "
             f"{workers} uvicorn worker(s) per service; loadtest/loadgen.py closed loop; POST /users/<id>/tags "
             "{\"top_k\": 20}, 2 tasks (interest K=3, intention K=4, D=32). Catalogues: the trained mvke-mt "
             "(1 epoch, default synthetic data) with its tag tower run on synthetic tag ids "
             "(`mvke export --synthetic-tags N --ann on`).", "",
             "| tags | mode | QPS c32 | p50 c1 ms | p99 c32 ms | RSS/worker MB | recall@20 | tag-all users/s | "
             "load s | bundle MB | export s | publish s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["sizes"]:
        for mode, label in (("off", "exact"), ("on", "ANN")):
            r = row[mode]
            recall = "1 (exact)" if mode == "off" else (f"{row['recall_at_20']:.4f}" if row["recall_at_20"] else "-")
            err = f" (not 200: c1 {r['errors_c1']}, c32 {r['errors_c32']})" if r["errors_c1"] or r["errors_c32"] else ""
            lines.append(f"| {row['tags']:,} | {label} | {r['qps_c32']:,.0f}{err} | {r['p50_c1_ms']:.2f} | "
                         f"{r['p99_c32_ms']:.1f} | {', '.join(f'{x:.0f}' for x in r['rss_mb'])} | {recall} | "
                         f"{r['tag_all_users_s']:,.0f} | {r['load_s']:.1f} | {row['bundle_mb']:.1f} | "
                         f"{row['export_s']:.0f} | {row['publish_s']:.1f} |")
        if row["off"]["qps_c32"]:
            lines.append(f"| {row['tags']:,} | ANN / exact | {row['on']['qps_c32'] / row['off']['qps_c32']:.1f}x | "
                         f"{row['on']['p50_c1_ms'] / row['off']['p50_c1_ms']:.2f}x | | | | "
                         f"{row['on']['tag_all_users_s'] / row['off']['tag_all_users_s']:.1f}x | | | | |")
    if res.get("c1"):
        straight = res["c1"][STRAIGHT]["p50_c1"]
        lines += ["", f"c=1 latency at {res['sizes'][0]['tags']:,} tags, medians of interleaved rounds "
                      f"(same run, same Redis, 1 worker each):", "",
                  "| endpoint | p50 c1 ms | p99 c1 ms | QPS c32 | p99 c32 ms | p50 / straightforward | answers not 200 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, m in res["c1"].items():
            lines.append(f"| {name} | {m['p50_c1']:.2f} | {m['p99_c1']:.2f} | {m['qps_c32']:,.0f} | "
                         f"{m['p99_c32']:.1f} | {m['p50_c1'] / straight:.2f} | {m['not_200']} |")
    return "\n".join(lines)
