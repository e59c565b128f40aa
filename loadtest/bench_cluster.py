"""Service QPS on one Redis node vs a 3-master Redis Cluster, side by side in one run.

    python -m loadtest.bench_cluster [--work /tmp/mvke-bench-cluster] [--concurrency 32]
                                     [--duration 10] [--rounds 3] [--json out.json]

Builds (once, under --work) the default synthetic data and an mvke-mt bundle (1 epoch),
starts a private redis-server and a private 3-master cluster (mvke/localcluster.py), publishes
the same bundle and loads the same users into both, starts one service per backend
(`mvke serve`, 1 worker each, `redis://` vs `redis+cluster://`) and drives them with
loadtest/loadgen.py at the same concurrency, alternating the order each round. Medians of
the rounds, the ratio cluster / single, CPU model and load average beside the figures.
Everything runs on this machine's cores: the three cluster masters share them with the
service and the load generator, so the ratio shows the client-side cost of cluster routing,
not the capacity a real cluster adds (docs/SCALING.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from loadtest.bench import dataset_user_ids, loadavg, machine
from loadtest.harness import Server, make_requests, pipeline, run_load


def main(argv: list[str] | None = None) -> dict:
    from mvke.localcluster import LocalRedisCluster
    from mvke.localredis import LocalRedis

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/mvke-bench-cluster")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    single, cluster = LocalRedis().start(), LocalRedisCluster(masters=3).start()
    backends = {"single node": single.url, "3-master cluster": cluster.url}
    servers: dict[str, Server] = {}
    rows: dict[str, list[dict]] = {name: [] for name in backends}
    try:
        for name, url in backends.items():   # data, model and bundle built once; published + loaded into each
            built = pipeline(work, "mvke-mt", redis_url=url, log=work / "pipeline.log")
            servers[name] = Server.service(url, workers=1, log=work / f"service-{name.split()[0]}.log").start()
        requests = make_requests(dataset_user_ids(Path(built["data"])), n=4096, topk_mix="20:1")
        print(f"{machine()['cpu']}, load {loadavg()}; c={a.concurrency}, {a.duration:.0f} s per run, "
              f"{a.rounds} rounds", flush=True)
        for r in range(a.rounds):
            order = list(backends) if r % 2 == 0 else list(reversed(backends))
            for name in order:
                res = run_load(servers[name].port, requests, a.concurrency, a.duration, warmup=1.0)
                res["load"] = loadavg()
                rows[name].append(res)
                print(f"round {r + 1} {name:18s} {res['qps']:8,.0f} QPS  p50 {res['p50_ms']:6.2f} ms  "
                      f"p99 {res['p99_ms']:6.2f} ms  status {res['status']}  load {res['load'][0]}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
        single.stop()
        cluster.stop()
    summary = {name: {"qps": statistics.median(x["qps"] for x in rs), "p50_ms": statistics.median(x["p50_ms"] for x in rs),
                      "p99_ms": statistics.median(x["p99_ms"] for x in rs),
                      "non_200": sum(v for x in rs for k, v in x["status"].items() if k != "200")}
               for name, rs in rows.items()}
    ratio = summary["3-master cluster"]["qps"] / summary["single node"]["qps"]
    print("\n| backend | QPS (median) | p50 ms | p99 ms | non-200 |\n|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['qps']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['non_200']} |")
    print(f"\ncluster / single: {ratio:.2f}")
    report = {"machine": machine(), "concurrency": a.concurrency, "duration_s": a.duration, "rounds": rows,
              "summary": summary, "ratio_cluster_to_single": ratio,
              "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
