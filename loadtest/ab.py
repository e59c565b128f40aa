"""`python -m loadtest.ab --baseline DIR`: the service of another checkout against this tree's, one bundle.

The A/B section of `loadtest.bench --baseline` without the rest of the bench (no second model, no
naive/straightforward endpoints, no in-process ceilings), for a machine too busy for the whole bench:
both services run on one private Redis holding one published bundle and its users, and are loaded in
turn (who goes first alternates per round) at c=1 and c=32. Medians per side and the ratios are printed
and written as JSON, with the CPU model and the load average of every row.

    git worktree add /tmp/old 43c4d58
    python -m loadtest.ab --baseline /tmp/old --rounds 4 --out docs/results/arch_ab.json

`--straight` loads the straightforward FastAPI + ONNX Runtime + redis-py endpoint
(loadtest/straight_app.py, the same bundle, the same number of workers, BLAS 1 thread) as the
other side instead of another checkout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loadtest.api_bench import cpu_seconds
from loadtest.bench import git_rev, machine
from loadtest.harness import ROOT, Server, make_requests, pipeline, run_load, scan_user_ids, start_redis
from mvke.runtime.system import loadavg


def baseline_bundle(bundle: Path, baseline: Path, out: Path) -> Path:
    """A copy of `bundle` whose manifest holds only the fields the baseline's Manifest knows.

    Fields added since (e.g. `ann`, None for an exact-only bundle) would make the older reader refuse
    the bundle; the arrays and the ONNX file are the same bytes, so both services serve one model."""
    probe = ("import dataclasses, json\n"
             "try:\n    from model_export.contract import Manifest\n"       # before the runtime core
             "except ImportError:\n    from mvke.runtime.contract import Manifest\n"
             "print(json.dumps([f.name for f in dataclasses.fields(Manifest)]))")
    known = set(json.loads(subprocess.run([sys.executable, "-c", probe], cwd=baseline, check=True,
                                          capture_output=True, text=True).stdout))
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = {k: v for k, v in manifest.items() if k not in known}
    if any(v not in (None, [], {}) for v in dropped.values()):
        raise SystemExit(f"the baseline cannot serve this bundle: it has no fields {sorted(dropped)}")
    (out / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k in known}, indent=1))
    return out


def publish_for_baseline(bundle: Path, baseline: Path, work: Path, redis_url: str) -> None:
    """The baseline publishes the same bundle with its own code: its model keys may be laid out
    differently (before the Redis Cluster work: `mvke:active`, now `{mvke}:active`)."""
    copy = baseline_bundle(bundle, baseline, work / "bundle-baseline")
    publish = subprocess.run([sys.executable, "-m", "mvke.cli", "publish", str(copy), "--redis", redis_url],
                             cwd=baseline, capture_output=True, text=True)
    if publish.returncode != 0:
        raise SystemExit(f"the baseline could not publish {copy}: {publish.stderr[-1500:]}")


def ab_rounds(servers: dict[str, Server], reqs: list, rounds: int, duration: float, warmup: float,
              log=print, levels: tuple[int, ...] = (1, 32)) -> list[dict]:
    """Every round loads each side at each level of concurrency (c=1 then c=32 by default); the side
    that goes first alternates. Each row also has the side's CPU per request (its master and workers,
    every thread: the idle session's spinning ones included), warm-up included in time and CPU alike."""
    rows = []
    names = list(servers)
    for rnd in range(rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            for c in levels:
                cpu0, t0 = cpu_seconds(servers[name]), time.monotonic()
                res = run_load(servers[name].port, reqs, c, duration, warmup)
                cores = (cpu_seconds(servers[name]) - cpu0) / (time.monotonic() - t0)
                res.update(side=name, c=c, round=rnd, load=loadavg(), cores=cores,
                           cpu_us_per_request=cores / res["qps"] * 1e6 if res["qps"] else None)
                rows.append(res)
                log(f"round {rnd} {name:10} c={c:<3} {res['qps']:8.0f} QPS p50 {res['p50_ms']:6.2f} ms "
                    f"p99 {res['p99_ms']:7.2f} ms CPU {res['cpu_us_per_request'] or 0:5.0f} us/request "
                    f"status {res['status']} load {res['load'][0]:.1f}")
    return rows


def medians(rows: list[dict], names: list[str]) -> dict:
    """Per side: the goals' two figures (c=32 QPS, c=1 p50), and QPS and p50 at every level measured."""
    def median(n: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["side"] == n and r["c"] == c)
    levels = sorted({r["c"] for r in rows})
    return {n: {"c32_qps": median(n, 32, "qps"), "c1_p50_ms": median(n, 1, "p50_ms"),
                "levels": {str(c): {"qps": median(n, c, "qps"), "p50_ms": median(n, c, "p50_ms"),
                                    "cpu_us_per_request": median(n, c, "cpu_us_per_request")} for c in levels}}
            for n in names}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    other = p.add_mutually_exclusive_group(required=True)
    other.add_argument("--baseline", help="a checkout of another commit (git worktree add DIR REV)")
    other.add_argument("--straight", action="store_true", help="loadtest/straight_app.py as the other side")
    p.add_argument("--work", default=".mvke-local/ab", help="dataset, checkpoint and bundle (built when missing)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per row")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers of each service")
    p.add_argument("--levels", default="1,32",
                   help="concurrency levels loaded in each round, comma-separated (1 and 32 are the goals')")
    p.add_argument("--out", help="write the report (JSON) here")
    a = p.parse_args(argv)
    levels = tuple(sorted({int(c) for c in a.levels.split(",")} | {1, 32}))
    base = "straight" if a.straight else "baseline"
    sides = {base: ROOT if a.straight else Path(a.baseline).resolve(), "this tree": ROOT}
    report = {"machine": machine(), "load_start": loadavg(), "revs": {n: git_rev(r) for n, r in sides.items()},
              "rounds": a.rounds, "duration_s": a.duration, "workers": a.workers, "levels": levels}
    redis = start_redis()
    servers: dict[str, Server] = {}
    try:
        built = pipeline(a.work, "mvke-mt", redis.url)  # data, train 1 epoch, export, publish, features
        if a.straight:
            servers[base] = Server.asgi("loadtest.straight_app:app", workers=a.workers, log=Path(a.work) / "ab-straight.log",
                                        env={"REDIS_URL": redis.url, "MVKE_STRAIGHT_BUNDLE": built["bundle"],
                                             "OPENBLAS_NUM_THREADS": "1"}).start()
        else:
            publish_for_baseline(Path(built["bundle"]), sides[base], Path(a.work), redis.url)
        reqs = make_requests(scan_user_ids(redis.url), 8192, zipf=0.0, topk_mix="20:1", seed=1)
        for name, root in sides.items():
            if name not in servers:
                log = Path(a.work) / f"ab-{name.replace(' ', '-')}.log"
                servers[name] = Server.service(redis.url, workers=a.workers, root=root, log=log).start()
        t0 = time.time()
        rows = ab_rounds(servers, reqs, a.rounds, a.duration, 1.0, levels=levels)
        report["seconds"] = round(time.time() - t0, 1)
    finally:
        for s in servers.values():
            s.stop()
        redis.stop()
    med = medians(rows, list(sides))
    report.update(rows=rows, median=med, load_end=loadavg(),
                  ratio={"c32_qps": med["this tree"]["c32_qps"] / med[base]["c32_qps"],
                         "c1_p50_ms": med["this tree"]["c1_p50_ms"] / med[base]["c1_p50_ms"]})
    print(json.dumps({k: report[k] for k in ("revs", "median", "ratio", "load_start", "load_end")}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
