"""Hyperparameter search: one Optuna study per (model, dataset), the same space and budget for every model.

Objective: mean validation AUC of the two tasks at the best epoch (early stopping
inside each trial). The test split is never read (`TrainConfig.score_test=False`).
Studies live in a SQLite file (`<out>/<model>/study.db`), so an interrupted study
resumes where it stopped; `best.json` holds the chosen configuration that
`mvke experiment --configs` reads.

The shared space (every model, `suggest`):

* lr 3e-4..1e-2 (log), lr_schedule constant | cosine, weight_decay 1e-6..1e-2 (log, AdamW);
* dropout 0..0.3, field_norm on | off;
* embed_dim 8 | 16 | 32, out_dim 32 | 64;
* hidden width 64 | 128 | 256 and depth 1 | 2: each expert's tower (MVKE, MoE, MMoE, CGC),
  noMTL's tower and Hard Sharing's shared bottom are [width] * depth, Hard Sharing's heads
  [width // 2];
* epochs 3..10 (the most a trial trains; early stopping with patience 1 inside it), batch size 256 | 1024.

`workers` > 1: every trial trains on Ray Train (mvke/training/distributed.py, one Ray for the
whole study). Optuna's trial lives in the driver, so the median rule is handed to the workers
as thresholds per epoch (`median_thresholds`) and the history is replayed into the trial
afterwards; the trial ends pruned at the same epoch as a 1-worker trial would.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path


from mvke.training.trainer import (EncodedData, TrainConfig, epoch_valid_auc, mean_finite, model_config_for, prepare,
                                   train_model)

EPOCH_RANGE = (3, 10)
# MedianPruner's settings. Pruning only from epoch 3 (optuna prunes at steps >= n_warmup_steps): the
# first studies (pruning from epoch 1) cut MMoE's and CGC's trial at the configuration that became
# mvke-mt's best after one epoch, where the three models were within 0.007 of each other (docs/MODELS.md).
PRUNE_STARTUP_TRIALS = 3
PRUNE_WARMUP_EPOCHS = 3


def suggest(trial) -> tuple[dict, dict]:
    """(ModelConfig overrides, TrainConfig overrides) for one trial: the same space for every model."""
    width = trial.suggest_categorical("hidden", [64, 128, 256])
    depth = trial.suggest_int("layers", 1, 2)
    model = {
        "embed_dim": trial.suggest_categorical("embed_dim", [8, 16, 32]),
        "out_dim": trial.suggest_categorical("out_dim", [32, 64]),
        "dropout": trial.suggest_float("dropout", 0.0, 0.3),
        "field_norm": trial.suggest_categorical("field_norm", [True, False]),
        **hidden_sizes(width, depth),
    }
    train = {
        "lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
        "lr_schedule": trial.suggest_categorical("lr_schedule", ["constant", "cosine"]),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        "epochs": trial.suggest_int("epochs", *EPOCH_RANGE),
        "batch_size": trial.suggest_categorical("batch_size", [256, 1024]),
    }
    return model, train


def hidden_sizes(width: int, depth: int) -> dict:
    return {"expert_hidden": [width] * depth, "tower_hidden": [width] * depth, "head_hidden": [max(8, width // 2)]}


def study_paths(out: str | Path, model: str) -> tuple[Path, str]:
    d = Path(out) / model
    d.mkdir(parents=True, exist_ok=True)
    return d, f"sqlite:///{(d / 'study.db').resolve()}"


def _objective(data: EncodedData, model: str, seed: int, threads: int):
    import optuna

    def objective(trial) -> float:
        model_over, train_over = suggest(trial)
        cfg = TrainConfig(**train_over, seed=seed, threads=threads, progress=False, score_test=False)

        def report(epoch: int, value: float, best: float) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            result = train_model(data, model_config_for(model, data, **model_over), cfg, on_epoch=report)
        finally:
            trial.set_user_attr("cpu_seconds", time.process_time() - cpu0)
            trial.set_user_attr("wall_seconds", time.perf_counter() - wall0)
        m = result.metrics
        trial.set_user_attr("params", m["params"])
        trial.set_user_attr("best_epoch", m["best_epoch"])
        trial.set_user_attr("valid_auc", m["valid_auc"])
        return m["best_valid_mean_auc"]
    return objective


def median_thresholds(study) -> dict[int, float]:
    """{epoch: median of the finished trials' value at that epoch} from the warm-up epoch on: a trial whose
    best value so far is below it is pruned (MedianPruner's rule; empty before its start-up trials)."""
    import numpy as np
    import optuna
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < PRUNE_STARTUP_TRIALS:
        return {}
    out = {}
    for epoch in range(PRUNE_WARMUP_EPOCHS, EPOCH_RANGE[1] + 1):
        values = [t.intermediate_values[epoch] for t in done if epoch in t.intermediate_values]
        if values:
            out[epoch] = float(np.nanmedian(values))
    return out


def _objective_distributed(data_dir: str | Path, model: str, seed: int, threads: int, dist):
    """The objective on Ray Train: the same space, seed and pruning rule as `_objective`."""
    import dataclasses

    import optuna

    from mvke.training.distributed import train_distributed

    def objective(trial) -> float:
        model_over, train_over = suggest(trial)
        cfg = TrainConfig(**train_over, seed=seed, threads=threads * dist.workers, progress=False, score_test=False)
        wall0 = time.perf_counter()
        result = train_distributed(data_dir, model, cfg, dataclasses.replace(
            dist, score_test=False, prune_below=median_thresholds(trial.study)), **model_over)
        m = result.metrics
        trial.set_user_attr("cpu_seconds", m["cpu_seconds"])
        trial.set_user_attr("wall_seconds", time.perf_counter() - wall0)
        trial.set_user_attr("workers", dist.workers)
        for row in m["history"]:     # the epochs the workers ran, into the trial: the pruner's record
            trial.report(mean_finite(epoch_valid_auc(row).values()), row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()
        trial.set_user_attr("params", m["params"])
        trial.set_user_attr("best_epoch", m["best_epoch"])
        trial.set_user_attr("valid_auc", m["valid_auc"])
        return m["best_valid_mean_auc"]
    return objective


def tune(data_dir: str | Path, model: str, trials: int, out: str | Path, seed: int = 0, threads: int = 1,
         progress: bool = True, data: EncodedData | None = None, workers: int = 1, address: str | None = None,
         use_gpu: bool = False) -> dict:
    """Run (or resume) the study until it holds `trials` finished trials; write and return best.json.

    workers > 1 (or a Ray `address`): every trial on Ray Train with that many DDP workers, data streamed."""
    import optuna
    from mvke.models import MODELS
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    optuna.logging.set_verbosity(optuna.logging.INFO if progress else optuna.logging.WARNING)
    logging.getLogger("optuna").propagate = False
    d, storage = study_paths(out, model)
    # The same sampler seed for every model: the random start-up trials try the same configurations
    # for every model (a paired search), then TPE follows each model's own results.
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(6, trials - 2)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS, n_warmup_steps=PRUNE_WARMUP_EPOCHS)
    study = optuna.create_study(study_name=model, storage=storage, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    if len(done) < trials:
        if workers > 1 or address:
            from mvke.training.distributed import DistributedConfig, ray_session
            dist = DistributedConfig(workers=workers, address=address, use_gpu=use_gpu)
            with ray_session(dist):
                study.optimize(_objective_distributed(data_dir, model, seed, threads, dist),
                               n_trials=trials - len(done))
        else:
            data = data if data is not None else prepare(data_dir)
            study.optimize(_objective(data, model, seed, threads), n_trials=trials - len(done))
    return write_best(study, model, data_dir, d, seed)


def write_best(study, model: str, data_dir, d: Path, seed: int) -> dict:
    import optuna
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    best = study.best_trial

    class _Fixed:   # replays the chosen parameters through `suggest`, so the mapping lives in one place
        def __init__(self, params):
            self.params = params

        def suggest_categorical(self, name, _choices):
            return self.params[name]

        suggest_int = suggest_float = lambda self, name, *a, **k: self.params[name]

    model_over, train_over = suggest(_Fixed(best.params))
    res = {
        "model": model, "data": str(data_dir), "seed": seed, "objective": "mean validation AUC (both tasks)",
        "trials": len(finished), "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in finished),
        "best_trial": best.number, "valid_mean_auc": best.value, "params": best.params,
        "model_overrides": model_over, "train_overrides": train_over,
        "best_epoch": best.user_attrs.get("best_epoch"), "model_params": best.user_attrs.get("params"),
        "cpu_seconds": float(sum(t.user_attrs.get("cpu_seconds", 0.0) for t in finished)),
        "wall_seconds": float(sum(t.user_attrs.get("wall_seconds", 0.0) for t in finished)),
        "trial_values": [None if t.value is None else float(t.value) for t in finished],
    }
    (d / "best.json").write_text(json.dumps(res, indent=1))
    return res


def load_tuned(configs_dir: str | Path | None, model: str) -> dict | None:
    """best.json of a model from a `mvke tune` output directory (None if absent)."""
    if configs_dir is None:
        return None
    p = Path(configs_dir) / model / "best.json"
    return json.loads(p.read_text()) if p.exists() else None


def cpu_hours(configs_dir: str | Path) -> dict[str, float]:
    out = {}
    for p in sorted(Path(configs_dir).glob("*/best.json")):
        out[p.parent.name] = json.loads(p.read_text())["cpu_seconds"] / 3600
    return out

