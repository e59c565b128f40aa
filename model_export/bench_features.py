"""Feature loading, side by side in one run: the per-row loader it replaced vs `mvke features load`.

    python -m model_export.bench_features --users 400000 --work /tmp/fb [--json out.json]

Builds (once, under --work) a users Parquet of N users by re-keying the default synthetic
dataset's users, starts a private redis-server and a private 3-master Redis Cluster, and
loads the same users with:

* `per-row (before)`: the loader before this change (`validate_row` per row, a redis-py
  pipeline with one MULTI per 1,000 users), single node only (a cross-slot MULTI);
* `features load, W workers`: model_export/features_job.py on the single node and on the cluster.

Per row: wall users/s end to end (Parquet read included), client CPU and Redis server CPU
per user (every process of each, from /proc: load-independent), and the load average.
The machine is shared; CPU per user is the figure to compare, wall users/s the one to
read with the load average beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in f[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def build_users(work: Path, users: int) -> Path:
    """<work>/users-N: meta.json + users.parquet of N users (the synthetic users, re-keyed)."""
    out = work / f"users-{users}"
    if (out / "users.parquet").exists():
        return out
    base = work / "synth"
    if not (base / "users.parquet").exists():
        from mvke.data.synthetic import SynthConfig, generate
        generate(SynthConfig(users=20_000), base, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "meta.json", out / "meta.json")
    src = pq.read_table(base / "users.parquet")
    ids = src.column("user_id").to_pylist()
    with pq.ParquetWriter(out / ".users.tmp", src.schema) as w:
        done, copy = 0, 0
        while done < users:
            n = min(len(src), users - done)
            t = src.slice(0, n)
            uid = pa.array([f"r{copy:04d}{u}" for u in ids[:n]], type=src.schema.field("user_id").type)
            w.write_table(t.set_column(0, "user_id", uid),
                          row_group_size=65_536)
            done, copy = done + n, copy + 1
    os.replace(out / ".users.tmp", out / "users.parquet")
    return out


def per_row_before(data: Path, url: str) -> int:
    """The loader this change replaced (model_export/feature_store.py before it), kept for the comparison."""
    from model_export.feature_store import LOADED_AT_FIELD, validate_row
    from mvke.runtime.redis_client import connect
    kinds = json.loads((data / "meta.json").read_text())["fields"]
    r = connect(url)
    rows = pq.read_table(data / "users.parquet").to_pylist()
    stamp, pending, loaded = str(int(time.time())), 0, 0
    pipe = r.pipeline(transaction=True)
    for row in rows:
        mapping, _, _ = validate_row(row, kinds)
        if mapping is None:
            continue
        key = f"mvke:user:{row['user_id']}"
        pipe.delete(key)
        pipe.hset(key, mapping={**mapping, LOADED_AT_FIELD: stamp})
        pending += 1
        if pending >= 1000:
            pipe.execute()
            loaded, pending = loaded + pending, 0
    if pending:
        pipe.execute()
    r.close()
    return loaded + pending


def _run(label: str, fn, servers: list, children: bool) -> dict:
    for s in servers:
        s.client().flushall()
    server_cpu0 = sum(_cpu_seconds(s.proc.pid) for s in servers)
    self0 = os.times()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    users = fn()
    wall = time.perf_counter() - t0
    self1 = os.times()
    client_cpu = (self1.user - self0.user) + (self1.system - self0.system)
    if children:   # worker processes (reaped by the pool before it returned)
        client_cpu += (self1.children_user - self0.children_user) + (self1.children_system - self0.children_system)
    server_cpu = sum(_cpu_seconds(s.proc.pid) for s in servers) - server_cpu0
    stored = sum(s.client().dbsize() for s in servers)
    row = {"label": label, "users": users, "stored_keys": stored, "seconds": round(wall, 2),
           "users_per_second": round(users / wall), "client_cpu_us_per_user": round(1e6 * client_cpu / users, 1),
           "server_cpu_us_per_user": round(1e6 * server_cpu / users, 1), "load_before": [round(x, 2) for x in load0],
           "load_after": [round(x, 2) for x in os.getloadavg()]}
    print(f"{label:34s} {row['users_per_second']:>9,} users/s  {wall:6.1f}s  client {row['client_cpu_us_per_user']:5.1f} "
          f"us/user  redis {row['server_cpu_us_per_user']:5.1f} us/user  load {row['load_before'][0]:.1f}", flush=True)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Per configuration: the median users/s and CPU per user over its rounds (printed too)."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        runs = [r for r in rows if r["label"] == label]
        med = {k: float(np.median([r[k] for r in runs]))
               for k in ("users_per_second", "client_cpu_us_per_user", "server_cpu_us_per_user")}
        out.append({"label": label, "rounds": len(runs), **med,
                    "users_per_second_range": [min(r["users_per_second"] for r in runs),
                                               max(r["users_per_second"] for r in runs)]})
    if len(rows) > len(out):
        print("median over rounds:")
        for m in out:
            lo, hi = m["users_per_second_range"]
            print(f"  {m['label']:34s} {m['users_per_second']:>9,.0f} users/s ({lo:,}-{hi:,})  client "
                  f"{m['client_cpu_us_per_user']:5.1f} us/user  redis {m['server_cpu_us_per_user']:5.1f} us/user")
    return out


def main(argv: list[str] | None = None) -> dict:
    from model_export.features_job import FeaturesLoadConfig, load_features
    from mvke.localcluster import LocalRedisCluster
    from mvke.localredis import LocalRedis

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=400_000)
    p.add_argument("--work", default="/tmp/mvke-bench-features")
    p.add_argument("--workers", default="1,2", help="worker counts to run (comma-separated)")
    p.add_argument("--skip-before", action="store_true", help="skip the per-row loader (slow)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds; each round runs every configuration once (interleaved, so a noisy minute "
                        "hits all of them), and the summary gives each one's median")
    p.add_argument("--json")
    a = p.parse_args(argv)
    work = Path(a.work)
    data = build_users(work, a.users)
    workers = [int(w) for w in a.workers.split(",")]
    print(f"{a.users:,} users; CPU {cpu_model()}, {len(os.sched_getaffinity(0))} cores; "
          f"load {os.getloadavg()}", flush=True)

    def job(url: str, w: int):
        def go() -> int:
            shutil.rmtree(data / "_features_load", ignore_errors=True)
            return load_features(FeaturesLoadConfig(str(data), redis_url=url, workers=w, progress=False)).loaded
        return go

    rows = []
    single = LocalRedis(extra_args=["--hash-max-listpack-value", "512"]).start()
    cluster = LocalRedisCluster(masters=3).start()
    try:
        for _ in range(a.repeat):
            if not a.skip_before:
                rows.append(_run("per-row (before), 1 node", lambda: per_row_before(data, single.url), [single],
                                 False))
            for w in workers:
                rows.append(_run(f"features load, {w} worker(s), 1 node", job(single.url, w), [single], w > 1))
            for w in workers:
                rows.append(_run(f"features load, {w} worker(s), 3-node cluster", job(cluster.url, w),
                                 cluster.nodes, w > 1))
    finally:
        single.stop()
        cluster.stop()
    medians = summarise(rows)
    report = {"users": a.users, "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "rounds": a.repeat,
              "rows": rows, "medians": medians, "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
