"""The hot path: fetch features -> encode -> predict -> postprocess.

Requests become `TagJob`s. `Tagger.process` handles a list of jobs at once (one job when batching
is off, many when the batcher coalesced them): one Redis round trip for all their feature hashes
(fetch), then `compute`, in KServe's pre / predict / post shape, each step timed in
`mvke_step_seconds`: `encode` (the predictor's preprocessing: raw values -> ids; a bad value is
that job's 422), `predict` (one `LoadedModel.predict` call for the batch: it alone chooses how to
rank, mvke/runtime/model.py) and `postprocess` (each job's answer: tag names, version, flags).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from mvke.runtime.events import feature_age_s
from mvke.runtime.keys import Keys
from mvke.runtime.model import Answer, LoadedModel, Query
from mvke.runtime.redis_client import REDIS_ERRORS, describe_error, is_cluster, resolve
from service.cluster_fetch import ClusterHashReader
from service.node_fetch import NodeHashReader, PipelineHashReader
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from service.settings import Settings
from service.shadow import LiveRecorder


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
    query: Query
    future: asyncio.Future | None = None
    model: LoadedModel | None = None          # the routed version (None: the active one)
    unknown_values: dict[str, int] | None = None
    unknown_tags: list[str] | None = None
    # filled by the pipeline
    missing_fields: list[str] | None = None
    feature_age_s: float | None = None        # in the answer only with MVKE_FEATURE_AGE_IN_ANSWERS / MAX_FEATURE_AGE_S
    stale: bool | None = None
    row: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass
class TagResult:
    user_id: str
    model_version: str
    model_name: str                  # the registry name (mvke-mt, ...); the version's LoadedModel is TagJob.model
    feature_source: str
    tasks: dict[str, list[tuple[str, float]]]
    explanations: dict[str, list[dict]] | None = None   # per task, aligned with `tasks` (explain: true)
    unknown_values: dict[str, int] | None = None
    unknown_tags: list[str] | None = None
    missing_fields: list[str] | None = None             # model fields the user's features lacked
    feature_age_s: float | None = None                  # seconds since the stored features were brought up to date
    stale: bool | None = None                           # older than MVKE_MAX_FEATURE_AGE_S


class Tagger:
    def __init__(self, registry: ModelRegistry, redis, metrics: ServiceMetrics, keys: Keys, settings: Settings,
                 live: LiveRecorder | None = None):
        """`redis`: an asyncio client of mvke.runtime.redis_client (one node or a cluster); `live`: where
        answers / errors per version are counted and the canary's shadow sampled (service/shadow.py)."""
        self.registry, self.redis, self.metrics, self.keys = registry, redis, metrics, keys
        self.live = live
        # Batches of at least this size run in a worker thread (the loop keeps reading requests while
        # ONNX Runtime and numpy, which release the GIL, work); 0: always on the loop (the default).
        self.offload_min_batch = settings.compute_offload_min_batch or (1 << 62)
        self.reject_missing = settings.missing_fields == "reject"
        self.max_age = settings.max_feature_age_s
        self.age_in_answers = settings.feature_age_in_answers or self.max_age is not None
        self._feature_age = metrics.feature_age
        step = metrics.step
        self._steps = {name: step.labels(name) for name in STEPS}
        self._batch_size = metrics.batch_size
        self._shed_redis = metrics.shed.labels("redis")
        self._per_version: dict[str, Any] = {}
        self.hash_reader = feature_reader(redis, settings)

    def model(self) -> LoadedModel:
        m = self.registry.current
        if m is None:
            raise unavailable(self.registry.last_error or "no model loaded")
        return m

    async def process(self, jobs: list[TagJob], idle: bool = False) -> list[TagResult | ServiceError]:
        """Results aligned with `jobs`; per-job errors are returned, not raised.

        Jobs routed to another version (canary, pinned) are computed per version, after one
        feature fetch for all of them. idle: nothing else waits on this worker (the batcher's idle
        bypass; `LoadedModel.rank`)."""
        try:
            model = self.model()
        except ServiceError as e:
            return [e] * len(jobs)
        for job in jobs:
            if job.model is not None and job.model is not model:
                results = await self._process_versions(jobs, model, idle)
                break
        else:
            results = await self._process_one(jobs, model, idle=idle)
        if self.live is not None:
            self._record_live(jobs, results, model)
        return results

    def _record_live(self, jobs: list[TagJob], results: list, active: LoadedModel) -> None:
        """Answers and 5xx per version that served them; the active's answered rows offered to the shadow."""
        counts: dict[str, list[int]] = {}
        shadow_rows = []
        for job, res in zip(jobs, results):
            model = job.model or active
            c = counts.setdefault(model.version, [0, 0])
            if type(res) is TagResult:
                c[0] += 1
                if model is active:
                    shadow_rows.append(job.row)
            elif res.status >= 500:
                c[1] += 1
        for version, (answers, errors) in counts.items():
            self.live.count(version, answers, errors)
        if shadow_rows:
            self.live.offer(active, self.registry.canary, shadow_rows)

    async def _process_versions(self, jobs: list[TagJob], active: LoadedModel,
                                idle: bool = False) -> list[TagResult | ServiceError]:
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
                                           [rows[i] for i in idx], idle)
            for i, res in zip(idx, part):
                results[i] = res
        return results

    async def _process_one(self, jobs: list[TagJob], model: LoadedModel,
                           rows: list | None = None, idle: bool = False) -> list[TagResult | ServiceError]:
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
            error = self._attach_row(model, job, stored)
            if error is None:
                ready.append(i)
            else:
                results[i] = error
        if ready:
            todo = jobs if len(ready) == len(jobs) else [jobs[i] for i in ready]
            if len(todo) >= self.offload_min_batch:
                computed = await asyncio.to_thread(self.compute, model, todo)
            else:
                computed = self.compute(model, todo, idle)
            answered = 0
            for i, res in zip(ready, computed):
                results[i] = res
                answered += type(res) is TagResult
            self._answered(model.version).inc(answered)
        return results  # type: ignore[return-value]

    def _attach_row(self, model: LoadedModel, job: TagJob, stored: dict | BaseException) -> ServiceError | None:
        """The job's feature row: stored values, overridden by the request's (or the error that is its answer)."""
        if isinstance(stored, BaseException):   # this user's cluster node failed; the others' did not
            self._shed_redis.inc()
            return unavailable(f"feature store unavailable: {describe_error(stored)}")
        if not job.features:
            if not stored:
                return ServiceError(404, f"user {job.user_id!r} is not in the feature store; "
                                         "send its raw values in `features`", field="user_id")
            job.row, job.source = stored, "store"
        else:
            job.row = {**stored, **job.features}
            job.source = "store+request" if stored else "request"
        if stored:
            self._age(job, stored)
        missing = self._missing_fields(model, job)
        if missing and self.reject_missing:
            return ServiceError(422, f"features: {job.source} values lack the model's fields {missing} "
                                     "(MVKE_MISSING_FIELDS=reject)", field="features")
        return None

    def _age(self, job: TagJob, stored: dict) -> None:
        """The stored features' age (mvke.runtime.events.feature_age_s): observed, and kept for the answer."""
        age = feature_age_s(stored)
        if age is None:
            return
        self._feature_age.observe(age)
        if self.age_in_answers:
            job.feature_age_s = age
            if self.max_age is not None:
                job.stale = age > self.max_age

    def _missing_fields(self, model: LoadedModel, job: TagJob) -> list[str] | None:
        """The model's fields the job's row lacks (counted in /metrics), kept on the job for its answer."""
        row = job.row
        fields = model.schema.position
        if not fields.keys() - row.keys():     # the common case, in C: every field present
            return None
        missing = [name for name in model.schema.names if name not in row]
        if missing:
            job.missing_fields = missing
            counter = self.metrics.missing_fields
            for name in missing:
                counter.labels(name).inc()
        return missing or None

    def _answered(self, version: str):
        child = self._per_version.get(version)
        if child is None:
            child = self._per_version[version] = self.metrics.version_requests.labels(version)
        return child

    async def _fetch(self, jobs: list[TagJob]) -> list[dict[str, str] | BaseException]:
        t0 = time.perf_counter()
        user_key = self.keys.user
        ids = list(dict.fromkeys(j.user_id for j in jobs))
        values = await self.hash_reader.hgetall_many([user_key(u) for u in ids])
        if len(ids) == len(jobs):
            rows = values
        else:
            by_id = dict(zip(ids, values))
            rows = [by_id[j.user_id] for j in jobs]
        self._steps["fetch"].observe(time.perf_counter() - t0)
        return rows

    def compute(self, model: LoadedModel, jobs: list[TagJob], idle: bool = False) -> list[TagResult | ServiceError]:
        """encode -> predict -> postprocess for jobs whose rows are set; per-job errors are returned."""
        steps = self._steps
        out: list[TagResult | ServiceError | None] = [None] * len(jobs)
        t0 = time.perf_counter()
        users = model.encode([j.row for j in jobs])
        keep = list(range(len(jobs)))
        if users.errors:   # a bad feature value is that job's 422; the others go on
            for i, e in users.errors.items():
                out[i] = ServiceError(422, f"features.{e.field}: {e.reason}", field=f"features.{e.field}")
            keep = [i for i in keep if i not in users.errors]
            if not keep:
                return out  # type: ignore[return-value]
            users = users.take(keep)
        t1 = time.perf_counter()
        steps["encode"].observe(t1 - t0)
        answers = model.predict(users, [jobs[i].query for i in keep], idle)
        t2 = time.perf_counter()
        steps["predict"].observe(t2 - t1)
        for i, answer in zip(keep, answers):
            out[i] = self.postprocess(model, jobs[i], answer)
        steps["postprocess"].observe(time.perf_counter() - t2)
        return out  # type: ignore[return-value]

    @staticmethod
    def postprocess(model: LoadedModel, job: TagJob, answer: Answer) -> TagResult:
        """The job's answer: tag names instead of indices, the version, and the flags it asked for."""
        tag_of = model.tags.__getitem__
        return TagResult(job.user_id, model.version, model.manifest.model, job.source,
                         {task: list(zip(map(tag_of, idx), scores)) for task, (idx, scores) in answer.tasks.items()},
                         answer.explanations, job.unknown_values, job.unknown_tags, job.missing_fields,
                         job.feature_age_s, job.stale)


STEPS = ("fetch", "encode", "predict", "postprocess")


def feature_reader(redis, settings: Settings):
    """The reader of the users' feature hashes: a Redis Cluster's one pipeline per master (a dead master
    failing only its users: cluster_fetch.py), one node's lean RESP reader (node_fetch.py), or redis-py's
    pipeline where that reader does not speak the URL (TLS)."""
    if is_cluster(redis):
        return ClusterHashReader(redis, settings.redis_pool_size, settings.redis_pool_wait_s)
    url = resolve(settings.redis_url, settings.redis_cluster).url
    if redis is not None and NodeHashReader.supports(url):
        return NodeHashReader(url, settings.redis_timeout_s, settings.redis_pool_size, settings.redis_pool_wait_s)
    return PipelineHashReader(redis)
