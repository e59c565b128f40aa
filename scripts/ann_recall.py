"""Which candidate scheme: recall@20 against exact scoring, speed and size, on a trained tag side.

    python scripts/ann_recall.py --ckpt runs/ck --tags 100000,1000000 [--users 1000] [--out docs/results/ann.md]

The catalogue: the checkpoint's trained tag tower run on synthetic tag ids
(model_export/synthetic_tags.py). Users: the checkpoint's training users when its data is on
disk, else random ids. For each catalogue size, task and gate sharpness (1 = the trained gates;
10 = a_t^10 renormalised: near one-hot gates, the hard case for a numerator-only search) it
measures, against the exact top 20 by cosine:

  numerator top-C   the exact MIPS top C of vec(V) . w_t (no index): how often the exact top 20
                    is among the best numerators, i.e. what the denominator alone costs;
  ivf, 1 cluster    mvke.runtime.ann with gate_clusters=1 (IVF-SQ8 over w_t, exact rerank);
  ivf, 8 clusters   the shipped default (tags grouped by gate, query over each group's denominator);

each index with the export's quality gate (nprobe doubled until recall@20 >= 0.95), its
search + rerank time per user at batch 16 (one thread), build time and size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvke.runtime import ann  # noqa: E402
from mvke.runtime.scoring import EXACT_CHUNK, exact_top_k, gathered_cosines, numerator_rows, top_k, unit_rows  # noqa: E402
from mvke.runtime.system import cpu_model  # noqa: E402


def sharpened(gates: np.ndarray, power: float) -> np.ndarray:
    if power == 1:
        return gates
    g = np.exp(power * np.log(np.maximum(gates, 1e-30)))
    return (g / g.sum(1, keepdims=True)).astype(np.float32)


def numerator_recall(values: np.ndarray, gates: np.ndarray, unit: np.ndarray, exact: np.ndarray, c: int) -> float:
    import faiss
    flat = faiss.IndexFlatIP(gates.shape[1] * unit.shape[1])
    for lo in range(0, len(gates), EXACT_CHUNK):
        flat.add(numerator_rows(gates[lo:lo + EXACT_CHUNK], unit[lo:lo + EXACT_CHUNK])[0])
    ids = flat.search(np.ascontiguousarray(values.reshape(len(values), -1)), c)[1]
    top, _ = top_k(gathered_cosines(values, ids, unit, gates), ids.shape[1], ids)
    return ann.recall_at_k(top[:, :exact.shape[1]], exact)


def per_user_us(task: ann.TaskAnn, values: np.ndarray, batch: int = 16, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for lo in range(0, 256, batch):
            task.top_k(values[lo:lo + batch], 20)
        best = min(best, (time.perf_counter() - t0) / 256 * 1e6)
    return best


def run(a: argparse.Namespace) -> list[dict]:
    import torch
    from model_export.synthetic_tags import grow_tag_catalogue
    from mvke.training.trainer import load_checkpoint
    torch.set_num_threads(1)
    ann.limit_faiss_threads(1)
    rows = []
    base = load_checkpoint(a.ckpt)
    cat, multi = users(a, base)
    with torch.no_grad():
        values = [v.numpy() for v in base.model.user_vectors(torch.from_numpy(cat), torch.from_numpy(multi))]
    for size in a.tags:
        grown = grow_tag_catalogue(load_checkpoint(a.ckpt), size)
        with torch.no_grad():
            sides = [(e.numpy(), g.numpy()) for e, g in grown.model.all_tag_vectors()]
        for ti, (task, (emb, gates0)) in enumerate(zip(grown.model.tasks, sides)):
            unit = unit_rows(emb)
            for power in a.sharpen:
                gates = sharpened(gates0, power)
                v = values[ti]
                t0 = time.perf_counter()
                exact, _ = exact_top_k(v, unit, gates, 20)
                exact_s = time.perf_counter() - t0
                row = {"tags": size, "task": task, "K": gates.shape[1], "sharpen": power,
                       "gate_max_mean": float(gates.max(1).mean()), "users": len(v),
                       "exact_ms_per_user": exact_s / len(v) * 1e3,
                       "numerator": {c: numerator_recall(v, gates, unit, exact, c) for c in (20, 50, 100)}}
                for clusters, nprobe in ((1, 4), (8, 1)):
                    cfg = ann.AnnConfig(gate_clusters=clusters, nprobe=nprobe)
                    t0 = time.perf_counter()
                    index = ann.build_task_index(gates, emb, cfg)
                    build = time.perf_counter() - t0
                    task_ann = ann.TaskAnn(index, unit, gates, cfg.candidates)
                    gate = ann.tune_nprobe(task_ann, v, cfg)
                    row[f"ivf{clusters}"] = {"recall": gate.recall, "nprobe": gate.nprobe, "tried": gate.tried,
                                             "build_s": build, "bytes": len(index.to_bytes()),
                                             "us_per_user_b16": per_user_us(task_ann, v)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def users(a: argparse.Namespace, base) -> tuple[np.ndarray, np.ndarray]:
    from model_export.bundle import random_users, real_users
    real = real_users(base.data_dir, base.schema, a.users)
    return real if real is not None else random_users(base.schema, a.users, np.random.default_rng(0))


def report(rows: list[dict], a: argparse.Namespace, started: str, load: list[float]) -> str:
    cpu = cpu_model() or "?"
    lines = [f"Run {started}: `python scripts/ann_recall.py --ckpt {a.ckpt} --tags {','.join(map(str, a.tags))} "
             f"--users {a.users}`; {os.cpu_count()} CPUs ({cpu}), load average before {load}, after "
             f"{[round(x, 2) for x in os.getloadavg()]} (a shared, busy machine: times are upper bounds). "
             "Catalogue: the trained mvke-mt tag tower run on synthetic tag ids; users: training users. "
             "Recall@20 against the exact top 20 by cosine; times per user at batch 16, one thread.", "",
             "| tags | task (K) | gates | numerator top-20 / 50 / 100 | IVF 1 cluster: recall (nprobe), us/user, MB, build s "
             "| IVF 8 gate clusters: recall (nprobe), us/user, MB, build s | exact ms/user |",
             "|---:|---|---|---|---|---|---:|"]
    for r in rows:
        n = r["numerator"]
        cells = []
        for key in ("ivf1", "ivf8"):
            x = r[key]
            cells.append(f"{x['recall']:.4f} ({x['nprobe']}), {x['us_per_user_b16']:.0f}, {x['bytes'] / 1e6:.1f}, "
                         f"{x['build_s']:.1f}")
        gates = "trained" if r["sharpen"] == 1 else f"a^{r['sharpen']:g}"
        lines.append(f"| {r['tags']:,} | {r['task']} ({r['K']}) | {gates} (mean max {r['gate_max_mean']:.2f}) | "
                     f"{n[20]:.4f} / {n[50]:.4f} / {n[100]:.4f} | {cells[0]} | {cells[1]} | "
                     f"{r['exact_ms_per_user']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tags", default="100000,1000000", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--sharpen", default="1,10", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results" / "ann.md"))
    a = p.parse_args(argv)
    started, load = time.strftime("%Y-%m-%d %H:%M:%S %Z"), [round(x, 2) for x in os.getloadavg()]
    rows = run(a)
    text = report(rows, a, started, load)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Candidate schemes for large catalogues (scripts/ann_recall.py)\n\n" + text + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
