"""Training and evaluation loop shared by every model.

Loss = sum over tasks of BCE(task label, sigmoid(logit)) (paper eq. 8).
Validation: a fixed 10% of the training day; early stopping on the mean
validation AUC over tasks; the test day is scored once with the best weights.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mvke.data.dataset import TASKS, EncodedSplit, build_schema, encode_split, load_dataset, RawDataset
from mvke.models import ModelConfig, TwoTowerTagger, build_model
from mvke.runtime.features import FeatureSchema
from mvke.training.metrics import roc_auc

CHECKPOINT_FILES = ("model.pt", "config.json", "schema.json", "metrics.json")


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.0
    patience: int = 1
    valid_fraction: float = 0.1
    seed: int = 0
    threads: int = 2
    progress: bool = True


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
    """Load, build vocabularies on the training split, encode all splits."""
    ds = load_dataset(data_dir)
    schema = build_schema(ds)
    full = encode_split(ds, ds.train, schema)
    # The validation rows are fixed (seed 0) so every model and seed sees the same split.
    perm = np.random.default_rng(0).permutation(len(full))
    n_valid = int(len(full) * valid_fraction)
    return EncodedData(ds, schema, full.subset(np.sort(perm[n_valid:])), full.subset(np.sort(perm[:n_valid])),
                       encode_split(ds, ds.test, schema))


def model_config_for(name: str, data: EncodedData, **overrides) -> ModelConfig:
    s = data.schema
    return ModelConfig(name=name, tasks=list(TASKS), num_ids=s.num_ids, num_cat_fields=len(s.cat_fields),
                       num_multi_fields=len(s.multi_fields), num_tags=len(data.dataset.tags), **overrides)


def _tensors(split: EncodedSplit, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(split.cat_ids[idx]), torch.from_numpy(split.multi_ids[idx]),
            torch.from_numpy(split.tag_ids[idx]), torch.from_numpy(split.labels[idx]))


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
    probs = predict(model, split)
    return {t: roc_auc(split.labels[:, i], probs[:, i]) for i, t in enumerate(TASKS)}


def train_model(data: EncodedData, model_cfg: ModelConfig, cfg: TrainConfig) -> TrainResult:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = build_model(model_cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    best, best_state, bad_epochs, history = -1.0, None, 0, []
    n = len(data.train)
    t0 = time.perf_counter()
    seen = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = rng.permutation(n)
        bar = tqdm(range(0, n, cfg.batch_size), desc=f"{model_cfg.name} epoch {epoch}", disable=not cfg.progress,
                   leave=False, unit="batch")
        total = 0.0
        for start in bar:
            cat, multi, tags, labels = _tensors(data.train, perm[start:start + cfg.batch_size])
            logits = model(cat, multi, tags)
            loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        valid = evaluate(model, data.valid)
        # A task whose validation rows hold one class only has no AUC (nan): leave it out.
        finite = [v for v in valid.values() if np.isfinite(v)]
        mean_auc = float(np.mean(finite)) if finite else float("-inf")
        history.append({"epoch": epoch, "train_loss": total / n, **{f"valid_{k}_auc": v for k, v in valid.items()}})
        if cfg.progress:
            tqdm.write(f"[{model_cfg.name}] epoch {epoch}: loss {total / n:.4f} "
                       + " ".join(f"valid {k} AUC {v:.4f}" for k, v in valid.items()))
        if best_state is None or mean_auc > best:
            best, bad_epochs = mean_auc, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs > cfg.patience:
                break
    train_seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    test = evaluate(model, data.test)
    metrics = {
        "model": model_cfg.name, "dataset": data.dataset.name, "seed": cfg.seed,
        "test_auc": test, "best_valid_mean_auc": best, "history": history,
        "train_seconds": train_seconds, "samples_per_second": seen / train_seconds,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "n_train": len(data.train), "n_test": len(data.test),
    }
    if data.test.true_probs is not None:
        metrics["oracle_test_auc"] = oracle_auc(data.test)
    return TrainResult(model, data.schema, data.dataset.tags, metrics)


def oracle_auc(split: EncodedSplit) -> dict[str, float]:
    """AUC of the true probabilities: the ceiling any model can reach."""
    return {t: roc_auc(split.labels[:, i], split.true_probs[:, i]) for i, t in enumerate(TASKS)}


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
    model = build_model(ModelConfig(**cfg["model"]))
    model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
    model.eval()
    return TrainResult(model, FeatureSchema.from_dict(schema["features"]), schema["tags"],
                       json.loads((ckpt / "metrics.json").read_text()), cfg.get("data", {}).get("path"))
