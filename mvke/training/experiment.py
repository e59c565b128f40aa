"""Offline experiments of paper section 5.2: every model over seeds, selected on validation only.

`run_experiment` trains each model of `mvke.models.MODELS` once per seed with its
configuration (`--configs`: the `best.json` files `mvke tune` wrote; otherwise the
defaults) and scores the test day once per run. On synthetic data seed s > 0 also
regenerates the data (generator seed + s, cached beside the data directory), so the
spread includes data variance. Each (model, seed) run is a *cell* stored under
`<out>/cells/`; a rerun skips finished cells whose configuration is unchanged, so an
interrupted experiment resumes and two processes can share one output directory
(give them different `--models`).

Written to `out_dir`:

* `results.json`: `"selection": "valid"`; per model mean and std over seeds of test AUC
  (ctr = task "interest", cvr = "intention"), gAUC, Recall@20 and NDCG@20 of the top-20
  over the whole catalogue, parameters, the configuration and its source, the best epoch
  per seed, the paired per-seed difference to mvke-mt, MVKE's attention and gate
  entropies; top-level `reference` (LightGBM), `oracle` (true probabilities), the expert
  sweep and Fig. 8 gate weights;
* `results.md` with the exact commands; `auc_bar.png` (Fig. 6), `expert_sweep.png`
  (Fig. 7), `gate_heatmap.png` (Fig. 8), `attention_heatmap.png` (field attention per expert).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mvke.data.dataset import TASKS
from mvke.models import MODELS, build_torch_model
from mvke.runtime.system import cpu_model
from mvke.training import plots
from mvke.training.diagnostics import TASK_KEYS, mvke_diagnostics
from mvke.training.parts_data import prepare_any
from mvke.training.resume import RunCheckpoint
from mvke.training.trainer import EncodedData, TrainConfig, model_config_for, test_metrics, train_model
from mvke.training.tune import load_tuned

SWEEP_EXPERTS = range(4, 11)
MAIN_MODELS = ("mvke-mt", "mvke-st", "nomtl", "hard-sharing", "moe", "mmoe", "cgc")
CONTROLS = ("mvke-uniform-gate", "mvke-no-kernel-attention", "mvke-plain-gate")
MATCH_TOLERANCE = 0.15
MATCHED = "@matched"


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


# -- data per seed ---------------------------------------------------------------------
def seed_data_dir(data_dir: str | Path, seed: int) -> Path:
    """The dataset of one seed: synthetic data is regenerated with generator seed + seed (cached
    in `<data_dir>-seeds/seed-<seed>`); other datasets are the same for every seed.

    A world written in parts (above 65,536 users) is generated in place with `resume`: an
    interrupted generation keeps its finished parts (meta.json, written last, marks it done);
    one process per seed directory."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    if seed == 0 or "generator" not in meta:
        return data_dir
    from mvke.data.synthetic import SynthConfig, generate, part_blocks
    out = data_dir.parent / f"{data_dir.name}-seeds" / f"seed-{seed}"
    if not (out / "meta.json").exists():
        gen = dict(meta["generator"])
        gen["seed"] = gen["seed"] + seed
        if part_blocks(SynthConfig(**gen), None):
            generate(SynthConfig(**gen), out, progress=False, resume=True)
            return out
        tmp = out.parent / f".{out.name}.{os.getpid()}"
        generate(SynthConfig(**gen), tmp, progress=False)
        try:
            tmp.rename(out)       # atomic: a second process generating the same seed loses the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- configurations --------------------------------------------------------------------
def base_name(label: str) -> str:
    return label.split("@")[0]


def resolve_config(name: str, configs_dir) -> dict:
    """{"model": ModelConfig overrides, "train": TrainConfig overrides, "source": ...} of a model."""
    tuned = load_tuned(configs_dir, name)
    if tuned is None:
        return {"model": {}, "train": {}, "source": "defaults (not tuned)"}
    return {"model": tuned["model_overrides"], "train": tuned["train_overrides"],
            "source": f"tuned: {tuned['trials']} trials, best valid mean AUC {tuned['valid_mean_auc']:.4f}"}


def param_count(name: str, data: EncodedData, model_over: dict) -> int:
    torch.manual_seed(0)
    m = build_torch_model(model_config_for(name, data, **model_over))
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def matched_config(name: str, data: EncodedData, model_over: dict, target: int) -> dict:
    """The model's configuration with every hidden width scaled so its parameters match `target`."""
    def scaled(f: float) -> dict:
        out = dict(model_over)
        for key in ("expert_hidden", "tower_hidden", "head_hidden"):
            sizes = model_over.get(key, getattr(model_config_for(name, data), key))
            out[key] = [max(4, int(round(h * f))) for h in sizes]
        return out
    lo, hi = 1 / 64, 64.0
    for _ in range(40):   # params grow with the widths: bisect on the log scale
        mid = (lo * hi) ** 0.5
        if param_count(name, data, scaled(mid)) < target:
            lo = mid
        else:
            hi = mid
    return scaled((lo * hi) ** 0.5)


def sweep_config(mvke_mt: dict, k: int) -> dict:
    """mvke-mt's configuration with K experts and the sweep's task ranges (Fig. 7)."""
    return {**mvke_mt, "model": {**mvke_mt["model"], "experts": k, "task_experts": sweep_task_experts(k)}}


def config_key(cfg: dict) -> str:
    return hashlib.sha256(json.dumps({"model": cfg["model"], "train": cfg["train"]}, sort_keys=True)
                          .encode()).hexdigest()[:16]


# -- cells ------------------------------------------------------------------------------
class Cells:
    """One JSON file per (label, seed) under `<out>/cells/`."""

    def __init__(self, out: Path):
        self.root = out / "cells"

    def path(self, label: str, seed: int) -> Path:
        return self.root / label.replace("/", "_") / f"seed-{seed}.json"

    def state_path(self, label: str, seed: int) -> Path:
        """Where an unfinished run's state lives (mvke/training/resume.py) until its cell is written."""
        return self.root.parent / "inflight" / label.replace("/", "_") / f"seed-{seed}.pt"

    def get(self, label: str, seed: int, key: str) -> dict | None:
        p = self.path(label, seed)
        if not p.exists():
            return None
        cell = json.loads(p.read_text())
        return cell if cell.get("config_key") == key else None

    def put(self, label: str, seed: int, cell: dict) -> None:
        p = self.path(label, seed)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cell, indent=1))
        tmp.replace(p)


def run_cell(data: EncodedData, name: str, cfg: dict, seed: int, threads: int, diagnostics: bool,
             dist=None, state_file: Path | None = None) -> dict:
    """One (model, seed) run; `dist` (a DistributedConfig): trained on Ray Train, scored in memory as here.
    state_file: the in-process run's state (continued if there, saved as it trains; mvke/training/resume.py)."""
    checkpoint = None
    if dist is None:
        tc = TrainConfig(**{**cfg["train"], "seed": seed, "threads": threads, "progress": False, "score_test": True})
        if state_file is not None:
            checkpoint = RunCheckpoint(state_file, f"{cell_key(cfg)} seed {seed} {data_fingerprint(data)}")
        result = train_model(data, model_config_for(name, data, **cfg["model"]), tc, checkpoint=checkpoint)
    else:
        result = train_on_workers(data, name, cfg, seed, threads, dist)
    cell = {"config_key": cell_key(cfg, dist), "config": cfg, "data": data.dataset.path.name, **result.metrics,
            "cpus": checkpoint.cpus if checkpoint is not None else [cpu_model()]}   # where it trained
    cell["model_config"] = {k: v for k, v in asdict(result.model.cfg).items()
                            if k not in ("num_ids", "num_cat_fields", "num_multi_fields", "num_tags")}
    if diagnostics:
        cell["diagnostics"] = mvke_diagnostics(result.model, data.test, data.train.tag_ids, data.schema,
                                               data.dataset.tags)
    return cell


def data_fingerprint(data: EncodedData) -> str:
    """Rows and positives per split: a state saved on one world is not continued on another."""
    return " ".join(f"{name}:{len(split)}/{int(np.count_nonzero(split.labels))}"
                    for name, split in (("train", data.train), ("valid", data.valid)))


def train_on_workers(data: EncodedData, name: str, cfg: dict, seed: int, threads: int, dist):
    """Ray Train (DDP, the dataset streamed from its directory), then the test day scored on the in-memory
    split like a 1-worker run: the streamed vocabularies are the trainer's (same rule, same rows)."""
    from mvke.training.distributed import train_distributed
    tc = TrainConfig(**{**cfg["train"], "seed": seed, "threads": threads * dist.workers, "progress": False})
    result = train_distributed(data.dataset.path, name, tc, replace(dist, score_test=False), **cfg["model"])
    if result.schema.to_dict() != data.schema.to_dict():
        raise RuntimeError(f"{data.dataset.path}: the streamed vocabularies differ from the in-memory ones")
    result.metrics |= {"n_test": len(data.test), **test_metrics(result.model, data)}
    return result


def cell_key(cfg: dict, dist=None) -> str:
    """A cell's key: its configuration, and the number of workers when it trained on more than one
    (another shuffling and gradient averaging: not the same run)."""
    workers = dist.workers if dist is not None else 1
    return config_key(cfg) + (f"-w{workers}" if workers > 1 else "")


# -- summaries ------------------------------------------------------------------------
def _ms(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0}


def summarise(cells: list[dict]) -> dict:
    """Mean ± std (sample std) over seeds; the existing keys (ctr_auc_mean, ...) plus the new metrics."""
    out: dict = {}
    for task, key in TASK_KEYS.items():
        aucs = [c["test_auc"][task] for c in cells]
        out[f"{key}_auc_mean"], out[f"{key}_auc_std"] = _ms(aucs)["mean"], _ms(aucs)["std"]
    out["gauc"] = {key: _ms([c["test_gauc"][t] for c in cells]) for t, key in TASK_KEYS.items()}
    out["recall_at_20"] = {key: _ms([c["test_ranking"][t]["recall_at_20"] for c in cells]) for t, key in TASK_KEYS.items()}
    out["ndcg_at_20"] = {key: _ms([c["test_ranking"][t]["ndcg_at_20"] for c in cells]) for t, key in TASK_KEYS.items()}
    out["valid_mean_auc"] = _ms([c["best_valid_mean_auc"] for c in cells])
    out["params"] = cells[0]["params"]
    out["train_seconds"] = float(np.mean([c["train_seconds"] for c in cells]))
    out["samples_per_second"] = float(np.mean([c["samples_per_second"] for c in cells]))
    out["samples_per_cpu_second"] = float(np.mean([c.get("samples_per_cpu_second", float("nan")) for c in cells]))
    out["cpu_seconds"] = float(np.sum([c.get("cpu_seconds", float("nan")) for c in cells]))
    out["seeds"] = len(cells)
    out["config"] = {**cells[0]["config"], "full": cells[0]["model_config"]}
    out["best_epoch_per_seed"] = [c["best_epoch"] for c in cells]
    out["per_seed"] = [{
        "seed": c["seed"], "ctr_auc": c["test_auc"]["interest"], "cvr_auc": c["test_auc"]["intention"],
        "ctr_gauc": c["test_gauc"]["interest"], "cvr_gauc": c["test_gauc"]["intention"],
        "valid_mean_auc": c["best_valid_mean_auc"], "best_epoch": c["best_epoch"], "epochs_run": len(c["history"]),
        "train_seconds": c["train_seconds"], "samples_per_second": c["samples_per_second"],
    } for c in cells]
    diags = [c.get("diagnostics") or {} for c in cells]
    if all("attention" in d for d in diags):
        per_expert = np.mean([d["attention"]["entropy_per_expert"] for d in diags], 0)
        out["attention_entropy"] = {"per_expert": [round(float(x), 4) for x in per_expert],
                                    "mean": float(per_expert.mean()),
                                    "top_fields_seed0": diags[0]["attention"]["top_fields"]}
    if all("gate" in d for d in diags):
        out["gate_entropy"] = {key: float(np.mean([d["gate"][key]["entropy"] for d in diags])) for key in TASK_KEYS.values()}
    return out


def paired(a: list[dict], b: list[dict]) -> dict:
    """Per-seed differences a - b (same seeds) of valid mean AUC and test AUC per task, with a paired t-test."""
    from scipy.stats import ttest_rel
    seeds = sorted({c["seed"] for c in a} & {c["seed"] for c in b})
    ia, ib = {c["seed"]: c for c in a}, {c["seed"]: c for c in b}
    out: dict = {"seeds": seeds}
    series = {"valid_mean_auc": lambda c: c["best_valid_mean_auc"],
              **{f"test_{key}_auc": (lambda c, t=t: c["test_auc"][t]) for t, key in TASK_KEYS.items()}}
    for name, get in series.items():
        d = [get(ia[s]) - get(ib[s]) for s in seeds]
        p = float(ttest_rel([get(ia[s]) for s in seeds], [get(ib[s]) for s in seeds]).pvalue) if len(seeds) > 1 else float("nan")
        out[name] = {"diff": [round(x, 6) for x in d], **_ms(d), "p_value": p,
                     "beyond_noise": bool(len(seeds) > 1 and p < 0.05)}
    return out


# -- the experiment -----------------------------------------------------------------------
@dataclass
class ExperimentSpec:
    """One `mvke experiment` call.

    aggregate_only: train nothing; write the tables and figures from the cells already present (a label
    is reported only when all `seeds` of its seeds are there).
    max_epochs: one epoch budget for every model instead of each study's best trial's `epochs`, early
    stopping on validation (patience 1) deciding where each run stops. A trial's `epochs` is the budget that
    trial had, not a measured optimum: a best trial whose best epoch is its last was still improving.
    workers > 1 (or a Ray `address`): every run on Ray Train with that many DDP workers (one Ray for the
    experiment); its cells are kept apart from 1-worker cells (`cell_key`)."""
    data_dir: str | Path
    out_dir: str | Path
    seeds: int = 5
    models: list[str] | None = None          # None: MAIN_MODELS and CONTROLS
    configs: str | Path | None = None        # `mvke tune`'s output directory (best.json per model)
    sweep_experts: bool = False
    reference: bool = True                   # LightGBM per seed
    match_params: bool = True                # baselines also at mvke-mt's parameter count (MATCHED)
    threads: int = 1
    progress: bool = True
    aggregate_only: bool = False
    max_epochs: int | None = None
    workers: int = 1
    address: str | None = None
    use_gpu: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.models or () if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
        for name in ("seeds", "workers", "max_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def model_list(self) -> list[str]:
        return list(self.models) if self.models else [*MAIN_MODELS, *CONTROLS]

    def distributed(self):
        """The Ray Train configuration of every run, or None (runs in this process)."""
        if self.workers == 1 and not self.address:
            return None
        from mvke.training.distributed import DistributedConfig
        return DistributedConfig(workers=self.workers, address=self.address, use_gpu=self.use_gpu)


def experiment_command(spec: ExperimentSpec) -> str:
    """The `mvke experiment` command line that reruns `spec`."""
    parts = ["mvke", "experiment", "--data", str(spec.data_dir), "--out", str(spec.out_dir), "--seeds", str(spec.seeds)]
    if not spec.match_params:
        parts.append("--no-matched")
    if spec.workers > 1:
        parts += ["--workers", str(spec.workers)]
    if spec.max_epochs is not None:
        parts += ["--max-epochs", str(spec.max_epochs)]
    if spec.models and spec.model_list != [*MAIN_MODELS, *CONTROLS]:
        parts += ["--models", ",".join(spec.models)]
    if spec.configs:
        parts += ["--configs", str(spec.configs)]
    if spec.sweep_experts:
        parts.append("--sweep-experts")
    if not spec.reference:
        parts.append("--no-reference")
    return shlex.join(parts)


def machine_info(threads: int) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu_cores": os.cpu_count(), "torch_threads": threads, "processor": cpu, "loadavg_at_end": list(load),
            "python": platform.python_version(), "torch": torch.__version__, "gpu": False}


def data_command(data_dir: str | Path) -> str:
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    if "generator" in meta:
        g = meta["generator"]
        return (f"mvke data synth --out {data_dir} --users {g['users']} --tags {g['tags']} --seed {g['seed']} "
                f"--world {g.get('world', 'facets')} --facets {g['facets']}")
    if meta.get("name") == "ml100k":
        return f"mvke data ml100k --out {data_dir} --negatives {meta.get('negatives', 4)} --seed {meta.get('seed', 0)}"
    return f"(dataset {meta.get('name')!r} at {data_dir})"


def run_experiment(data_dir: str | Path, out_dir: str | Path, **options) -> dict:
    """Run (or resume) every cell, then aggregate all cells found under out_dir into results.json/md and
    figures; `options`: the other fields of `ExperimentSpec`."""
    return run_spec(ExperimentSpec(data_dir, out_dir, **options))


def run_spec(spec: ExperimentSpec) -> dict:
    dist = spec.distributed()
    session = contextlib.nullcontext()
    if dist is not None and not spec.aggregate_only:
        from mvke.training.distributed import ray_session
        session = ray_session(dist)
    with session:
        return _run_experiment(spec, dist)


def _run_experiment(spec: ExperimentSpec, dist) -> dict:
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cfgs = _resolve_configs(spec)
    unmatched: dict[str, str] = {}
    models = spec.model_list
    n_runs = len(models) * spec.seeds + (len(SWEEP_EXPERTS) if spec.sweep_experts else 0)
    bar = tqdm(total=n_runs, desc="experiment", unit="run", disable=not spec.progress)
    for seed in range(1 if spec.aggregate_only else spec.seeds):
        data = prepare_any(seed_data_dir(spec.data_dir, seed))   # parts: bounded memory
        if spec.match_params and seed == 0:
            unmatched = _add_matched(cfgs, models, data)
        if spec.aggregate_only:
            break
        _run_seed(spec, Cells(out), cfgs, data, seed, dist, bar)
    bar.close()
    res = aggregate(spec, cfgs, dist)
    if unmatched:
        res["unmatched"] = unmatched
    res["command"] = experiment_command(spec)
    res["wall_seconds_this_call"] = time.perf_counter() - t_start
    if spec.configs:
        res["tune_commands"], res["cpu_hours"] = tuning_record(spec.configs, res)
    res["machine"] = machine_info(spec.threads)
    write_results(out, res)
    return res


def _resolve_configs(spec: ExperimentSpec) -> dict[str, dict]:
    """Every label's configuration: mvke-mt first, then the models in their order (a set here gave
    every call its own table order); `max_epochs` replaces each one's epoch budget."""
    cfgs = {m: resolve_config(m, spec.configs) for m in dict.fromkeys(["mvke-mt", *spec.model_list])}
    if spec.max_epochs is not None:
        for cfg in cfgs.values():
            cfg["train"] = {**cfg["train"], "epochs": spec.max_epochs}
            cfg["source"] += f"; epochs: {spec.max_epochs} for every model, early-stopped on validation"
    return cfgs


def _add_matched(cfgs: dict[str, dict], models: list[str], data: EncodedData) -> dict[str, str]:
    """Add `<model>@matched` configurations (widths scaled to mvke-mt's parameters) for the baselines
    more than MATCH_TOLERANCE away from it; returns {model: why} of those that cannot be matched."""
    unmatched = {}
    target = param_count("mvke-mt", data, cfgs["mvke-mt"]["model"])
    for m in models:
        own = param_count(m, data, cfgs[m]["model"])
        if m.startswith("mvke") or abs(own / target - 1) <= MATCH_TOLERANCE:
            continue
        matched = matched_config(m, data, cfgs[m]["model"], target)
        got = param_count(m, data, matched)
        if abs(got / target - 1) > MATCH_TOLERANCE:   # e.g. embedding tables alone exceed the target
            unmatched[m] = (f"{own:,} params; scaling its hidden widths reaches {got:,} at best, "
                            f"not within {MATCH_TOLERANCE:.0%} of mvke-mt's {target:,}")
            continue
        cfgs[m + MATCHED] = {**cfgs[m], "model": matched, "source": cfgs[m]["source"] + f"; widths scaled to {target:,} params"}
    return unmatched


def _run_seed(spec: ExperimentSpec, cells: Cells, cfgs: dict[str, dict], data: EncodedData, seed: int, dist,
              bar) -> None:
    """The cells of one seed not yet done: every label, LightGBM, the seed-0 expert sweep."""
    models = spec.model_list
    for label in [*models, *[m + MATCHED for m in models if m + MATCHED in cfgs]]:
        name, cfg = base_name(label), cfgs[label]
        bar.set_postfix_str(f"{label} seed {seed}")
        if cells.get(label, seed, cell_key(cfg, dist)) is None:
            state_file = cells.state_path(label, seed) if dist is None else None
            cell = run_cell(data, name, cfg, seed, spec.threads, diagnostics=name.startswith("mvke"), dist=dist,
                            state_file=state_file)
            cells.put(label, seed, cell)
            if state_file is not None:
                state_file.unlink(missing_ok=True)
            if spec.progress:
                tqdm.write(f"{label} seed {seed}: CTR AUC {cell['test_auc']['interest']:.4f} "
                           f"CVR AUC {cell['test_auc']['intention']:.4f} (best epoch {cell['best_epoch']}, "
                           f"{cell['train_seconds']:.0f} s)")
        bar.update(1 if not label.endswith(MATCHED) else 0)
    if spec.reference and cells.get("lightgbm", seed, "lightgbm") is None:
        from mvke.training.gbdt import gbdt_reference
        bar.set_postfix_str(f"lightgbm seed {seed}")
        cells.put("lightgbm", seed, {"config_key": "lightgbm", "seed": seed, **gbdt_reference(data, seed, spec.threads)})
    if spec.sweep_experts and seed == 0:
        for k in SWEEP_EXPERTS:
            cfg = sweep_config(cfgs["mvke-mt"], k)
            if cells.get(f"sweep-K{k}", 0, cell_key(cfg, dist)) is None:
                bar.set_postfix_str(f"sweep K={k}")
                cells.put(f"sweep-K{k}", 0, run_cell(data, "mvke-mt", cfg, 0, spec.threads, diagnostics=False,
                                                     dist=dist))
            bar.update(1)


def aggregate(spec: ExperimentSpec, cfgs: dict, dist=None) -> dict:
    """results.json content from the cells present (every label with all `seeds` seeds)."""
    cells = Cells(Path(spec.out_dir))
    res: dict = {"selection": "valid", "dataset": None, "seeds": spec.seeds, "data_command": data_command(spec.data_dir),
                 "models": {}, "controls": {}, "configs": {}}
    runs: dict[str, list[dict]] = {}
    for label, cfg in cfgs.items():
        got = [cells.get(label, s, cell_key(cfg, dist)) for s in range(spec.seeds)]
        if all(got):
            runs[label] = got
    for label, cs in runs.items():
        res["dataset"] = cs[0]["dataset"]
        group = "controls" if base_name(label) in CONTROLS else "models"
        res[group][label] = summarise(cs)
        res["configs"][label] = cfgs[label]
        if label != "mvke-mt" and "mvke-mt" in runs:
            res[group][label]["paired_vs_mvke_mt"] = paired(runs["mvke-mt"], cs)
        if "oracle_test_auc" in cs[0]:
            res["oracle"] = {f"{TASK_KEYS[t]}_auc": _ms([c["oracle_test_auc"][t] for c in cs])["mean"] for t in TASKS}
            res["oracle"] |= {f"{TASK_KEYS[t]}_gauc": _ms([c["oracle_test_gauc"][t] for c in cs])["mean"] for t in TASKS}
    if "mvke-mt" in runs:
        c0 = runs["mvke-mt"][0]
        res["data"] = {"train": c0["n_train"], "valid": c0["n_valid"], "test": c0["n_test"]}
        res["gates"] = c0.get("diagnostics", {}).get("gate_weights")
        res["attention"] = c0.get("diagnostics", {}).get("attention")
    if spec.reference:
        res |= _reference(cells, spec.seeds)
    if spec.sweep_experts:
        res["sweep"] = _sweep_rows(cells, cfgs, dist)
    return res


def _reference(cells: Cells, seeds: int) -> dict:
    """LightGBM: a reference, not a compared model: reported over the seeds it has, and says how many."""
    gb = [g for g in (cells.get("lightgbm", s, "lightgbm") for s in range(seeds)) if g]
    if not gb:
        return {}
    return {"reference": {
        "model": "lightgbm", "params": gb[0]["params"], "seeds": len(gb), "seed_ids": [g["seed"] for g in gb],
        **{f"{key}_auc": _ms([g["test_auc"][t] for g in gb]) for t, key in TASK_KEYS.items()},
        **{f"{key}_gauc": _ms([g["test_gauc"][t] for g in gb]) for t, key in TASK_KEYS.items()},
        "best_rounds_first_seed": gb[0]["best_rounds"], "seconds": float(np.mean([g["seconds"] for g in gb]))}}


def _sweep_rows(cells: Cells, cfgs: dict, dist) -> list[dict]:
    """Fig. 7's rows: mvke-mt at each K of SWEEP_EXPERTS (seed 0), those present."""
    rows = []
    for k in SWEEP_EXPERTS:
        c = cells.get(f"sweep-K{k}", 0, cell_key(sweep_config(cfgs["mvke-mt"], k), dist))
        if c:
            rows.append({"experts": k, "task_experts": sweep_task_experts(k), "seeds": 1,
                         "valid_mean_auc": c["best_valid_mean_auc"],
                         "ctr_auc": c["test_auc"]["interest"], "cvr_auc": c["test_auc"]["intention"],
                         "params": c["params"], "train_seconds": c["train_seconds"]})
    return rows


def tuning_record(configs, res: dict) -> tuple[list[str], dict]:
    """The `mvke tune` commands behind the configs and the CPU hours of tuning and of these runs."""
    commands, tuning = [], 0.0
    for label in {base_name(k) for k in (*res["models"], *res["controls"])}:
        tuned = load_tuned(configs, label)
        if tuned:
            commands.append(shlex.join(["mvke", "tune", "--data", str(tuned.get("data")), "--model", label,
                                        "--trials", str(tuned["trials"]), "--out", str(configs)]))
            tuning += tuned.get("cpu_seconds", 0.0)
    runs = sum(m.get("cpu_seconds", 0.0) for m in (*res["models"].values(), *res["controls"].values()))
    return sorted(commands), {"tuning": round(tuning / 3600, 2), "runs": round(runs / 3600, 2)}


def write_results(out: Path, res: dict) -> None:
    from mvke.training.report import figure_names, render_markdown
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(render_markdown(res))
    drawn = figure_names(res)         # the figures results.md links to
    if "auc_bar.png" in drawn:
        plots.auc_bar({**res["models"], **res["controls"]}, out / "auc_bar.png", res["dataset"], res.get("oracle"),
                      res.get("reference"))
    if "expert_sweep.png" in drawn:
        baselines = {n: res["models"][n] for n in ("nomtl", "mmoe") if n in res["models"]}
        plots.expert_sweep(res["sweep"], out / "expert_sweep.png", res["dataset"], baselines)
    if "gate_heatmap.png" in drawn:
        experts = res["models"]["mvke-mt"]["config"]["full"]["experts"]
        plots.gate_heatmap(res["gates"], out / "gate_heatmap.png", experts, res["dataset"])
    if "attention_heatmap.png" in drawn:
        plots.attention_heatmap(res["attention"], out / "attention_heatmap.png", res["dataset"])

