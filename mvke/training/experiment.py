"""Offline experiments of paper section 5.2: every variant over several seeds, tables and figures.

`run_experiment` trains each model of `mvke.models.MODELS` once per seed on
one prepared dataset (the same train/valid/test rows for all), then writes to
`out_dir`:

* `results.json`: per model the mean and std (sample std, ddof=1) over seeds
  of the test AUC of both tasks (ctr = task "interest", cvr = task
  "intention"), parameter count, mean training seconds and samples/s, and the
  per-seed numbers; the oracle AUC (true probabilities) on synthetic data; the
  expert sweep and gate weights when asked for;
* `results.md`: the table, the exact command and the machine;
* `auc_bar.png` (Fig. 6), and with `sweep_experts` `expert_sweep.png` (Fig. 7)
  and `gate_heatmap.png` (Fig. 8).
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mvke.models import MODELS
from mvke.training import plots
from mvke.training.trainer import EncodedData, TrainConfig, TrainResult, model_config_for, prepare, train_model

TASK_KEYS = {"interest": "ctr", "intention": "cvr"}
SWEEP_EXPERTS = range(4, 11)
HEATMAP_TAGS = 10
RESULT_FILES = ("results.json", "results.md", "auc_bar.png", "expert_sweep.png", "gate_heatmap.png")


def sweep_task_experts(k: int) -> dict[str, list[int]]:
    """Task -> experts for K experts in the sweep (0-based).

    Interest gets the first round(0.6 K) experts, intention the last
    round(0.8 K); each share is clamped to K - 1 so every task keeps at least
    one expert of its own, and the two ranges always overlap. K = 5 gives the
    paper's 1-3 / 2-5.
    """
    if k < 2:
        raise ValueError(f"the sweep needs at least 2 experts, got {k}")
    n_ctr = min(k - 1, max(1, int(0.6 * k + 0.5)))
    n_cvr = min(k - 1, max(1, int(0.8 * k + 0.5)))
    return {"interest": list(range(n_ctr)), "intention": list(range(k - n_cvr, k))}


def _std(xs: list[float]) -> float:
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def _summary(runs: list[dict]) -> dict:
    out: dict = {}
    for task, key in TASK_KEYS.items():
        vals = [r["test_auc"][task] for r in runs]
        out[f"{key}_auc_mean"] = float(np.mean(vals))
        out[f"{key}_auc_std"] = _std(vals)
    out["params"] = runs[0]["params"]
    out["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
    out["samples_per_second"] = float(np.mean([r["samples_per_second"] for r in runs]))
    out["seeds"] = len(runs)
    out["per_seed"] = [{
        "seed": r["seed"], "ctr_auc": r["test_auc"]["interest"], "cvr_auc": r["test_auc"]["intention"],
        "train_seconds": r["train_seconds"], "samples_per_second": r["samples_per_second"],
        "epochs_run": len(r["history"]),
        "best_epoch": 1 + int(np.argmax([np.mean([h[f"valid_{t}_auc"] for t in TASK_KEYS]) for h in r["history"]])),
    } for r in runs]
    return out


def _config_record(cfg) -> dict:
    """The model config without the dataset-derived sizes (those are in the data)."""
    d = asdict(cfg)
    for k in ("num_ids", "num_cat_fields", "num_multi_fields", "num_tags"):
        d.pop(k, None)
    return d


def _data_command(data: EncodedData, data_dir: str | Path) -> str:
    meta = data.dataset.meta
    if meta.get("name") == "synthetic" and "generator" in meta:
        g = meta["generator"]
        return f"mvke data synth --out {data_dir} --users {g['users']} --tags {g['tags']} --seed {g['seed']}"
    if meta.get("name") == "ml100k":
        return f"mvke data ml100k --out {data_dir} --negatives {meta.get('negatives', 4)} --seed {meta.get('seed', 0)}"
    return f"(dataset {data.dataset.name!r} at {data_dir})"


def experiment_command(data_dir, out_dir, seeds, models, sweep_experts, epochs) -> str:
    parts = ["mvke", "experiment", "--data", str(data_dir), "--out", str(out_dir), "--seeds", str(seeds)]
    if models:
        parts += ["--models", ",".join(models)]
    if sweep_experts:
        parts.append("--sweep-experts")
    parts += ["--epochs", str(epochs)]
    return shlex.join(parts)


def machine_info(threads: int) -> dict:
    return {"cpu_cores": os.cpu_count(), "torch_threads": threads, "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "gpu": False}


def _chosen_tags(data: EncodedData, n: int) -> list[int]:
    """The n most frequent training tags, one per category (`cat/tag` names) while categories last."""
    ids = data.train.tag_ids[data.train.tag_ids > 0]
    counts = np.bincount(ids, minlength=len(data.dataset.tags) + 1)
    order = [int(t) for t in np.argsort(-counts, kind="stable") if t > 0 and counts[t] > 0]
    names = data.dataset.tags
    chosen, cats = [], set()
    for t in order:
        cat = names[t - 1].split("/")[0] if "/" in names[t - 1] else names[t - 1]
        if cat not in cats:
            chosen.append(t)
            cats.add(cat)
        if len(chosen) == n:
            return chosen
    return (chosen + [t for t in order if t not in chosen])[:n]


@torch.no_grad()
def gate_weights(result: TrainResult, data: EncodedData, n: int = HEATMAP_TAGS) -> dict:
    """Per task: the experts it uses and the gate weights of n chosen tags (Fig. 8)."""
    model = result.model.eval()
    tags = _chosen_tags(data, n)
    out = {}
    per_task = model.tag_vectors(torch.tensor(tags).unsqueeze(1))
    for task, (_, w) in zip(model.tasks, per_task):
        out[task] = {"experts": list(model.cfg.task_experts[task]),
                     "tags": [data.dataset.tags[t - 1] for t in tags],
                     "weights": np.round(w.numpy().astype(np.float64), 6).tolist()}
    return out


def _fmt(m: float, s: float) -> str:
    return f"{m:.4f} ± {s:.4f}"


def _delta(m: dict, ref: dict | None, key: str) -> str:
    if ref is None:
        return "n/a"
    return f"{100 * (m[f'{key}_auc_mean'] / ref[f'{key}_auc_mean'] - 1):+.2f}%"


def render_markdown(res: dict) -> str:
    models, ref = res["models"], res["models"].get("nomtl")
    lines = [f"# Offline results: {res['dataset']}", "",
             f"Test AUC, mean ± std (sample std) over {res['seeds']} seeds (seeds 0..{res['seeds'] - 1}); "
             "CTR = interest task (click), CVR = intention task (conversion). "
             "Δ is relative to noMTL: (AUC / AUC_noMTL - 1) x 100. "
             "Params are trainable parameters (noMTL and MVKE-st hold one model per task, counted together); "
             "train seconds are the mean wall time of one training run (all epochs, early stopping on the "
             "validation AUC, both tasks).", "",
             "| model | CTR AUC | CVR AUC | Δ CTR vs noMTL | Δ CVR vs noMTL | params | train s |",
             "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        lines.append(f"| {name} | {_fmt(m['ctr_auc_mean'], m['ctr_auc_std'])} | {_fmt(m['cvr_auc_mean'], m['cvr_auc_std'])}"
                     f" | {_delta(m, ref, 'ctr')} | {_delta(m, ref, 'cvr')} | {m['params']:,} | {m['train_seconds']:.1f} |")
    if res.get("oracle"):
        o = res["oracle"]
        lines.append(f"| oracle (true probabilities) | {o['ctr_auc']:.4f} | {o['cvr_auc']:.4f} | | | | |")
    lines.append("")
    if "mvke-mt" in models:
        m = models["mvke-mt"]
        per = ", ".join(f"seed {p['seed']}: {p['ctr_auc']:.4f} / {p['cvr_auc']:.4f}" for p in m["per_seed"])
        lines += [f"MVKE-mt training speed: {m['samples_per_second']:,.0f} samples/s "
                  f"(mean over seeds, {res['machine']['torch_threads']} torch thread). "
                  f"Per seed (CTR / CVR): {per}.", ""]
    d = res["data"]
    lines += ["Rows: train {train:,}, validation {valid:,} (fixed 10% of the training day), test {test:,}.".format(**d), ""]
    if res.get("sweep"):
        lines += ["## Number of experts (Fig. 7)", "",
                  "MVKE-mt, one seed (0) per K, everything else at the defaults. Task -> experts "
                  "(1-based): interest the first round(0.6 K), intention the last round(0.8 K), each at most "
                  "K - 1 so both tasks keep an expert of their own (K = 5 is the paper's 1-3 / 2-5).", "",
                  "| K | interest experts | intention experts | CTR AUC | CVR AUC |", "|---|---|---|---|---|"]
        for r in res["sweep"]:
            te = r["task_experts"]
            span = lambda xs: f"{xs[0] + 1}-{xs[-1] + 1}"  # noqa: E731
            lines.append(f"| {r['experts']} | {span(te['interest'])} | {span(te['intention'])} "
                         f"| {r['ctr_auc']:.4f} | {r['cvr_auc']:.4f} |")
        lines.append("")
    if res.get("gates"):
        lines += ["## Gate weights (Fig. 8)", "",
                  "MVKE-mt seed 0; the most frequent training tags, one per category where tags have one. "
                  "See gate_heatmap.png; the numbers are in results.json under `gates`.", ""]
    figs = ["auc_bar.png"] + (["expert_sweep.png", "gate_heatmap.png"] if res.get("sweep") else [])
    mach = res["machine"]
    lines += ["## Reproduce", "", "```", res["data_command"], res["command"], "```", "",
              f"Machine: {mach['cpu_cores']} CPU cores ({mach['processor']}), no GPU, torch {mach['torch']} "
              f"with {mach['torch_threads']} intra-op thread, Python {mach['python']}; shared with other work, "
              "so seconds are indicative. "
              f"Training: {res['train']['epochs']} epochs max, batch {res['train']['batch_size']}, "
              f"Adam lr {res['train']['lr']}, patience {res['train']['patience']}. "
              f"Total wall time {res['wall_seconds'] / 60:.1f} min.", "",
              "Figures: " + ", ".join(f"[{f}]({f})" for f in figs), ""]
    return "\n".join(lines)


def _write(out: Path, res: dict) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(render_markdown(res))


def run_experiment(data_dir: str | Path, out_dir: str | Path, seeds: int = 3, models: list[str] | None = None,
                   sweep_experts: bool = False, epochs: int = 5, threads: int = 1,
                   model_overrides: dict | None = None, train_overrides: dict | None = None,
                   progress: bool = True) -> dict:
    """Train `models` (default: all of MODELS) for seeds 0..seeds-1 and write results to out_dir.

    Args:
        threads: torch intra-op threads per run (1 by default: the numbers in
            docs/results come from a shared 2-core machine).
        model_overrides: ModelConfig fields applied to every model (ablations).
        train_overrides: TrainConfig fields (lr, batch_size, ...).
    Returns the content of results.json.
    """
    models = list(models) if models else list(MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = prepare(data_dir)
    model_overrides = dict(model_overrides or {})
    base_train = TrainConfig(epochs=epochs, threads=threads, progress=False, **(train_overrides or {}))
    res: dict = {
        "dataset": data.dataset.name,
        "seeds": seeds,
        "command": experiment_command(data_dir, out_dir, seeds, models if models != list(MODELS) else None,
                                      sweep_experts, epochs),
        "data_command": _data_command(data, data_dir),
        "machine": machine_info(threads),
        "train": {k: v for k, v in asdict(base_train).items() if k not in ("seed", "progress")},
        "data": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        "models": {}, "configs": {},
    }
    if model_overrides:
        res["model_overrides"] = model_overrides
    n_runs = len(models) * seeds + (len(SWEEP_EXPERTS) if sweep_experts else 0)
    bar = tqdm(total=n_runs, desc="experiment", unit="run", disable=not progress)
    keep: TrainResult | None = None
    for name in models:
        runs = []
        for seed in range(seeds):
            bar.set_postfix_str(f"{name} seed {seed}")
            cfg = model_config_for(name, data, **model_overrides)
            result = train_model(data, cfg, TrainConfig(**{**asdict(base_train), "seed": seed}))
            m = result.metrics
            runs.append(m)
            res["configs"][name] = _config_record(cfg)
            if "oracle_test_auc" in m:
                res["oracle"] = {f"{TASK_KEYS[t]}_auc": v for t, v in m["oracle_test_auc"].items()}
            if name == "mvke-mt" and seed == 0:
                keep = result
            bar.update(1)
            if progress:
                tqdm.write(f"{name} seed {seed}: CTR AUC {m['test_auc']['interest']:.4f} "
                           f"CVR AUC {m['test_auc']['intention']:.4f} ({m['train_seconds']:.0f} s, "
                           f"{len(m['history'])} epochs)")
        res["models"][name] = _summary(runs)
        res["wall_seconds"] = time.perf_counter() - t_start
        _write(out, res)  # partial results survive an interrupted run

    if sweep_experts:
        res["sweep"] = []
        for k in SWEEP_EXPERTS:
            bar.set_postfix_str(f"sweep K={k}")
            te = sweep_task_experts(k)
            cfg = model_config_for("mvke-mt", data, **{**model_overrides, "experts": k, "task_experts": te})
            m = train_model(data, cfg, TrainConfig(**{**asdict(base_train), "seed": 0})).metrics
            res["sweep"].append({"experts": k, "task_experts": te, "seeds": 1,
                                 "ctr_auc": m["test_auc"]["interest"], "cvr_auc": m["test_auc"]["intention"],
                                 "params": m["params"], "train_seconds": m["train_seconds"]})
            bar.update(1)
            if progress:
                tqdm.write(f"sweep K={k}: CTR AUC {m['test_auc']['interest']:.4f} "
                           f"CVR AUC {m['test_auc']['intention']:.4f}")
        if keep is None:  # the gate figure needs a trained MVKE-mt
            keep = train_model(data, model_config_for("mvke-mt", data, **model_overrides),
                               TrainConfig(**{**asdict(base_train), "seed": 0}))
        res["gates"] = gate_weights(keep, data)
    bar.close()

    res["wall_seconds"] = time.perf_counter() - t_start
    _write(out, res)
    plots.auc_bar(res["models"], out / "auc_bar.png", res["dataset"], res.get("oracle"))
    if sweep_experts:
        baselines = {n: res["models"][n] for n in ("nomtl", "mmoe") if n in res["models"]}
        plots.expert_sweep(res["sweep"], out / "expert_sweep.png", res["dataset"], baselines)
        experts = keep.model.cfg.experts
        plots.gate_heatmap(res["gates"], out / "gate_heatmap.png", experts, res["dataset"])
    return res


# -- ablation of MVKE's open choices (docs/MODELS.md) -------------------------------

# The configuration every variant changes one thing of: MVKE as first written (paper eq. 7
# projected gate with a value transform, ReLU on the attention projections, kernels
# N(0, 0.01)). Pinned here, not taken from ModelConfig's defaults, so the committed
# ablation numbers stay reproducible when a default changes (the default gate became
# "dot" without value transform after this ablation; see docs/MODELS.md).
ABLATION_REFERENCE = {"attention": "fields", "gate": "projected", "gate_value": True, "activation": "relu",
                      "attn_activation": None, "kernel_init": 0.01}

# label -> (models, ModelConfig overrides on top of ABLATION_REFERENCE, TrainConfig overrides).
# Baselines ride along where the change applies to them too (learning rate, epochs), so the
# comparison stays fair; the MVKE-only options do not touch them.
ABLATION_VARIANTS: dict[str, tuple[list[str], dict, dict]] = {
    "reference": (["mvke-mt", "nomtl", "mmoe"], {}, {}),
    "attention=sum": (["mvke-mt"], {"attention": "sum"}, {}),
    "gate=dot": (["mvke-mt"], {"gate": "dot"}, {}),
    "gate_value=off": (["mvke-mt"], {"gate_value": False}, {}),
    "activation=tanh": (["mvke-mt"], {"activation": "tanh"}, {}),
    "attn_activation=identity": (["mvke-mt"], {"attn_activation": "identity"}, {}),
    "gate=dot+gate_value=off": (["mvke-mt"], {"gate": "dot", "gate_value": False}, {}),
    # The published TF code: plain dot gate without value transform, linear Q/K/V projections.
    "authors-code": (["mvke-mt"], {"gate": "dot", "gate_value": False, "attn_activation": "identity"}, {}),
    "kernel_init=1": (["mvke-mt"], {"kernel_init": 1.0}, {}),
    "gate=dot+kernel_init=1": (["mvke-mt"], {"gate": "dot", "kernel_init": 1.0}, {}),
    # Is MVKE's edge its LayerNorm'ed field embeddings? Give the baselines the same input.
    "baselines+field_norm": (["nomtl", "mmoe"], {"field_norm": True}, {}),
    "lr=5e-3": (["mvke-mt", "nomtl", "mmoe"], {}, {"lr": 5e-3}),
    "epochs=10": (["mvke-mt", "nomtl", "mmoe"], {}, {"epochs": 10}),
}


def _norm_entropy(w: torch.Tensor, dim: int) -> float:
    """Mean entropy of the distributions along `dim`, divided by log(size): 1 = uniform."""
    n = w.shape[dim]
    if n < 2:
        return 0.0
    h = -(w.clamp_min(1e-12).log() * w).sum(dim) / math.log(n)
    return float(h.mean())


@torch.no_grad()
def mvke_diagnostics(result: TrainResult, data: EncodedData, rows: int = 4096) -> dict:
    """How much MVKE's attention departs from uniform: gate entropy over all tags, field attention entropy."""
    model = result.model.eval()
    out: dict = {}
    for task, (_, w) in zip(model.tasks, model.all_tag_vectors()):
        out[f"gate_entropy_{TASK_KEYS[task]}"] = _norm_entropy(w, -1)
        out[f"gate_tag_std_{TASK_KEYS[task]}"] = float(w.std(0).mean())  # how much tags differ
    if hasattr(model, "field_attention"):
        idx = np.arange(min(rows, len(data.test)))
        att = model.field_attention(torch.from_numpy(data.test.cat_ids[idx]),
                                    torch.from_numpy(data.test.multi_ids[idx]))      # [B, F, K]
        out["field_attention_entropy"] = _norm_entropy(att, 1)
    return out


def render_ablation(res: dict) -> str:
    ref = {n: m for n, m in res["variants"].get("reference", {}).items()}
    lines = [f"# MVKE ablation on {res['dataset']}", "",
             f"Test AUC, mean ± std over seeds {res['seed_list']}; each variant changes the reference "
             f"configuration ({', '.join(f'{k}={v}' for k, v in res['reference'].items())}) in the named "
             "options only. Δ: AUC difference in points x 100 against the same model's reference row. "
             "Gate entropy: mean over all tags of the gate's entropy / log(K_task) "
             "(1.0 = uniform over the task's experts); field attn: the same for the experts' attention over the "
             "fields (1.0 = uniform over the fields).", "",
             "| variant | model | CTR AUC | CVR AUC | Δ CTR | Δ CVR | gate entropy ctr / cvr | field attn entropy "
             "| epochs run | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, per_model in res["variants"].items():
        for name, m in per_model.items():
            d = m.get("diagnostics") or {}
            gate = (f"{d['gate_entropy_ctr']:.3f} / {d['gate_entropy_cvr']:.3f}" if "gate_entropy_ctr" in d else "")
            fa = f"{d['field_attention_entropy']:.3f}" if "field_attention_entropy" in d else ""
            r = ref.get(name)
            dc = f"{100 * (m['ctr_auc_mean'] - r['ctr_auc_mean']):+.2f}" if r and label != "reference" else ""
            dv = f"{100 * (m['cvr_auc_mean'] - r['cvr_auc_mean']):+.2f}" if r and label != "reference" else ""
            ep = "/".join(str(p["epochs_run"]) for p in m["per_seed"])
            lines.append(f"| {label} | {name} | {_fmt(m['ctr_auc_mean'], m['ctr_auc_std'])} "
                         f"| {_fmt(m['cvr_auc_mean'], m['cvr_auc_std'])} | {dc} | {dv} | {gate} | {fa} | {ep} "
                         f"| {m['train_seconds']:.0f} |")
    mach = res["machine"]
    cmds = res["command"] if isinstance(res["command"], list) else [res["command"]]
    lines += ["", "```", res["data_command"], *cmds, "```", ""] + ([res["note"], ""] if res.get("note") else []) + [
              f"Machine: {mach['cpu_cores']} CPU cores, no GPU, torch {mach['torch']}, "
              f"{mach['torch_threads']} thread; shared, so seconds are indicative.", ""]
    return "\n".join(lines)


def run_ablation(data_dir: str | Path, out_dir: str | Path, seeds: int = 2, variants: list[str] | None = None,
                 epochs: int = 5, threads: int = 1, progress: bool = True) -> dict:
    """Train the ABLATION_VARIANTS over seeds; write ablation.json / ablation.md to out_dir."""
    variants = list(variants) if variants else list(ABLATION_VARIANTS)
    unknown = [v for v in variants if v not in ABLATION_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(ABLATION_VARIANTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(data_dir)
    cmd = ["python", "-m", "mvke.training.experiment", "ablation", "--data", str(data_dir), "--out", str(out_dir),
           "--seeds", str(seeds), "--epochs", str(epochs)]
    if variants != list(ABLATION_VARIANTS):
        cmd += ["--variants", ",".join(variants)]
    res: dict = {"dataset": data.dataset.name, "seed_list": list(range(seeds)), "command": shlex.join(cmd),
                 "reference": ABLATION_REFERENCE,
                 "data_command": _data_command(data, data_dir), "machine": machine_info(threads), "variants": {}}
    total = sum(len(ABLATION_VARIANTS[v][0]) for v in variants) * seeds
    bar = tqdm(total=total, desc="ablation", unit="run", disable=not progress)
    for label in variants:
        names, mo, to = ABLATION_VARIANTS[label]
        res["variants"][label] = {}
        for name in names:
            runs, diags = [], []
            for seed in range(seeds):
                bar.set_postfix_str(f"{label} {name} seed {seed}")
                tc = TrainConfig(**{"epochs": epochs, "threads": threads, "progress": False, **to, "seed": seed})
                result = train_model(data, model_config_for(name, data, **{**ABLATION_REFERENCE, **mo}), tc)
                runs.append(result.metrics)
                if name.startswith("mvke"):
                    diags.append(mvke_diagnostics(result, data))
                bar.update(1)
                if progress:
                    tqdm.write(f"{label} {name} seed {seed}: CTR {result.metrics['test_auc']['interest']:.4f} "
                               f"CVR {result.metrics['test_auc']['intention']:.4f}"
                               + (f" {diags[-1]}" if diags else ""))
            summary = _summary(runs)
            if diags:
                summary["diagnostics"] = {k: float(np.mean([d[k] for d in diags])) for k in diags[0]}
            summary["model_overrides"], summary["train_overrides"] = mo, to
            res["variants"][label][name] = summary
            (out / "ablation.json").write_text(json.dumps(res, indent=1))
            (out / "ablation.md").write_text(render_ablation(res))
    bar.close()
    return res


def _main(argv: list[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="python -m mvke.training.experiment",
                                description="MVKE ablation (the main experiment is `mvke experiment`)")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ablation")
    a.add_argument("--data", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--seeds", type=int, default=2)
    a.add_argument("--epochs", type=int, default=5)
    a.add_argument("--variants", help=f"comma-separated subset of: {', '.join(ABLATION_VARIANTS)}")
    args = p.parse_args(argv)
    run_ablation(args.data, args.out, seeds=args.seeds, epochs=args.epochs,
                 variants=args.variants.split(",") if args.variants else None)


if __name__ == "__main__":
    _main()
