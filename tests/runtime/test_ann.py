"""The ANN candidate step and its exact rerank against the dense scoring (mvke/runtime/ann.py)."""
from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss", reason="faiss-cpu is installed by the service extra")

from mvke.runtime import ann  # noqa: E402
from mvke.runtime.scoring import exact_top_k, gathered_cosines, numerator_rows, unit_rows  # noqa: E402


def dense_cosines(values: np.ndarray, gates: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """The reference: build every tag's user vector E_u(t) = sum_k a_tk V_k and take its cosine with e_t."""
    eu = np.einsum("tk,bkd->btd", gates.astype(np.float64), values.astype(np.float64))      # [B, T, D]
    e = emb.astype(np.float64)
    return np.einsum("btd,td->bt", eu, e) / (np.linalg.norm(eu, axis=2) * np.linalg.norm(e, axis=1))


def tag_side(T: int, K: int, D: int, seed: int = 0, sharpen: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, D))
    emb = (centres[rng.integers(0, 32, T)] + 0.5 * rng.standard_normal((T, D))).astype(np.float32)
    logits = sharpen * rng.standard_normal((T, K))
    gates = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return gates.astype(np.float32), emb


def users(n: int, K: int, D: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 1, D))
    return (base + 0.7 * rng.standard_normal((n, K, D))).astype(np.float32)   # correlated experts


def test_gathered_cosines_equal_the_dense_formula():
    gates, emb = tag_side(500, 3, 16)
    values = users(7, 3, 16)
    ids = np.random.default_rng(2).integers(0, 500, (7, 40))
    ref = np.take_along_axis(dense_cosines(values, gates, emb), ids, 1)
    got = gathered_cosines(values, ids, unit_rows(emb), gates)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_exact_top_k_in_chunks_equals_a_full_sort():
    gates, emb = tag_side(1000, 4, 8)
    values = users(5, 4, 8)
    ref = dense_cosines(values, gates, emb)
    exclude = np.zeros_like(ref, dtype=bool)
    exclude[:, ref.argmax(1)] = True                     # each row's best tag (and others') excluded
    idx, cos = exact_top_k(values, unit_rows(emb), gates, 10, exclude=exclude, chunk=128)
    masked = np.where(exclude, -np.inf, ref)
    want = np.argsort(-masked, 1, kind="stable")[:, :10]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(cos, np.take_along_axis(masked, want, 1), atol=1e-5)


def test_numerator_rows_make_the_numerator_an_inner_product():
    gates, emb = tag_side(50, 3, 8)
    values = users(4, 3, 8)
    w, _ = numerator_rows(gates, unit_rows(emb))                                     # [T, K*D]
    num = values.reshape(4, -1) @ w.T
    eu = np.einsum("tk,bkd->btd", gates, values)
    ref = np.einsum("btd,td->bt", eu, unit_rows(emb))
    np.testing.assert_allclose(num, ref, atol=1e-5)


@pytest.mark.parametrize("sharpen,clusters", [(1.0, 1), (4.0, 8)])
def test_index_recall_and_gate(sharpen, clusters):
    """Peaked gates uncorrelated with the experts (sharpen 4) need the gate clusters (the export's
    second scheme when the numerator alone fails the gate)."""
    gates, emb = tag_side(6000, 3, 16, sharpen=sharpen)
    values = users(200, 3, 16)
    cfg = ann.AnnConfig(nprobe=2, candidates=60, gate_users=200, gate_clusters=clusters)
    index = ann.build_task_index(gates, emb, cfg)
    task = ann.TaskAnn(ann.CandidateIndex.from_bytes(index.to_bytes(), cfg.nprobe), unit_rows(emb), gates,
                       cfg.candidates)
    report = ann.tune_nprobe(task, values, cfg)
    assert report.passed and report.recall >= 0.95, report
    assert task.index.nprobe == report.nprobe
    # the reranked candidates carry their exact cosines
    idx, cos = task.top_k(values[:8], 20)
    ref = dense_cosines(values[:8], gates, emb)
    np.testing.assert_allclose(cos, np.take_along_axis(ref, idx, 1), atol=1e-5)
    assert (np.diff(cos, axis=1) <= 1e-7).all()


def test_gate_reports_failure_when_recall_cannot_be_reached():
    gates, emb = tag_side(4000, 3, 16)
    values = users(100, 3, 16)
    cfg = ann.AnnConfig(nlist=64, nprobe=1, max_nprobe=2, candidates=20, min_recall=0.999)
    task = ann.TaskAnn(ann.build_task_index(gates, emb, cfg), unit_rows(emb), gates, cfg.candidates)
    report = ann.tune_nprobe(task, values, cfg)
    assert not report.passed
    assert set(report.tried) == {1, 2} and report.recall == report.tried[2] < 0.999


def test_excluded_tags_never_come_back_from_the_index():
    gates, emb = tag_side(3000, 3, 16)
    values = users(4, 3, 16)
    task = ann.TaskAnn(ann.build_task_index(gates, emb, ann.AnnConfig(nprobe=8)), unit_rows(emb), gates)
    first, _ = task.top_k(values, 5)
    again, _ = task.top_k(values, 5, exclude=[row[:3] for row in first])
    for row, ex in zip(again, first):
        assert not set(row) & set(ex[:3])
        assert set(ex[3:]) <= set(row)


def test_index_bytes_are_deterministic():
    gates, emb = tag_side(3000, 3, 16)
    a = ann.build_task_index(gates, emb).to_bytes()
    b = ann.build_task_index(gates, emb).to_bytes()
    assert a == b


def side_with_index(gates: np.ndarray, emb: np.ndarray, cfg: "ann.AnnConfig"):
    """A TaskTagSide served through a candidate index (factors only, as the service builds it)."""
    from mvke.runtime.contract import TaskSpec
    from mvke.runtime.scoring import TaskTagSide
    K = gates.shape[1]
    side = TaskTagSide.build(TaskSpec("interest", list(range(K)), [0, K], 5.0, -1.0), gates, emb, dense=False)
    side.ann = ann.TaskAnn(ann.build_task_index(gates, emb, cfg), side.unit, side.gates, cfg.candidates)
    side.ann.index.nprobe = side.ann.index.nlist          # every list probed: recall must be 1.0
    return side


def test_batched_index_path_with_every_list_probed_ranks_like_exact():
    from mvke.runtime.scoring import rank
    gates, emb = tag_side(2000, 3, 16)
    values = users(32, 3, 16)
    side = side_with_index(gates, emb, ann.AnnConfig(nlist=16, gate_clusters=1, candidates=100))
    calls = []
    search = side.ann.search
    side.ann.search = lambda v, n: calls.append(len(v)) or search(v, n)
    approx = rank(values, [side], 20)["interest"]                # the whole batch in one call
    exact = rank(values, [side], 20, approximate=False)["interest"]
    assert calls == [32]                                         # one candidate search for all 32 users
    np.testing.assert_array_equal(approx.tag_index, exact.tag_index)
    np.testing.assert_allclose(approx.scores, exact.scores, atol=1e-6)
    ref = np.argsort(-dense_cosines(values, gates, emb), 1, kind="stable")[:, :20]
    np.testing.assert_array_equal(exact.tag_index, ref)


def test_exact_request_bypasses_the_index():
    """`"exact": true` ranks every tag from the factors: the index is not searched, so a broken index
    (every candidate list empty) changes nothing; the approximate path does read it."""
    from mvke.runtime.scoring import rank
    gates, emb = tag_side(2000, 3, 16)
    values = users(8, 3, 16)
    side = side_with_index(gates, emb, ann.AnnConfig(nlist=16, candidates=60))
    want = rank(values, [side], 10, approximate=False)["interest"]
    side.ann.search = lambda v, n: np.full((len(v), n), -1, dtype=np.int64)
    got = rank(values, [side], 10, approximate=False)["interest"]
    np.testing.assert_array_equal(got.tag_index, want.tag_index)
    np.testing.assert_allclose(got.scores, want.scores)
    broken = rank(values, [side], 10)["interest"]
    assert not np.array_equal(broken.tag_index, want.tag_index)


def test_faiss_runs_on_the_threads_it_is_given():
    from threadpoolctl import threadpool_info
    try:
        ann.limit_faiss_threads(1)
        assert faiss.omp_get_max_threads() == 1
        assert all(lib["num_threads"] == 1 for lib in threadpool_info() if lib["prefix"] == "libopenblas")
        ann.limit_faiss_threads(2)
        assert faiss.omp_get_max_threads() == 2
    finally:
        ann.limit_faiss_threads(1)


def test_export_falls_back_to_gate_clusters_when_the_numerator_alone_fails_the_gate():
    from model_export.candidates import FALLBACK_CLUSTERS, build_and_gate
    gates, emb = tag_side(6000, 3, 16, sharpen=4.0)
    side = side_with_index(gates, emb, ann.AnnConfig(nlist=16))
    entry: dict = {}
    index, gate = build_and_gate(side, users(200, 3, 16), ann.AnnConfig(nprobe=2, candidates=60, gate_users=200),
                                 entry)
    first, second = entry["schemes_tried"]
    assert first["gate_clusters"] == 1 and first["recall_at_k"] < 0.95
    assert second["gate_clusters"] == len(index.indexes) == FALLBACK_CLUSTERS and gate.passed
    assert entry["gate_clusters"] == FALLBACK_CLUSTERS and entry["recall_at_k"] >= 0.95


def test_search_runs_on_one_faiss_thread_in_whichever_thread_calls_it():
    """omp_set_num_threads sets the calling thread's team only: the service imports FAISS in the
    thread that loads the model and searches on its event loop (on 2 busy cores a search with
    FAISS's default team ran ~19x slower in the service than with one thread)."""
    import threading
    gates, emb = tag_side(2000, 3, 16)
    index = ann.build_task_index(gates, emb, ann.AnnConfig(nlist=16))
    ann.limit_faiss_threads(1)
    seen = {}

    def search():
        seen["before"] = faiss.omp_get_max_threads()      # a new thread: the library's default team
        index.search(users(4, 3, 16), 10)
        seen["after"] = faiss.omp_get_max_threads()
    t = threading.Thread(target=search)
    t.start()
    t.join()
    assert seen["after"] == 1, seen
