"""Where a single request's time goes inside the service: the c=1 cost of each serving variant
without HTTP, the load generator or the kernel's loopback in the figure.

    python scripts/c1_inprocess.py [--work /tmp/lt] [--requests 6000] [--out docs/results/c1_inprocess.json]

One process, one event loop, a private redis-server holding the `mvke pipeline` model and its
users. Each variant is the real ASGI app (service.app.create_app: edge middleware, fast path,
batcher, tagger, model) with its settings; raw ASGI calls (POST /users/<id>/tags {"top_k": 20}),
one at a time, variants alternating every --block requests (so a change of the machine's load
hits them alike). Per variant: wall time per request (p25/p50/p90) and CPU time of this process
per request (user + system, which includes the Redis client's socket writes). Variants:

  before         MVKE_SCORING=numpy, MVKE_IDLE_BYPASS=false (tower in ONNX, scoring in numpy,
                 every request handed to the batch worker and back)
  fused          MVKE_SCORING=onnx, MVKE_IDLE_BYPASS=false (tower + scoring + TopK in one ONNX call)
  after          MVKE_SCORING=onnx, MVKE_IDLE_BYPASS=true (the defaults)

The end-to-end c=1 table (with the straightforward endpoint) is `python -m loadtest.bench --tags ...`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.harness import pipeline, scan_user_ids, start_redis  # noqa: E402
from mvke.runtime.system import cpu_model, loadavg  # noqa: E402

VARIANTS = {"before": {"scoring": "numpy", "idle_bypass": False},
            "fused": {"scoring": "onnx", "idle_bypass": False},
            "after": {"scoring": "onnx", "idle_bypass": True}}
BODY = b'{"top_k": 20}'


async def call(app, user_id: str) -> int:
    """One POST /users/<id>/tags through the app's full ASGI stack -> the status code."""
    path = f"/users/{user_id}/tags"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    messages = [{"type": "http.request", "body": BODY, "more_body": False}]
    status = [0]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)   # the app never asks twice for a complete body

    async def send(message):
        if message["type"] == "http.response.start":
            status[0] = message["status"]

    await app(scope, receive, send)
    return status[0]


async def measure(apps: dict, ids: list[str], n: int, block: int) -> dict:
    rng = random.Random(0)
    for app in apps.values():                              # warm-up: sessions, pools, code paths
        for _ in range(200):
            assert await call(app, rng.choice(ids)) == 200
    wall = {name: [] for name in apps}
    cpu = dict.fromkeys(apps, 0.0)
    order = list(apps)
    for b in range(max(1, n // block)):
        for name in order if b % 2 == 0 else order[::-1]:
            app, c0 = apps[name], time.process_time()
            for _ in range(block):
                uid = rng.choice(ids)
                t0 = time.perf_counter()
                status = await call(app, uid)
                wall[name].append(time.perf_counter() - t0)
                assert status == 200, status
            cpu[name] += time.process_time() - c0
    out = {}
    for name, v in wall.items():
        v.sort()
        out[name] = {"requests": len(v), "p25_us": 1e6 * v[len(v) // 4], "p50_us": 1e6 * v[len(v) // 2],
                     "p90_us": 1e6 * v[9 * len(v) // 10], "cpu_us_per_request": 1e6 * cpu[name] / len(v)}
    return out


async def run_apps(redis_url: str, ids: list[str], n: int, block: int) -> dict:
    from contextlib import AsyncExitStack

    from service.app import create_app
    from service.settings import Settings
    os.environ["REDIS_URL"] = redis_url
    apps = {name: create_app(Settings(log_level="WARNING", **kw)) for name, kw in VARIANTS.items()}
    async with AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        deadline = time.monotonic() + 60
        while any(app.state.svc.registry.current is None for app in apps.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("no model loaded within 60 s")
            await asyncio.sleep(0.05)
        for name, app in apps.items():
            m = app.state.svc.registry.current
            assert m.scoring == VARIANTS[name]["scoring"], (name, m.scoring)
        return await measure(apps, ids, n, block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/lt", help="`mvke pipeline` work folder (built when missing)")
    p.add_argument("--requests", type=int, default=6000, help="requests per variant")
    p.add_argument("--block", type=int, default=25, help="requests per variant before switching")
    p.add_argument("--out", help="also write the figures as JSON here")
    a = p.parse_args(argv)
    import uvloop
    load_before = loadavg()
    redis = start_redis()
    try:
        pipeline(a.work, "mvke-mt", redis.url, log=Path(a.work) / "pipeline_publish.log")
        ids = scan_user_ids(redis.url)
        res = uvloop.run(run_apps(redis.url, ids, a.requests, a.block))
    finally:
        redis.stop()
    doc = {"cpu": cpu_model() or "?", "nproc": os.cpu_count(), "load_before": load_before, "load_after": loadavg(),
           "requests_per_variant": a.requests, "variants": VARIANTS, "results": res}
    print(f"{doc['nproc']} CPUs ({doc['cpu']}), load average before {load_before}, after {doc['load_after']}")
    print(f"{'variant':8} {'p25 us':>8} {'p50 us':>8} {'p90 us':>8} {'CPU us/request':>15}")
    for name, r in res.items():
        print(f"{name:8} {r['p25_us']:8.0f} {r['p50_us']:8.0f} {r['p90_us']:8.0f} {r['cpu_us_per_request']:15.0f}")
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
