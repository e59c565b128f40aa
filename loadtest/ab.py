"""`python -m loadtest.ab --baseline DIR`: the service of another checkout against this tree's, one bundle.

The A/B section of `loadtest.bench --baseline` without the rest of the bench (no second model, no
naive/straightforward endpoints, no in-process ceilings), for a machine too busy for the whole bench:
both services run on one private Redis holding one published bundle and its users, and are loaded in
turn (who goes first alternates per round) at c=1 and c=32. Medians per side and the ratios are printed
and written as JSON, with the CPU model and the load average of every row.

    git worktree add /tmp/old 43c4d58
    python -m loadtest.ab --baseline /tmp/old --rounds 4 --out docs/results/arch_ab.json
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


def ab_rounds(ports: dict[str, int], reqs: list, rounds: int, duration: float, warmup: float,
              log=print) -> list[dict]:
    """Every round loads each side at c=1 then c=32; the side that goes first alternates."""
    rows = []
    names = list(ports)
    for rnd in range(rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            for c in (1, 32):
                res = run_load(ports[name], reqs, c, duration, warmup)
                res.update(side=name, c=c, round=rnd, load=loadavg())
                rows.append(res)
                log(f"round {rnd} {name:10} c={c:<3} {res['qps']:8.0f} QPS p50 {res['p50_ms']:6.2f} ms "
                    f"p99 {res['p99_ms']:7.2f} ms status {res['status']} load {res['load'][0]:.1f}")
    return rows


def medians(rows: list[dict], names: list[str]) -> dict:
    return {n: {"c32_qps": statistics.median(r["qps"] for r in rows if r["side"] == n and r["c"] == 32),
                "c1_p50_ms": statistics.median(r["p50_ms"] for r in rows if r["side"] == n and r["c"] == 1)}
            for n in names}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="a checkout of another commit (git worktree add DIR REV)")
    p.add_argument("--work", default=".mvke-local/ab", help="dataset, checkpoint and bundle (built when missing)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per row")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers of each service")
    p.add_argument("--out", help="write the report (JSON) here")
    a = p.parse_args(argv)
    sides = {"baseline": Path(a.baseline).resolve(), "this tree": ROOT}
    report = {"machine": machine(), "load_start": loadavg(), "revs": {n: git_rev(r) for n, r in sides.items()},
              "rounds": a.rounds, "duration_s": a.duration, "workers": a.workers}
    redis = start_redis()
    servers: dict[str, Server] = {}
    try:
        built = pipeline(a.work, "mvke-mt", redis.url)  # data, train 1 epoch, export, publish, features
        # The baseline publishes the same bundle with its own code: its model keys may be laid out
        # differently (before the Redis Cluster work: `mvke:active`, now `{mvke}:active`).
        bundle = baseline_bundle(Path(built["bundle"]), sides["baseline"], Path(a.work) / "bundle-baseline")
        publish = subprocess.run([sys.executable, "-m", "mvke.cli", "publish", str(bundle), "--redis", redis.url],
                                 cwd=sides["baseline"], capture_output=True, text=True)
        if publish.returncode != 0:
            raise SystemExit(f"the baseline could not publish {bundle}: {publish.stderr[-1500:]}")
        reqs = make_requests(scan_user_ids(redis.url), 8192, zipf=0.0, topk_mix="20:1", seed=1)
        for name, root in sides.items():
            log = Path(a.work) / f"ab-{name.replace(' ', '-')}.log"
            servers[name] = Server.service(redis.url, workers=a.workers, root=root, log=log).start()
        t0 = time.time()
        rows = ab_rounds({n: s.port for n, s in servers.items()}, reqs, a.rounds, a.duration, 1.0)
        report["seconds"] = round(time.time() - t0, 1)
    finally:
        for s in servers.values():
            s.stop()
        redis.stop()
    med = medians(rows, list(sides))
    report.update(rows=rows, median=med, load_end=loadavg(),
                  ratio={"c32_qps": med["this tree"]["c32_qps"] / med["baseline"]["c32_qps"],
                         "c1_p50_ms": med["this tree"]["c1_p50_ms"] / med["baseline"]["c1_p50_ms"]})
    print(json.dumps({k: report[k] for k in ("revs", "median", "ratio", "load_start", "load_end")}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
