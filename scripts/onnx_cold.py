"""The fused tower + TopK graph at batch 1, with its tag-side matrices in cache and after a sweep
through 64 MB: what the service's c=1 model call costs when the request's other work (and the
neighbours on the box) have pushed the 1.6 MB of tag matrices out of the core's caches.

    python scripts/onnx_cold.py BUNDLE_DIR [--calls 400]

Prints the median per call of each, the CPU model and the load average (issue 21's c=1 figure); also
the cost of reading the matrices back into the caches (one byte per 64-byte line) alone and before a
cold call: what a request would pay to prefetch them while it waits for Redis.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvke.runtime.contract import read_bundle  # noqa: E402
from mvke.runtime.encoded import EncodedBatch  # noqa: E402
from mvke.runtime.model import build_model  # noqa: E402
from mvke.runtime.system import cpu_model, loadavg  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--calls", type=int, default=400)
    a = p.parse_args()
    model = build_model(*read_bundle(a.bundle), provider="cpu")
    rng = np.random.default_rng(0)
    users = EncodedBatch(rng.integers(1, 30, (1, len(model.schema.cat_fields))).astype(np.int64),
                         rng.integers(1, 30, (1, len(model.schema.multi_fields), model.schema.multi_len)).astype(np.int64))
    sweep = np.ones(64 * 2**20 // 8)
    weights = sum(np.asarray(v).nbytes for v in model.topk_feeds.values())
    print(f"{cpu_model()}, load {loadavg()}; tag-side matrices {weights / 2**20:.2f} MiB")
    lines = [np.asarray(v).reshape(-1).view(np.uint8)[::64] for v in model.topk_feeds.values()]

    def prefetch() -> None:
        for line in lines:
            line.sum()

    rows = (("in cache", False, True, False), ("after a 64 MB sweep", True, True, False),
            ("prefetch alone, after a sweep", True, False, True), ("prefetch + call, after a sweep", True, True, True))
    for label, cold, call, touch in rows * 2:
        times = []
        for _ in range(a.calls):
            if cold:
                sweep += 1.0
            t = time.perf_counter()
            if touch:
                prefetch()
            if call:
                model.rank(users, 20, mode="fused")
            times.append(time.perf_counter() - t)
        print(f"batch 1, {label}: {np.median(times) * 1e6:.1f} us median")


if __name__ == "__main__":
    main()
