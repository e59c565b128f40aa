"""Score every tag of a task at once from the user's expert outputs (paper section 4.3).

For one task with K experts, tag gates a_t [K] and tag embedding e_t [D], and a
user's value-transformed expert outputs V [K, D]:

    E_u(t) = sum_k a_tk V_k
    cos    = a_t . (V e_t) / (||e_t|| sqrt(a_t^T G a_t)),   G = V V^T
    score  = sigmoid(scale * cos + bias)

Precomputing, per tag, `W_t = vec(a_t (x) e_t / ||e_t||)` [K*D] and
`Q_t = vec(a_t a_t^T)` [K*K] turns all tags into two GEMMs per batch:
`num = vec(V) @ W` and `norm2 = vec(G) @ Q`: no per-tag loop, and a batch of
users costs one matrix product per task.

This module is the one place of the scoring arithmetic: the cosine (`dense_cosines` from the
precomputed W and Q, `gathered_cosines` from the factors on chosen tags, both ending in
`_divide_by_norm`), the one top-k (`top_k`) and the one `EPS`. The service, batch tagging, the
ANN rerank (mvke/runtime/ann.py) and the export's parity gate all score through it; which of
its paths serves a request is chosen by `LoadedModel.rank` (mvke/runtime/model.py) alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from mvke.runtime.contract import TaskSpec

EPS = 1e-8
EXACT_CHUNK = 65536      # tags per chunk of the exact path from the factors ([B, chunk] temporaries)


# ---- the tag side ----------------------------------------------------------------------------
def unit_rows(tag_emb: np.ndarray) -> np.ndarray:
    """e_t / ||e_t|| [T, D] float32."""
    return (tag_emb / np.maximum(np.linalg.norm(tag_emb, axis=1, keepdims=True), EPS)).astype(np.float32)


def numerator_rows(gates: np.ndarray, unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per tag, w_t = vec(a_t (x) e_t/||e_t||) [n, K*D] (row-major over (k, d), matching vec(V) of a
    [K, D] V: the cosine's numerator is vec(V) . w_t) and q_t = vec(a_t a_t^T) [n, K*K] (its
    squared denominator is vec(G) . q_t), float32. Transposed, they are the dense side's W and Q."""
    n, K = gates.shape
    w = (gates[:, :, None] * unit[:, None, :]).reshape(n, -1).astype(np.float32)      # [n, K*D]
    q = (gates[:, :, None] * gates[:, None, :]).reshape(n, K * K)                      # [n, K*K]
    return w, q


class CandidateSearch(Protocol):
    """What a side served approximately needs from its index (mvke/runtime/ann.py `TaskAnn`)."""

    def top_k(self, values: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray]: ...

    def nbytes(self) -> int: ...


@dataclass
class TaskTagSide:
    """Tag-side arrays of one task, prepared for scoring.

    Dense (the default): W and Q, all tags in two GEMMs. A side served through a candidate index
    (`ann`) keeps only the factors (gates and unit embeddings: K + D floats per tag instead of
    K*D + K*K) and scores exactly-asked requests from them in chunks."""

    name: str
    k: int
    slice: tuple[int, int]   # [start, stop) of this task's experts on axis 1 of the tower output
    gates: np.ndarray        # [T, K]
    W: np.ndarray | None     # [K*D, T]  gate (x) unit tag embedding (None: factors only)
    Q: np.ndarray | None     # [K*K, T]  gate outer products
    scale: float
    bias: float
    unit: np.ndarray         # [T, D] unit tag embeddings (factor scoring, the rerank, explanations)
    ann: CandidateSearch | None = None   # candidate index, when this side is served approximately

    @classmethod
    def build(cls, spec: TaskSpec, gates: np.ndarray, tag_emb: np.ndarray, dense: bool = True) -> "TaskTagSide":
        gates = gates.astype(np.float32, copy=False)
        unit = unit_rows(tag_emb)
        W = Q = None
        if dense:
            w, q = numerator_rows(gates, unit)
            W, Q = np.ascontiguousarray(w.T), np.ascontiguousarray(q.T)
        return cls(spec.name, gates.shape[1], (spec.slice[0], spec.slice[1]), gates, W, Q, float(spec.scale),
                   float(spec.bias), unit)

    @property
    def num_tags(self) -> int:
        return self.gates.shape[0]

    def values(self, expert_outputs: np.ndarray) -> np.ndarray:
        """This task's experts of the tower output: [B, sum K, D] -> [B, K, D]."""
        return expert_outputs[:, self.slice[0]:self.slice[1]]

    def nbytes(self) -> int:
        """Bytes of the arrays this side holds (the index included)."""
        arrays = (self.gates, self.W, self.Q, self.unit)
        return sum(a.nbytes for a in arrays if a is not None) + (self.ann.nbytes() if self.ann else 0)


# ---- the cosine ------------------------------------------------------------------------------
def _divide_by_norm(num: np.ndarray, norm2: np.ndarray) -> np.ndarray:
    """num / max(sqrt(max(norm2, 0)), EPS), in place on both (no temporaries of their size)."""
    np.maximum(norm2, 0.0, out=norm2)
    np.sqrt(norm2, out=norm2)
    np.maximum(norm2, EPS, out=norm2)
    np.divide(num, norm2, out=num)
    return num


def dense_cosines(values: np.ndarray, W: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """values [B, K, D] (one task's expert outputs), W [K*D, n], Q [K*K, n] -> cos [B, n] (a new array)."""
    B, K, D = values.shape
    num = values.reshape(B, K * D) @ W                                     # [B, n]
    gram = np.matmul(values, values.transpose(0, 2, 1)).reshape(B, K * K)  # [B, K*K]
    return _divide_by_norm(num, gram @ Q)                                  # [B, n]


def gathered_cosines(values: np.ndarray, ids: np.ndarray, unit: np.ndarray, gates: np.ndarray) -> np.ndarray:
    """The exact cosine of each row's own tags from the factors: values [B, K, D], ids [B, C] -> [B, C].

    E_u(t) = sum_k a_tk V_k is built for the C tags only (one batched [C, K] @ [K, D] product per
    user), then cos = E_u(t) . e_t / ||E_u(t)|| (e_t unit): equal to the dense form to float32
    rounding, in one product and two reductions (1.3-1.5x less time than the dense form's three
    products at B = 16-32, C = 100, measured on 2 busy cores)."""
    e = np.take(unit, ids, axis=0)                                         # [B, C, D]
    g = np.take(gates, ids, axis=0)                                        # [B, C, K]
    u = np.matmul(g, np.ascontiguousarray(values, dtype=np.float32))      # [B, C, D]  E_u(t)
    num = np.einsum("bcd,bcd->bc", u, e)                                   # [B, C]
    return _divide_by_norm(num, np.einsum("bcd,bcd->bc", u, u))           # ||E_u(t)||^2


def task_cosines(values: np.ndarray, side: TaskTagSide) -> np.ndarray:
    """values [B, K, D] (this task's expert outputs) -> cos(E_u(t), e_t) [B, T] for every tag."""
    if side.W is None:
        return np.concatenate([cos for _, cos in chunk_cosines(values, side.unit, side.gates)], axis=1)
    return dense_cosines(values, side.W, side.Q)


def cosines_at(values: np.ndarray, side: TaskTagSide, idx: np.ndarray) -> np.ndarray:
    """values [B, K, D], tag indices [n] (the same tags for every row) -> cos [B, n]: the dense
    side's two products on the n chosen columns of W and Q, else the same cosine from the factors."""
    if side.W is None:
        return gathered_cosines(values, np.broadcast_to(idx, (len(values), len(idx))), side.unit, side.gates)
    return dense_cosines(values, side.W[:, idx], side.Q[:, idx])


def chunk_cosines(values: np.ndarray, unit: np.ndarray, gates: np.ndarray,
                  chunk: int = EXACT_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """Exact cosines of every tag, chunk by chunk, from the factors: yields (first tag id of the
    chunk, cos [B, chunk]). Each chunk's W and Q are built on the fly, so no [K*D, T] matrix is held."""
    for lo in range(0, len(unit), chunk):
        w, q = numerator_rows(gates[lo:lo + chunk], unit[lo:lo + chunk])
        yield lo, dense_cosines(values, w.T, q.T)


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


def probabilities(cos: np.ndarray, side: TaskTagSide) -> np.ndarray:
    """sigmoid(scale * cos + bias), in place on `cos`: the arithmetic of `task_logits` in the same order."""
    cos *= side.scale
    cos += side.bias
    return sigmoid(cos)


# ---- the one top-k ---------------------------------------------------------------------------
def top_k(scores: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row, best first: (ids [B, k], values [B, k]).

    `ids` [B, N]: what each column stands for (default: the column number). argpartition over the
    whole batch at once, then a stable sort of the k kept per row; works on logits, cosines or
    probabilities alike (any monotonic transform ranks the same), so a sigmoid need only be taken
    of the k kept values."""
    B, N = scores.shape
    k = min(k, N)
    if k < N:
        part = np.argpartition(scores, N - k, axis=1)[:, N - k:]          # the k largest, unordered
        vals = np.take_along_axis(scores, part, axis=1)
    else:
        part = np.broadcast_to(np.arange(N), (B, N))
        vals = scores
    order = np.argsort(-vals, axis=1, kind="stable")
    chosen = np.take_along_axis(part, order, axis=1)
    return (chosen if ids is None else np.take_along_axis(ids, chosen, axis=1)), np.take_along_axis(vals, order, axis=1)


def exact_top_k(values: np.ndarray, unit: np.ndarray, gates: np.ndarray, k: int,
                exclude: np.ndarray | None = None, chunk: int = EXACT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine over every tag from the factors, in chunks: (tag ids [B, k], cosines [B, k])
    best first. `exclude` [B, T] bool (or None) marks tags never returned (their cosine becomes -inf)."""
    best: tuple[np.ndarray, np.ndarray] | None = None
    for lo, cos in chunk_cosines(values, unit, gates, chunk):
        if exclude is not None:
            cos[exclude[:, lo:lo + cos.shape[1]]] = -np.inf
        ids, vals = top_k(cos, k)
        ids = ids + lo
        if best is not None:
            ids, vals = np.concatenate([best[0], ids], 1), np.concatenate([best[1], vals], 1)
        best = top_k(vals, k, ids)
    return best


# ---- ranking ---------------------------------------------------------------------------------
@dataclass
class Ranked:
    """One task's top k tags for a batch of users, best first."""

    tag_index: np.ndarray        # [B, k] int64: row of tags.json (tag id - 1)
    scores: np.ndarray           # [B, k] float32 probabilities
    kept: np.ndarray | None      # [B, k] bool: False where only excluded tags were left (None: none excluded)

    def take(self, rows: Sequence[int] | np.ndarray) -> "Ranked":
        return Ranked(self.tag_index[rows], self.scores[rows], None if self.kept is None else self.kept[rows])


def rank(values: np.ndarray, sides: Iterable[TaskTagSide], k: int | Mapping[str, int],
         exclude: Sequence[Sequence[int] | None] | None = None, approximate: bool = True) -> dict[str, Ranked]:
    """Tower outputs [B, sum K, D] -> per task, the k best tags of each user, scored in numpy (the
    predictor's numpy and ANN modes: `LoadedModel.rank` chooses; call that, not this).

    `k`: one k for every task, or task -> k (a task missing or at 0 is not scored).
    `exclude`: per user, tag indices never returned (they rank last, with kept=False).
    `approximate`: a side with a candidate index ranks its candidates only (exact cosines of
    the index's candidates); False ranks every tag exactly.
    With a positive temperature the cosine ranks like the logit, so the scale, bias and
    sigmoid are applied to the k kept values only (`probabilities`: the arithmetic of
    `task_logits`, in the same order, so the probabilities are those of `task_scores`).
    """
    out = {}
    excluding = exclude is not None and any(exclude)
    for side in sides:
        kk = k if isinstance(k, int) else k.get(side.name, 0)
        if kk <= 0:
            continue
        task_values = side.values(values)                                        # [B, K, D]
        if side.W is None or (approximate and side.ann is not None):
            idx, best = _factor_top_k(task_values, side, kk, exclude, approximate)
        else:
            by_cos = side.scale > 0
            ranked_on = (task_cosines if by_cos else task_logits)(task_values, side)   # [B, T]
            for row, tags in enumerate(exclude or ()):
                if tags:
                    ranked_on[row, tags] = -np.inf
            idx, best = top_k(ranked_on, kk)
            if not by_cos:
                out[side.name] = Ranked(idx, sigmoid(best), np.isfinite(best) if excluding else None)
                continue
        out[side.name] = Ranked(idx, probabilities(best, side), np.isfinite(best) if excluding else None)
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


def explain_tags(values: np.ndarray, side: TaskTagSide, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Why one user scores these tags (section 4.3; the paper's Fig. 8 per user and tag).

    values [K, D] (the user's expert outputs for the task), tag indices [n] ->
    (gates [n, K], contributions [n, K], cosines [n]). With E_u(t) = sum_k a_tk V_k,
    cos = sum_k a_tk (V_k . e_t) / (|e_t| |E_u(t)|): the cosine is a sum over experts, and
    `contributions[:, k]` is expert k's term of it (their sum is the cosine the score used).
    """
    gates = side.gates[idx]                                             # [n, K]
    along = side.unit[idx] @ values.T                                   # [n, K]  V_k . e_t / |e_t|
    user_t = gates @ values                                             # [n, D]  E_u(t)
    norm = np.maximum(np.linalg.norm(user_t, axis=1, keepdims=True), EPS)
    contributions = gates * along / norm                                # [n, K]
    return gates, contributions, contributions.sum(axis=1)
