"""What MVKE's virtual kernels do: field attention per expert, gate weights per tag (paper Fig. 8).

Entropies are normalised by their uniform maximum: 1.0 = uniform (the part does
nothing tag- or field-specific), 0.0 = all weight on one field / one expert.
"""
from __future__ import annotations

import numpy as np
import torch

from mvke.data.dataset import TASKS, EncodedSplit
from mvke.models import TwoTowerTagger
from mvke.training.metrics import normalised_entropy

TASK_KEYS = {"interest": "ctr", "intention": "cvr"}
HEATMAP_TAGS = 10


def field_names(schema) -> list[str]:
    """Field names in model order (single-valued fields first)."""
    return [f.name for f in schema.model_order]


@torch.no_grad()
def attention_report(model: TwoTowerTagger, split: EncodedSplit, names: list[str], rows: int = 4096) -> dict | None:
    """Per expert: normalised entropy of its field attention (mean over users), top-3 fields, mean weights."""
    if not hasattr(model, "field_attention"):
        return None
    model.eval()
    idx = np.arange(min(rows, len(split)))
    w = model.field_attention(torch.from_numpy(split.cat_ids[idx]),
                              torch.from_numpy(split.multi_ids[idx])).numpy()      # [B, F, K]
    entropy = normalised_entropy(w, axis=1).mean(0)                                # [K]
    mean = w.mean(0).T                                                             # [K, F]
    top = [[[names[f], round(float(mean[k, f]), 4)] for f in np.argsort(-mean[k])[:3]] for k in range(len(mean))]
    return {"entropy_per_expert": [round(float(e), 4) for e in entropy], "entropy_mean": float(entropy.mean()),
            "top_fields": top, "mean_weights": np.round(mean, 5).tolist(), "fields": names}


@torch.no_grad()
def gate_report(model: TwoTowerTagger) -> dict | None:
    """Per task: normalised gate entropy over the task's experts, mean over all catalogue tags, and how
    much tags differ (mean over experts of the std of the weight across tags)."""
    k = model.experts_per_task()
    if max(k) < 2:
        return None
    model.eval()
    out = {}
    for task, (_, w) in zip(model.tasks, model.all_tag_vectors()):
        w = w.numpy()
        out[TASK_KEYS[task]] = {"entropy": float(normalised_entropy(w, axis=1).mean()),
                                "tag_std": float(w.std(0).mean()), "max_weight_mean": float(w.max(1).mean())}
    return out


def chosen_tags(tag_ids: np.ndarray, names: list[str], n: int = HEATMAP_TAGS) -> list[int]:
    """The n most frequent training tags, one per category (`cat/tag` names) while categories last."""
    ids = tag_ids[tag_ids > 0]
    counts = np.bincount(ids, minlength=len(names) + 1)
    order = [int(t) for t in np.argsort(-counts, kind="stable") if t > 0 and counts[t] > 0]
    chosen, cats = [], set()
    for t in order:
        cat = names[t - 1].split("/")[0]
        if cat not in cats:
            chosen.append(t)
            cats.add(cat)
        if len(chosen) == n:
            return chosen
    return (chosen + [t for t in order if t not in chosen])[:n]


@torch.no_grad()
def gate_weights(model: TwoTowerTagger, tags: list[int], names: list[str]) -> dict:
    """Per task: the experts it uses and the gate weights of the given tags (Fig. 8)."""
    model.eval()
    out = {}
    for task, (_, w) in zip(model.tasks, model.tag_vectors(torch.tensor(tags).unsqueeze(1))):
        out[task] = {"experts": list(model.cfg.task_experts[task]), "tags": [names[t - 1] for t in tags],
                     "weights": np.round(w.numpy().astype(np.float64), 6).tolist()}
    return out


def mvke_diagnostics(model: TwoTowerTagger, split: EncodedSplit, train_tags: np.ndarray, schema,
                     tag_names: list[str]) -> dict:
    """attention + gate reports and the Fig. 8 gate weights of an MVKE-family model (empty for others)."""
    out = {}
    att = attention_report(model, split, field_names(schema))
    if att is not None:
        out["attention"] = att
    gate = gate_report(model)
    if gate is not None:
        out["gate"] = gate
        if hasattr(model, "experts") and hasattr(model.experts, "kernels"):
            out["gate_weights"] = gate_weights(model, chosen_tags(train_tags, tag_names), tag_names)
    return out


assert set(TASK_KEYS) == set(TASKS)
