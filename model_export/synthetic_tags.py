"""Large benchmark catalogues from a trained model: its tag tower run on synthetic tag ids.

Training a model on a million tags needs logs that mention each of them; measuring how the
service scales with the catalogue does not. `grow_tag_catalogue` keeps a trained model and
appends rows to its tag embedding table (paper section 5.1: the hard-shared tag table in
front of one small tower per task), each drawn from a Gaussian fitted to the trained rows
(their mean and covariance). The trained per-task tag towers and virtual-kernel gates then
turn every synthetic row into a tag embedding e_t and gate weights a_t exactly as they do
for a trained tag, so the tag side has the trained model's geometry (norms, gate spread,
correlations between dimensions) at any size. The first rows keep the trained tags' names;
synthetic tags are named `syn/tag<id>`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mvke.training.trainer import TrainResult

SYNTHETIC_PREFIX = "syn/tag"


def _tag_tables(model: nn.Module) -> list[tuple[nn.Module, str, nn.Embedding]]:
    """Every tag embedding table of the model (one; one per task for per-task models)."""
    out = []
    for name, module in model.named_modules():
        if name.endswith("tag_tower"):
            out.append((module, "table", module.table))
    if not out:
        raise ValueError(f"{type(model).__name__} has no tag_tower.table to grow")
    return out


def grown_rows(trained: np.ndarray, extra: int, rng: np.random.Generator) -> np.ndarray:
    """`extra` rows drawn from N(mean, cov) of the trained rows [T, t] -> [extra, t] float32."""
    mean = trained.mean(0)
    cov = np.cov(trained, rowvar=False) + 1e-8 * np.eye(trained.shape[1])
    return rng.multivariate_normal(mean, cov, size=extra, method="cholesky").astype(np.float32)


def grow_tag_catalogue(result: TrainResult, num_tags: int, seed: int = 0) -> TrainResult:
    """The trained model with `num_tags` tags (>= the trained ones); the model is changed in place."""
    model = result.model
    trained = len(result.tags)
    if num_tags < trained:
        raise ValueError(f"num_tags {num_tags} is below the trained catalogue's {trained}")
    rng = np.random.default_rng(seed)
    for owner, attr, table in _tag_tables(model):
        with torch.no_grad():
            old = table.weight.detach().clone()                              # [T + 1, t], row 0 padding
            if getattr(owner, "group", None) is not None:
                # Fold each trained tag's parent embedding into its row: the grown tags, which have no
                # parent, are then drawn from the distribution of the trained tags' full embeddings.
                old += owner.group(owner.group_of)
                old[0] = 0
                owner.group = None
            old = old.numpy()
            new = nn.Embedding(num_tags + 1, old.shape[1], padding_idx=0)
            new.weight.zero_()
            new.weight[: trained + 1] = torch.from_numpy(old)
            if num_tags > trained:
                new.weight[trained + 1:] = torch.from_numpy(grown_rows(old[1:], num_tags - trained, rng))
        setattr(owner, attr, new)
    for module in model.modules():
        cfg = getattr(module, "cfg", None)
        if cfg is not None and hasattr(cfg, "num_tags"):
            cfg.num_tags = num_tags
            cfg.tag_groups = []
    width = len(str(num_tags))
    tags = list(result.tags) + [f"{SYNTHETIC_PREFIX}{i:0{width}d}" for i in range(trained + 1, num_tags + 1)]
    metrics = {**result.metrics, "synthetic_tags": {"trained": trained, "total": num_tags, "seed": seed}}
    return TrainResult(model.eval(), result.schema, tags, metrics)
