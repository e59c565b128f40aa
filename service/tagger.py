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
from model_export.scoring import task_scores, top_k
from mvke.features import FeatureError
from service.metrics import ServiceMetrics
from service.model_loader import LoadedModel
from service.registry import ModelRegistry


class ServiceError(Exception):
    """An error with its HTTP status; `field` names the offending input for 4xx."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.retry_after = status, message, field, retry_after


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


class Tagger:
    def __init__(self, registry: ModelRegistry, redis: aioredis.Redis, metrics: ServiceMetrics, keys: Keys):
        self.registry, self.redis, self.metrics, self.keys = registry, redis, metrics, keys

    def model(self) -> LoadedModel:
        m = self.registry.current
        if m is None:
            raise unavailable(self.registry.last_error or "no model loaded")
        return m

    async def process(self, jobs: list[TagJob]) -> list[TagResult | ServiceError]:
        """Results aligned with `jobs`; per-job errors are returned, not raised."""
        try:
            model = self.model()
        except ServiceError as e:
            return [e] * len(jobs)
        self.metrics.batch_size.observe(len(jobs))
        try:
            rows = await self._fetch(jobs)
        except RedisError as e:
            self.metrics.shed.labels("redis").inc()
            return [unavailable(f"feature store unavailable: {type(e).__name__}: {e}")] * len(jobs)
        results: list[TagResult | ServiceError | None] = [None] * len(jobs)
        ready = []
        for i, (job, stored) in enumerate(zip(jobs, rows)):
            if not stored and not job.features:
                results[i] = ServiceError(404, f"user {job.user_id!r} is not in the feature store; "
                                               "send its raw values in `features`", field="user_id")
                continue
            job.row = {**stored, **(job.features or {})}
            job.source = "store+request" if stored and job.features else ("store" if stored else "request")
            ready.append(i)
        if ready:
            computed = await asyncio.to_thread(self._compute, model, [jobs[i] for i in ready])
            for i, res in zip(ready, computed):
                results[i] = res
        return results  # type: ignore[return-value]

    async def _fetch(self, jobs: list[TagJob]) -> list[dict[str, str]]:
        t0 = time.perf_counter()
        ids = list(dict.fromkeys(j.user_id for j in jobs))
        async with self.redis.pipeline(transaction=False) as pipe:
            for uid in ids:
                pipe.hgetall(self.keys.user(uid))
            values = await pipe.execute()
        by_id = dict(zip(ids, values))
        self.metrics.step.labels("fetch").observe(time.perf_counter() - t0)
        return [by_id[j.user_id] for j in jobs]

    def _compute(self, model: LoadedModel, jobs: list[TagJob]) -> list[TagResult | ServiceError]:
        step = self.metrics.step
        t0 = time.perf_counter()
        out: list[TagResult | ServiceError | None] = [None] * len(jobs)
        rows, keep = [], []
        for i, job in enumerate(jobs):
            try:
                rows.append(model.schema.encode_rows([job.row]))
                keep.append(i)
            except FeatureError as e:
                out[i] = ServiceError(422, f"features.{e.field}: {e.reason}", field=f"features.{e.field}")
        if not keep:
            return out  # type: ignore[return-value]
        cat = np.concatenate([r[0] for r in rows])
        multi = np.concatenate([r[1] for r in rows])
        t1 = time.perf_counter()
        step.labels("encode").observe(t1 - t0)
        values = model.run_tower(cat, multi)                                     # [B, sum K, D]
        t2 = time.perf_counter()
        step.labels("tower").observe(t2 - t1)
        wanted = {t for i in keep for t in jobs[i].tasks}
        scores = {}
        for spec in model.manifest.tasks:
            if spec.name in wanted:
                scores[spec.name] = task_scores(values[:, spec.slice[0]:spec.slice[1]], model.sides[spec.name])
        t3 = time.perf_counter()
        step.labels("score").observe(t3 - t2)
        for row, i in enumerate(keep):
            job = jobs[i]
            mask = None
            if job.exclude:
                mask = np.zeros(len(model.tags), dtype=bool)
                mask[[model.tag_index[t] for t in job.exclude if t in model.tag_index]] = True
            ranked = {}
            for task in job.tasks:
                best = top_k(scores[task][row:row + 1], job.top_k, mask, job.min_score)[0]
                ranked[task] = [(model.tags[t], s) for t, s in best]
            out[i] = TagResult(job.user_id, model.version, model.manifest.model, job.source, ranked)
        step.labels("rank").observe(time.perf_counter() - t3)
        return out  # type: ignore[return-value]
