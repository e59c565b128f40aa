"""Score and rank a batch of users with the service's own scoring code, without per-user loops.

The service's hot path (service/tagger.py) is: ONNX tower -> `task_logits`
(all tags of a task, two GEMMs) -> `top_k_logits` (one argpartition over the
batch) -> `sigmoid` of the K winners only. `rank_batch` calls exactly those
functions from model_export/scoring.py; the only difference is that it walks
a large batch in chunks of `SCORE_CHUNK` users (measured on the default model:
the ONNX tower takes 11.0 instead of 13.5 us of CPU per user at 512 than at
4,096; the [chunk, T] score arrays stay in cache).
A chunk is just a smaller batch: the same tags and, up to float rounding of
the GEMMs, the same scores as a request for the same user.
"""
from __future__ import annotations

import numpy as np

from model_export.scoring import sigmoid, task_logits, top_k_logits
from service.model_loader import LoadedModel

SCORE_CHUNK = 512


def rank_batch(model: LoadedModel, cat: np.ndarray, multi: np.ndarray, k: int, chunk: int = SCORE_CHUNK
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encoded users -> per task (manifest order): top-k tag indices [B, k] and probabilities [B, k] (float32)."""
    B = len(cat)
    k = min(k, model.manifest.num_tags)
    out = [(np.empty((B, k), dtype=np.int64), np.empty((B, k), dtype=np.float32)) for _ in model.manifest.tasks]
    for lo in range(0, B, chunk):
        hi = min(lo + chunk, B)
        values = model.run_tower(cat[lo:hi], multi[lo:hi])                   # [chunk, sum K, D]
        for (idx, prob), spec in zip(out, model.manifest.tasks):
            logits = task_logits(values[:, spec.slice[0]:spec.slice[1]], model.sides[spec.name])
            i, best = top_k_logits(logits, k)
            idx[lo:hi] = i
            prob[lo:hi] = sigmoid(best)
    return out
