"""Evaluation metrics: pooled AUC, user-averaged AUC (gAUC), top-k ranking quality, entropies.

AUC comes from scikit-learn (`roc_auc_score`); every function returns nan where
the metric is undefined (one class only, no user with a relevant tag).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels)
    if len(labels) == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean over users of the AUC of their own impressions; users with one class only are left out."""
    df = pd.DataFrame({"u": users, "y": np.asarray(labels), "s": np.asarray(scores, dtype=np.float64)})
    pos = df.groupby("u", sort=False)["y"].agg(["min", "max"])
    keep = pos.index[pos["min"] != pos["max"]]
    if len(keep) == 0:
        return float("nan")
    df = df[df["u"].isin(keep)]
    # Within-user ranks (ties averaged) give each user's Mann-Whitney AUC in one pass.
    ranks = df.groupby("u", sort=False)["s"].rank(method="average")
    g = pd.DataFrame({"y": df["y"], "ry": ranks * df["y"]}).groupby(df["u"].to_numpy(), sort=False)
    n_pos, n, rank_sum = g["y"].sum(), g["y"].size(), g["ry"].sum()
    per_user = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))
    return float(per_user.mean())


def ranking_metrics(top: np.ndarray, relevant: list[set[int]], k: int) -> dict[str, float]:
    """Recall@k and NDCG@k (binary relevance) averaged over users with at least one relevant item.

    top: [U, >= k] item ids in ranked order; relevant[u]: the user's relevant item ids.
    """
    recalls, ndcgs = [], []
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for row, rel in zip(top[:, :k], relevant):
        if not rel:
            continue
        hits = np.fromiter((t in rel for t in row), bool, len(row))
        recalls.append(hits.sum() / len(rel))
        ideal = discounts[: min(len(rel), k)].sum()
        ndcgs.append(float((hits * discounts[: len(row)]).sum() / ideal))
    if not recalls:
        return {f"recall_at_{k}": float("nan"), f"ndcg_at_{k}": float("nan"), "users": 0}
    return {f"recall_at_{k}": float(np.mean(recalls)), f"ndcg_at_{k}": float(np.mean(ndcgs)), "users": len(recalls)}


def normalised_entropy(w: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy of the distributions along `axis` divided by log(size): 1 = uniform, 0 = one-hot."""
    n = w.shape[axis]
    if n < 2:
        return np.zeros(np.delete(w.shape, axis))
    w = np.clip(np.asarray(w, dtype=np.float64), 1e-12, None)
    return -(w * np.log(w)).sum(axis) / math.log(n)


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Mean predicted vs observed rate and the expected calibration error (equal-width bins:
    sum over bins of the bin's share of rows times |mean predicted - observed rate| in it)."""
    labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    if len(labels) == 0:
        return {"mean_predicted": float("nan"), "observed": float("nan"), "ece": float("nan")}
    which = np.minimum((probs * bins).astype(np.int64), bins - 1)
    n = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, probs, bins) - np.bincount(which, labels, bins))   # per bin: |sum p - sum y|
    return {"mean_predicted": float(probs.mean()), "observed": float(labels.mean()),
            "ece": float(gap[n > 0].sum() / len(labels))}


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `actual` against `expected` over the deciles of `expected`:
    sum (a - e) * ln(a / e) of the bins' shares (0 = same distribution; > 0.25 is a large shift)."""
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    if len(expected) == 0 or len(actual) == 0:
        return float("nan")
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1) / len(expected)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1) / len(actual)
    e, a = np.clip(e, eps, None), np.clip(a, eps, None)
    return float(((a - e) * np.log(a / e)).sum())
