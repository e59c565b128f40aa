"""Audience index figures: build time and size at 1M / 10M users x 1,780 tags, and query latency.

    PYTHONPATH=. python scripts/audience_bench.py --users 1000000 10000000 --out /tmp/aud --redis redis://127.0.0.1:PORT/0

The rows are SYNTHESISED in tag-all's output layout (batch/audience_synth.py: top 20 per task, Parquet
parts of 65,536 users, Zipf tag popularity over 1,780 tags) instead of running the model over 10M
users: the index build only reads those rows, so the figure is the build's own. The build is timed
from the Parquet parts (batch/audiences.build_index, what `tag-all --audiences` calls), then published
to Redis; queries are 3-tag expressions (`A AND B AND NOT C`, `A OR B AND C`, ...) over tags drawn by
popularity, answered by the service's own code (service/audiences.estimate: resolve latest, one
pipelined HMGET, deserialise, evaluate, sample ids), one at a time on one core.
A script (not a floor): it times batch's build and service's query, which may not import each other.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from pathlib import Path

import numpy as np

from batch.audience_synth import TASKS, synth_parts

def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _system() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpu": cpu, "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "note": "shared machine (other sessions' work ran beside this)"}


def _queries(meta, rng: random.Random, n: int) -> list[str]:
    w = {t: np.asarray(meta.sizes[t], dtype=float) for t in meta.tasks}
    shapes = ["{} AND {} AND NOT {}", "{} AND {} AND {}", "({} OR {}) AND {}", "{} OR {} OR {}"]

    def pick():
        t = rng.choice(meta.tasks)
        i = rng.choices(range(len(meta.tags)), weights=w[t])[0]
        return f"{t}:{meta.tags[i]}"
    return [rng.choice(shapes).format(pick(), pick(), pick()) for _ in range(n)]


def bench_queries(redis_url: str, prefix: str, n: int, seed: int = 0, cache_mb: int = 256) -> dict:
    """p50/p99 of 3-tag expressions through the service's estimate() (Redis read + evaluation + sample)."""
    import asyncio
    from types import SimpleNamespace

    from mvke.runtime.keys import Keys
    from mvke.runtime.redis_client import resolve
    from service.audiences import AudienceStore, estimate
    from service.schemas import AudienceEstimateRequest
    from service.settings import Settings

    async def go():
        s = Settings(redis_url=redis_url, key_prefix=prefix, audience_cache_mb=cache_mb)
        store = AudienceStore(SimpleNamespace(settings=s, keys=Keys(prefix), redis_target=resolve(redis_url)))
        meta = await store.latest()
        qs = _queries(meta, random.Random(seed), n)
        for q in qs[:20]:                      # warm the pool and the meta cache
            await estimate(store, AudienceEstimateRequest(expression=q))
        import redis as _redis
        server = _redis.Redis.from_url(redis_url)
        cpu0 = server.info("cpu")
        times, cpus, sizes = [], [], []
        for q in qs:
            t0, c0 = time.perf_counter(), time.process_time()
            res = await estimate(store, AudienceEstimateRequest(expression=q))
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            sizes.append(res["size"])
        cpu1 = server.info("cpu")
        server.close()
        redis_cpu_s = sum(cpu1[k] - cpu0[k] for k in ("used_cpu_user", "used_cpu_sys"))
        await store.aclose()
        ms, cpu_ms = np.asarray(times) * 1e3, np.asarray(cpus) * 1e3
        return {"queries": n, "cache_mb": cache_mb, "cache_used_mb": round(store.cache.used / 2**20, 1),
                # CPU time of this process per query (robust to other sessions' load), and redis-server's CPU
                # per query (INFO cpu over the loop): what the query costs on dedicated cores
                "client_cpu_p50_ms": round(float(np.percentile(cpu_ms, 50)), 2),
                "client_cpu_p99_ms": round(float(np.percentile(cpu_ms, 99)), 2),
                "redis_cpu_per_query_ms": round(redis_cpu_s / n * 1e3, 2), "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2),
                "median_size": int(np.median(sizes)), "example": qs[0]}
    return asyncio.run(go())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--out", required=True, help="scratch directory for the synthetic parts")
    ap.add_argument("--redis", required=True, help="a private Redis (it receives the index)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--skew", type=float, default=1.0)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    import redis as _redis

    from batch.audiences import build_index, publish
    from mvke.runtime.audience import AudienceRule
    from mvke.runtime.keys import Keys
    results = {"system_before": _system(), "runs": []}
    for users in a.users:
        out = Path(a.out) / f"u{users}"
        t0 = time.perf_counter()
        files = sorted((out / "tags").glob("part-*.parquet"))
        if len(files) == -(-users // 65_536) and (out / "_complete").exists():   # parts of an earlier run
            from batch.audience_synth import catalogue
            tags, synth_s = catalogue(), None
        else:
            files, tags = synth_parts(out, users, skew=a.skew)
            (out / "_complete").touch()
            synth_s = round(time.perf_counter() - t0, 1)
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        index = build_index(files, list(TASKS), tags, AudienceRule(20), "bench", {"users": users})
        build_s = time.perf_counter() - t0
        prefix = f"bench{users}"
        r = _redis.Redis.from_url(a.redis, socket_timeout=300)
        used0 = r.info("memory")["used_memory"]
        t0 = time.perf_counter()
        publish(index, r, Keys(prefix))
        publish_s = time.perf_counter() - t0
        used1 = r.info("memory")["used_memory"]
        run = {"users": users, "tags": len(tags), "top_k": 20, "tasks": len(TASKS), "synth_s": synth_s,
               "parquet_bytes": sum(f.stat().st_size for f in files), "build_s": round(build_s, 1),
               "build_peak_rss_mb": round(_rss_mb(), 0), "rss_before_build_mb": round(rss0, 0),
               "bitmap_bytes": index.bytes(), "user_dictionary_bytes": index.user_ids.nbytes,
               "memberships": int(sum(sum(s) for s in index.meta.sizes.values())),
               "publish_s": round(publish_s, 1), "redis_used_memory_bytes": used1 - used0,
               "loadavg_after_build": os.getloadavg()}
        del index
        run["query_no_cache"] = bench_queries(a.redis, prefix, a.queries, cache_mb=0)
        run["query"] = bench_queries(a.redis, prefix, a.queries, cache_mb=256)
        run["loadavg_after_queries"] = os.getloadavg()
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
        r.close()
    results["system_after"] = _system()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
