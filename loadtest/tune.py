"""`python -m loadtest.tune [--quick]`: sweep the service's settings one at a time around a baseline.

For each variant (env overrides of `mvke serve`): start the service, load it at
concurrency 32 and 256 with loadtest/loadgen.py, record QPS, p50, p99 and the
status counts. The table goes to docs/results/performance.md between the
`tuning` markers (and JSON beside it); the chosen defaults live in
service/settings.py. Same data as loadtest/bench.py (built under --work when missing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from loadtest.bench import (dataset_user_ids, ensure_data, fmt_status, machine, serve_dataset, serving_settings,
                            write_markdown)
from loadtest.harness import ROOT, Server, make_requests, run_load, start_redis
from mvke.runtime.system import loadavg

# (label, workers, env overrides); the first is the baseline every other row changes one thing of
VARIANTS: list[tuple[str, int, dict[str, str]]] = [
    ("defaults", 0, {}),
    ("1 worker", 1, {}),
    ("2 workers", 2, {}),
    ("3 workers", 3, {}),
    ("batching off", 0, {"MVKE_BATCHING": "false"}),
    ("max_batch_size 8", 0, {"MVKE_MAX_BATCH_SIZE": "8"}),
    ("max_batch_size 32", 0, {"MVKE_MAX_BATCH_SIZE": "32"}),
    ("max_batch_size 64", 0, {"MVKE_MAX_BATCH_SIZE": "64"}),
    ("max_batch_size 128", 0, {"MVKE_MAX_BATCH_SIZE": "128"}),
    ("max_wait_ms 1", 0, {"MVKE_MAX_WAIT_MS": "1"}),
    ("max_wait_ms 3", 0, {"MVKE_MAX_WAIT_MS": "3"}),
    ("ORT threads 2", 0, {"MVKE_ORT_INTRA_THREADS": "2"}),
    ("compute always in a thread", 0, {"MVKE_COMPUTE_OFFLOAD_MIN_BATCH": "1"}),
    ("compute in a thread from batch 16", 0, {"MVKE_COMPUTE_OFFLOAD_MIN_BATCH": "16"}),
    ("fast path off", 0, {"MVKE_FAST_PATH": "false"}),
    ("Redis pool 8", 0, {"MVKE_REDIS_POOL_SIZE": "8"}),
    ("BLAS threads 2", 0, {"MVKE_BLAS_THREADS": "2"}),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.tune", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 s per point instead of 8 s")
    p.add_argument("--only", help="comma-separated variant labels to run (default all)")
    p.add_argument("--concurrency", default="32,256")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep, interleaved (medians reported)")
    p.add_argument("--work", default="/tmp/lt")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "performance.md"))
    a = p.parse_args(argv)
    dur = 3.0 if a.quick else 8.0
    conc = [int(c) for c in a.concurrency.split(",")]
    paths = ensure_data(Path(a.work), print)
    ids = dataset_user_ids(paths["data"])
    reqs = make_requests(ids, 8192, topk_mix="20:1", seed=1)
    only = set(a.only.split(",")) if a.only else None
    redis = start_redis()
    results = []
    load_before = loadavg()
    try:
        serve_dataset(redis.url, Path(a.work), "mvke-mt")
        for rnd in range(a.rounds):  # rounds interleave the variants, so a burst of other load hits all
            for label, workers, env in VARIANTS:
                if only and label not in only:
                    continue
                with Server.service(redis.url, workers=workers or None, env=env,
                                    log=Path(a.work) / "tune-service.log") as s:
                    w = serving_settings(s)["workers"]   # 0 in VARIANTS: the service's own default
                    for c in conc:
                        r = run_load(s.port, reqs, c, dur, 1.0)
                        r.update(variant=label, workers=w, env=env, c=c, rss_mb=s.rss_mb(), round=rnd)
                        results.append(r)
                        print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {label:34} c={c:<4}"
                              f" {r['qps']:8.0f} QPS p50 {r['p50_ms']:7.2f} p99 {r['p99_ms']:8.2f} {r['status']}",
                              flush=True)
    finally:
        redis.stop()
    lines = [f"Tuning sweep {time.strftime('%Y-%m-%d %H:%M')}: {machine()['nproc']} CPUs, load average before "
             f"{load_before}, after {loadavg()}; {dur:g} s per point after 1 s warm-up, {a.rounds} round(s) "
             "interleaving the variants (medians shown, each round's QPS in brackets), loadtest/loadgen.py, "
             "mvke-mt (2 tasks x 1,780 tags, top 20). Each row changes one setting of the defaults.", "",
             "| variant | workers | c | QPS (median) | rounds | p50 ms | p99 ms | non-200 |",
             "|---|---:|---:|---:|---|---:|---:|---|"]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["c"]), []).append(r)
    for (label, c), rs in groups.items():
        med = lambda k: statistics.median(x[k] for x in rs)  # noqa: E731
        status: dict[str, int] = {}
        for x in rs:
            for k, v in x["status"].items():
                status[k] = status.get(k, 0) + v
        lines.append(f"| {label} | {rs[0]['workers']} | {c} | {med('qps'):,.0f} | "
                     f"{', '.join(format(x['qps'], ',.0f') for x in rs)} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} | "
                     f"{fmt_status(status)} |")
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(a.out)
    write_markdown(out, text, marker="tuning")
    out.with_name("tuning.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
