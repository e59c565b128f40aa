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
bundled OpenBLAS: set where a process starts and by each search in its own thread), a batch of users is one search
per task, and the rerank is a handful of batched numpy products over [B, C] gathers.

Nothing here is tuned at run time: the index is built at export (`build_task_index`),
shipped in the bundle with its sha256, and its nprobe set by the export's quality gate
(`tune_nprobe`: recall@20 against exact scoring over 1,000 users).

Every function takes and returns numpy arrays; FAISS is imported on first use only, so
the service without the extra still loads dense models.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mvke.runtime.scoring import EPS, EXACT_CHUNK, exact_top_k, gathered_cosines, numerator_rows, top_k, unit_rows

SCHEME = "ivf-sq8-ip(vec(V) . a_t (x) e_t/||e_t||) + exact cosine rerank"


def load_faiss(threads: int | None = None) -> Any:
    """The faiss module, imported on first use only (the service without the extra still loads dense
    models); with `threads`, its threads are capped to that (`limit_faiss_threads`)."""
    faiss = sys.modules.get("faiss")
    if faiss is None:
        try:
            import faiss
        except ImportError as e:  # the message names the extra that installs it
            raise ImportError("FAISS is needed for ANN candidates: pip install 'mvke[service]' (faiss-cpu)") from e
    if threads is not None:
        limit_faiss_threads(threads)
    return faiss


def limit_faiss_threads(n: int) -> None:
    """FAISS's OpenMP team (of the calling thread) and the OpenBLAS it bundles (a second copy, beside
    numpy's, that `limit_blas_threads` cannot reach before FAISS is loaded) to `n` threads, if FAISS
    is loaded. Called where a process starts (mvke.runtime.system.limit_threads) and by `load_faiss`
    when it loads FAISS later; the team size of the thread that searches is set by each search
    (`CandidateIndex.threads`).

    The default is 1: FAISS parallelises a batch of queries with OpenMP (threads that spin while
    they wait) and its own OpenBLAS; beside an event loop, ONNX Runtime and other worker processes,
    that team only contends. Measured on 2 busy cores (docs/results/ann.md): one batch of 32 users
    searched in 0.7 ms with 1 thread and 8 ms with 2. Offline jobs (the export's index build) raise
    it to the CPUs they own."""
    faiss = sys.modules.get("faiss")
    if faiss is None:
        return
    faiss.omp_set_num_threads(max(1, int(n)))
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits={"libopenblas": max(1, int(n))})   # FAISS's copy; numpy's is libscipy_openblas
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


# ---- the index -------------------------------------------------------------------------------
def gate_clusters(gates: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the tags' gate vectors: (centroids [C, K], cluster of each tag [T])."""
    faiss = load_faiss()
    n = max(1, min(n, len(gates) // 64))
    if n == 1:
        return gates.mean(0, keepdims=True).astype(np.float32), np.zeros(len(gates), dtype=np.int64)
    km = faiss.Kmeans(gates.shape[1], n, niter=20, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(gates, dtype=np.float32))
    assign = km.index.search(np.ascontiguousarray(gates, dtype=np.float32), 1)[1][:, 0]
    return km.centroids.astype(np.float32), assign.astype(np.int64)


def _ivf(ids: np.ndarray, gates: np.ndarray, unit: np.ndarray, nlist: int, cfg: "AnnConfig") -> Any:
    """IVF (inner product) over the w_t of tags `ids`, 8-bit scalar-quantised (K*D bytes per tag)."""
    faiss = load_faiss()
    dim = gates.shape[1] * unit.shape[1]
    nlist = max(1, min(nlist, len(ids) // 8))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = cfg.seed
    rng = np.random.default_rng(cfg.seed)
    n_train = min(len(ids), cfg.train_per_list * nlist)
    sample = np.sort(rng.choice(ids, n_train, replace=False)) if n_train < len(ids) else ids
    index.train(numerator_rows(gates[sample], unit[sample])[0])
    for lo in range(0, len(ids), EXACT_CHUNK):  # in chunks: no [T, K*D] float32 copy at once
        part = ids[lo:lo + EXACT_CHUNK]
        index.add_with_ids(numerator_rows(gates[part], unit[part])[0], part)
    return index


@dataclass
class CandidateIndex:
    """Per gate cluster c (centroid gate abar_c), an IVF over its tags' w_t.

    A query searches every cluster with vec(V) / ||sum_k abar_ck V_k||: the numerator over the
    cluster's approximate denominator, so candidates from different clusters compare as
    approximate cosines. With one cluster this is the plain numerator MIPS."""

    centroids: np.ndarray          # [C, K] gate centroids
    indexes: list                  # C faiss IVF indexes (tag ids as FAISS ids)
    threads: int = 1               # FAISS threads of a search (set in the thread that searches)

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
        # omp_set_num_threads sets the CALLING thread's team only (an OpenMP ICV per thread): the service
        # loads a model in a worker thread and searches on its event loop, so each search sets it
        load_faiss().omp_set_num_threads(self.threads)
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
        return top_k(d, n, i)[0]

    def to_bytes(self) -> bytes:
        """MVKEANN1 | C | K | centroids float32 | per index: uint64 length + faiss bytes."""
        faiss = load_faiss()
        C, K = self.centroids.shape
        parts = [MAGIC, np.array([C, K], dtype="<u4").tobytes(), self.centroids.astype("<f4").tobytes()]
        for index in self.indexes:
            blob = faiss.serialize_index(index).tobytes()
            parts += [np.array([len(blob)], dtype="<u8").tobytes(), blob]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, nprobe: int, threads: int = 1) -> "CandidateIndex":
        faiss = load_faiss(threads)
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
        out = cls(centroids, indexes, threads)
        out.nprobe = nprobe
        return out


MAGIC = b"MVKEANN1"


def build_task_index(gates: np.ndarray, tag_emb: np.ndarray, cfg: AnnConfig = AnnConfig(),
                     threads: int = 1) -> CandidateIndex:
    """Gate clusters, then one IVF per cluster with lists in proportion to its size, built and searched
    on `threads` FAISS threads (an offline job gives it every CPU it owns)."""
    load_faiss(threads)
    T = len(gates)
    unit = unit_rows(tag_emb)
    centroids, assign = gate_clusters(gates, cfg.gate_clusters, cfg.seed)
    nlist = cfg.nlist or default_nlist(T)
    indexes = []
    for c in range(len(centroids)):
        ids = np.flatnonzero(assign == c)
        indexes.append(_ivf(ids, gates, unit, max(1, round(nlist * len(ids) / T)), cfg))
    index = CandidateIndex(centroids, indexes, threads)
    index.nprobe = cfg.nprobe
    return index


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
        cos = gathered_cosines(values, safe, self.unit_emb, self.gates)
        cos[missing] = -np.inf
        if n_ex:
            for row, ex in enumerate(exclude):
                if len(ex):
                    cos[row, np.isin(safe[row], ex)] = -np.inf
        return top_k(cos, k, safe)

    def nbytes(self) -> int:
        return self.index.nbytes()


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
