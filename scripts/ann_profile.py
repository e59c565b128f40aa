"""Where the ANN query path's time goes, per batch: candidate search vs exact rerank vs the rest.

    python scripts/ann_profile.py --ckpt /tmp/lt/ckpt/<mvke-mt> [--tags 20000,100000] [--batches 1,32]
                                  [--threads 1,2] [--clusters 1,8] [--out FILE.json]

Catalogue: the checkpoint's trained tag tower run on synthetic tag ids (model_export/synthetic_tags.py);
users: random feature ids through the checkpoint's user tower. For each size and task: the index of
mvke.runtime.ann (per --clusters), its nprobe set by the export's gate (recall@20 >= 0.95 over
--gate-users users), then per batch size (--batches) and FAISS OpenMP thread count (--threads):

  search   TaskAnn.search (query vectors, FAISS, merging the clusters' candidates)
  rerank   gathered_cosines on the candidate ids (gathers + exact cosine)
  total    TaskAnn.top_k (search + rerank + top-k + sorting)
  exact    exact_top_k from the factors (what `"exact": true` runs), and the dense two GEMMs
           (task_cosines + top_k: the service's exact path)

Times are medians over --reps passes of 256 users, in microseconds per batch (and per user). BLAS
(numpy's and FAISS's) is capped to one thread like the service's; the machine is shared, so compare
rows of one run only. CPU model and load average are printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvke.runtime import ann  # noqa: E402
from mvke.runtime.system import cpu_model, limit_blas_threads, loadavg  # noqa: E402

USERS = 256


def timed(fn, values: np.ndarray, batch: int, reps: int) -> float:
    """Median over `reps` passes of microseconds per batch (USERS users in batches of `batch`)."""
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for lo in range(0, USERS, batch):
            fn(values[lo:lo + batch])
        runs.append((time.perf_counter() - t0) / (USERS // batch) * 1e6)
    return statistics.median(runs)


def tag_side_of(ckpt: str, size: int) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    import torch
    from model_export.synthetic_tags import grow_tag_catalogue
    from mvke.runtime.features import random_users
    from mvke.training.trainer import load_checkpoint
    grown = grow_tag_catalogue(load_checkpoint(ckpt), size)
    cat, multi = random_users(grown.schema, 1024, np.random.default_rng(0))
    with torch.no_grad():
        sides = [(e.numpy(), g.numpy()) for e, g in grown.model.all_tag_vectors()]
        values = [v.numpy() for v in grown.model.user_vectors(torch.from_numpy(cat), torch.from_numpy(multi))]
    return list(grown.model.tasks), sides, values


def profile(a: argparse.Namespace) -> list[dict]:
    import torch
    from mvke.runtime.scoring import TaskTagSide, exact_top_k, gathered_cosines, task_cosines, top_k, unit_rows
    from mvke.runtime.contract import TaskSpec
    torch.set_num_threads(1)
    rows = []
    for size in a.tags:
        tasks, sides, values = tag_side_of(a.ckpt, size)
        limit_blas_threads(1)          # FAISS's own OpenBLAS is loaded now: cap it too, as the service does
        for task, (emb, gates), v in zip(tasks, sides, values):
            unit = unit_rows(emb)
            v = np.ascontiguousarray(v, dtype=np.float32)
            K, D = v.shape[1:]
            dense = TaskTagSide.build(TaskSpec(task, list(range(K)), [0, K], 1.0, 0.0), gates, emb)
            for clusters in a.clusters:
                cfg = ann.AnnConfig(gate_clusters=clusters, nprobe=1, gate_users=a.gate_users)
                t0 = time.perf_counter()
                index = ann.build_task_index(gates, emb, cfg, threads=2)
                build_s = time.perf_counter() - t0
                tann = ann.TaskAnn(index, unit, gates, cfg.candidates)
                gate = ann.tune_nprobe(tann, v[:a.gate_users], cfg)
                n = max(cfg.candidates, 40)
                for threads in a.threads:
                    index.threads = threads
                    for batch in a.batches:
                        ids = tann.search(v[:batch], n)
                        row = {"tags": size, "task": task, "K": K, "D": D, "clusters": len(index.indexes),
                               "nlist": index.nlist, "nprobe": gate.nprobe, "recall": round(gate.recall, 4),
                               "build_s": round(build_s, 1), "faiss_threads": threads, "batch": batch,
                               "search_us": timed(lambda x: tann.search(x, n), v, batch, a.reps),
                               "rerank_us": timed(lambda x: gathered_cosines(
                                   x, np.where(ids[:len(x)] < 0, 0, ids[:len(x)]), unit, gates), v, batch, a.reps),
                               "total_us": timed(lambda x: tann.top_k(x, 20), v, batch, a.reps)}
                        if clusters == a.clusters[0] and threads == a.threads[0]:
                            row["exact_factors_us"] = timed(lambda x: exact_top_k(x, unit, gates, 20), v, batch,
                                                            max(1, a.reps // 2))
                            row["exact_dense_us"] = timed(lambda x: top_k(task_cosines(x, dense), 20), v,
                                                          batch, max(1, a.reps // 2))
                        row["other_us"] = row["total_us"] - row["search_us"] - row["rerank_us"]
                        rows.append(row)
                        print(json.dumps({k: (round(x, 1) if isinstance(x, float) else x) for k, x in row.items()}),
                              flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| tags | task (K) | clusters | nlist / nprobe | recall@20 | FAISS threads | batch | search us | "
             "rerank us | other us | total us | us/user | exact dense us/user | exact factors us/user |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["batch"]
        ed = f"{r['exact_dense_us'] / b:.0f}" if "exact_dense_us" in r else ""
        ef = f"{r['exact_factors_us'] / b:.0f}" if "exact_factors_us" in r else ""
        lines.append(f"| {r['tags']:,} | {r['task']} ({r['K']}) | {r['clusters']} | {r['nlist']} / {r['nprobe']} | "
                     f"{r['recall']:.4f} | {r['faiss_threads']} | {b} | {r['search_us']:.0f} | {r['rerank_us']:.0f} | "
                     f"{r['other_us']:.0f} | {r['total_us']:.0f} | {r['total_us'] / b:.0f} | {ed} | {ef} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tags", default="20000,100000", type=ints)
    p.add_argument("--batches", default="1,32", type=ints)
    p.add_argument("--threads", default="1,2", type=ints)
    p.add_argument("--clusters", default="1,8", type=ints)
    p.add_argument("--gate-users", type=int, default=500)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="JSON rows (+ the table as FILE.md)")
    a = p.parse_args(argv)
    load = loadavg()
    rows = profile(a)
    text = (f"CPU: {cpu_model()}; load average before {load}, after {loadavg()}; "
            f"`python scripts/ann_profile.py {' '.join(argv or sys.argv[1:])}`\n\n" + table(rows))
    print(text)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
        Path(a.out).with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
