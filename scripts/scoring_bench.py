"""Scoring on the CPU: numpy (ORT tower + numpy scoring + numpy top-k) against the fused ONNX graph
(tower -> every tag's score -> TopK in one ORT call), per batch size and catalogue size.

    python scripts/scoring_bench.py --bundles DIR[,DIR...] [--batches 1,16,256] [--rounds 12] [--block-s 0.25]
                                    [--json FILE] [--md FILE]
    python scripts/scoring_bench.py --ckpt CKPT --work DIR --tags 1780,100000 ...   (exports the bundles first:
                                    `mvke export --synthetic-tags N --ann off`, kept under --work)

Each bundle is loaded twice as the service loads it (mvke.runtime.model.build_model, CPU provider, 1 intra-op
thread, BLAS capped to 1 thread as the service does (--blas-threads), dense scoring: no candidate index): once with
scoring="numpy", once with scoring="onnx". For each batch size the two variants alternate in blocks of
--block-s seconds (order flipped every round, so a change of the machine's load hits both), --rounds rounds;
per variant the median users/s over the rounds, and the fused/numpy ratio as the median of the per-round
ratios (paired: the two blocks of a round ran back to back). The two variants' top-20 indices are compared
on one batch (agreement printed: same work, not a shortcut). CPU model and load average beside the figures.
The markdown table goes between `<!-- scoring:begin -->` and `<!-- scoring:end -->` of --md (text outside
the markers is kept).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from mvke.runtime.system import cpu_model, limit_blas_threads, loadavg  # noqa: E402

K = 20


def export(ckpt: str, work: Path, tags: int) -> Path:
    from loadtest.harness import mvke
    out = work / f"bundle_scoring{tags}"
    if not (out / "manifest.json").exists():
        mvke("export", ckpt, "--out", str(out), "--ann", "off", "--synthetic-tags", str(tags))
    return out


def block_rate(fn, users: int, seconds: float) -> float:
    """users/s of `fn` (one call = `users` users) over at least `seconds` and at least one call."""
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * users / (time.perf_counter() - t0)


def bench_bundle(bundle: Path, batches: list[int], rounds: int, block_s: float) -> dict:
    from mvke.runtime.contract import read_bundle
    from mvke.runtime.encoded import EncodedBatch
    from mvke.runtime.model import build_model
    manifest, blobs = read_bundle(bundle, verify=False)
    numpy_model = build_model(manifest, blobs, "cpu", 1, ann_mode="off", scoring="numpy")
    fused_model = build_model(manifest, blobs, "cpu", 1, ann_mode="off", scoring="onnx")
    assert numpy_model.scoring == "numpy" and fused_model.scoring == "onnx", "bundle has no dense fused graph"
    schema = numpy_model.schema
    ks = {t: K for t in manifest.task_names}
    rng = np.random.default_rng(0)
    load_before = loadavg()
    rows = []
    for b in batches:
        cat = rng.integers(1, 3, (b, len(schema.cat_fields))).astype(np.int64)
        multi = np.zeros((b, len(schema.multi_fields), schema.multi_len), dtype=np.int64)
        variants = {
            "numpy": lambda: numpy_model.rank(EncodedBatch(cat, multi), ks, mode="numpy"),
            "fused": lambda: fused_model.rank(EncodedBatch(cat, multi), ks, mode="fused"),
        }
        a, f = variants["numpy"](), variants["fused"]()   # warm-up + the same answer
        agree = statistics.mean(len(set(a[t].tag_index[i]) & set(f[t].tag_index[i])) / K
                                for t in ks for i in range(b))
        rates = {name: [] for name in variants}
        for r in range(rounds):
            for name in (("numpy", "fused") if r % 2 == 0 else ("fused", "numpy")):
                rates[name].append(block_rate(variants[name], b, block_s))
        med = {name: statistics.median(v) for name, v in rates.items()}
        ratio = statistics.median(f / n for f, n in zip(rates["fused"], rates["numpy"]))
        row = {"batch": b, "numpy_users_s": med["numpy"], "fused_users_s": med["fused"],
               "numpy_us_per_user": 1e6 / med["numpy"], "fused_us_per_user": 1e6 / med["fused"],
               "fused_over_numpy": ratio, "faster": "fused" if ratio > 1 else "numpy",
               "top20_agreement": agree, "rounds": rates, "load": loadavg()}
        rows.append(row)
        print(f"{manifest.num_tags:>9,} tags  batch {b:>4}: numpy {med['numpy']:>9,.0f} users/s "
              f"({1e6 / med['numpy']:8.1f} us/user)  fused {med['fused']:>9,.0f} users/s "
              f"({1e6 / med['fused']:8.1f} us/user)  fused/numpy {ratio:5.2f}x  top-20 agree {agree:.4f}  "
              f"load {row['load']}", flush=True)
    return {"bundle": str(bundle), "version": manifest.version, "tags": manifest.num_tags,
            "tasks": {t.name: {"experts": len(t.experts)} for t in manifest.tasks}, "load_before": load_before,
            "load_after": loadavg(), "batches": rows}


ANN_MIN_TAGS = 50_000   # service/settings.py ann_min_tags, batch --ann-min-tags (MVKE_ANN=auto)


def code_uses(tags: int, batch: int) -> str:
    """What the code picks on the CPU (service/tagger.py Tagger.compute, batch/tag_all.py rank_users,
    mvke/runtime/model.py build_model): the service ranks through the fused graph whenever the version
    ships one and every task is dense (MVKE_SCORING=auto; plain requests at any batch the batcher forms,
    1-16, and POST /tags:batch up to 256; candidate scoring and explanations take the two calls);
    tag-all scores in chunks of 512, through the fused graph as well (numpy only for a version without
    one or with a candidate index). From
    ANN_MIN_TAGS tags up MVKE_ANN=auto serves the candidate index instead (no dense side, so no fused
    graph): these rows are then what MVKE_ANN=off or tag-all --ann off run."""
    where = {1: "service c=1 (idle bypass)", 16: "service batcher (max 16)"}.get(batch, f"batch {batch}")
    if batch >= 256:
        where, uses = "service POST /tags:batch (max 256), tag-all CPU (chunks of 512)", "fused"
    else:
        uses = "fused"
    if tags >= ANN_MIN_TAGS:
        return f"{where}: candidate index by default; with MVKE_ANN=off {uses}"
    return f"{where}: {uses}"


def markdown(doc: dict) -> str:
    lines = [f"Run {doc['when']}: `{doc['command']}`; {doc['nproc']} CPUs ({doc['cpu']}), load average before "
             f"{doc['load_before']}, after {doc['load_after']} (1, 5, 15 min; the machine is shared with training "
             f"jobs: absolute figures are depressed, the ratio of one row is paired). CPU provider, 1 ORT intra-op "
             f"thread, BLAS {doc.get('blas', 'capped to 1 thread')}, top {K} per task, dense (no candidate index). Medians over "
             f"{doc['rounds']} interleaved rounds of {doc['block_s']} s per variant.", "",
             "| tags | batch | numpy users/s | fused users/s | numpy us/user | fused us/user | fused / numpy | "
             "faster | top-20 agreement | load (1 min) | the code uses here (CPU) |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for cat in doc["catalogues"]:
        for r in cat["batches"]:
            lines.append(f"| {cat['tags']:,} | {r['batch']} | {r['numpy_users_s']:,.0f} | {r['fused_users_s']:,.0f} | "
                         f"{r['numpy_us_per_user']:.1f} | {r['fused_us_per_user']:.1f} | {r['fused_over_numpy']:.2f}x | "
                         f"{r['faster']} | {r['top20_agreement']:.4f} | {r['load'][0]} | "
                         f"{code_uses(cat['tags'], r['batch'])} |")
    return "\n".join(lines)


def write_md(path: Path, body: str, marker: str = "scoring") -> None:
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Scoring on the CPU: fused ONNX vs numpy\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundles", type=lambda s: s.split(","), default=[], help="exported bundle folders")
    p.add_argument("--ckpt", help="checkpoint to export with --tags (when --bundles is not given)")
    p.add_argument("--work", default="/tmp/scoring_bench", help="where --ckpt's bundles go")
    p.add_argument("--tags", type=lambda s: [int(x) for x in s.split(",")], default=[1780, 100_000])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 256])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--block-s", type=float, default=0.25, help="seconds per variant per round")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="cap of numpy's BLAS threads (1: as the service and tag-all's actors; 0: no cap)")
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("--render", metavar="JSON", help="only write --md from a run's --json")
    a = p.parse_args(argv)
    if a.render:
        write_md(Path(a.md), markdown(json.loads(Path(a.render).read_text())))
        return 0
    blas = limit_blas_threads(a.blas_threads) if a.blas_threads else "not capped"   # the service: MVKE_BLAS_THREADS=1
    bundles = [Path(b) for b in a.bundles]
    if not bundles:
        if not a.ckpt:
            p.error("give --bundles or --ckpt")
        Path(a.work).mkdir(parents=True, exist_ok=True)
        bundles = [export(a.ckpt, Path(a.work), n) for n in a.tags]
    doc = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
           "command": "python scripts/scoring_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "cpu": cpu_model() or "?", "nproc": os.cpu_count(), "load_before": loadavg(), "rounds": a.rounds,
           "block_s": a.block_s, "blas": blas, "catalogues": []}
    print(f"{doc['nproc']} CPUs ({doc['cpu']}), load average {doc['load_before']}, BLAS {blas}", flush=True)
    for bundle in bundles:
        doc["catalogues"].append(bench_bundle(bundle, a.batches, a.rounds, a.block_s))
        doc["load_after"] = loadavg()
        if a.json:
            Path(a.json).write_text(json.dumps(doc, indent=1))
    print(f"load average after {doc['load_after']}")
    if a.md:
        write_md(Path(a.md), markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
