"""All-tag scoring and the one ranker (mvke/runtime/scoring.py) against brute force.

`rank` is what the service and batch tagging both call: its tags must be the best k by
the full score matrix, its probabilities exactly `task_scores` at those tags, exclusions
must rank last and be flagged, and a non-positive temperature must still rank by logit.
"""
from __future__ import annotations

import numpy as np
import pytest

from mvke.runtime.contract import TaskSpec
from mvke.runtime.scoring import TaskTagSide, rank, sigmoid, task_logits, task_scores, top_k


def test_top_k_is_a_sorted_top_k():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (9, 300)).astype(np.float32)
    for k in (1, 20, 299, 300, 1000):
        idx, best = top_k(logits.copy(), k)
        want = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(best, np.take_along_axis(logits, want, axis=1))
    excluded = logits.copy()
    excluded[:, :5] = -np.inf
    idx, best = top_k(excluded, 300)
    assert not np.isfinite(best[:, -5:]).any() and set(idx[0, -5:].tolist()) == set(range(5))


def _sides(rng, scales=(4.0, 2.5)) -> tuple[list[TaskTagSide], np.ndarray]:
    """Two tasks sharing expert 1 of 3 ([B, 4, D] tower output: task a = experts 0-1, task b = 2-3)."""
    T, D, B = 120, 8, 16
    sides, start = [], 0
    for name, k, scale in zip(("a", "b"), (2, 2), scales):
        gates = rng.dirichlet(np.ones(k), T).astype(np.float32)
        emb = rng.normal(0, 1, (T, D)).astype(np.float32)
        sides.append(TaskTagSide.build(TaskSpec(name, list(range(k)), [start, start + k], scale, -0.3), gates, emb))
        start += k
    return sides, rng.normal(0, 1, (B, start, D)).astype(np.float32)


@pytest.mark.parametrize("scales", [(4.0, 2.5), (-1.5, 0.0)], ids=["positive", "non-positive temperature"])
def test_rank_is_the_top_k_of_the_score_matrix(scales):
    rng = np.random.default_rng(1)
    sides, values = _sides(rng, scales)
    exclude = [None] * len(values)
    exclude[3], exclude[7] = [0, 5, 9], list(range(115))          # row 7: only 5 tags left for k=10
    got = rank(values, sides, {"a": 10, "b": 4}, exclude)
    for side in sides:
        r = got[side.name]
        k = {"a": 10, "b": 4}[side.name]
        v = values[:, side.slice[0]:side.slice[1]]
        logits = task_logits(v, side)
        for row, tags in enumerate(exclude):
            if tags:
                logits[row, tags] = -np.inf
        want = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        assert r.tag_index.shape == r.scores.shape == (len(values), k)
        top = np.take_along_axis(logits, r.tag_index, axis=1)
        np.testing.assert_array_equal(top, np.take_along_axis(logits, want, axis=1))   # same values, best first
        np.testing.assert_array_equal(r.kept, np.isfinite(top))
        full = task_scores(v, side)
        ok = r.kept
        np.testing.assert_array_equal(r.scores[ok], np.take_along_axis(full, r.tag_index, axis=1)[ok])
    assert got["a"].kept[7].sum() == 5 and not set(got["a"].tag_index[3].tolist()) & {0, 5, 9}


def test_rank_skips_tasks_nobody_asked_and_caps_k():
    sides, values = _sides(np.random.default_rng(2))
    assert set(rank(values, sides, {"b": 3})) == {"b"}
    got = rank(values, sides, 10_000)
    assert got["a"].tag_index.shape == (len(values), 120) and got["a"].kept is None
    np.testing.assert_array_equal(np.sort(got["a"].tag_index, axis=1), np.tile(np.arange(120), (len(values), 1)))
    assert got["a"].scores.dtype == np.float32
    np.testing.assert_array_equal(got["a"].scores, sigmoid(np.sort(task_logits(values[:, :2], sides[0]), 1)[:, ::-1]))
