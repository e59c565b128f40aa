"""Score every tag of a task at once from the user's expert outputs (paper section 4.3).

For one task with K experts, tag gates a_t [K] and tag embedding e_t [D], and a
user's value-transformed expert outputs V [K, D]:

    E_u(t) = sum_k a_tk V_k
    cos    = a_t . (V e_t) / (||e_t|| sqrt(a_t^T G a_t)),   G = V V^T
    score  = sigmoid(scale * cos + bias)

Precomputing, per tag, `W_t = vec(a_t (x) e_t / ||e_t||)` [K*D] and
`Q_t = vec(a_t a_t^T)` [K*K] turns all tags into two GEMMs per batch:
`num = vec(V) @ W` and `norm2 = vec(G) @ Q`: no per-tag loop, and a batch of
users costs one matrix product per task. The same code serves requests,
batch tagging and the export parity gate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_export.contract import TaskSpec

EPS = 1e-8


@dataclass
class TaskTagSide:
    """Tag-side arrays of one task, prepared for scoring."""

    name: str
    k: int
    gates: np.ndarray        # [T, K]
    tag_emb: np.ndarray      # [T, D]
    W: np.ndarray            # [K*D, T]  gate (x) unit tag embedding
    Q: np.ndarray            # [K*K, T]  gate outer products
    scale: float
    bias: float

    @classmethod
    def build(cls, spec: TaskSpec, gates: np.ndarray, tag_emb: np.ndarray) -> "TaskTagSide":
        T, K = gates.shape
        unit = tag_emb / np.maximum(np.linalg.norm(tag_emb, axis=1, keepdims=True), EPS)
        W = np.einsum("tk,td->kdt", gates, unit).reshape(K * tag_emb.shape[1], T)
        Q = np.einsum("tk,tl->klt", gates, gates).reshape(K * K, T)
        return cls(spec.name, K, gates.astype(np.float32), tag_emb.astype(np.float32),
                   np.ascontiguousarray(W, dtype=np.float32), np.ascontiguousarray(Q, dtype=np.float32),
                   float(spec.scale), float(spec.bias))

    @property
    def num_tags(self) -> int:
        return self.gates.shape[0]


def task_cosines(values: np.ndarray, side: TaskTagSide) -> np.ndarray:
    """values [B, K, D] (this task's expert outputs) -> cos(E_u(t), e_t) [B, T] (a new array).

    The elementwise steps run in place on the two [B, T] products (no temporaries of that size).
    """
    B, K, D = values.shape
    num = values.reshape(B, K * D) @ side.W                                # [B, T]
    gram = np.matmul(values, values.transpose(0, 2, 1)).reshape(B, K * K)  # [B, K*K]
    norm = gram @ side.Q                                                   # [B, T]
    np.maximum(norm, 0.0, out=norm)
    np.sqrt(norm, out=norm)
    np.maximum(norm, EPS, out=norm)
    np.divide(num, norm, out=num)
    return num


def task_logits(values: np.ndarray, side: TaskTagSide) -> np.ndarray:
    """values [B, K, D] (this task's expert outputs) -> logits [B, T] (a new array the caller may modify):
    `scale * (num / max(sqrt(max(norm2, 0)), EPS)) + bias`, the arithmetic in that order."""
    cos = task_cosines(values, side)
    cos *= side.scale
    cos += side.bias
    return cos


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def task_scores(values: np.ndarray, side: TaskTagSide) -> np.ndarray:
    """Probabilities [B, T]."""
    return sigmoid(task_logits(values, side))


def top_k_logits(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row, best first: (indices [B, k], values [B, k]).

    Works on logits (or scores: any monotonic transform ranks the same), so the
    sigmoid need only be taken of the k kept values, not of all B x T.
    argpartition over the whole batch at once, then a sort of the k kept per row.
    """
    B, T = logits.shape
    k = min(k, T)
    if k < T:
        idx = np.argpartition(logits, T - k, axis=1)[:, T - k:]           # the k largest, unordered
        part = np.take_along_axis(logits, idx, axis=1)
    else:
        idx = np.broadcast_to(np.arange(T), (B, T))
        part = logits
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(part, order, axis=1)


def top_k(scores: np.ndarray, k: int, mask: np.ndarray | None = None,
          min_score: float | None = None) -> list[list[tuple[int, float]]]:
    """Per row, the k best (tag index, score) pairs, best first.

    `mask` [T] bool marks tags to exclude; `min_score` drops weaker tags.
    argpartition keeps this O(T) per row rather than a full sort.
    """
    s = scores if mask is None else np.where(mask, -np.inf, scores)
    T = s.shape[1]
    k = min(k, T)
    idx = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < T else np.tile(np.arange(T), (len(s), 1))
    part = np.take_along_axis(s, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    part = np.take_along_axis(part, order, axis=1)
    out = []
    for row_idx, row_s in zip(idx, part):
        keep = np.isfinite(row_s)
        if min_score is not None:
            keep &= row_s >= min_score
        out.append([(int(i), float(v)) for i, v in zip(row_idx[keep], row_s[keep])])
    return out


def task_cosines_at(values: np.ndarray, side: TaskTagSide, idx: np.ndarray) -> np.ndarray:
    """values [K, D] (one user's expert outputs for this task), tag indices [n] -> cos [n].

    The same two products as `task_cosines`, on the n chosen columns of W and Q only
    (candidate scoring: exact scores for given tags without scoring the whole catalogue).
    """
    K, D = values.shape
    num = values.reshape(1, K * D) @ side.W[:, idx]                     # [1, n]
    norm = (values @ values.T).reshape(1, K * K) @ side.Q[:, idx]       # [1, n]
    np.maximum(norm, 0.0, out=norm)
    np.sqrt(norm, out=norm)
    np.maximum(norm, EPS, out=norm)
    return (num / norm)[0]


def explain_tags(values: np.ndarray, side: TaskTagSide, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Why one user scores these tags (section 4.3; the paper's Fig. 8 per user and tag).

    values [K, D] (the user's expert outputs for the task), tag indices [n] ->
    (gates [n, K], contributions [n, K], cosines [n]). With E_u(t) = sum_k a_tk V_k,
    cos = sum_k a_tk (V_k . e_t) / (|e_t| |E_u(t)|): the cosine is a sum over experts, and
    `contributions[:, k]` is expert k's term of it (their sum is the cosine the score used).
    """
    gates = side.gates[idx]                                             # [n, K]
    emb = side.tag_emb[idx]                                             # [n, D]
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), EPS)
    along = unit @ values.T                                             # [n, K]  V_k . e_t / |e_t|
    user_t = gates @ values                                             # [n, D]  E_u(t)
    norm = np.maximum(np.linalg.norm(user_t, axis=1, keepdims=True), EPS)
    contributions = gates * along / norm                                # [n, K]
    return gates, contributions, contributions.sum(axis=1)
