"""Which FAISS index for the numerator search: recall@20 and search time per user against nprobe.

    python scripts/ann_variants.py --ckpt /tmp/lt/ckpt/<mvke-mt> --tags 1000000 --tasks 0,1 \
        --specs "SQ8:1024:100;SQ8:4096:100" > out.jsonl

Catalogue and users as scripts/ann_profile.py (trained tag tower on synthetic tag ids, 512 random
users). A spec is FAISS-codec:nlist:candidates ("SQ8", "PQ48x4fs", "Flat"...): IVF over w_t
(inner product), trained on 64 points per list; for nprobe 4, 8, ... (until recall > 0.995), the
recall@20 of the exact rerank of its candidates against the exact top 20, and the search time per
user at batch 32 on one FAISS thread (best of 3 passes over 256 users). One JSON line per point.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvke.runtime import ann  # noqa: E402
from mvke.runtime.scoring import EXACT_CHUNK, exact_top_k, gathered_cosines, numerator_rows, top_k, unit_rows  # noqa: E402
from mvke.runtime.system import cpu_model, limit_blas_threads, loadavg  # noqa: E402
from scripts.ann_profile import tag_side_of  # noqa: E402


def variants(emb: np.ndarray, gates: np.ndarray, v: np.ndarray, spec: str, exact: np.ndarray) -> list[dict]:
    faiss = ann.load_faiss()
    name, nlist, cands = spec.split(":")
    nlist, cands = int(nlist), int(cands)
    unit = unit_rows(emb)
    q = np.ascontiguousarray(v.reshape(len(v), -1))
    ann.limit_faiss_threads(2)
    t0 = time.time()
    index = faiss.index_factory(q.shape[1], f"IVF{nlist},{name}", faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(0).choice(len(gates), min(len(gates), 64 * nlist), replace=False))
    index.train(numerator_rows(gates[sample], unit[sample])[0])
    for lo in range(0, len(gates), EXACT_CHUNK):
        index.add(numerator_rows(gates[lo:lo + EXACT_CHUNK], unit[lo:lo + EXACT_CHUNK])[0])
    build = time.time() - t0
    ann.limit_faiss_threads(1)
    rows = []
    for nprobe in (4, 8, 16, 32, 64, 128):
        if nprobe > nlist:
            break
        index.nprobe = nprobe
        ids = index.search(q, cands)[1]
        safe = np.where(ids < 0, 0, ids)
        cos = gathered_cosines(v, safe, unit, gates)
        cos[ids < 0] = -np.inf
        top, _ = top_k(cos, cos.shape[1], safe)
        recall = ann.recall_at_k(top[:, :exact.shape[1]], exact)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            for lo in range(0, 256, 32):
                index.search(q[lo:lo + 32], cands)
            ts.append((time.perf_counter() - t0) / 256 * 1e6)
        rows.append({"index": f"IVF{nlist},{name}", "cands": cands, "nprobe": nprobe, "recall": round(recall, 4),
                     "search_us_user_b32": round(min(ts), 1), "build_s": round(build, 1),
                     "MB": round(faiss.serialize_index(index).nbytes / 1e6, 1), "load": loadavg()})
        if recall > 0.995:
            break
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tags", type=int, default=1_000_000)
    p.add_argument("--tasks", default="0,1")
    p.add_argument("--specs", default="SQ8:1024:100;SQ8:4096:100")
    a = p.parse_args(argv)
    print(json.dumps({"cpu": cpu_model(), "load": loadavg()}), flush=True)
    tasks, sides, values = tag_side_of(a.ckpt, a.tags)
    limit_blas_threads(1)
    for ti in map(int, a.tasks.split(",")):
        emb, gates = sides[ti]
        v = np.ascontiguousarray(values[ti][:512], dtype=np.float32)
        exact, _ = exact_top_k(v, unit_rows(emb), gates, 20)
        for spec in a.specs.split(";"):
            for row in variants(emb, gates, v, spec, exact):
                print(json.dumps({"tags": a.tags, "task": tasks[ti], **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
