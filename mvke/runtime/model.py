"""The predictor: one model version in memory, the one object that answers "tags for these users".

In the shape of KServe's `Model` (load / preprocess / predict / postprocess): `build_model` loads a
version (ORT sessions + prepared tag sides, warmed up); `LoadedModel.encode` is the preprocessing
(raw rows or an Arrow table -> ids); `predict` answers a batch of users' queries with one call,
built from three methods that callers may also use alone:

    rank(users, k, exclude, exact)      top k of every asked task; it alone chooses HOW: the fused
                                        tower + scoring + TopK ONNX graph, the tower + numpy GEMMs,
                                        or the candidate index of a large catalogue (mvke/runtime/ann.py)
    score_candidates(users, tags)       exact scores of given tags only (targeting)
    explain(users, tags)                gate weights and each expert's share of the score

Postprocessing (names, answer documents) is the caller's: the service's Tagger, batch tagging.
A `LoadedModel` is immutable; a request (or a batch) holds a reference to it, so a hot swap
never changes the model under a request that already started.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from mvke.runtime import ann
from mvke.runtime.contract import (ONNX_FILE, TAGS_FILE, TOWER_TOPK_FILE, Manifest, ann_index_file, decode_array,
                                   gates_file, tag_emb_file)
from mvke.runtime.encoded import EncodedBatch
from mvke.runtime.features import FeatureSchema
from mvke.runtime.scoring import Ranked, TaskTagSide, cosines_at, explain_tags, rank, sigmoid, top_k

ANN_MIN_TAGS = 50_000     # MVKE_ANN=auto serves a catalogue this large through its candidate index
RANK_MODES = ("fused", "numpy", "ann", "exact")

log = logging.getLogger("mvke.runtime")


@dataclass(slots=True)    # not frozen: one is built per request, and a frozen init costs ~2 us more
class Query:
    """What one user asks: `top_k` tags of each of `tasks`, best first.

    exclude: tag indices never returned; min_score: drop tags scoring less; exact: rank every tag
    also where the model ranks a large catalogue's candidates; candidates: score only these tag
    indices (in this order for ties); explain: add each returned tag's explanation."""

    tasks: tuple[str, ...]
    top_k: int
    exclude: tuple[int, ...] = ()
    min_score: float | None = None
    exact: bool = False
    candidates: np.ndarray | None = None
    explain: bool = False

    @property
    def needs_expert_outputs(self) -> bool:
        return self.candidates is not None or self.explain


@dataclass
class Answer:
    """One user's answer: per task (tag indices, probabilities), best first, and explanations if asked."""

    tasks: dict[str, tuple[list[int], list[float]]]
    explanations: dict[str, list[dict]] | None = None


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    schema: FeatureSchema
    session: ort.InferenceSession
    provider: str
    tags: list[str]
    sides: dict[str, TaskTagSide]                  # task -> tag side, in manifest order
    tag_index: dict[str, int] = field(default_factory=dict)
    # tower + scoring + TopK in one graph (contract.TOWER_TOPK_FILE) and the tag-side feeds it reads
    topk_session: ort.InferenceSession | None = None
    topk_feeds: dict = field(default_factory=dict)
    # the same graph on more threads, for a call made while the worker has nothing else to do
    # (`build_model`'s idle_threads; None: that call uses topk_session too)
    topk_idle: ort.InferenceSession | None = None

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def scoring(self) -> str:
        """"onnx": tower + scoring + TopK in one ONNX call; "numpy": tower in ONNX, scoring in numpy."""
        return "onnx" if self.topk_session is not None else "numpy"

    @cached_property
    def approximate(self) -> bool:
        """True when some task is served through its candidate index (asked per batch: computed once)."""
        return any(side.ann is not None for side in self.sides.values())

    # ---- preprocess ---------------------------------------------------------------------------
    def encode(self, users) -> EncodedBatch:
        """Raw rows (mappings field -> value) or an Arrow table/record batch -> ids (FeatureSchema.encode)."""
        return self.schema.encode(users)

    # ---- predict ------------------------------------------------------------------------------
    def run_tower(self, cat_ids: np.ndarray, multi_ids: np.ndarray) -> np.ndarray:
        """The user tower alone: [B, sum K_task, D] expert outputs of every task (graph names from the manifest)."""
        m = self.manifest
        cat_name, multi_name = m.onnx_inputs
        return self.session.run([m.onnx_output], {cat_name: cat_ids, multi_name: multi_ids})[0]

    def expert_outputs(self, users: EncodedBatch) -> np.ndarray:
        """[B, sum K, D], computed once per batch (kept on it: candidates and explanations reuse it)."""
        if users.expert_outputs is None:
            users.expert_outputs = self.run_tower(users.cat_ids, users.multi_ids)
        return users.expert_outputs

    def rank_mode(self, users: EncodedBatch, exact: bool = False) -> str:
        """How `rank` ranks these users: "exact" (every tag, from the factors, on a side served through
        its index), "ann" (the index's candidates), "numpy" (the tower output is already at hand: the
        GEMMs cost less than a second tower pass), else "fused" (one ONNX call) when the bundle has the
        graph, "numpy" otherwise."""
        if self.approximate:
            return "exact" if exact else "ann"
        if self.topk_session is not None and users.expert_outputs is None:
            return "fused"
        return "numpy"

    def rank(self, users: EncodedBatch, k: int | Mapping[str, int],
             exclude: Sequence[Sequence[int] | None] | None = None, exact: bool | Sequence[bool] = False,
             mode: str | None = None, idle: bool = False) -> dict[str, Ranked]:
        """Per task (manifest order; a task at k 0 or missing is not scored), the k best tags of each user.

        exclude: per user, tag indices never returned (kept=False where too few are left);
        exact: True, or per user, to rank every tag where a large catalogue is served from its index;
        mode: force one of RANK_MODES (the parity gate and benchmarks compare them), else `rank_mode`;
        idle: the caller's worker has nothing else to do (the batcher's idle bypass): the fused call may
        run on the idle session's threads (same answer, byte for byte)."""
        ks = {t: k for t in self.sides} if isinstance(k, int) else dict(k)
        per_row = not isinstance(exact, bool)
        if per_row and mode is None and self.approximate and any(exact) and not all(exact):
            return self._rank_split(users, ks, exclude, list(exact))
        mode = mode or self.rank_mode(users, all(exact) if per_row and len(exact) else bool(exact))
        if mode == "fused":
            return self._rank_fused(users, ks, exclude, idle)
        return rank(self.expert_outputs(users), self.sides.values(), ks, exclude, approximate=mode == "ann")

    def _rank_split(self, users: EncodedBatch, k: dict[str, int], exclude, exact: list[bool]) -> dict[str, Ranked]:
        """Users asking `exact` on a model served approximately, ranked apart from the others, then merged."""
        rows = {flag: [i for i, e in enumerate(exact) if e == flag] for flag in (False, True)}
        parts = {flag: self.rank(users.take(r), k, [exclude[i] for i in r] if exclude else None, flag)
                 for flag, r in rows.items()}
        return {task: _merge_rows([(rows[flag], parts[flag][task]) for flag in parts], len(exact))
                for task in parts[False]}

    def _rank_fused(self, users: EncodedBatch, k: dict[str, int],
                    exclude: Sequence[Sequence[int] | None] | None, idle: bool = False) -> dict[str, Ranked]:
        """`rank` in one ONNX call (every task is scored; the asked ones are returned). Excluded tags are
        dropped from a top (k + excluded) and the rest keeps its order, so the answer equals the numpy
        ranker's (kept=False pads when too few are left)."""
        T = self.manifest.num_tags
        n_ex = max((len(e or ()) for e in exclude), default=0) if exclude else 0
        want = np.array([min(T, max(k.values()) + n_ex)], dtype=np.int64)
        outs = self._run_topk(users.cat_ids, users.multi_ids, want, idle)
        ranked = {}
        for name, kk in k.items():
            if kk <= 0:
                continue
            idx, prob = outs[f"top_idx_{name}"], outs[f"top_prob_{name}"]
            kk = min(kk, T)
            ranked[name] = _drop_excluded(idx, prob, exclude, kk) if n_ex else Ranked(idx[:, :kk], prob[:, :kk], None)
        return ranked

    def _run_topk(self, cat_ids: np.ndarray, multi_ids: np.ndarray, top_k: np.ndarray,
                  idle: bool = False) -> dict[str, np.ndarray]:
        m = self.manifest
        names = [o.name for o in self.topk_session.get_outputs()]
        cat_name, multi_name = m.onnx_inputs
        if self.provider != "CUDAExecutionProvider":
            feeds = {cat_name: cat_ids, multi_name: multi_ids, "top_k": top_k, **self.topk_feeds}
            session = self.topk_idle if idle and self.topk_idle is not None else self.topk_session
            return dict(zip(names, session.run(names, feeds)))
        # CUDA: the tag-side matrices stay on the device (bound once at load); only ids go up
        # and the top k come back.
        binding = self.topk_session.io_binding()
        binding.bind_cpu_input(cat_name, cat_ids)
        binding.bind_cpu_input(multi_name, multi_ids)
        binding.bind_cpu_input("top_k", top_k)
        for name, value in self.topk_feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        self.topk_session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def score_candidates(self, users: EncodedBatch, candidates: Sequence[np.ndarray], tasks: Sequence[str],
                         k: Sequence[int] | None = None) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Per user, per task: its own candidate tag indices ranked by their exact score (the arithmetic
        of the full ranking on the candidates' columns only) -> (tag indices [n], probabilities [n]),
        best first, the first k[i] (default all)."""
        values = self.expert_outputs(users)
        out = []
        for row, cand in enumerate(candidates):
            kk = len(cand) if k is None else min(k[row], len(cand))
            per_task = {}
            for task in tasks:
                side = self.sides[task]
                if not len(cand):
                    per_task[task] = (cand, np.zeros(0, dtype=np.float32))
                    continue
                cos = cosines_at(side.values(values[row:row + 1]), side, cand)               # [1, n]
                logits = cos * side.scale + side.bias
                idx, best = top_k(logits, kk, cand[None])
                per_task[task] = (idx[0], sigmoid(best[0]))
            out.append(per_task)
        return out

    def explain(self, users: EncodedBatch, tags: Sequence[Mapping[str, Sequence[int]]]) -> list[dict[str, list[dict]]]:
        """Per user, per task, for each of its given tag indices: the tag's gate weight on each of the
        task's experts (the paper's Fig. 8) and each expert's additive part of the cosine (summing to
        it; `shares` = part / cosine), with the task's score scale and bias."""
        values = self.expert_outputs(users)
        experts = {spec.name: list(spec.experts) for spec in self.manifest.tasks}
        out = []
        for row, per_task in enumerate(tags):
            doc = {}
            for task, idx in per_task.items():
                side = self.sides[task]
                if not len(idx):
                    doc[task] = []
                    continue
                gates, parts, cos = explain_tags(side.values(values[row:row + 1])[0], side,
                                                 np.asarray(idx, dtype=np.int64))
                shares = parts / np.where(np.abs(cos) > 1e-12, cos, 1e-12)[:, None]
                doc[task] = [{"experts": experts[task], "gates": g, "contributions": c, "shares": sh, "cosine": cs,
                              "scale": side.scale, "bias": side.bias}
                             for g, c, sh, cs in zip(gates.tolist(), parts.tolist(), shares.tolist(), cos.tolist())]
            out.append(doc)
        return out

    def predict(self, users: EncodedBatch, queries: Sequence[Query], idle: bool = False) -> list[Answer]:
        """Each user's answer to its own query, the batch in as few model calls as its queries allow:
        one `rank` for every user ranked over the catalogue (at the largest k asked per task), then
        the candidate scorings and explanations of the users that ask for them. idle: see `rank`."""
        if any(q.needs_expert_outputs for q in queries):
            self.expert_outputs(users)     # computed once; `rank` then scores from it
        answers: list[Answer | None] = [None] * len(queries)
        full = [i for i, q in enumerate(queries) if q.candidates is None]
        if full:
            whole = len(full) == len(queries)
            part, asked = (users, queries) if whole else (users.take(full), [queries[i] for i in full])
            ranked = self.rank(part, _largest_k(asked), _excluded(asked), [q.exact for q in asked], idle=idle)
            for i, answer in zip(full, _trim(ranked, asked)):
                answers[i] = answer
        if len(full) < len(queries):
            self._answer_candidates(users, queries, answers)
        explain = [i for i, q in enumerate(queries) if q.explain]
        if explain:
            docs = self.explain(users.take(explain),
                                [{t: idx for t, (idx, _) in answers[i].tasks.items()} for i in explain])
            for i, doc in zip(explain, docs):
                answers[i].explanations = doc
        return answers  # type: ignore[return-value]

    def _answer_candidates(self, users: EncodedBatch, queries: Sequence[Query], answers: list) -> None:
        rows = [i for i, q in enumerate(queries) if q.candidates is not None]
        for i in rows:
            q = queries[i]
            cand = q.candidates
            if q.exclude:
                cand = cand[~np.isin(cand, q.exclude)]
            (scored,) = self.score_candidates(users.take([i]), [cand], q.tasks, [q.top_k])
            answers[i] = Answer({task: _at_least(idx.tolist(), prob.tolist(), q.min_score)
                                 for task, (idx, prob) in scored.items()})


def _largest_k(queries: Sequence[Query]) -> dict[str, int]:
    k: dict[str, int] = {}
    for q in queries:
        for task in q.tasks:
            if q.top_k > k.get(task, 0):
                k[task] = q.top_k
    return k


def _excluded(queries: Sequence[Query]) -> list[tuple[int, ...]] | None:
    return [q.exclude for q in queries] if any(q.exclude for q in queries) else None


def _trim(ranked: dict[str, Ranked], queries: Sequence[Query]) -> list[Answer]:
    """Each query's own answer from the batch's ranking: its tasks, its top k, excluded and weak tags dropped."""
    tops = {task: (r.tag_index.tolist(), r.scores.tolist(), None if r.kept is None else r.kept.tolist())
            for task, r in ranked.items()}
    answers = []
    for row, q in enumerate(queries):
        tasks = {}
        for task in q.tasks:
            idx_rows, prob_rows, kept = tops[task]
            ii, pp = idx_rows[row][:q.top_k], prob_rows[row][:q.top_k]
            if kept is not None:
                ok = kept[row]
                ii, pp = [t for n, t in enumerate(ii) if ok[n]], [p for n, p in enumerate(pp) if ok[n]]
            tasks[task] = _at_least(ii, pp, q.min_score)
        answers.append(Answer(tasks))
    return answers


def _at_least(idx: list[int], scores: list[float], min_score: float | None) -> tuple[list[int], list[float]]:
    """The tags scoring at least `min_score` (None: all); scores are best first, so a prefix."""
    if min_score is None:
        return idx, scores
    n = sum(1 for p in scores if p >= min_score)
    return idx[:n], scores[:n]


def _merge_rows(parts: list[tuple[list[int], Ranked]], n: int) -> Ranked:
    """One task's rankings of disjoint row subsets -> the ranking of all n rows, in row order."""
    first = parts[0][1]
    idx = np.empty((n, first.tag_index.shape[1]), dtype=first.tag_index.dtype)
    scores = np.empty((n, first.scores.shape[1]), dtype=first.scores.dtype)
    kept = None if all(r.kept is None for _, r in parts) else np.ones(idx.shape, dtype=bool)
    for rows, r in parts:
        idx[rows], scores[rows] = r.tag_index, r.scores
        if kept is not None and r.kept is not None:
            kept[rows] = r.kept
    return Ranked(idx, scores, kept)


def _drop_excluded(idx: np.ndarray, prob: np.ndarray, exclude: Sequence[Sequence[int] | None], k: int) -> Ranked:
    B = len(idx)
    out_i = np.zeros((B, k), dtype=idx.dtype)
    out_p = np.zeros((B, k), dtype=prob.dtype)
    kept = np.zeros((B, k), dtype=bool)
    for row in range(B):
        ex = exclude[row] if row < len(exclude) else None
        keep = ~np.isin(idx[row], ex) if ex else np.ones(idx.shape[1], dtype=bool)
        ii, pp = idx[row][keep][:k], prob[row][keep][:k]
        out_i[row, :len(ii)], out_p[row, :len(pp)], kept[row, :len(ii)] = ii, pp, True
    return Ranked(out_i, out_p, kept)


# ---- load ---------------------------------------------------------------------------------------
def tag_sides(manifest: Manifest, blobs: dict[str, bytes], approximate: bool = False,
              search_threads: int = 1) -> dict[str, TaskTagSide]:
    """task -> its tag side (gates and tag embeddings of the bundle, prepared for scoring).
    approximate: tasks with a candidate index in the bundle are served through it (factors only,
    no dense W, Q), searched on `search_threads` FAISS threads; the others stay dense."""
    sides = {}
    for spec in manifest.tasks:
        g, e = gates_file(spec.name), tag_emb_file(spec.name)
        index_name = ann_index_file(spec.name)
        use_index = approximate and index_name in blobs
        side = TaskTagSide.build(spec, decode_array(blobs[g], manifest.files[g]),
                                 decode_array(blobs[e], manifest.files[e]), dense=not use_index)
        if use_index:
            info = manifest.ann["tasks"][spec.name]
            index = ann.CandidateIndex.from_bytes(blobs[index_name], info["nprobe"], search_threads)
            side.ann = ann.TaskAnn(index, side.unit, side.gates, info["candidates"])
        sides[spec.name] = side
    return sides


def serve_approximately(manifest: Manifest, blobs: dict[str, bytes], mode: str, min_tags: int) -> bool:
    """MVKE_ANN: `off` never, `on` whenever the bundle has an index, `auto` from `min_tags` tags up."""
    has_index = any(ann_index_file(t.name) in blobs for t in manifest.tasks)
    if mode == "on" and not has_index:
        log.warning("MVKE_ANN=on but version %s has no candidate index; scoring exactly", manifest.version)
    return has_index and (mode == "on" or (mode == "auto" and manifest.num_tags >= min_tags))


def make_session(onnx_bytes: bytes, provider: str = "auto", intra_threads: int = 1,
                 spin_us: int | None = None) -> tuple[ort.InferenceSession, str]:
    """CUDA when requested/available AND actually in use (onnxruntime-gpu lists CUDA even
    on a machine without a GPU, then silently falls back), else CPU. spin_us: how long idle
    intra-op threads spin before they sleep (None: ONNX Runtime's default)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_threads
    if spin_us is not None:
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    want_cuda = provider in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
    if want_cuda:
        try:
            sess = ort.InferenceSession(onnx_bytes, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if sess.get_providers()[0] == "CUDAExecutionProvider":
                return sess, "CUDAExecutionProvider"
            log.warning("CUDA provider listed but not usable; running on CPU")
        except Exception as e:  # a broken CUDA install must not stop a CPU service
            log.warning("CUDA session failed (%s); running on CPU", e)
    elif provider == "cuda":
        log.warning("MVKE_ORT_PROVIDER=cuda but this onnxruntime has no CUDA provider; running on CPU")
    return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"]), "CPUExecutionProvider"


def build_model(manifest: Manifest, blobs: dict[str, bytes], provider: str = "auto",
                intra_threads: int = 1, ann_mode: str = "off", ann_min_tags: int = ANN_MIN_TAGS,
                scoring: str = "auto", search_threads: int = 1, idle_threads: int = 1,
                idle_spin_us: int | None = None) -> LoadedModel:
    """The version ready to serve. ann_mode: auto|on|off (candidate indexes, see `serve_approximately`,
    searched on `search_threads` FAISS threads); scoring: auto|onnx|numpy (auto: the fused tower +
    TopK graph when the bundle has one and every task is dense; measured faster than numpy on the
    CPU, and the only way the GPU does the scoring); idle_threads > intra_threads: a second CPU
    session of the fused graph on that many threads for `rank(idle=True)` (a request alone on its
    worker: at batch 1 the call reads the whole tag side for one user, from memory when other work
    has passed through the caches, and more cores read it sooner), whose threads spin `idle_spin_us`
    after a call before they sleep (None: ONNX Runtime's default, tens of ms; the service passes
    MVKE_ORT_IDLE_SPIN_US)."""
    session, used = make_session(blobs[ONNX_FILE], provider, intra_threads)
    tags = json.loads(blobs[TAGS_FILE])
    sides = tag_sides(manifest, blobs, serve_approximately(manifest, blobs, ann_mode, ann_min_tags), search_threads)
    topk_session, feeds = None, {}
    dense = all(side.W is not None for side in sides.values())
    if scoring != "numpy" and TOWER_TOPK_FILE in blobs and dense:
        topk_session, topk_used = make_session(blobs[TOWER_TOPK_FILE],
                                               "cuda" if used == "CUDAExecutionProvider" else "cpu", intra_threads)
        feeds = {}
        for side in sides.values():
            for name, arr in ((f"tag_w_{side.name}", side.W), (f"tag_q_{side.name}", side.Q)):
                feeds[name] = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0) if topk_used == "CUDAExecutionProvider" \
                    else arr
    elif scoring == "onnx":
        log.warning("MVKE_SCORING=onnx but version %s has no dense %s; scoring in numpy",
                    manifest.version, TOWER_TOPK_FILE)
    topk_idle = None
    if topk_session is not None and topk_used == "CPUExecutionProvider" and idle_threads > intra_threads:
        topk_idle = make_session(blobs[TOWER_TOPK_FILE], "cpu", idle_threads, spin_us=idle_spin_us)[0]
    model = LoadedModel(manifest, FeatureSchema.from_dict(manifest.features), session, used, tags, sides,
                        {t: i for i, t in enumerate(tags)}, topk_session, feeds, topk_idle)
    warm_up(model)
    return model


def warm_up(model: LoadedModel) -> None:
    """One call of each session: the first run of a session allocates; do it before taking traffic."""
    cat = np.full((1, len(model.schema.cat_fields)), 1, dtype=np.int64)
    multi = np.zeros((1, len(model.schema.multi_fields), model.schema.multi_len), dtype=np.int64)
    model.run_tower(cat, multi)
    if model.topk_session is not None:
        model.rank(EncodedBatch(cat, multi), 1, mode="fused")
    if model.topk_idle is not None:
        model.rank(EncodedBatch(cat, multi), 1, mode="fused", idle=True)
