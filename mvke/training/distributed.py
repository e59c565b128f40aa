"""`mvke train --workers N`: data-parallel training on Ray Train (TorchTrainer, DDP), data streamed.

    dataset dir -> parts: (train, users) Parquet pairs; users never straddle parts
      1. vocabularies: one pass over the parts (users of each part's training rows), in Ray tasks
      2. Ray Data: part list -> map_batches(PartEncoder actors): read the part's Parquet row groups,
         split validation off per part (the trainer's time split), join the users, encode -> id arrays
         -> streaming_split into N equal shards (Ray Train's default DataConfig)
      3. N TorchTrainer workers (DDP: gloo on CPU, nccl on GPU), each running the trainer's own loop
         (`trainer.fit`: the same model, optimiser, step, loss and early stopping as a 1-process run);
         rank 0 keeps the best weights
      4. the driver writes the checkpoint with `save_checkpoint`: same format as `--workers 1`, so
         `mvke export` works on either

Memory per process is bounded by one part plus the shuffle buffer, whatever the dataset size:
a dataset larger than one machine's memory trains (write it in parts: `mvke data synth`
does above 65,536 users, parts of 4,096 users; any `train.parquet/part-*.parquet` + `users.parquet/part-*.parquet`
directory pair with the same part names and each user in one part works).

Batch size and learning rate: `--batch-size B` is the effective (global) batch. Each of
the N workers takes B/N samples per step and DDP averages the gradients, so a step sees
the same B samples' mean gradient as one worker would, and the learning rate stays the
1-worker one (no linear scaling is needed because the effective batch does not change).
Samples per epoch, steps per epoch and the number of epochs are therefore the same.
`--workers 1` never starts Ray (trainer.train_model on in-memory arrays) unless `--stream`
asks for this path with one worker. Validation is the trainer's time split
(mvke/data/split.py), applied part by part.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mvke.data.dataset import TASKS, RawDataset, encode_split
from mvke.data.split import TIME_COLUMN, SplitError, time_validation_mask
from mvke.runtime.features import FeatureSchema, FieldSpec

SHUFFLE_BUFFER_ROWS = 65_536


@dataclass
class DataPart:
    """One unit of streaming: a training file and the users it refers to (test optional)."""
    train: str
    users: str
    test: str | None = None


def find_parts(data_dir: str | Path) -> list[DataPart]:
    """`train.parquet` a file: one part. A directory of `part-*.parquet`: one part per file, paired by name."""
    root = Path(data_dir)
    train, users, test = root / "train.parquet", root / "users.parquet", root / "test.parquet"
    if train.is_file():
        return [DataPart(str(train), str(users), str(test) if test.exists() else None)]
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: no such file or directory")
    parts = []
    for f in sorted(train.glob("*.parquet")):
        u = users / f.name if users.is_dir() else users
        if not u.exists():
            raise FileNotFoundError(f"{u}: the users of {f} (parts are paired by file name)")
        t = test / f.name if test.is_dir() else None
        parts.append(DataPart(str(f), str(u), str(t) if t and t.exists() else None))
    if not parts:
        raise FileNotFoundError(f"{train}: no part files")
    return parts


def validation_mask(train: pd.DataFrame, valid_fraction: float, source: str = "train.parquet") -> np.ndarray:
    """Which rows of a part are validation rows: the trainer's time split (mvke/data/split.py), on one part.

    The rule only looks at each user's own rows (users never straddle parts), so applying it
    part by part gives the same split as the trainer's on the whole table. A part may have no
    validation row; `scan_parts` checks that the whole dataset has some.
    """
    return time_validation_mask(train, valid_fraction, source, allow_empty=True)


def _part_split(part: DataPart, kinds: dict[str, str], valid_fraction: float,
                split: str, columns: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(rows of the split, users table, number of validation rows of the part (0 for the test split))
    of one part; split in {train, valid, test};
    `columns`: only these columns of the rows (those of them the file has)."""
    n_valid = 0
    if split == "test":
        rows = pq.read_table(part.test).to_pandas()
    else:
        if columns is not None:
            names = set(pq.read_schema(part.train).names)
            columns = [c for c in columns if c in names]
        rows = pq.read_table(part.train, columns=columns).to_pandas()
        is_valid = validation_mask(rows, valid_fraction, part.train)
        n_valid = int(is_valid.sum())
        rows = rows[is_valid if split == "valid" else ~is_valid].reset_index(drop=True)
    users = pq.read_table(part.users, columns=["user_id", *kinds]).to_pandas()
    return rows, users, n_valid


@dataclass
class PartsScan:
    """What one pass over the parts tells before training: the vocabularies and the split's sizes."""
    schema: FeatureSchema
    train_rows: int
    valid_rows: int


def _scan_part(part: DataPart, kinds: dict[str, str], valid_fraction: float) -> tuple[dict[str, set[str]], int, int]:
    """One part's share of the scan: the values of each field over its training rows' users, and
    its training and validation row counts."""
    # the vocabularies need the users of the training rows, or their inline fields: not the tags and labels
    rows, users, n_valid = _part_split(part, kinds, valid_fraction, "train", ["user_id", TIME_COLUMN, *kinds])
    source = rows if all(n in rows.columns for n in kinds) else users[users["user_id"].isin(set(rows["user_id"]))]
    table = pa.Table.from_pandas(source[list(kinds)], preserve_index=False)
    seen = {}
    for name, kind in kinds.items():
        col = table.column(name)
        values = pc.list_flatten(col) if kind == "multi" else col
        seen[name] = {str(v) for v in pc.unique(values.drop_null()).to_pylist()}
    return seen, len(rows), n_valid


def _merge_scans(scans, kinds: dict[str, str]) -> tuple[dict[str, set[str]], int, int]:
    """(values per field, training rows, validation rows) of several scans, merged."""
    seen: dict[str, set[str]] = {name: set() for name in kinds}
    train_rows = valid_rows = 0
    for scan_seen, n_train, n_valid in scans:
        for name, values in scan_seen.items():
            seen[name] |= values
        train_rows, valid_rows = train_rows + n_train, valid_rows + n_valid
    return seen, train_rows, valid_rows


def _scan_parts_chunk(parts: list[DataPart], kinds: dict[str, str], valid_fraction: float):
    """_scan_part over several parts, merged (one Ray task's work in `scan_parts(ray_tasks=True)`)."""
    return _merge_scans((_scan_part(part, kinds, valid_fraction) for part in parts), kinds)


SCAN_PARTS_PER_TASK = 16


def _scan_chunks_on_ray(chunks: list[list[DataPart]], kinds: dict[str, str], valid_fraction: float):
    """_scan_parts_chunk of each chunk as a Ray task; results yielded as they finish (merged one
    at a time, so the driver never holds every chunk's vocabularies at once)."""
    import ray
    task = ray.remote(num_cpus=1)(_scan_parts_chunk)
    waiting = [task.remote(c, kinds, valid_fraction) for c in chunks]
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        try:
            yield ray.get(done[0])
        except ray.exceptions.RayTaskError as e:   # the part's own error (e.g. unreadable Parquet), not Ray's wrapper
            raise e.cause from None


def scan_parts(parts: list[DataPart], meta: dict[str, Any], valid_fraction: float,
               ray_tasks: bool = False, parts_per_task: int = SCAN_PARTS_PER_TASK) -> PartsScan:
    """Vocabularies over the training rows' users, part by part (FeatureSchema.build's rule, min count 1),
    and the number of training and validation rows (the cosine schedule's length).

    `ray_tasks`: the parts are scanned by Ray tasks of `parts_per_task` parts each, on every CPU
    of the Ray cluster in use (a 10M-user dataset has 2,442 parts: ~20 minutes on one core).
    Raises SplitError, as the trainer does, when no part has a validation row."""
    kinds, max_lens = meta["fields"], meta.get("max_lens", {})
    chunks = [parts[i:i + parts_per_task] for i in range(0, len(parts), parts_per_task)]
    if ray_tasks and len(chunks) > 1:
        results = _scan_chunks_on_ray(chunks, kinds, valid_fraction)
    else:
        results = (_scan_parts_chunk(c, kinds, valid_fraction) for c in chunks)
    seen, train_rows, valid_rows = _merge_scans(results, kinds)
    if not valid_rows:
        raise SplitError(f"validation fraction {valid_fraction} gives an empty validation set: no user has "
                         f"{int(np.ceil(0.5 / valid_fraction))} or more distinct training timestamps")
    schema = FeatureSchema([FieldSpec(name, kind, max_lens.get(name, 1) if kind == "multi" else 1, sorted(seen[name]))
                            for name, kind in kinds.items()])
    return PartsScan(schema, train_rows, valid_rows)


def encode_part(part: DataPart, meta: dict[str, Any], schema: FeatureSchema, valid_fraction: float,
                split: str) -> dict[str, np.ndarray]:
    """One part's rows of `split` as model-ready arrays (trainer's encode_split on the part)."""
    rows, users, _ = _part_split(part, meta["fields"], valid_fraction, split)
    raw = RawDataset(Path(part.train).parent, meta, rows, rows, users)
    enc = encode_split(raw, rows, schema)
    return {"cat_ids": enc.cat_ids, "multi_ids": enc.multi_ids, "tag_ids": enc.tag_ids, "labels": enc.labels}


class PartEncoder:
    """Ray Data callable class: part descriptors in, encoded sample rows out (one part at a time)."""

    def __init__(self, meta: dict[str, Any], schema: dict, valid_fraction: float, split: str):
        self.meta, self.schema = meta, FeatureSchema.from_dict(schema)
        self.valid_fraction, self.split = valid_fraction, split

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for d in batch["part"]:
            part = DataPart(**json.loads(d))
            yield encode_part(part, self.meta, self.schema, self.valid_fraction, self.split)


def _dataset(parts: list[DataPart], meta: dict, schema: FeatureSchema, valid_fraction: float, split: str,
             encoders: int):
    import ray
    items = [{"part": json.dumps(asdict(p))} for p in parts]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # num_cpus=0: the encoders reserve no CPU, so N workers fit a Ray of N CPUs (a reservation beyond the
    # cluster's CPUs would leave the trainer waiting for resources forever)
    return ds.map_batches(PartEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=encoders),
                          fn_constructor_kwargs={"meta": meta, "schema": schema.to_dict(),
                                                 "valid_fraction": valid_fraction, "split": split},
                          num_cpus=0)


# ---- the worker loop (runs inside each Ray Train worker) ----------------------------------------
def _worker_loop(config: dict[str, Any]) -> None:
    """The trainer's loop (`trainer.fit`: step, loss, early stopping) on this worker's shard, the
    model wrapped in DDP; rank 0 reports the best weights."""
    import ray.train
    import ray.train.torch
    import torch

    from mvke.models import ModelConfig, build_torch_model
    from mvke.training.trainer import TrainConfig, fit, make_optimizer

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    model = ray.train.torch.prepare_model(build_torch_model(ModelConfig(**config["model"])))
    per_worker = max(1, config["batch_size"] // world)
    # The trainer's optimiser and schedule (AdamW, constant or cosine to 0 at the last planned epoch),
    # the schedule's length in this worker's steps: its equal share of the training rows.
    steps_per_epoch = -(-config["train_rows"] // (world * per_worker))
    opt, sched = make_optimizer(model, TrainConfig(epochs=config["epochs"], lr=config["lr"],
                                                   lr_schedule=config["lr_schedule"],
                                                   weight_decay=config["weight_decay"]), steps_per_epoch)
    train_shard, valid_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("valid")

    def epoch_batches(epoch: int):
        return _shard_batches(train_shard, per_worker, local_shuffle_buffer_size=config["shuffle_rows"],
                              local_shuffle_seed=config["seed"] + epoch)

    pruner = _Pruner({int(k): v for k, v in (config.get("prune_below") or {}).items()})
    cpu0 = time.process_time()
    run = fit(model, opt, sched, config["epochs"], config["patience"], epoch_batches,
              lambda: _validate(model, valid_shard, world, config["max_eval_rows"]),
              on_epoch=pruner, max_steps=config["max_steps"])
    _report(run, opt, world, ctx.get_world_rank(), time.process_time() - cpu0, pruner.pruned_at)


def _shard_batches(shard, batch_size: int, **shuffle) -> Iterator[tuple]:
    """A Ray Data shard's batches as the trainer's batch tuples (`trainer.BATCH_KEYS`)."""
    from mvke.training.trainer import BATCH_KEYS
    for b in shard.iter_torch_batches(batch_size=batch_size, dtypes=_torch_dtypes(), **shuffle):
        yield tuple(b[k] for k in BATCH_KEYS)


def _torch_dtypes() -> dict:
    import torch
    return {"cat_ids": torch.int64, "multi_ids": torch.int64, "tag_ids": torch.int64, "labels": torch.float32}


class _Pruner:
    """fit's on_epoch: Optuna's median rule, decided here because the trial lives in the driver: every
    rank saw the same gathered validation AUC, so all of them stop at the same epoch."""

    def __init__(self, below: dict[int, float]):
        self.below, self.pruned_at = below, None

    def __call__(self, epoch: int, mean_auc: float, best: float) -> bool:
        if epoch in self.below and best < self.below[epoch]:
            self.pruned_at = epoch
        return self.pruned_at is not None


def _report(run, opt, world: int, rank: int, cpu_seconds: float, pruned_at: int | None) -> None:
    """The run's metrics, summed over the workers, to Ray Train; rank 0 adds the best weights."""
    import ray.train
    import torch
    import torch.distributed as dist
    totals = torch.tensor([run.samples, run.step_seconds, cpu_seconds], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)       # samples and CPU seconds of all workers; wall seconds summed (divided below)
    samples, train_seconds, cpu = float(totals[0]), float(totals[1]) / world, float(totals[2])
    metrics = {**run.stopping.metrics(), "steps": run.steps, "samples": samples, "train_seconds": train_seconds,
               "samples_per_second": samples / max(train_seconds, 1e-9), "workers": world,
               "cpu_seconds": cpu, "samples_per_cpu_second": samples / max(cpu, 1e-9),
               "pruned_at_epoch": pruned_at, "final_lr": float(opt.param_groups[0]["lr"])}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(run.stopping.best_state, os.path.join(tmp, "model.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _validate(model, shard, world: int, max_rows: int = 0) -> dict[str, float]:
    """AUC per task over every worker's share of the validation rows (gathered on all ranks);
    `max_rows` > 0: about that many rows in all (each worker stops after its share)."""
    import torch
    import torch.distributed as dist

    from mvke.training.trainer import task_aucs
    model.eval()
    probs, labels, seen = [], [], 0
    with torch.no_grad():
        for b in shard.iter_torch_batches(batch_size=8192, dtypes=_torch_dtypes()):
            probs.append(torch.sigmoid(model(b["cat_ids"], b["multi_ids"], b["tag_ids"])).numpy())
            labels.append(b["labels"].numpy())
            seen += len(labels[-1])
            if max_rows and seen >= max_rows / world:
                break
    mine = (np.concatenate(probs) if probs else np.zeros((0, len(TASKS)), np.float32),
            np.concatenate(labels) if labels else np.zeros((0, len(TASKS)), np.float32))
    everyone = [mine]
    if dist.is_initialized() and world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    return task_aucs(np.concatenate([e[1] for e in everyone]), np.concatenate([e[0] for e in everyone]))


# ---- the driver ---------------------------------------------------------------------------------
@dataclass
class DistributedConfig:
    workers: int = 2
    use_gpu: bool = False
    address: str | None = None        # a Ray cluster; None: a local Ray on this machine
    encoders: int = 1                 # PartEncoder actors feeding the workers
    max_steps: int = 0                # stop after this many steps per worker (0: whole epochs)
    max_eval_rows: int = 0            # validate / score the test split on about this many rows (0: all)
    shuffle_rows: int = SHUFFLE_BUFFER_ROWS
    score_test: bool = True
    storage: str | None = None        # Ray Train's run directory (default: a temporary one)
    # {epoch: value}: stop (pruned) after an epoch whose best mean validation AUC so far is below the
    # value (`mvke tune`: the median of the finished trials at that epoch, optuna's MedianPruner rule)
    prune_below: dict[int, float] | None = None


def train_distributed(data_dir: str | Path, model_name: str, train_cfg, dist_cfg: DistributedConfig,
                      **model_overrides):
    """Train on Ray Train; returns a trainer.TrainResult (save it with `save_checkpoint`)."""
    import ray

    from mvke.training.trainer import TrainResult, model_config

    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    parts = find_parts(data_dir)
    t0 = time.perf_counter()
    owned = _init_ray(dist_cfg)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if not dist_cfg.use_gpu and cpus < dist_cfg.workers:
            raise ValueError(f"--workers {dist_cfg.workers} needs {dist_cfg.workers} CPUs in the Ray cluster, "
                             f"it has {cpus:g}")
        scan = scan_parts(parts, meta, train_cfg.valid_fraction, ray_tasks=True)
        model_cfg = model_config(model_name, scan.schema, meta["tags"], **model_overrides)
        result = _fit_on_ray(parts, meta, scan, model_cfg, train_cfg, dist_cfg)
    finally:
        if owned:
            ray.shutdown()
    model = _best_model(result, model_cfg)
    metrics = {"model": model_name, "dataset": meta.get("name", Path(data_dir).name), "seed": train_cfg.seed,
               **{k: v for k, v in result.metrics.items() if not k.startswith("_")},
               "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "n_train": scan.train_rows, "n_valid": scan.valid_rows,
               "wall_seconds": time.perf_counter() - t0}
    if dist_cfg.score_test and all(p.test for p in parts):
        metrics.update(test_auc_streamed(model, parts, meta, scan.schema, dist_cfg.max_eval_rows))
    return TrainResult(model, scan.schema, list(meta["tags"]), metrics)


def _fit_on_ray(parts: list[DataPart], meta: dict, scan: PartsScan, model_cfg, train_cfg, dist_cfg: DistributedConfig):
    """Ray Train's TorchTrainer running `_worker_loop` on the streamed train and valid splits."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False   # progress: the workers' reports
    datasets = {split: _dataset(parts, meta, scan.schema, train_cfg.valid_fraction, split, dist_cfg.encoders)
                for split in ("train", "valid")}
    loop_cfg = {"model": asdict(model_cfg), "epochs": train_cfg.epochs, "batch_size": train_cfg.batch_size,
                "lr": train_cfg.lr, "lr_schedule": train_cfg.lr_schedule, "weight_decay": train_cfg.weight_decay,
                "patience": train_cfg.patience, "train_rows": scan.train_rows, "prune_below": dist_cfg.prune_below,
                "seed": train_cfg.seed, "threads": max(1, train_cfg.threads // dist_cfg.workers),
                "max_steps": dist_cfg.max_steps, "max_eval_rows": dist_cfg.max_eval_rows,
                "shuffle_rows": dist_cfg.shuffle_rows}
    storage = dist_cfg.storage or tempfile.mkdtemp(prefix="mvke-raytrain-")
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend="nccl" if dist_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=dist_cfg.workers, use_gpu=dist_cfg.use_gpu,
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=storage, name="mvke-train"),
        datasets=datasets)
    return trainer.fit()


def _best_model(result, model_cfg):
    """The model with rank 0's best weights from the Ray Train result's checkpoint, in eval mode."""
    import torch

    from mvke.models import build_torch_model
    model = build_torch_model(model_cfg)
    with result.checkpoint.as_directory() as d:
        model.load_state_dict(torch.load(Path(d) / "model.pt", weights_only=True))
    return model.eval()


def test_auc_streamed(model, parts: list[DataPart], meta: dict, schema: FeatureSchema, max_rows: int = 0) -> dict:
    """Test AUC per task, the test rows encoded and scored part by part (only scores and labels kept);
    `max_rows` > 0: the parts up to the one that reaches that many rows."""
    import torch

    from mvke.training.trainer import BATCH_KEYS, task_aucs
    probs, labels = [], []
    with torch.no_grad():
        for part in parts:
            enc = encode_part(part, meta, schema, 0.0, "test")
            for s in range(0, len(enc["labels"]), 8192):
                sl = slice(s, s + 8192)
                logits = model(*(torch.from_numpy(enc[k][sl]) for k in BATCH_KEYS[:3]))
                probs.append(torch.sigmoid(logits).numpy())
            labels.append(enc["labels"])
            if max_rows and sum(len(x) for x in labels) >= max_rows:
                break
    p, y = np.concatenate(probs), np.concatenate(labels)
    return {"test_auc": task_aucs(y, p), "n_test": len(y)}


@contextlib.contextmanager
def ray_session(cfg: DistributedConfig) -> Iterator[None]:
    """One Ray for several trainings (a study's trials, an experiment's runs): started here unless
    one is running, shut down on exit if started here."""
    owned = _init_ray(cfg)
    try:
        yield
    finally:
        if owned:
            import ray
            ray.shutdown()


def _init_ray(cfg: DistributedConfig) -> bool:
    import logging

    import ray
    if ray.is_initialized():
        return False
    common = dict(logging_level=logging.WARNING, log_to_driver=True)
    if cfg.address:
        ray.init(address=cfg.address, **common)
    else:
        ray.init(address="local", num_cpus=max(cfg.workers, len(os.sched_getaffinity(0))),
                 include_dashboard=False, object_store_memory=512 * 1024 * 1024, **common)
    return True
