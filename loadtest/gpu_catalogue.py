"""Tower + scoring + TopK on the GPU against catalogue size (run by loadtest/gpu_check.sh).

    python -m loadtest.gpu_catalogue --work DIR [--ckpt CKPT --data DIR] [--tags 1780,100000,1000000] [--json OUT]

Without --ckpt/--data: the small model of loadtest/gpu_check.py (`mvke pipeline`, 2,000 synthetic
users, 1 epoch) under --work, built when missing.

For each catalogue size: the checkpoint exported with its trained tag tower run on synthetic tag
ids (`mvke export --synthetic-tags N --ann off`: exact scoring, no index, no recall gate to wait
for), loaded as the service loads it (mvke.runtime.model.build_model) with the CUDA provider when
one really runs, else the CPU (said in the report): users/s of the fused graph (tower -> every
tag's score -> TopK 20 per task in one ONNX call, tag-side matrices bound on the device) and of
the CPU reference (ORT tower + numpy scoring) at batch 1, 16, 256. Then the service itself
(`mvke serve`, 1 worker, MVKE_ORT_PROVIDER=cuda) at c=32 for each size: QPS, p50, p99.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 16, 256)


def per_second(fn, users: int, budget_s: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s or n == 0:
        fn()
        n += 1
    return n * users / (time.perf_counter() - t0)


def export(ckpt: str, work: Path, tags: int) -> Path:
    from loadtest.harness import mvke
    out = work / f"bundle_gpu{tags}"
    if not (out / "manifest.json").exists():
        mvke("export", ckpt, "--out", str(out), "--ann", "off", "--synthetic-tags", str(tags))
    return out


def scoring_rates(bundle: Path, budget_s: float) -> dict:
    from mvke.runtime.contract import read_bundle
    from mvke.runtime.encoded import EncodedBatch
    from mvke.runtime.model import build_model
    manifest, blobs = read_bundle(bundle, verify=False)
    fused = build_model(manifest, blobs, "auto", scoring="onnx")
    cpu = build_model(manifest, blobs, "cpu", scoring="numpy")
    rng = np.random.default_rng(0)
    schema = cpu.schema
    out = {"provider": fused.provider, "tags": manifest.num_tags}
    ks = {t: 20 for t in manifest.task_names}
    for b in BATCHES:
        cat = rng.integers(1, 3, (b, len(schema.cat_fields))).astype(np.int64)
        multi = np.zeros((b, len(schema.multi_fields), schema.multi_len), dtype=np.int64)
        out[f"fused_b{b}"] = per_second(lambda: fused.rank(EncodedBatch(cat, multi), ks, mode="fused"), b, budget_s)
        out[f"cpu_numpy_b{b}"] = per_second(lambda: cpu.rank(EncodedBatch(cat, multi), ks, mode="numpy"), b,
                                            budget_s)
    return out


def service_rate(bundle: Path, data: Path, seconds: float) -> dict:
    from loadtest.harness import Server, make_requests, run_load, serve_bundle, start_redis
    redis = start_redis()
    try:
        reqs = make_requests(serve_bundle(redis.url, bundle, data), 4096, seed=1)
        with Server.service(redis.url, workers=1, env={"MVKE_ORT_PROVIDER": "cuda"}) as svc:
            svc_info = json.loads(__import__("httpx").get(svc.url + "/model", timeout=5).text)
            r = run_load(svc.port, reqs, 32, seconds, 1.0)
        return {"qps_c32": r["qps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "status": r["status"],
                "provider": svc_info.get("provider")}
    finally:
        redis.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="checkpoint (default: gpu_check's small model under --work)")
    p.add_argument("--data", help="the dataset directory (users for the service rows; default: as --ckpt)")
    p.add_argument("--work", required=True)
    p.add_argument("--tags", default="1780,100000,1000000", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per batch size")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of load per service row")
    p.add_argument("--json")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (a.ckpt and a.data):
        from loadtest.gpu_check import small_model
        done = small_model(work)
        a.ckpt, a.data = a.ckpt or done["checkpoint"], a.data or done["data"]
    rows = []
    for n in a.tags:
        t0 = time.perf_counter()
        bundle = export(a.ckpt, work, n)
        row = {"export_s": time.perf_counter() - t0, **scoring_rates(bundle, a.budget)}
        row["service"] = service_rate(bundle, Path(a.data), a.seconds)
        rows.append(row)
        print(f"{n:>9,} tags on {row['provider']}: fused users/s " +
              ", ".join(f"b{b} {row[f'fused_b{b}']:,.0f}" for b in BATCHES) + " | CPU numpy users/s " +
              ", ".join(f"b{b} {row[f'cpu_numpy_b{b}']:,.0f}" for b in BATCHES) +
              f" | service c32 {row['service']['qps_c32']:,.0f} QPS p99 {row['service']['p99_ms']:.1f} ms "
              f"({row['service']['provider']}) | export {row['export_s']:.0f} s", flush=True)
        if a.json:   # after every size: a timeout at 1M keeps the rows before it
            Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
