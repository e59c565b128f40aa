"""The hot path: fetch features -> encode -> run tower -> score -> rank.

Requests become `TagJob`s. `Tagger.process` handles a list of jobs at once (one
job when batching is off, many when the batcher coalesced them): one Redis
round trip for all their feature hashes, one ONNX call, one scoring GEMM per
task, then a top-k per job. Each step is timed in `mvke_step_seconds`.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from model_export.contract import Keys
from model_export.scoring import (explain_tags, sigmoid, task_cosines, task_cosines_at, task_logits,
                                  top_k_logits)
from mvke.features import FeatureError
from service.metrics import ServiceMetrics
from service.model_loader import LoadedModel, limit_blas_threads
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


class Tagger:
    def __init__(self, registry: ModelRegistry, redis: aioredis.Redis, metrics: ServiceMetrics, keys: Keys):
        self.registry, self.redis, self.metrics, self.keys = registry, redis, metrics, keys
        settings = getattr(registry, "settings", None)
        # Batches of at least this size run in a worker thread (the loop keeps reading requests while
        # ONNX Runtime and numpy, which release the GIL, work); 0: always on the loop (the default).
        self.offload_min_batch = getattr(settings, "compute_offload_min_batch", 0) or (1 << 62)
        limit_blas_threads(getattr(settings, "blas_threads", 1))
        step = metrics.step
        self._steps = {name: step.labels(name) for name in ("fetch", "encode", "tower", "score", "rank")}
        self._batch_size = metrics.batch_size
        self._shed_redis = metrics.shed.labels("redis")
        self._per_version: dict[str, Any] = {}

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
        except RedisError as e:
            self._shed_redis.inc()
            return [unavailable(f"feature store unavailable: {type(e).__name__}: {e}")] * len(jobs)
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
            except RedisError as e:
                self._shed_redis.inc()
                return [unavailable(f"feature store unavailable: {type(e).__name__}: {e}")] * len(jobs)
        results: list[TagResult | ServiceError | None] = [None] * len(jobs)
        ready = []
        for i, (job, stored) in enumerate(zip(jobs, rows)):
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
                computed = await asyncio.to_thread(self._compute, model, todo)
            else:
                computed = self._compute(model, todo)
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

    async def _fetch(self, jobs: list[TagJob]) -> list[dict[str, str]]:
        t0 = time.perf_counter()
        user_key = self.keys.user
        if len(jobs) == 1:
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

    def _encode(self, model: LoadedModel, jobs: list[TagJob],
                out: list) -> tuple[list[int], np.ndarray | None, np.ndarray | None]:
        """-> (indices of the jobs that encoded, cat ids, multi ids); encoding errors go to `out`."""
        encoder = model.encoder
        accepts = encoder.accepts
        fast = [i for i, j in enumerate(jobs) if j.features is None or accepts(j.row)]
        if len(fast) == len(jobs):
            cat, multi = encoder.encode([j.row for j in jobs])
            return fast, cat, multi
        cats: list = [None] * len(jobs)
        multis: list = [None] * len(jobs)
        if fast:
            c, m = encoder.encode([jobs[i].row for i in fast])
            for pos, i in enumerate(fast):
                cats[i], multis[i] = c[pos:pos + 1], m[pos:pos + 1]
        for i, job in enumerate(jobs):
            if cats[i] is None:
                try:  # the reference encoder: any raw value, type errors naming the field
                    cats[i], multis[i] = model.schema.encode_rows([job.row])
                except FeatureError as e:
                    out[i] = ServiceError(422, f"features.{e.field}: {e.reason}", field=f"features.{e.field}")
        keep = [i for i in range(len(jobs)) if cats[i] is not None]
        if not keep:
            return keep, None, None
        return keep, np.concatenate([cats[i] for i in keep]), np.concatenate([multis[i] for i in keep])

    @staticmethod
    def _score_catalogue(model: LoadedModel, values: np.ndarray, jobs: list[TagJob]) -> dict[str, tuple]:
        """Per wanted task: (top tag indices, their probabilities, finite mask or None) per row."""
        T = len(model.tags)
        tops: dict[str, tuple[list, list, list | None]] = {}
        for spec in model.manifest.tasks:
            name = spec.name
            k = 0
            for job in jobs:
                if name in job.tasks and job.top_k > k:
                    k = job.top_k
            if not k:
                continue
            side = model.sides[name]
            # With a positive temperature the cosine ranks like the logit, so the scale and bias
            # are applied to the k kept values only (same arithmetic as task_logits, fewer passes).
            by_cos = side.scale > 0
            fn = task_cosines if by_cos else task_logits
            ranked_on = fn(values[:, spec.slice[0]:spec.slice[1]], side)                # [B, T]
            excluded = False
            for row, job in enumerate(jobs):
                if job.exclude and name in job.tasks:
                    ranked_on[row, [model.tag_index[t] for t in job.exclude if t in model.tag_index]] = -np.inf
                    excluded = True
            idx, best = top_k_logits(ranked_on, min(k, T))
            if by_cos:
                best *= side.scale
                best += side.bias
            finite = np.isfinite(best).tolist() if excluded else None
            tops[name] = (idx.tolist(), sigmoid(best).tolist(), finite)
        return tops

    def _compute(self, model: LoadedModel, jobs: list[TagJob]) -> list[TagResult | ServiceError]:
        steps = self._steps
        t0 = time.perf_counter()
        out: list[TagResult | ServiceError | None] = [None] * len(jobs)
        keep, cat, multi = self._encode(model, jobs, out)
        if not keep:
            return out  # type: ignore[return-value]
        kept = [jobs[i] for i in keep]
        t1 = time.perf_counter()
        steps["encode"].observe(t1 - t0)
        values = model.run_tower(cat, multi)                                     # [B, sum K, D]
        t2 = time.perf_counter()
        steps["tower"].observe(t2 - t1)
        # Every wanted task is scored for the whole batch (one GEMM pair), then each row keeps its
        # own top k: one argpartition over the batch at the largest k asked for that task.
        # Jobs with candidate tags are scored on their candidates only (`_rank_candidates`).
        full = [row for row, job in enumerate(kept) if job.candidates is None]
        full_values = values if len(full) == len(kept) else values[full]
        full_jobs = kept if len(full) == len(kept) else [kept[r] for r in full]
        tops = self._score_catalogue(model, full_values, full_jobs) if full else {}
        t3 = time.perf_counter()
        steps["score"].observe(t3 - t2)
        tags, version, model_name = model.tags, model.version, model.manifest.model
        tag_of = tags.__getitem__
        for pos, job in enumerate(full_jobs):
            ranked = {}
            for task in job.tasks:
                idx_rows, prob_rows, finite = tops[task]
                ii, pp = idx_rows[pos][:job.top_k], prob_rows[pos][:job.top_k]
                if finite is not None or job.min_score is not None:
                    ok = finite[pos] if finite is not None else None
                    lo = job.min_score
                    ranked[task] = [(tags[t], p) for n, (t, p) in enumerate(zip(ii, pp))
                                    if (ok is None or ok[n]) and (lo is None or p >= lo)]
                else:
                    ranked[task] = list(zip(map(tag_of, ii), pp))
            out[keep[full[pos]]] = TagResult(job.user_id, version, model_name, job.source, ranked)
        if len(full) < len(kept):
            for row, job in enumerate(kept):
                if job.candidates is not None:
                    out[keep[row]] = TagResult(job.user_id, version, model_name, job.source,
                                               rank_candidates(model, values[row], job))
        for row, job in enumerate(kept):
            res = out[keep[row]]
            if job.explain:
                res.explanations = explain_ranked(model, values[row], res.tasks)
            if job.unknown_values or job.unknown_tags is not None:
                res.unknown_values, res.unknown_tags = job.unknown_values, job.unknown_tags
        steps["rank"].observe(time.perf_counter() - t3)
        return out  # type: ignore[return-value]


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
        side, spec = model.sides[task], model.manifest.task(task)
        if not len(cand):
            ranked[task] = []
            continue
        logits = task_cosines_at(values[spec.slice[0]:spec.slice[1]], side, cand) * side.scale + side.bias
        order = np.argsort(-logits, kind="stable")[:job.top_k]
        probs = sigmoid(logits[order]).tolist()
        lo = job.min_score
        ranked[task] = [(tags[t], p) for t, p in zip(cand[order].tolist(), probs) if lo is None or p >= lo]
    return ranked


def explain_ranked(model: LoadedModel, values: np.ndarray, ranked: dict[str, list[tuple[str, float]]]
                   ) -> dict[str, list[dict]]:
    """Per task, for each returned tag: gate weights over the task's experts and each expert's
    part of the score (model_export.scoring.explain_tags). values [sum K, D]: one user's."""
    out = {}
    for task, items in ranked.items():
        spec, side = model.manifest.task(task), model.sides[task]
        if not items:
            out[task] = []
            continue
        idx = np.array([model.tag_index[t] for t, _ in items], dtype=np.int64)
        gates, parts, cos = explain_tags(values[spec.slice[0]:spec.slice[1]], side, idx)
        shares = parts / np.where(np.abs(cos) > 1e-12, cos, 1e-12)[:, None]
        out[task] = [{"experts": list(spec.experts), "gates": g, "contributions": c, "shares": sh, "cosine": cs,
                      "scale": side.scale, "bias": side.bias}
                     for g, c, sh, cs in zip(gates.tolist(), parts.tolist(), shares.tolist(), cos.tolist())]
    return out
