"""Training and evaluation loop shared by every model.

Loss = sum over tasks of BCE(task label, sigmoid(logit)) (paper eq. 8).
Validation: the last ~10% of each user's training events, by time
(`mvke.data.split`); early stopping and every choice read the validation
metrics only. The test day is scored once, with the best weights, and only
when `TrainConfig.score_test` is set (tuning never sets it).

One loop, `fit` (`train_epoch` -> `train_step` -> `batch_loss`, then a
validation AUC per task and `EarlyStopping`), serves `train_model` and every
Ray Train worker of `mvke/training/distributed.py`; only where the batches
and the validation AUC come from differ.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mvke.data.dataset import TASKS, EncodedSplit, RawDataset, build_schema, encode_split, load_dataset
from mvke.data.split import time_validation_mask
from mvke.models import ModelConfig, TwoTowerTagger, build_torch_model
from mvke.models.layers import tag_groups_of
from mvke.runtime.features import FeatureSchema
from mvke.training.metrics import auc, gauc, ranking_metrics
from mvke.training.resume import PartialEpoch, RunCheckpoint

CHECKPOINT_FILES = ("model.pt", "config.json", "schema.json", "metrics.json")
LR_SCHEDULES = ("constant", "cosine")
TOP_K = 20


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 1024
    lr: float = 2e-3
    lr_schedule: str = "constant"   # "constant" | "cosine" (per step, to 0 at the last planned epoch)
    weight_decay: float = 0.0       # decoupled (AdamW)
    patience: int = 1
    valid_fraction: float = 0.1
    seed: int = 0
    threads: int = 2
    progress: bool = True
    score_test: bool = True         # False: the test split is never read (tuning)

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


@dataclass
class TrainResult:
    model: TwoTowerTagger
    schema: FeatureSchema
    tags: list[str]
    metrics: dict = field(default_factory=dict)
    data_dir: str | None = None     # the dataset it was trained on (set by load_checkpoint)


@dataclass
class EncodedData:
    dataset: RawDataset
    schema: FeatureSchema
    train: EncodedSplit
    valid: EncodedSplit
    test: EncodedSplit


def prepare(data_dir: str | Path, valid_fraction: float = 0.1) -> EncodedData:
    """Load, split validation off by time, build vocabularies on the training part, encode all splits."""
    ds = load_dataset(data_dir)
    is_valid = time_validation_mask(ds.train, valid_fraction, str(Path(data_dir) / "train.parquet"))
    fit = RawDataset(ds.path, ds.meta, ds.train[~is_valid].reset_index(drop=True), ds.test, ds.users)
    schema = build_schema(fit)
    full = encode_split(ds, ds.train, schema)
    return EncodedData(ds, schema, full.subset(np.flatnonzero(~is_valid)), full.subset(np.flatnonzero(is_valid)),
                       encode_split(ds, ds.test, schema))


def model_config(name: str, schema: FeatureSchema, tags: list[str], **overrides) -> ModelConfig:
    """`name`'s configuration for a dataset's vocabularies and tags (`overrides` win)."""
    overrides.setdefault("tag_groups", tag_groups_of(tags))
    return ModelConfig(name=name, tasks=list(TASKS), num_ids=schema.num_ids, num_cat_fields=len(schema.cat_fields),
                       num_multi_fields=len(schema.multi_fields), num_tags=len(tags), **overrides)


def model_config_for(name: str, data: EncodedData, **overrides) -> ModelConfig:
    return model_config(name, data.schema, data.dataset.tags, **overrides)


# -- the loop ------------------------------------------------------------------------
def _tensors(split: EncodedSplit, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(split.cat_ids[idx]), torch.from_numpy(split.multi_ids[idx]),
            torch.from_numpy(split.tag_ids[idx]), torch.from_numpy(split.labels[idx]))


def batches(split: EncodedSplit, batch_size: int, rng: np.random.Generator,
            skip_batches: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    """One shuffled pass over a split: (cat_ids, multi_ids, tag_ids, labels) per batch; `skip_batches`:
    start after that many (a resumed epoch, mvke/training/resume.py)."""
    perm = rng.permutation(len(split))
    for start in range(skip_batches * batch_size, len(perm), batch_size):
        yield _tensors(split, perm[start:start + batch_size])


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    return opt, sched


BATCH_KEYS = ("cat_ids", "multi_ids", "tag_ids", "labels")   # a batch's tensors, in `batches`' order


def batch_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Paper eq. 8: the sum over tasks of each task's mean BCE on the batch."""
    cat, multi, tags, labels = batch
    logits = model(cat, multi, tags)                                       # [B, n_tasks]
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).sum()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...],
               sched=None) -> float:
    """One optimiser step on one batch (under DDP the backward pass averages the workers' gradients)."""
    loss = batch_loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.item())


@dataclass
class EpochStats:
    loss: float         # mean training loss per sample
    samples: int
    steps: int
    seconds: float      # wall time of the steps (validation not included)


def train_epoch(model: torch.nn.Module, opt, batch_iter, sched=None, desc: str = "",
                progress: bool = False, partial: PartialEpoch | None = None, after_step=None) -> EpochStats:
    """Train over an iterator of batches. partial: the totals of a resumed epoch to continue from;
    after_step(PartialEpoch) is called after every step (the run's checkpoint)."""
    model.train()
    done = partial or PartialEpoch()
    t0, total, seen, steps = time.perf_counter() - done.seconds, done.loss_total, done.seen, done.steps
    bar = tqdm(batch_iter, desc=desc, disable=not progress, leave=False, unit="batch")
    for batch in bar:
        loss = train_step(model, opt, batch, sched)
        n = len(batch[3])
        total, seen, steps = total + loss * n, seen + n, steps + 1
        if progress:
            bar.set_postfix(loss=f"{loss:.4f}")
        if after_step is not None:
            after_step(PartialEpoch(total, seen, steps, time.perf_counter() - t0))
    return EpochStats(total / max(seen, 1), seen, steps, time.perf_counter() - t0)


def task_aucs(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """{task: AUC} of [N, n_tasks] labels and probabilities (nan where a task has one class only)."""
    return {t: auc(labels[:, i], probs[:, i]) for i, t in enumerate(TASKS)}


@torch.no_grad()
def predict(model: TwoTowerTagger, split: EncodedSplit, batch_size: int = 8192) -> np.ndarray:
    """Probabilities [N, n_tasks]."""
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        idx = np.arange(start, min(start + batch_size, len(split)))
        cat, multi, tags, _ = _tensors(split, idx)
        out.append(torch.sigmoid(model(cat, multi, tags)).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(TASKS)), np.float32)


def evaluate(model: TwoTowerTagger, split: EncodedSplit) -> dict[str, float]:
    """AUC per task (nan where a task has one class only)."""
    return task_aucs(split.labels, predict(model, split))


def mean_finite(values) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("-inf")


def epoch_valid_auc(row: dict) -> dict[str, float]:
    """{task: validation AUC} of one history row ({"valid_<task>_auc": ...})."""
    return {k.split("_")[1]: v for k, v in row.items() if k.startswith("valid_")}


@dataclass
class EarlyStopping:
    """The one early-stopping rule: keep the weights of the epoch with the best mean validation AUC
    (over the tasks that have one), stop when more than `patience` epochs in a row did not improve on it."""
    patience: int
    best: float = float("-inf")
    best_epoch: int = 0
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)

    def record(self, epoch: int, train_loss: float, valid: dict[str, float], model: torch.nn.Module) -> float:
        """Add an epoch's row to the history; returns its mean validation AUC."""
        mean_auc = mean_finite(valid.values())   # a task with one class in validation has no AUC
        self.history.append({"epoch": epoch, "train_loss": train_loss, **{f"valid_{k}_auc": v for k, v in valid.items()}})
        if self.best_state is None or mean_auc > self.best:
            weights = getattr(model, "module", model)  # a DDP wrapper holds the model as .module
            self.best, self.best_epoch = mean_auc, epoch
            self.best_state = {k: v.detach().clone() for k, v in weights.state_dict().items()}
        return mean_auc

    def stop(self, epoch: int) -> bool:
        return epoch - self.best_epoch > self.patience

    def metrics(self) -> dict:
        return {"best_valid_mean_auc": self.best, "best_epoch": self.best_epoch, "history": self.history,
                "valid_auc": epoch_valid_auc(self.history[self.best_epoch - 1])}


@dataclass
class FitResult:
    stopping: EarlyStopping
    samples: int = 0
    steps: int = 0
    step_seconds: float = 0.0   # wall time in training steps, validation not included

    def add(self, epoch: EpochStats) -> None:
        self.samples, self.steps, self.step_seconds = (self.samples + epoch.samples, self.steps + epoch.steps,
                                                       self.step_seconds + epoch.seconds)


def fit(model: torch.nn.Module, opt, sched, epochs: int, patience: int, epoch_batches, validate,
        on_epoch=None, max_steps: int = 0, desc: str = "", progress: bool = False,
        run: FitResult | None = None, first_epoch: int = 1, partial: PartialEpoch | None = None,
        checkpoint: RunCheckpoint | None = None) -> FitResult:
    """The one training loop (single process and every DDP worker): per epoch, train over
    `epoch_batches(epoch)`, `validate()` -> {task: AUC}, early stopping; the best weights are in
    the result, not loaded.

    on_epoch(epoch, mean_auc, best_so_far) is called after each epoch; it may raise (Optuna
    pruning) or return True to stop. max_steps > 0: stop after that many steps in all.
    A resumed run (train_model): `run`, `first_epoch` and `partial` as restored by `checkpoint`,
    which saves the state after every epoch (and inside one, at its own interval)."""
    if checkpoint is not None and (max_steps or on_epoch is not None):
        raise ValueError("a checkpointed run stops on early stopping alone (max_steps and on_epoch are not saved)")
    run = run or FitResult(EarlyStopping(patience))
    stopping = run.stopping
    if first_epoch > 1 and partial is None and stopping.stop(first_epoch - 1):
        return run                                  # stopped before the process that saved it ended
    for epoch in range(first_epoch, epochs + 1):
        batch_iter = epoch_batches(epoch)
        if max_steps:
            batch_iter = itertools.islice(batch_iter, max_steps - run.steps)
        after_step = (lambda p, e=epoch: checkpoint.after_step(e, p)) if checkpoint is not None else None
        stats = train_epoch(model, opt, batch_iter, sched, f"{desc} epoch {epoch}", progress,
                            partial if epoch == first_epoch else None, after_step)
        run.add(stats)
        valid = validate()
        mean_auc = stopping.record(epoch, stats.loss, valid, model)
        if progress:
            tqdm.write(f"[{desc}] epoch {epoch}: loss {stats.loss:.4f} "
                       + " ".join(f"valid {k} AUC {v:.4f}" for k, v in valid.items()))
        if checkpoint is not None:
            checkpoint.after_epoch(epoch)
        if on_epoch is not None and on_epoch(epoch, mean_auc, stopping.best):
            break
        if stopping.stop(epoch) or (max_steps and run.steps >= max_steps):
            break
    return run


def train_model(data: EncodedData, model_cfg: ModelConfig, cfg: TrainConfig, on_epoch=None,
                initial_state: dict | None = None, checkpoint: RunCheckpoint | None = None) -> TrainResult:
    """Train with early stopping on the mean validation AUC; restore the best epoch's weights.

    on_epoch(epoch, valid_mean_auc, best_so_far) is called after each epoch (Optuna pruning); it may raise to stop.
    initial_state: weights to start from instead of the random init (the daily cycle's warm start).
    checkpoint: the run's state file: continued from when it exists, saved as the run goes
    (mvke/training/resume.py); CPU and wall seconds then count every process of the run.
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = build_torch_model(model_cfg)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    steps = (len(data.train) + cfg.batch_size - 1) // cfg.batch_size
    opt, sched = make_optimizer(model, cfg, steps)
    rng = np.random.default_rng(cfg.seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    run, first_epoch, partial = FitResult(EarlyStopping(cfg.patience)), 1, None
    def make_batches(skip: int = 0):
        return batches(data.train, cfg.batch_size, rng, skip)

    epoch_batches = lambda _: make_batches()  # noqa: E731
    if checkpoint is not None:
        checkpoint.bind(model, opt, sched, rng, make_batches, run.stopping, run)
        first_epoch, partial = checkpoint.restore()
        epoch_batches = checkpoint.epoch_batches
    run = fit(model, opt, sched, cfg.epochs, cfg.patience, epoch_batches, lambda: evaluate(model, data.valid),
              on_epoch, desc=model_cfg.name, progress=cfg.progress, run=run, first_epoch=first_epoch,
              partial=partial, checkpoint=checkpoint)
    train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    if checkpoint is not None:
        train_seconds, cpu_seconds = checkpoint.wall_seconds(), checkpoint.cpu_seconds()
    model.load_state_dict(run.stopping.best_state)
    model.eval()
    metrics = {
        "model": model_cfg.name, "dataset": data.dataset.name, "seed": cfg.seed, **run.stopping.metrics(),
        "train_seconds": train_seconds, "samples_per_second": run.samples / train_seconds,
        # CPU time of this process: on a shared machine wall-clock speed mostly measures the neighbours.
        "cpu_seconds": cpu_seconds, "samples_per_cpu_second": run.samples / max(cpu_seconds, 1e-9),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "n_train": len(data.train), "n_valid": len(data.valid), "n_test": len(data.test),
    }
    if cfg.score_test:
        metrics.update(test_metrics(model, data))
    return TrainResult(model, data.schema, data.dataset.tags, metrics)


# -- test-day evaluation ------------------------------------------------------------
def test_metrics(model: TwoTowerTagger, data: EncodedData) -> dict:
    """Everything reported on the test day: AUC and gAUC per task, Recall/NDCG@20, the oracle AUC."""
    split = data.test
    probs = predict(model, split)
    out = {"test_auc": task_aucs(split.labels, probs),
           "test_gauc": {t: gauc(split.user_ids, split.labels[:, i], probs[:, i]) for i, t in enumerate(TASKS)},
           "test_ranking": ranking_quality(model, split, TOP_K)}
    if split.true_probs is not None:
        out["oracle_test_auc"] = oracle_auc(split)
        out["oracle_test_gauc"] = {t: gauc(split.user_ids, split.labels[:, i], split.true_probs[:, i])
                                   for i, t in enumerate(TASKS)}
    return out


def test_users(split: EncodedSplit) -> tuple[np.ndarray, list[list[set[int]]]]:
    """Each test user's first row (the features the service would hold at the start of the test
    period) and, per task, the tags of the ads the user clicked / converted on that day."""
    users, first = np.unique(split.user_ids, return_index=True)
    pos = np.searchsorted(users, split.user_ids)
    relevant: list[list[set[int]]] = []
    for i in range(len(TASKS)):
        rel: list[set[int]] = [set() for _ in users]
        for row in np.flatnonzero(split.labels[:, i] > 0):
            rel[pos[row]].update(int(t) for t in split.tag_ids[row] if t > 0)
        relevant.append(rel)
    return first, relevant


@torch.no_grad()
def top_tags(model: TwoTowerTagger, cat: torch.Tensor, multi: torch.Tensor, k: int,
             batch_size: int = 512) -> list[np.ndarray]:
    """Per task, [U, k] tag ids (1-based) ranked by score over the whole catalogue, as the service ranks."""
    model.eval()
    tag_side = model.all_tag_vectors()                                   # per task ([T, D], [T, K])
    k = min(k, model.cfg.num_tags)
    out: list[list[np.ndarray]] = [[] for _ in tag_side]
    for start in range(0, len(cat), batch_size):
        users = model.user_vectors(cat[start:start + batch_size], multi[start:start + batch_size])
        for i, (v, (e_t, gate)) in enumerate(zip(users, tag_side)):
            e_u = torch.einsum("tk,bkd->btd", gate, v)                   # [B, T, D]
            cos = F.cosine_similarity(e_u, e_t.unsqueeze(0), dim=-1, eps=1e-8)  # [B, T]
            out[i].append(torch.topk(cos, k, dim=1).indices.numpy() + 1)
    return [np.concatenate(o) for o in out]


def ranking_quality(model: TwoTowerTagger, split: EncodedSplit, k: int = TOP_K) -> dict[str, dict]:
    first, relevant = test_users(split)
    cat, multi = torch.from_numpy(split.cat_ids[first]), torch.from_numpy(split.multi_ids[first])
    tops = top_tags(model, cat, multi, k)
    return {t: ranking_metrics(tops[i], relevant[i], k) for i, t in enumerate(TASKS)}


def oracle_auc(split: EncodedSplit) -> dict[str, float]:
    """AUC of the true probabilities: the ceiling any model can reach."""
    return task_aucs(split.labels, split.true_probs)


# -- checkpoints -------------------------------------------------------------------
def save_checkpoint(result: TrainResult, out: str | Path, train_cfg: TrainConfig, data_dir: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), out / "model.pt")
    (out / "config.json").write_text(json.dumps({
        "model": asdict(result.model.cfg), "train": asdict(train_cfg),
        "data": {"path": str(data_dir), "name": result.metrics.get("dataset")}}, indent=1))
    (out / "schema.json").write_text(json.dumps({"features": result.schema.to_dict(), "tags": result.tags}))
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1))
    return out


def load_checkpoint(ckpt: str | Path) -> TrainResult:
    ckpt = Path(ckpt)
    for f in CHECKPOINT_FILES:
        if not (ckpt / f).exists():
            raise FileNotFoundError(f"{ckpt / f}: checkpoint file missing (run `mvke train` first)")
    cfg = json.loads((ckpt / "config.json").read_text())
    schema = json.loads((ckpt / "schema.json").read_text())
    model = build_torch_model(ModelConfig(**cfg["model"]))
    model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
    model.eval()
    return TrainResult(model, FeatureSchema.from_dict(schema["features"]), schema["tags"],
                       json.loads((ckpt / "metrics.json").read_text()), cfg.get("data", {}).get("path"))
