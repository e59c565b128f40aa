"""`mvke train | experiment | tune`: registered into the `mvke` command line (entry point group `mvke.commands`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mvke.runtime.options import at_least_one

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
    if a.workers > 1 or a.address or a.stream:
        # Ray Train (DDP), the data streamed part by part (mvke/training/distributed.py); same checkpoint format
        from mvke.training.distributed import DistributedConfig, train_distributed
        result = train_distributed(a.data, a.model, cfg, DistributedConfig(workers=a.workers, use_gpu=a.gpu,
                                                                           address=a.address, max_steps=a.max_steps,
                                                                           max_eval_rows=a.max_eval_rows),
                                   **_model_overrides(a))
    else:
        data = prepare(a.data)
        result = train_model(data, model_config_for(a.model, data, **_model_overrides(a)), cfg)
    save_checkpoint(result, a.out, cfg, a.data)
    m = result.metrics
    print(json.dumps({"model": a.model, "best_epoch": m.get("best_epoch"), "valid_auc": m.get("valid_auc"),
                      "test_auc": m["test_auc"], "test_gauc": m.get("test_gauc"), "oracle_test_auc": m.get("oracle_test_auc"),
                      "samples_per_second": round(m["samples_per_second"]), "out": str(a.out)}, indent=1))


def _experiment(a: argparse.Namespace) -> None:
    from mvke.training.experiment import run_experiment
    models = a.models.split(",") if a.models else None
    run_experiment(a.data, a.out, seeds=a.seeds, models=models, configs=a.configs, sweep_experts=a.sweep_experts,
                   reference=not a.no_reference, threads=a.threads, aggregate_only=a.aggregate_only,
                   max_epochs=a.max_epochs, workers=a.workers, address=a.address, use_gpu=a.gpu,
                   match_params=not a.no_matched)


def _tune(a: argparse.Namespace) -> None:
    from mvke.training.tune import tune
    best = tune(a.data, a.model, a.trials, a.out, seed=a.seed, threads=a.threads, workers=a.workers,
                address=a.address, use_gpu=a.gpu)
    print(json.dumps({k: best[k] for k in ("model", "trials", "pruned", "valid_mean_auc", "params",
                                           "model_params", "cpu_seconds")}, indent=1))


# The keys of mvke.models.MODELS, written out so that `--help` needs no torch import
# (tests/cli/test_help.py keeps the two equal).
MODEL_NAMES = ("mvke-mt", "mvke-st", "nomtl", "hard-sharing", "moe", "mmoe", "cgc",
               "mvke-uniform-gate", "mvke-no-kernel-attention", "mvke-plain-gate")
MODEL_HELP = (f"model to train: {', '.join(MODEL_NAMES)} (default mvke-mt; docs/MODELS.md says what each is)")


def _ray_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--workers / --address / --gpu of `experiment` and `tune`: `mvke train --workers`'s path for each run."""
    p.add_argument("--workers", type=at_least_one, default=1,
                   help=f"data-parallel workers on Ray Train for {what} (DDP, the data streamed; one Ray for the "
                        "whole call); 1: no Ray (default). The batch size stays the global batch (docs/SCALING.md)")
    p.add_argument("--address", help="Ray cluster address for --workers (default: a local Ray)")
    p.add_argument("--gpu", action="store_true", help="--workers: one GPU per worker, NCCL (default: CPU, gloo)")


def register(sub) -> None:
    _register_train(sub)
    _register_experiment(sub)
    _register_tune(sub)


def _register_train(sub) -> None:
    t = sub.add_parser("train", help="train one model",
                       description="Train one model on a dataset directory (`mvke data ...`), early-stopped on the "
                                   "validation rows, then score the test split once. Writes a checkpoint "
                                   "(model.pt, config.json, schema.json, metrics.json with test and oracle AUC).")
    t.add_argument("--data", required=True, metavar="DIR", help="dataset directory (meta.json, train/test/users.parquet)")
    t.add_argument("--model", default="mvke-mt", metavar="NAME", help=MODEL_HELP)
    t.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write (input of `mvke export`)")
    t.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed (default 0)")
    t.add_argument("--config", metavar="JSON",
                   help="best.json of `mvke tune`: its chosen model and training settings (the flags below override)")
    t.add_argument("--epochs", type=int, help="most epochs; early stopping may end sooner (default 5)")
    t.add_argument("--batch-size", type=int, default=1024, help="samples per step (default 1024)")
    t.add_argument("--lr", type=float, help="AdamW learning rate (default 0.002)")
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], help="learning-rate schedule (default constant)")
    t.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay (default 0)")
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; split among --workers)")
    _train_ray_arguments(t)
    _model_arguments(t)
    t.set_defaults(func=_train, extra=EXTRA)


def _train_ray_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--workers", type=at_least_one, default=1,
                   help="data-parallel workers on Ray Train (DDP; the data streamed part by part); 1: no Ray "
                        "(default). --batch-size stays the global batch: each worker takes batch-size/workers, so "
                        "the learning rate needs no scaling (docs/SCALING.md)")
    t.add_argument("--address", help="Ray cluster address for --workers (default: a local Ray)")
    t.add_argument("--gpu", action="store_true", help="--workers: one GPU per worker, NCCL (default: CPU, gloo)")
    t.add_argument("--max-steps", type=int, default=0, help="--workers: stop each worker after this many steps "
                                                             "(default 0: whole epochs)")
    t.add_argument("--stream", action="store_true",
                   help="train on Ray Train with the data streamed part by part even with --workers 1: a dataset "
                        "larger than memory (`mvke data synth` writes parts above 65536 users; docs/SCALING.md)")
    t.add_argument("--max-eval-rows", type=int, default=0, metavar="N",
                   help="--workers/--stream: validate and score the test split on about the first N rows only "
                        "(default 0: all; for smoke runs and memory/throughput measurements with --max-steps)")


def _model_arguments(t: argparse.ArgumentParser) -> None:
    """The model's architecture flags of `mvke train` (unset: the model's defaults)."""
    t.add_argument("--experts", type=int, metavar="K", help="experts per task (MVKE: virtual kernels); model default if unset")
    t.add_argument("--task-experts", metavar="SPEC",
                   help="MVKE-mt: the experts each task reads, e.g. interest=1-3,intention=2-5 (1-based, inclusive)")
    t.add_argument("--attention", choices=["values", "fields", "residual", "uniform"],
                   help="MVKE expert attention over the fields: values (default: field value maps shared by the "
                        "experts, weighted per expert), fields, residual (the published code's form) or uniform; "
                        "docs/MODELS.md")
    t.add_argument("--gate", choices=["bilinear", "plain", "projected", "uniform"],
                   help="MVKE tag gate: bilinear (default, ours), plain (the published code's E_T . VK), projected "
                        "(eq. 7) or uniform; docs/MODELS.md")


def _register_experiment(sub) -> None:
    e = sub.add_parser("experiment", help="every model over seeds, selected on validation; tables and figures",
                       description="Train each model for each seed with its tuned configuration (--configs), "
                                   "early-stopped on validation, the test day scored once per run; synthetic data "
                                   "is regenerated per seed. Resumable: finished (model, seed) runs are kept under "
                                   "--out/cells. Writes results.json/md and the paper's figures under --out.")
    e.add_argument("--data", required=True, metavar="DIR", help="dataset directory")
    e.add_argument("--out", required=True, metavar="DIR", help="results directory")
    e.add_argument("--seeds", type=int, default=5, help="seeds per model (default 5)")
    e.add_argument("--models", metavar="NAMES", help=f"comma-separated subset of: {', '.join(MODEL_NAMES)} (default all)")
    e.add_argument("--configs", metavar="DIR", help="output directory of `mvke tune` (each model's best.json)")
    e.add_argument("--sweep-experts", action="store_true", help="also train MVKE with 4..10 experts (Fig. 7)")
    e.add_argument("--no-reference", action="store_true", help="skip the LightGBM reference")
    e.add_argument("--no-matched", action="store_true",
                   help="no @matched rows (baselines outside ±15%% of mvke-mt's parameters rescaled to its size); "
                        "their cells, if run, are kept and reported by a later call without this flag")
    e.add_argument("--max-epochs", type=int, default=None,
                   help="one epoch budget for every model (early stopping on validation decides where each run "
                        "stops) instead of each study's best trial's epochs")
    e.add_argument("--aggregate-only", action="store_true",
                   help="train nothing: write results.json/md and the figures from the finished runs under --out "
                        "(a model is reported when all --seeds of its runs are there)")
    e.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    _ray_arguments(e, "every run")
    e.set_defaults(func=_experiment, extra=EXTRA)


def _register_tune(sub) -> None:
    u = sub.add_parser("tune", help="Optuna study of one model on validation AUC (resumable)",
                       description="One Optuna study (SQLite under --out/MODEL) over the search space shared by "
                                   "every model; objective = mean validation AUC of both tasks; the test split is "
                                   "never read. Writes --out/MODEL/best.json for `mvke experiment --configs`.")
    u.add_argument("--data", required=True, metavar="DIR", help="dataset directory")
    u.add_argument("--model", required=True, metavar="NAME", help=MODEL_HELP)
    u.add_argument("--trials", type=int, default=12, help="finished trials the study should hold (default 12)")
    u.add_argument("--out", required=True, metavar="DIR", help="studies directory")
    u.add_argument("--seed", type=int, default=0, help="sampler and training seed (default 0)")
    u.add_argument("--threads", type=int, default=1, help="torch CPU threads per trial (default 1)")
    _ray_arguments(u, "every trial")
    u.set_defaults(func=_tune, extra=EXTRA)
