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
batch tagging and the export parity gate; `rank` (top k per user and task)
is the one ranker of the service and of batch tagging.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from mvke.runtime.ann import TaskAnn, exact_top_k
from mvke.runtime.contract import TaskSpec

EPS = 1e-8


@dataclass
class TaskTagSide:
    """Tag-side arrays of one task, prepared for scoring.

    Dense (the default): W and Q, all tags in two GEMMs. A side served through a candidate index
    (`ann`, mvke/runtime/ann.py) keeps only the factors (gates and unit embeddings: K + D floats
    per tag instead of K*D + K*K) and scores exactly-asked requests from them in chunks."""

    name: str
    k: int
    slice: tuple[int, int]   # [start, stop) of this task's experts on axis 1 of the tower output
    gates: np.ndarray        # [T, K]
    tag_emb: np.ndarray | None   # [T, D] (None on a side served through its index: `unit` is what it reads)
    W: np.ndarray | None     # [K*D, T]  gate (x) unit tag embedding (None: factors only)
    Q: np.ndarray | None     # [K*K, T]  gate outer products
    scale: float
    bias: float
    unit: np.ndarray | None = None   # [T, D] unit tag embeddings (factor scoring and the rerank)
    ann: TaskAnn | None = None       # candidate index, when this side is served approximately

    @classmethod
    def build(cls, spec: TaskSpec, gates: np.ndarray, tag_emb: np.ndarray, dense: bool = True) -> "TaskTagSide":
        T, K = gates.shape
        unit = (tag_emb / np.maximum(np.linalg.norm(tag_emb, axis=1, keepdims=True), EPS)).astype(np.float32)
        W = Q = None
        if dense:
            W = np.ascontiguousarray(np.einsum("tk,td->kdt", gates, unit).reshape(K * tag_emb.shape[1], T),
                                     dtype=np.float32)
            Q = np.ascontiguousarray(np.einsum("tk,tl->klt", gates, gates).reshape(K * K, T), dtype=np.float32)
        return cls(spec.name, K, (spec.slice[0], spec.slice[1]), gates.astype(np.float32, copy=False),
                   tag_emb.astype(np.float32, copy=False) if dense else None, W, Q, float(spec.scale),
                   float(spec.bias), unit)

    @property
    def num_tags(self) -> int:
        return self.gates.shape[0]

    def nbytes(self) -> int:
        """Bytes of the arrays this side holds (the index included)."""
        arrays = (self.gates, self.tag_emb, self.W, self.Q, self.unit)
        return sum(a.nbytes for a in arrays if a is not None) + (self.ann.index.nbytes() if self.ann else 0)


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


@dataclass
class Ranked:
    """One task's top k tags for a batch of users, best first."""

    tag_index: np.ndarray        # [B, k] int64: row of tags.json (tag id - 1)
    scores: np.ndarray           # [B, k] float32 probabilities
    kept: np.ndarray | None      # [B, k] bool: False where only excluded tags were left (None: none excluded)


def rank(values: np.ndarray, sides: Iterable[TaskTagSide], k: int | Mapping[str, int],
         exclude: Sequence[Sequence[int] | None] | None = None, approximate: bool = True) -> dict[str, Ranked]:
    """Tower outputs [B, sum K, D] -> per task, the k best tags of each user (paper section 4.3).

    `k`: one k for every task, or task -> k (a task missing or at 0 is not scored).
    `exclude`: per user, tag indices never returned (they rank last, with kept=False).
    `approximate`: a side with a candidate index ranks its candidates only (exact cosines of
    the index's candidates); False ranks every tag exactly.
    With a positive temperature the cosine ranks like the logit, so the scale, bias and
    sigmoid are applied to the k kept values only (the same arithmetic as `task_logits`,
    in the same order, so the probabilities are those of `task_scores`).
    """
    out = {}
    for side in sides:
        kk = k if isinstance(k, int) else k.get(side.name, 0)
        if kk <= 0:
            continue
        kk = min(kk, side.num_tags)
        task_values = values[:, side.slice[0]:side.slice[1]]                       # [B, K, D]
        if side.W is None or (approximate and side.ann is not None):
            idx, best = _factor_top_k(task_values, side, kk, exclude, approximate)
            excluded = exclude is not None and any(exclude)
        else:
            by_cos = side.scale > 0
            ranked_on = (task_cosines if by_cos else task_logits)(task_values, side)  # [B, T]
            excluded = False
            for row, tags in enumerate(exclude or ()):
                if tags:
                    ranked_on[row, tags] = -np.inf
                    excluded = True
            idx, best = top_k_logits(ranked_on, kk)
            if not by_cos:
                out[side.name] = Ranked(idx, sigmoid(best), np.isfinite(best) if excluded else None)
                continue
        best *= side.scale
        best += side.bias
        out[side.name] = Ranked(idx, sigmoid(best), np.isfinite(best) if excluded else None)
    return out


def _factor_top_k(values: np.ndarray, side: TaskTagSide, k: int, exclude: Sequence[Sequence[int] | None] | None,
                  approximate: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top k by cosine from the factors: the index's candidates (approximate), else every tag in chunks."""
    if side.scale <= 0:  # the export builds indexes only for a positive temperature (cosine ranks as the logit)
        raise ValueError(f"task {side.name}: factor scoring needs a positive score temperature")
    if approximate and side.ann is not None:
        ex = [np.asarray(e or (), dtype=np.int64) for e in exclude] if exclude else None
        return side.ann.top_k(values, k, ex)
    mask = None
    if exclude is not None and any(exclude):
        mask = np.zeros((len(values), side.num_tags), dtype=bool)
        for row, tags in enumerate(exclude):
            if tags:
                mask[row, tags] = True
    return exact_top_k(values, side.unit, side.gates, k, exclude=mask)


def task_cosines_at(values: np.ndarray, side: TaskTagSide, idx: np.ndarray) -> np.ndarray:
    """values [K, D] (one user's expert outputs for this task), tag indices [n] -> cos [n].

    The same two products as `task_cosines`, on the n chosen columns of W and Q only
    (candidate scoring: exact scores for given tags without scoring the whole catalogue). A side
    served through its candidate index has no W, Q: the same cosine from its factors.
    """
    if side.W is None:
        gates = side.gates[idx]                                         # [n, K]
        num = (gates * (side.unit[idx] @ values.T)).sum(axis=1)         # [n]
        norm = np.linalg.norm(gates @ values, axis=1)                   # [n]  |E_u(t)|
        return num / np.maximum(norm, EPS)
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
    unit = side.unit[idx]                                               # [n, D]  e_t / |e_t|
    along = unit @ values.T                                             # [n, K]  V_k . e_t / |e_t|
    user_t = gates @ values                                             # [n, D]  E_u(t)
    norm = np.maximum(np.linalg.norm(user_t, axis=1, keepdims=True), EPS)
    contributions = gates * along / norm                                # [n, K]
    return gates, contributions, contributions.sum(axis=1)
