"""`mvke train | experiment | tune`: registered into the `mvke` command line (entry point group `mvke.commands`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EXTRA = "train"


def parse_task_experts(spec: str | None) -> dict | None:
    """'interest=1-3,intention=2-5' (1-based, inclusive, as in the paper) -> 0-based lists."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        task, rng = part.split("=")
        lo, _, hi = rng.partition("-")
        out[task.strip()] = list(range(int(lo) - 1, int(hi or lo)))
    return out


def _model_overrides(a: argparse.Namespace) -> dict:
    over = {}
    if getattr(a, "experts", None):
        over["experts"] = a.experts
    te = parse_task_experts(getattr(a, "task_experts", None))
    if te:
        over["task_experts"] = te
    for key in ("attention", "gate"):
        if getattr(a, key, None):
            over[key] = getattr(a, key)
    if getattr(a, "config", None):   # a `mvke tune` best.json: its chosen model settings
        over = {**json.loads(Path(a.config).read_text())["model_overrides"], **over}
    return over


def _train(a: argparse.Namespace) -> None:
    from mvke.training.trainer import TrainConfig, model_config_for, prepare, save_checkpoint, train_model
    tuned = json.loads(Path(a.config).read_text())["train_overrides"] if a.config else {}
    given = {k: getattr(a, k) for k in ("epochs", "lr", "lr_schedule", "weight_decay") if getattr(a, k) is not None}
    cfg = TrainConfig(**{"epochs": 5, **tuned, **given, "seed": a.seed, "batch_size": a.batch_size,
                         "threads": a.threads})
    data = prepare(a.data)
    result = train_model(data, model_config_for(a.model, data, **_model_overrides(a)), cfg)
    save_checkpoint(result, a.out, cfg, a.data)
    m = result.metrics
    print(json.dumps({"model": a.model, "best_epoch": m["best_epoch"], "valid_auc": m["valid_auc"],
                      "test_auc": m["test_auc"], "test_gauc": m["test_gauc"], "oracle_test_auc": m.get("oracle_test_auc"),
                      "samples_per_second": round(m["samples_per_second"]), "out": str(a.out)}, indent=1))


def _experiment(a: argparse.Namespace) -> None:
    from mvke.training.experiment import run_experiment
    models = a.models.split(",") if a.models else None
    run_experiment(a.data, a.out, seeds=a.seeds, models=models, configs=a.configs, sweep_experts=a.sweep_experts,
                   reference=not a.no_reference, threads=a.threads)


def _tune(a: argparse.Namespace) -> None:
    from mvke.training.tune import tune
    best = tune(a.data, a.model, a.trials, a.out, seed=a.seed, threads=a.threads)
    print(json.dumps({k: best[k] for k in ("model", "trials", "pruned", "valid_mean_auc", "params",
                                           "model_params", "cpu_seconds")}, indent=1))


def register(sub) -> None:
    t = sub.add_parser("train", help="train one model")
    t.add_argument("--data", required=True)
    t.add_argument("--model", default="mvke-mt")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--config", help="best.json of `mvke tune`: its chosen settings (flags below override)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, default=1024)
    t.add_argument("--lr", type=float)
    t.add_argument("--lr-schedule", choices=["constant", "cosine"])
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    t.add_argument("--experts", type=int)
    t.add_argument("--task-experts", help="e.g. interest=1-3,intention=2-5 (1-based, inclusive)")
    t.add_argument("--attention", choices=["values", "fields", "residual", "uniform"])
    t.add_argument("--gate", choices=["bilinear", "plain", "projected", "uniform"])
    t.set_defaults(func=_train, extra=EXTRA)

    e = sub.add_parser("experiment", help="every model over seeds, selected on validation; tables and figures")
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--seeds", type=int, default=5)
    e.add_argument("--models", help="comma-separated (default: all models and controls)")
    e.add_argument("--configs", help="output directory of `mvke tune` (each model's best.json)")
    e.add_argument("--sweep-experts", action="store_true")
    e.add_argument("--no-reference", action="store_true", help="skip the LightGBM reference")
    e.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    e.set_defaults(func=_experiment, extra=EXTRA)

    u = sub.add_parser("tune", help="Optuna study of one model on validation AUC (resumable)")
    u.add_argument("--data", required=True)
    u.add_argument("--model", required=True)
    u.add_argument("--trials", type=int, default=12)
    u.add_argument("--out", required=True)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--threads", type=int, default=1, help="torch CPU threads per trial")
    u.set_defaults(func=_tune, extra=EXTRA)
