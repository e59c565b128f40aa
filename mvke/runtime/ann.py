"""Large catalogues: FAISS candidates per task, then the exact score on the candidates only.

The score is not a plain inner product (paper section 4.3). For a user's expert outputs
V [K, D] of one task and a tag with gate weights a_t [K] and embedding e_t [D]:

    cos_t = a_t . (V e_t) / (||e_t|| sqrt(a_t^T G a_t)),        G = V V^T
          = (vec(V) . w_t) / ||sum_k a_tk V_k||,                 w_t = vec(a_t (x) e_t / ||e_t||)

The numerator is an inner product between one query per user, vec(V) [K*D], and one
fixed vector per tag, w_t [K*D]: a maximum-inner-product search (MIPS). The denominator
is the length of the tag's own mixture of the user's experts; it only depends on the tag
through its gate a_t (a softmax over K kernels), so it varies much less across tags than
the numerator. The candidate step therefore searches the numerator exactly as written
(FAISS IVF, inner-product metric, 8-bit scalar-quantised w_t) for C >> k candidates, and
the exact cosine of those C tags (numerator AND denominator, in float32) ranks them.
Measured on a trained mvke-mt's tag side grown to 20k, 100k and 1M tags (docs/ARCHITECTURE.md,
docs/results/ann.md): the numerator's top 100 held the exact top 20 in >= 99.9% of cases, so
recall is set by how many IVF lists are probed (the gate's nprobe), not by C; one index over
the numerator (one FAISS search per task for a whole batch of users) reached the recall of the
8-gate-cluster variant at a fifth of its search time. The gate clusters stay as the export's
second attempt for tag sides where the numerator alone fails the gate.

Hot-path rules (scripts/ann_profile.py): FAISS runs on one thread per process (OpenMP and its
bundled OpenBLAS: `limit_faiss_threads`, applied on import), a batch of users is one search
per task, and the rerank is a handful of batched numpy products over [B, C] gathers.

Nothing here is tuned at run time: the index is built at export (`build_task_index`),
shipped in the bundle with its sha256, and its nprobe set by the export's quality gate
(`tune_nprobe`: recall@20 against exact scoring over 1,000 users).

Every function takes and returns numpy arrays; FAISS is imported on first use only, so
the service without the extra still loads dense models.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

EPS = 1e-8
SCHEME = "ivf-sq8-ip(vec(V) . a_t (x) e_t/||e_t||) + exact cosine rerank"
EXACT_CHUNK = 65536            # tags per chunk of the factorised exact path ([B, K, chunk] temporaries)


_THREADS = [1]                 # FAISS threads of this process (limit_faiss_threads); applied on import


def _faiss():
    first = "faiss" not in sys.modules
    saved = os.environ.get("OMP_NUM_THREADS")
    if first:   # FAISS's private libgomp reads this once, when it loads: the default of every thread
        os.environ["OMP_NUM_THREADS"] = str(_THREADS[0])
    try:
        import faiss
    except ImportError as e:  # the message names the extra that installs it
        raise ImportError("FAISS is needed for ANN candidates: pip install 'mvke[service]' (faiss-cpu)") from e
    finally:
        if first:         # child processes and libraries loaded later see the environment as it was
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
    if first:
        _apply_threads(faiss, _THREADS[0])
    return faiss


def _apply_threads(faiss: Any, n: int) -> None:
    """FAISS's OpenMP team and the OpenBLAS it bundles (a second copy, beside numpy's, that
    `limit_blas_threads` cannot reach before FAISS is imported) to `n` threads.

    omp_set_num_threads sets the CALLING thread's team size only (an OpenMP ICV per thread):
    the service loads a model, and so imports FAISS, in a worker thread and searches on its
    event loop, so `CandidateIndex.search` sets it again in the thread that searches."""
    faiss.omp_set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits={"libopenblas": n})   # FAISS's copy; numpy's is libscipy_openblas
    except ImportError:
        pass


@dataclass(frozen=True)
class AnnConfig:
    """Index and search parameters (one place; the export's CLI and the service settings feed it).

    Args:
        nlist: IVF lists; 0 picks `default_nlist(T)` (about 4 sqrt(T), a power of two).
        nprobe: lists searched per query, where the quality gate starts (it doubles it until
            recall passes: the export ships the smallest passing power of two).
        candidates: tags reranked exactly per user and task (at least 2 * top_k is used).
        min_recall: the export's gate on recall@`gate_k` against exact scoring.
        gate_users: users the gate scores both ways.
        gate_k: the k of recall@k.
        max_nprobe: the gate raises nprobe up to this before it gives up.
        train_per_list: k-means training points per list (a sample of the catalogue).
        gate_clusters: tags grouped by gate vector; each group is searched with the user's
            query over that group's approximate denominator (1, the default: the numerator
            alone, one FAISS search per batch; 8 measured 5-8x slower at the same recall on a
            trained tag side: docs/results/ann.md).
        seed: k-means and sampling seed (the same tag side gives the same index bytes).
    """

    nlist: int = 0
    nprobe: int = 1
    candidates: int = 100
    min_recall: float = 0.95
    gate_users: int = 1000
    gate_k: int = 20
    max_nprobe: int = 128
    train_per_list: int = 64
    gate_clusters: int = 1
    seed: int = 0


def default_nlist(num_tags: int) -> int:
    """About 4 sqrt(T) lists as a power of two (1M tags -> 4,096, 100k -> 1,024, 20k -> 512).
    Measured at 1M tags (trained tag side, the harder task, docs/results/ann.md): 4,096 lists
    reach recall@20 0.978 at nprobe 64 in 336 us per user, 1,024 lists 0.969 at nprobe 32 in
    657 us: half the search time for the same recall, for 130 s of k-means instead of 12 s at
    export on 2 busy cores."""
    return max(16, 1 << round(math.log2(max(1.0, 4 * math.sqrt(num_tags)))))


def unit_rows(tag_emb: np.ndarray) -> np.ndarray:
    """e_t / ||e_t|| [T, D] float32."""
    norm = np.linalg.norm(tag_emb, axis=1, keepdims=True)
    return (tag_emb / np.maximum(norm, EPS)).astype(np.float32)


def tag_vectors(gates: np.ndarray, unit_emb: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """w_t = vec(a_t (x) e_t/||e_t||) for tags [lo, hi) -> [n, K*D] float32 (row-major over (k, d),
    matching vec(V) of a [K, D] V)."""
    g, e = gates[lo:hi], unit_emb[lo:hi]
    return (g[:, :, None] * e[:, None, :]).reshape(len(g), -1).astype(np.float32)  # [n, K*D]


# ---- the index -------------------------------------------------------------------------------
def gate_clusters(gates: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the tags' gate vectors: (centroids [C, K], cluster of each tag [T])."""
    faiss = _faiss()
    n = max(1, min(n, len(gates) // 64))
    if n == 1:
        return gates.mean(0, keepdims=True).astype(np.float32), np.zeros(len(gates), dtype=np.int64)
    km = faiss.Kmeans(gates.shape[1], n, niter=20, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(gates, dtype=np.float32))
    assign = km.index.search(np.ascontiguousarray(gates, dtype=np.float32), 1)[1][:, 0]
    return km.centroids.astype(np.float32), assign.astype(np.int64)


def _ivf(ids: np.ndarray, gates: np.ndarray, unit: np.ndarray, nlist: int, cfg: "AnnConfig") -> Any:
    """IVF (inner product) over the w_t of tags `ids`, 8-bit scalar-quantised (K*D bytes per tag)."""
    faiss = _faiss()
    dim = gates.shape[1] * unit.shape[1]
    nlist = max(1, min(nlist, len(ids) // 8))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = cfg.seed
    rng = np.random.default_rng(cfg.seed)
    n_train = min(len(ids), cfg.train_per_list * nlist)
    sample = np.sort(rng.choice(ids, n_train, replace=False)) if n_train < len(ids) else ids
    index.train(tag_vectors(gates[sample], unit[sample]))
    for lo in range(0, len(ids), EXACT_CHUNK):  # in chunks: no [T, K*D] float32 copy at once
        part = ids[lo:lo + EXACT_CHUNK]
        index.add_with_ids(tag_vectors(gates[part], unit[part]), part)
    return index


@dataclass
class CandidateIndex:
    """Per gate cluster c (centroid gate abar_c), an IVF over its tags' w_t.

    A query searches every cluster with vec(V) / ||sum_k abar_ck V_k||: the numerator over the
    cluster's approximate denominator, so candidates from different clusters compare as
    approximate cosines. With one cluster this is the plain numerator MIPS."""

    centroids: np.ndarray          # [C, K] gate centroids
    indexes: list                  # C faiss IVF indexes (tag ids as FAISS ids)

    @property
    def nprobe(self) -> int:
        return self.indexes[0].nprobe

    @nprobe.setter
    def nprobe(self, n: int) -> None:
        for index in self.indexes:
            index.nprobe = n

    @property
    def nlist(self) -> int:
        return max(index.nlist for index in self.indexes)

    def nbytes(self) -> int:
        """Memory of the codes, ids and centroids (what the process holds for this index)."""
        return sum(ix.ntotal * (ix.code_size + 8) + 2 * ix.nlist * ix.d * 4 for ix in self.indexes)

    def search(self, values: np.ndarray, n: int) -> np.ndarray:
        """Candidate tag ids [B, n] (-1 pads), best approximate cosine first."""
        B = len(values)
        _faiss_module().omp_set_num_threads(_THREADS[0])   # this thread's team (see _apply_threads)
        flat = np.ascontiguousarray(values.reshape(B, -1), dtype=np.float32)
        if len(self.indexes) == 1:                       # one search for the whole batch
            return self.indexes[0].search(flat, n)[1]
        mixed = np.matmul(self.centroids, values)                                         # [B, C, D]
        den = np.sqrt(np.maximum(np.einsum("bcd,bcd->bc", mixed, mixed), EPS))            # ||sum_k abar_ck V_k||
        dist, ids = [], []
        for c, index in enumerate(self.indexes):
            d, i = index.search(np.ascontiguousarray(flat / den[:, c:c + 1], dtype=np.float32), n)
            dist.append(d)
            ids.append(i)
        d, i = np.concatenate(dist, 1), np.concatenate(ids, 1)                            # [B, C * n]
        d[i < 0] = -np.inf
        top = np.argpartition(-d, n - 1, axis=1)[:, :n]
        return np.take_along_axis(i, top, 1)

    def to_bytes(self) -> bytes:
        """MVKEANN1 | C | K | centroids float32 | per index: uint64 length + faiss bytes."""
        faiss = _faiss()
        C, K = self.centroids.shape
        parts = [MAGIC, np.array([C, K], dtype="<u4").tobytes(), self.centroids.astype("<f4").tobytes()]
        for index in self.indexes:
            blob = faiss.serialize_index(index).tobytes()
            parts += [np.array([len(blob)], dtype="<u8").tobytes(), blob]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, nprobe: int) -> "CandidateIndex":
        faiss = _faiss()
        if data[:len(MAGIC)] != MAGIC:
            raise ValueError("not an MVKE candidate index (bad magic)")
        pos = len(MAGIC)
        C, K = np.frombuffer(data, "<u4", 2, pos).tolist()
        pos += 8
        centroids = np.frombuffer(data, "<f4", C * K, pos).reshape(C, K).copy()
        pos += 4 * C * K
        indexes = []
        for _ in range(C):
            (size,) = np.frombuffer(data, "<u8", 1, pos).tolist()
            pos += 8
            indexes.append(faiss.deserialize_index(np.frombuffer(data, np.uint8, size, pos)))
            pos += size
        out = cls(centroids, indexes)
        out.nprobe = nprobe
        return out


MAGIC = b"MVKEANN1"


def build_task_index(gates: np.ndarray, tag_emb: np.ndarray, cfg: AnnConfig = AnnConfig()) -> CandidateIndex:
    """Gate clusters, then one IVF per cluster with lists in proportion to its size."""
    T = len(gates)
    unit = unit_rows(tag_emb)
    centroids, assign = gate_clusters(gates, cfg.gate_clusters, cfg.seed)
    nlist = cfg.nlist or default_nlist(T)
    indexes = []
    for c in range(len(centroids)):
        ids = np.flatnonzero(assign == c)
        indexes.append(_ivf(ids, gates, unit, max(1, round(nlist * len(ids) / T)), cfg))
    index = CandidateIndex(centroids, indexes)
    index.nprobe = cfg.nprobe
    return index


def index_to_bytes(index: CandidateIndex) -> bytes:
    return index.to_bytes()


def index_from_bytes(data: bytes, nprobe: int) -> CandidateIndex:
    return CandidateIndex.from_bytes(data, nprobe)


def _faiss_module() -> Any:
    return sys.modules.get("faiss") or _faiss()


def limit_faiss_threads(n: int) -> None:
    """FAISS threads of this process: now if FAISS is loaded, else when it is (FAISS is imported on
    first use only). The default is 1: FAISS parallelises a batch of queries with OpenMP (threads
    that spin while they wait) and its own OpenBLAS; beside an event loop, ONNX Runtime and other
    worker processes, that team only contends. Measured on 2 busy cores (docs/results/ann.md):
    one batch of 32 users searched in 0.7 ms with 1 thread and 8 ms with 2. Offline jobs (the
    export's index build) raise it to the CPUs they own."""
    _THREADS[0] = max(1, int(n))
    if "faiss" in sys.modules:
        _apply_threads(sys.modules["faiss"], _THREADS[0])


# ---- scoring on a subset of tags (candidates) and exact top-k in chunks ------------------------
def candidate_cosines(values: np.ndarray, ids: np.ndarray, unit_emb: np.ndarray, gates: np.ndarray) -> np.ndarray:
    """The exact cosine of each row's candidate tags: values [B, K, D], ids [B, C] -> [B, C] float32.

    The cosine of the paper's definition, per candidate: E_u(t) = sum_k a_tk V_k is built for the
    C candidates only (one batched [C, K] @ [K, D] product per user), then cos = E_u(t) . e_t /
    ||E_u(t)|| (e_t unit). Equal to the dense scoring's a_t . (V e_t) / sqrt(a_t^T G a_t) to
    float32 rounding, in one product and two reductions instead of three products and two
    einsums (1.3-1.5x less time at B = 16-32, C = 100, measured on 2 busy cores)."""
    e = np.take(unit_emb, ids, axis=0)                            # [B, C, D]
    g = np.take(gates, ids, axis=0)                               # [B, C, K]
    u = np.matmul(g, np.ascontiguousarray(values, dtype=np.float32))   # [B, C, D]  E_u(t)
    num = np.einsum("bcd,bcd->bc", u, e)                          # [B, C]
    norm = np.einsum("bcd,bcd->bc", u, u)                         # [B, C]  ||E_u(t)||^2
    np.sqrt(norm, out=norm)
    np.maximum(norm, EPS, out=norm)
    np.divide(num, norm, out=num)
    return num


def chunk_cosines(values: np.ndarray, unit_emb: np.ndarray, gates: np.ndarray,
                  chunk: int = EXACT_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """Exact cosines of every tag, chunk by chunk, from the factors: yields (first tag id of the
    chunk, cos [B, chunk]). Each chunk's W and Q are built on the fly (the dense scoring's two
    GEMMs on `chunk` tags), so no [K*D, T] matrix is ever held."""
    B, K, D = values.shape
    flat = values.reshape(B, K * D)
    gram = np.matmul(values, values.transpose(0, 2, 1)).reshape(B, K * K)     # [B, K*K]
    for lo in range(0, len(unit_emb), chunk):
        g = gates[lo:lo + chunk]
        w = tag_vectors(gates, unit_emb, lo, lo + chunk)                      # [n, K*D]
        q = (g[:, :, None] * g[:, None, :]).reshape(len(g), K * K)            # [n, K*K]
        num = flat @ w.T                                                      # [B, n]
        norm = gram @ q.T
        np.maximum(norm, 0.0, out=norm)
        np.sqrt(norm, out=norm)
        np.maximum(norm, EPS, out=norm)
        np.divide(num, norm, out=num)
        yield lo, num


def _merge_top(a: tuple[np.ndarray, np.ndarray] | None, idx: np.ndarray, val: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    if a is not None:
        idx, val = np.concatenate([a[0], idx], 1), np.concatenate([a[1], val], 1)
    if val.shape[1] > k:
        part = np.argpartition(-val, k - 1, axis=1)[:, :k]
        idx, val = np.take_along_axis(idx, part, 1), np.take_along_axis(val, part, 1)
    return idx, val


def sort_rows(idx: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row best first (ties by position, as a stable sort)."""
    order = np.argsort(-val, axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)


def exact_top_k(values: np.ndarray, unit_emb: np.ndarray, gates: np.ndarray, k: int,
                exclude: np.ndarray | None = None, chunk: int = EXACT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine over every tag, in chunks: (tag ids [B, k], cosines [B, k]) best first.
    `exclude` [B, T] bool (or None) marks tags never returned (their cosine becomes -inf)."""
    k = min(k, len(unit_emb))
    best = None
    for lo, cos in chunk_cosines(values, unit_emb, gates, chunk):
        if exclude is not None:
            cos[exclude[:, lo:lo + cos.shape[1]]] = -np.inf
        kk = min(k, cos.shape[1])
        part = np.argpartition(-cos, kk - 1, axis=1)[:, :kk] if kk < cos.shape[1] else \
            np.broadcast_to(np.arange(cos.shape[1]), cos.shape)
        best = _merge_top(best, part + lo, np.take_along_axis(cos, part, 1), k)
    return sort_rows(*best)


@dataclass
class TaskAnn:
    """One task's candidate index and the factors its exact rerank reads (float32)."""

    index: CandidateIndex
    unit_emb: np.ndarray          # [T, D]  e_t / ||e_t||
    gates: np.ndarray             # [T, K]
    candidates: int = 100

    def search(self, values: np.ndarray, n: int) -> np.ndarray:
        """Candidate tag ids [B, n] (-1 pads when the probed lists hold fewer than n tags)."""
        return self.index.search(values, n)

    def top_k(self, values: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k: candidates from the index, ranked by their exact cosine.
        exclude: per row, tag ids never returned (None or empty arrays for none)."""
        n_ex = max((len(e) for e in exclude), default=0) if exclude else 0
        n = min(len(self.unit_emb), max(self.candidates, 2 * k) + n_ex)
        ids = self.search(values, n)                                   # [B, n]
        missing = ids < 0
        safe = np.where(missing, 0, ids)
        cos = candidate_cosines(values, safe, self.unit_emb, self.gates)
        cos[missing] = -np.inf
        if n_ex:
            for row, ex in enumerate(exclude):
                if len(ex):
                    cos[row, np.isin(safe[row], ex)] = -np.inf
        kk = min(k, n)
        part = np.argpartition(-cos, kk - 1, axis=1)[:, :kk] if kk < n else np.broadcast_to(np.arange(n), cos.shape)
        return sort_rows(np.take_along_axis(safe, part, 1), np.take_along_axis(cos, part, 1))


# ---- the export's quality gate ---------------------------------------------------------------
def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx_row & exact_row| / |exact_row| (ids; -1 in approx never matches)."""
    k = exact.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e, assume_unique=False)) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k)


@dataclass
class GateReport:
    recall: float
    nprobe: int
    passed: bool
    tried: dict[int, float] = field(default_factory=dict)   # nprobe -> recall


def tune_nprobe(ann: TaskAnn, values: np.ndarray, cfg: AnnConfig = AnnConfig(), k: int | None = None) -> GateReport:
    """Recall@k of `ann.top_k` against `exact_top_k` over the given users' values [N, K, D];
    nprobe doubles from cfg.nprobe until recall >= cfg.min_recall or cfg.max_nprobe is passed.
    The index is left at the passing nprobe (or the last one tried)."""
    k = k or cfg.gate_k
    exact, _ = exact_top_k(values, ann.unit_emb, ann.gates, k)
    tried: dict[int, float] = {}
    nprobe = cfg.nprobe
    nlist = ann.index.nlist
    while True:
        ann.index.nprobe = nprobe
        approx = np.concatenate([ann.top_k(values[lo:lo + 256], k)[0] for lo in range(0, len(values), 256)])
        tried[nprobe] = recall_at_k(approx, exact)
        if tried[nprobe] >= cfg.min_recall or nprobe >= min(cfg.max_nprobe, nlist):
            return GateReport(tried[nprobe], nprobe, tried[nprobe] >= cfg.min_recall, tried)
        nprobe = min(nprobe * 2, cfg.max_nprobe, nlist)
