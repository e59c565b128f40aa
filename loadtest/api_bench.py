"""`python -m loadtest.api_bench --before DIR`: the API additions measured in one run.

1. Hot path A/B: QPS of POST /users/{id}/tags at concurrency 32 (top_k 20, no new
   fields) for the service of another source tree (`--before`, e.g. a `git worktree` of
   the commit before the change) and of this one, in interleaved rounds (the machine is
   shared, so the load drifts; medians and the per-round ratios are reported). Before
   that, the same 200 requests are sent to both, one at a time, and the response bodies
   compared byte for byte.
2. Many users per call: users/s and users per server CPU-second (per core) with
   POST /tags:batch (256 users a call) vs single calls at c=32, in one run.

Both servers read the same private Redis (the mvke-mt model and the users of
`mvke pipeline` under --work, built once). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
import orjson

from loadtest.bench import dataset_user_ids, machine, serve_dataset
from loadtest.harness import ROOT, Server, make_requests, pipeline, run_load, start_redis
from mvke.runtime.system import loadavg


def cpu_seconds(server: Server) -> float:
    import psutil
    total = 0.0
    for pid in server.pids():
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def measured(server: Server, requests: list, concurrency: int, duration: float, users_per_call: int) -> dict:
    c0, t0 = cpu_seconds(server), time.monotonic()
    res = run_load(server.port, requests, concurrency, duration, warmup=1.0)
    cores = (cpu_seconds(server) - c0) / (time.monotonic() - t0)   # server CPU in use, warmup included
    users_per_s = res["ok_qps"] * users_per_call
    return {"qps": res["qps"], "users_per_s": users_per_s, "p50_ms": res.get("p50_ms"),
            "p99_ms": res.get("p99_ms"), "status": res["status"], "server_cores": round(cores, 3),
            "users_per_cpu_s": users_per_s / cores if cores else None}


def same_bytes(a: Server, b: Server, ids: list[str], n: int = 200) -> int:
    """Requests (no new fields) whose answers differ between the two servers; 0 expected."""
    differ = 0
    with httpx.Client(timeout=10) as c:
        for i, uid in enumerate(ids[:n]):
            body = [None, {"top_k": 5}, {"top_k": 20, "tasks": ["intention"]}, {"min_score": 0.2}][i % 4]
            kw = {"json": body} if body is not None else {}
            ra, rb = c.post(f"{a.url}/users/{uid}/tags", **kw), c.post(f"{b.url}/users/{uid}/tags", **kw)
            differ += (ra.status_code, ra.content) != (rb.status_code, rb.content)
    return differ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.api_bench", description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="source tree of the version to compare against")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    p.add_argument("--work", default="/tmp/lt")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "api_bench.json"))
    a = p.parse_args(argv)
    work = Path(a.work)
    print(f"mvke pipeline: mvke-mt (1 epoch) under {work} (steps whose output exists are skipped)")
    data = Path(pipeline(work, "mvke-mt", log=work / "pipeline_mvke.log")["data"])
    redis = start_redis()
    try:
        serve_dataset(redis.url, work, "mvke-mt")
        ids = dataset_user_ids(data)
        singles = make_requests(ids, 8192, topk_mix="20:1", seed=1)
        env = {"MVKE_WORKERS": "1"}
        before = Server.service(redis.url, env={**env, "PYTHONPATH": a.before}, root=a.before)
        after = Server.service(redis.url, env=env)
        report = {"machine": machine(), "loadavg_start": loadavg(), "rounds": []}
        with before, after:
            report["differing_answers_of_200"] = same_bytes(before, after, ids)
            print(f"answers differing byte for byte (before vs after, 200 requests): "
                  f"{report['differing_answers_of_200']}")
            for r in range(a.rounds):
                row = {}
                for name, server in ((("before", before), ("after", after)) if r % 2 == 0
                                     else (("after", after), ("before", before))):
                    c0 = cpu_seconds(server)
                    res = run_load(server.port, singles, 32, a.duration, warmup=1.0)
                    row[name] = res["qps"]
                    # server CPU per answered request (warmup included in both): less sensitive to the
                    # other processes on the machine than the QPS share the server gets
                    row[f"{name}_cpu_us"] = (cpu_seconds(server) - c0) * 1e6 / max(1, res["requests"] * (
                        a.duration + 1.0) / a.duration)
                row["ratio"] = row["after"] / row["before"]
                row["cpu_ratio"] = row["after_cpu_us"] / row["before_cpu_us"]
                row["loadavg"] = loadavg()
                report["rounds"].append(row)
                print(f"round {r + 1}: before {row['before']:.0f} QPS {row['before_cpu_us']:.0f} us CPU/request, "
                      f"after {row['after']:.0f} QPS {row['after_cpu_us']:.0f} us CPU/request, QPS ratio "
                      f"{row['ratio']:.3f}, CPU ratio {row['cpu_ratio']:.3f}, load {row['loadavg']}")
            before.stop()
            batch_bodies = [["POST", "/tags:batch",
                             orjson.dumps({"users": [{"user_id": u} for u in ids[i * 256:(i + 1) * 256]],
                                           "defaults": {"top_k": 20}}).decode()]
                            for i in range(min(32, len(ids) // 256))]
            report["single_c32"] = measured(after, singles, 32, a.duration, 1)
            report["batch256_c4"] = measured(after, batch_bodies, 4, a.duration, 256)
            report["single_c32_again"] = measured(after, singles, 32, a.duration, 1)
        ratios = [r["ratio"] for r in report["rounds"]]
        report["qps_before_median"] = statistics.median(r["before"] for r in report["rounds"])
        report["qps_after_median"] = statistics.median(r["after"] for r in report["rounds"])
        report["ratio_median"] = statistics.median(ratios)
        report["cpu_ratio_median"] = statistics.median(r["cpu_ratio"] for r in report["rounds"])
        report["loadavg_end"] = loadavg()
    finally:
        redis.stop()
    s1, b, s2 = report["single_c32"], report["batch256_c4"], report["single_c32_again"]
    print(f"\nCPU: {report['machine']['cpu']} x {report['machine']['nproc']}; load {report['loadavg_start']} -> "
          f"{report['loadavg_end']}")
    print(f"hot path c=32: before {report['qps_before_median']:.0f} QPS, after {report['qps_after_median']:.0f} QPS "
          f"(median of {a.rounds} interleaved rounds; ratio median {report['ratio_median']:.3f}, "
          f"rounds {', '.join(f'{x:.3f}' for x in ratios)}); server CPU per request after/before: median "
          f"{report['cpu_ratio_median']:.3f}")
    for label, m in (("single calls, c=32", s1), ("batch of 256, c=4", b), ("single calls again", s2)):
        print(f"{label:20s} {m['users_per_s']:8.0f} users/s  {m['users_per_cpu_s'] or 0:8.0f} users per server "
              f"CPU-second  status {m['status']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
