"""The hot path: fetch features -> encode -> run tower -> score -> rank.

Requests become `TagJob`s. `Tagger.process` handles a list of jobs at once (one
job when batching is off, many when the batcher coalesced them): one Redis
round trip for all their feature hashes (fetch), then `compute`, in KServe's
pre/predict/post shape: `encode` (the schema's encoder), `tower` (one ONNX
call), `score` (every tag of every asked task and the top k, mvke.runtime's
`rank`, the one batch tagging uses) and `rank` (each request's own top k,
task subset, exclusions and min_score). Each step is timed in `mvke_step_seconds`.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mvke.runtime.keys import Keys
from mvke.runtime.model import LoadedModel
from mvke.runtime.redis_client import REDIS_ERRORS, describe_error, is_cluster
from mvke.runtime.scoring import Ranked, explain_tags, rank, sigmoid, task_cosines_at
from mvke.runtime.ann import limit_faiss_threads
from mvke.runtime.system import limit_blas_threads
from service.cluster_fetch import ClusterHashReader
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry


class ServiceError(Exception):
    """An error with its HTTP status; `field` names the offending input for 4xx."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: int | None = None,
                 errors: list[dict] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.retry_after = status, message, field, retry_after
        self.errors = errors


def unavailable(message: str) -> ServiceError:
    return ServiceError(503, message, retry_after=1)


@dataclass
class TagJob:
    user_id: str
    features: dict[str, Any] | None
    top_k: int
    tasks: list[str]
    min_score: float | None
    exclude: list[str]
    exact: bool = False              # score every tag, also where the model ranks candidates (MVKE_ANN)
    future: asyncio.Future | None = None
    model: LoadedModel | None = None          # the routed version (None: the active one)
    candidates: np.ndarray | None = None      # candidate scoring: tag indices to score (else the catalogue)
    explain: bool = False
    unknown_values: dict[str, int] | None = None
    unknown_tags: list[str] | None = None
    # filled by the pipeline
    row: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass
class TagResult:
    user_id: str
    model_version: str
    model: str
    feature_source: str
    tasks: dict[str, list[tuple[str, float]]]
    explanations: dict[str, list[dict]] | None = None   # per task, aligned with `tasks` (explain: true)
    unknown_values: dict[str, int] | None = None
    unknown_tags: list[str] | None = None


def merge_rows(parts: list[tuple[list[int], Ranked]], n: int) -> Ranked:
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


class Tagger:
    def __init__(self, registry: ModelRegistry, redis, metrics: ServiceMetrics, keys: Keys):
        """`redis`: an asyncio client of mvke.runtime.redis_client (one node or a cluster)."""
        self.registry, self.redis, self.metrics, self.keys = registry, redis, metrics, keys
        settings = getattr(registry, "settings", None)
        # Batches of at least this size run in a worker thread (the loop keeps reading requests while
        # ONNX Runtime and numpy, which release the GIL, work); 0: always on the loop (the default).
        self.offload_min_batch = getattr(settings, "compute_offload_min_batch", 0) or (1 << 62)
        limit_blas_threads(getattr(settings, "blas_threads", 1))
        limit_faiss_threads(getattr(settings, "blas_threads", 1))    # FAISS's OpenMP + OpenBLAS (candidate search)
        step = metrics.step
        self._steps = {name: step.labels(name) for name in ("fetch", "encode", "tower", "score", "rank")}
        self._batch_size = metrics.batch_size
        self._shed_redis = metrics.shed.labels("redis")
        self._per_version: dict[str, Any] = {}
        # Redis Cluster: one pipeline per master, a dead master failing only its users (cluster_fetch.py)
        self.cluster_reader = (ClusterHashReader(redis, getattr(settings, "redis_pool_size", 64),
                                                 getattr(settings, "redis_pool_wait_s", 0.2))
                               if is_cluster(redis) else None)

    def model(self) -> LoadedModel:
        m = self.registry.current
        if m is None:
            raise unavailable(self.registry.last_error or "no model loaded")
        return m

    async def process(self, jobs: list[TagJob]) -> list[TagResult | ServiceError]:
        """Results aligned with `jobs`; per-job errors are returned, not raised.

        Jobs routed to another version (canary, pinned) are computed per version, after one
        feature fetch for all of them."""
        try:
            model = self.model()
        except ServiceError as e:
            return [e] * len(jobs)
        for job in jobs:
            if job.model is not None and job.model is not model:
                return await self._process_versions(jobs, model)
        return await self._process_one(jobs, model)

    async def _process_versions(self, jobs: list[TagJob], active: LoadedModel) -> list[TagResult | ServiceError]:
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(id(job.model or active), []).append(i)
        try:
            rows = await self._fetch(jobs)
        except REDIS_ERRORS as e:
            self._shed_redis.inc()
            return [unavailable(f"feature store unavailable: {describe_error(e)}")] * len(jobs)
        results: list = [None] * len(jobs)
        for idx in groups.values():
            part = await self._process_one([jobs[i] for i in idx], jobs[idx[0]].model or active,
                                           [rows[i] for i in idx])
            for i, res in zip(idx, part):
                results[i] = res
        return results

    async def _process_one(self, jobs: list[TagJob], model: LoadedModel,
                           rows: list | None = None) -> list[TagResult | ServiceError]:
        self._batch_size.observe(len(jobs))
        if rows is None:
            try:
                rows = await self._fetch(jobs)
            except REDIS_ERRORS as e:
                self._shed_redis.inc()
                return [unavailable(f"feature store unavailable: {describe_error(e)}")] * len(jobs)
        results: list[TagResult | ServiceError | None] = [None] * len(jobs)
        ready = []
        for i, (job, stored) in enumerate(zip(jobs, rows)):
            if isinstance(stored, BaseException):   # this user's cluster node failed; the others' did not
                self._shed_redis.inc()
                results[i] = unavailable(f"feature store unavailable: {describe_error(stored)}")
                continue
            if not job.features:
                if not stored:
                    results[i] = ServiceError(404, f"user {job.user_id!r} is not in the feature store; "
                                                   "send its raw values in `features`", field="user_id")
                    continue
                job.row, job.source = stored, "store"
            else:
                job.row = {**stored, **job.features}
                job.source = "store+request" if stored else "request"
            ready.append(i)
        if ready:
            todo = jobs if len(ready) == len(jobs) else [jobs[i] for i in ready]
            if len(todo) >= self.offload_min_batch:
                computed = await asyncio.to_thread(self.compute, model, todo)
            else:
                computed = self.compute(model, todo)
            answered = 0
            for i, res in zip(ready, computed):
                results[i] = res
                answered += type(res) is TagResult
            self._answered(model.version).inc(answered)
        return results  # type: ignore[return-value]

    def _answered(self, version: str):
        child = self._per_version.get(version)
        if child is None:
            child = self._per_version[version] = self.metrics.version_requests.labels(version)
        return child

    async def _fetch(self, jobs: list[TagJob]) -> list[dict[str, str] | BaseException]:
        t0 = time.perf_counter()
        user_key = self.keys.user
        if self.cluster_reader is not None:
            ids = list(dict.fromkeys(j.user_id for j in jobs))
            values = await self.cluster_reader.hgetall_many([user_key(u) for u in ids])
            by_id = dict(zip(ids, values))
            rows = [by_id[j.user_id] for j in jobs]
        elif len(jobs) == 1:
            rows = [await self.redis.hgetall(user_key(jobs[0].user_id))]
        else:
            ids = list(dict.fromkeys(j.user_id for j in jobs))
            async with self.redis.pipeline(transaction=False) as pipe:
                for uid in ids:
                    pipe.hgetall(user_key(uid))
                values = await pipe.execute()
            if len(ids) == len(jobs):
                rows = values
            else:
                by_id = dict(zip(ids, values))
                rows = [by_id[j.user_id] for j in jobs]
        self._steps["fetch"].observe(time.perf_counter() - t0)
        return rows

    def compute(self, model: LoadedModel, jobs: list[TagJob]) -> list[TagResult | ServiceError]:
        """encode -> tower -> score -> rank for jobs whose rows are set; per-job errors are returned."""
        steps = self._steps
        out: list[TagResult | ServiceError | None] = [None] * len(jobs)
        t0 = time.perf_counter()
        keep, cat, multi = self.encode(model, jobs, out)
        if not keep:
            return out  # type: ignore[return-value]
        kept = jobs if len(keep) == len(jobs) else [jobs[i] for i in keep]
        t1 = time.perf_counter()
        steps["encode"].observe(t1 - t0)
        values = None
        if model.topk_session is not None and not any(job.candidates is not None or job.explain for job in kept):
            # tower + scores + TopK in one ONNX call (contract.TOWER_TOPK_FILE), timed as "tower";
            # candidate scoring and explanations need the expert outputs: they take the two calls
            ranked = model.rank_fused(cat, multi, *self.asked(model, kept))
            t3 = time.perf_counter()
            steps["tower"].observe(t3 - t1)
            full, every, full_jobs = range(len(kept)), True, kept
        else:
            values = model.run_tower(cat, multi)                                 # [B, sum K, D]
            t2 = time.perf_counter()
            steps["tower"].observe(t2 - t1)
            # Jobs with candidate tags are scored on their candidates only (rank_candidates), the
            # others on the whole catalogue, one GEMM pair for all of them.
            full = [row for row, job in enumerate(kept) if job.candidates is None]
            every = len(full) == len(kept)
            full_jobs = kept if every else [kept[row] for row in full]
            ranked = self.score(model, full_jobs, values if every else values[full]) if full else {}
            t3 = time.perf_counter()
            steps["score"].observe(t3 - t2)
        for row, result in zip(full, self.rank(model, full_jobs, ranked)):
            out[keep[row]] = result
        if not every:
            version, model_name = model.version, model.manifest.model
            for row, job in enumerate(kept):
                if job.candidates is not None:
                    out[keep[row]] = TagResult(job.user_id, version, model_name, job.source,
                                               rank_candidates(model, values[row], job))
        for row, job in enumerate(kept):
            if job.explain or job.unknown_values or job.unknown_tags is not None:
                res = out[keep[row]]
                if job.explain:
                    res.explanations = explain_ranked(model, values[row], res.tasks)
                res.unknown_values, res.unknown_tags = job.unknown_values, job.unknown_tags
        steps["rank"].observe(time.perf_counter() - t3)
        return out  # type: ignore[return-value]

    @staticmethod
    def encode(model: LoadedModel, jobs: list[TagJob], out: list) -> tuple[list[int], np.ndarray, np.ndarray]:
        """-> (indices of the jobs that encoded, cat ids, multi ids); a bad feature value is a 422 in `out`."""
        enc = model.schema.encode([j.row for j in jobs])
        if not enc.errors:
            return list(range(len(jobs))), enc.cat_ids, enc.multi_ids
        for i, e in enc.errors.items():
            out[i] = ServiceError(422, f"features.{e.field}: {e.reason}", field=f"features.{e.field}")
        keep = [i for i in range(len(jobs)) if i not in enc.errors]
        return keep, enc.cat_ids[keep], enc.multi_ids[keep]

    @staticmethod
    def asked(model: LoadedModel, jobs: list[TagJob]) -> tuple[dict[str, int], list[list[int]] | None]:
        """The largest k asked per task, and per job the tag indices it excludes (None: none anywhere)."""
        k: dict[str, int] = {}
        for job in jobs:
            for task in job.tasks:
                if job.top_k > k.get(task, 0):
                    k[task] = job.top_k
        exclude = None
        if any(job.exclude for job in jobs):
            index = model.tag_index
            exclude = [[index[t] for t in job.exclude if t in index] for job in jobs]
        return k, exclude

    @classmethod
    def score(cls, model: LoadedModel, jobs: list[TagJob], values: np.ndarray) -> dict[str, Ranked]:
        """Every task some job asks for, scored for the whole batch (one GEMM pair, or the candidates of
        a large catalogue's index), top k at the largest k asked. Jobs asking `exact` on a model served
        approximately are ranked over every tag, as a second call on their rows."""
        k, exclude = cls.asked(model, jobs)
        exact_rows = [i for i, job in enumerate(jobs) if job.exact] if model.approximate else []
        if not exact_rows or len(exact_rows) == len(jobs):
            return rank(values, model.sides.values(), k, exclude, approximate=not exact_rows)
        approx_rows = [i for i, job in enumerate(jobs) if not job.exact]
        parts = [(rows, rank(values[rows], model.sides.values(), k,
                             [exclude[i] for i in rows] if exclude else None, approximate=rows is approx_rows))
                 for rows in (approx_rows, exact_rows)]
        return {task: merge_rows([(rows, r[task]) for rows, r in parts], len(jobs)) for task in parts[0][1]}

    @staticmethod
    def rank(model: LoadedModel, jobs: list[TagJob], ranked: dict[str, Ranked]) -> list[TagResult]:
        """Each job's own answer: its tasks, its top k of the batch's ranking, excluded and weak tags dropped."""
        tops = {task: (r.tag_index.tolist(), r.scores.tolist(), None if r.kept is None else r.kept.tolist())
                for task, r in ranked.items()}
        tags, version, model_name = model.tags, model.version, model.manifest.model
        tag_of = tags.__getitem__
        results = []
        for row, job in enumerate(jobs):
            answer = {}
            for task in job.tasks:
                idx_rows, prob_rows, kept = tops[task]
                ii, pp = idx_rows[row][:job.top_k], prob_rows[row][:job.top_k]
                if kept is not None or job.min_score is not None:
                    ok = kept[row] if kept is not None else None
                    lo = job.min_score
                    answer[task] = [(tags[t], p) for n, (t, p) in enumerate(zip(ii, pp))
                                    if (ok is None or ok[n]) and (lo is None or p >= lo)]
                else:
                    answer[task] = list(zip(map(tag_of, ii), pp))
            results.append(TagResult(job.user_id, version, model_name, job.source, answer))
        return results


def rank_candidates(model: LoadedModel, values: np.ndarray, job: TagJob) -> dict[str, list[tuple[str, float]]]:
    """Candidate scoring for one user: exact scores of `job.candidates` per task, ranked,
    without the excluded tags, at least `min_score`, the best `top_k`.

    values [sum K, D]: the user's expert outputs of every task."""
    tags = model.tags
    excluded = {model.tag_index[t] for t in job.exclude if t in model.tag_index}
    cand = job.candidates if not excluded else np.array([i for i in job.candidates if i not in excluded],
                                                          dtype=np.int64)
    ranked = {}
    for task in job.tasks:
        side = model.sides[task]
        if not len(cand):
            ranked[task] = []
            continue
        logits = task_cosines_at(values[side.slice[0]:side.slice[1]], side, cand) * side.scale + side.bias
        order = np.argsort(-logits, kind="stable")[:job.top_k]
        probs = sigmoid(logits[order]).tolist()
        lo = job.min_score
        ranked[task] = [(tags[t], p) for t, p in zip(cand[order].tolist(), probs) if lo is None or p >= lo]
    return ranked


def explain_ranked(model: LoadedModel, values: np.ndarray, ranked: dict[str, list[tuple[str, float]]]
                   ) -> dict[str, list[dict]]:
    """Per task, for each returned tag: gate weights over the task's experts and each expert's
    part of the score (mvke.runtime.scoring.explain_tags). values [sum K, D]: one user's."""
    out = {}
    for task, items in ranked.items():
        side = model.sides[task]
        if not items:
            out[task] = []
            continue
        idx = np.array([model.tag_index[t] for t, _ in items], dtype=np.int64)
        gates, parts, cos = explain_tags(values[side.slice[0]:side.slice[1]], side, idx)
        shares = parts / np.where(np.abs(cos) > 1e-12, cos, 1e-12)[:, None]
        experts = _experts(model, task)
        out[task] = [{"experts": experts, "gates": g, "contributions": c, "shares": sh, "cosine": cs,
                      "scale": side.scale, "bias": side.bias}
                     for g, c, sh, cs in zip(gates.tolist(), parts.tolist(), shares.tolist(), cos.tolist())]
    return out


def _experts(model: LoadedModel, task: str) -> list[int]:
    for spec in model.manifest.tasks:
        if spec.name == task:
            return list(spec.experts)
    raise KeyError(task)
