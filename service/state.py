"""What a tagging request needs, shared by the FastAPI routes (service/app.py) and the fast path
(service/middleware.py): the service's state, request validation against the version that will
answer (routing: active, canary or pinned), and the JSON rendering of answers and errors. Both
import it; it imports neither.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import orjson
from fastapi.responses import Response

from mvke.runtime.feature_values import value_problem
from mvke.runtime.features import FeatureSchema
from mvke.runtime.keys import Keys
from mvke.runtime.model import LoadedModel, Query
from mvke.runtime.redis_client import connect, connect_async, resolve
from mvke.runtime.system import limit_threads
from service.auth import ApiKeys
from service.batcher import DynamicBatcher
from service.busy_board import BusyBoard
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry, RoutingError
from service.schemas import TagRequest
from service.settings import Settings
from service.shadow import LiveRecorder
from service.tagger import ServiceError, TagJob, TagResult, Tagger, unavailable


def json_response(doc, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def error_doc(e: ServiceError) -> dict:
    doc = {"detail": e.message, "field": e.field}
    if e.status == 422:  # every 422 has the same shape as pydantic's: one entry per problem
        loc = ["path", "user_id"] if e.field == "user_id" else ["body", *(e.field or "").split(".")]
        doc["errors"] = e.errors or [{"loc": [p for p in loc if p], "type": "value_error",
                                      "msg": e.message.split(": ", 1)[-1]}]
    return doc


def error_response(e: ServiceError) -> Response:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return json_response(error_doc(e), e.status, headers)


def render(result: TagResult) -> dict:
    """The answer for one user; keys beyond the first five appear only when asked for."""
    if result.explanations is None:
        tasks = {t: [{"tag": tag, "score": s} for tag, s in ranked] for t, ranked in result.tasks.items()}
    else:
        ex = result.explanations
        tasks = {t: [{"tag": tag, "score": s, "explain": e} for (tag, s), e in zip(ranked, ex[t])]
                 for t, ranked in result.tasks.items()}
    doc = {"user_id": result.user_id, "model_version": result.model_version, "model": result.model_name,
           "feature_source": result.feature_source, "tasks": tasks}
    if result.unknown_values:
        doc["unknown_values"] = result.unknown_values
    if result.unknown_tags is not None:
        doc["unknown_tags"] = result.unknown_tags
    if result.missing_fields:
        doc["missing_fields"] = result.missing_fields
    if result.feature_age_s is not None:
        doc["feature_age_s"] = round(result.feature_age_s, 3)
    if result.stale is not None:
        doc["stale"] = result.stale
    return doc


class ServiceState:
    """Everything the routes need, created in the lifespan."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.keys = Keys(settings.key_prefix)
        self.api_keys = ApiKeys(settings.api_keys, settings.api_keys_file, settings.metrics_need_key)
        common = dict(socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s)
        # One node or a Redis Cluster (redis+cluster:// or MVKE_REDIS_CLUSTER), AUTH and TLS from the URL.
        self.redis_target = resolve(settings.redis_url, settings.redis_cluster)
        # One node: a blocking pool waits up to redis_pool_wait_s for a connection, then fails with a
        # RedisError (503); redis-py's default pool would raise at once. A cluster: redis_pool_size
        # connections per master (the batched fetch: service/cluster_fetch.py).
        self.redis = connect_async(self.redis_target, pool_size=settings.redis_pool_size,
                                   pool_wait_s=settings.redis_pool_wait_s, decode_responses=True, **common)
        # model reads run in a worker thread (mvke.runtime.versions): a small synchronous client
        self.redis_models = connect(self.redis_target, max_connections=4, **common)
        # reading a version's files: one large reply (0.5 GB at 1M tags) that a busy Redis can take longer
        # than redis_timeout_s to send; a client of its own with a longer socket timeout
        self.redis_bundles = connect(self.redis_target, max_connections=2, socket_timeout=settings.model_read_timeout_s,
                                     socket_connect_timeout=settings.redis_timeout_s)
        self.registry = ModelRegistry(settings, self.redis_models, self.metrics, self.redis_bundles)
        self.live = LiveRecorder(self.redis, self.keys, self.metrics, settings)
        self.tagger = Tagger(self.registry, self.redis, self.metrics, self.keys, settings, self.live)
        self.batcher = DynamicBatcher(self.tagger, self.metrics, settings.max_batch_size, settings.max_wait_ms,
                                      settings.max_queue, settings.request_timeout_s,
                                      settings.idle_bypass,
                                      BusyBoard.from_env() if settings.ort_idle_thread_count() > 1 else None,
                                      ) if settings.batching else None

    async def start(self) -> None:
        # this worker process's thread limits, once, before a model loads (numpy's scoring GEMMs, FAISS)
        limit_threads(self.settings.blas_threads)
        await self.registry.start()
        await self.live.start()
        if self.batcher:
            await self.batcher.start()

    async def stop(self) -> None:
        if self.batcher:
            await self.batcher.stop()
        await self.live.stop()
        await self.registry.stop()
        await self.tagger.hash_reader.aclose()
        await self.redis.aclose()
        self.redis_models.close()
        self.redis_bundles.close()

    async def tag(self, job: TagJob) -> TagResult:
        if self.batcher:
            return await self.batcher.submit(job)
        (result,) = await self.tagger.process([job])
        if isinstance(result, ServiceError):
            raise result
        return result

    async def tag_many(self, jobs: list[TagJob]) -> list[TagResult | ServiceError]:
        """Jobs that arrived together -> per job its result or its error (not raised)."""
        if self.batcher:
            return await self.batcher.submit_many(jobs)
        return await self.tagger.process(jobs)


def validate_request(state: ServiceState, user_id: str, req: TagRequest) -> TagJob:
    """Check a request against the version that will answer it -> TagJob (else ServiceError naming the field)."""
    s = state.settings
    try:
        model = state.registry.route(user_id, getattr(req, "model_version", None))
    except RoutingError as e:
        raise ServiceError(e.status, e.message, field="model_version") from None
    if model is None:
        raise unavailable(state.registry.last_error or "no model loaded")
    top_k = req.top_k if req.top_k is not None else s.top_k_default
    if top_k > s.top_k_max:
        raise ServiceError(422, f"top_k: must be <= {s.top_k_max}, got {top_k}", field="top_k")
    tasks = req.tasks or model.manifest.task_names
    for t in tasks:
        if t not in model.sides:
            raise ServiceError(422, f"tasks: unknown task {t!r}; this model has {model.manifest.task_names}",
                               field="tasks")
    index = model.tag_index
    for t in req.exclude_tags:
        if t not in index:
            raise ServiceError(422, f"exclude_tags: unknown tag {t!r}", field="exclude_tags")
    unknown_values = None if req.features is None else check_features(model.schema, req.features)
    query = Query(tuple(dict.fromkeys(tasks)), top_k, tuple(index[t] for t in req.exclude_tags), req.min_score,
                  req.exact, explain=getattr(req, "explain", False))
    job = TagJob(user_id, req.features, query, model=model, unknown_values=unknown_values)
    candidates = getattr(req, "tags", None)
    if candidates is not None:
        _candidates(job, model, candidates, req.ignore_unknown, req.top_k, s.max_candidate_tags)
    return job


def check_features(schema: FeatureSchema, features: dict) -> dict[str, int] | None:
    """Request features against the model's schema (ServiceError naming the field) -> the unknown values."""
    if not features:
        raise ServiceError(422, f"features: empty; send the user's raw values (the model's fields: {schema.names}), "
                                "or leave `features` out to use the stored ones", field="features")
    for name, value in features.items():
        if name not in schema.position:
            raise ServiceError(422, f"features.{name}: unknown feature (known: {sorted(schema.names)})",
                               field=f"features.{name}")
        problem = value_problem(schema.fields[schema.position[name]].kind, value)   # feature_values.py
        if problem:
            raise ServiceError(422, f"features.{name}: {problem}", field=f"features.{name}")
    return unknown_value_counts(schema, features) or None


def unknown_value_counts(schema: FeatureSchema, features: dict) -> dict[str, int]:
    """Per request feature (values already checked by `value_problem`), how many of the values the model
    will read are not in its vocabulary (they become the out-of-vocabulary id); a multi field's first
    max_len values count."""
    counts = {}
    for name, value in features.items():
        pos = schema.position[name]
        f, known = schema.fields[pos], schema.value_ids[pos]
        if value is None:
            continue
        values = value[:f.max_len] if f.kind == "multi" else [value]
        n = sum(1 for x in values if str(x) not in known)
        if n:
            counts[name] = n
    return counts


def _candidates(job: TagJob, model: LoadedModel, tags: list[str], ignore_unknown: bool, top_k: int | None,
                limit: int) -> None:
    """Candidate scoring: the tags' indices on the job (unknown ones: 422, or listed with ignore_unknown)."""
    if len(tags) > limit:
        raise ServiceError(422, f"tags: at most {limit} candidate tags per request, got {len(tags)}", field="tags")
    index = model.tag_index
    known = [index[t] for t in dict.fromkeys(tags) if t in index]
    unknown = [t for t in dict.fromkeys(tags) if t not in index]
    if unknown and not ignore_unknown:
        shown = ", ".join(repr(t) for t in unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise ServiceError(422, f"tags: {len(unknown)} unknown to model {model.version}: {shown} "
                                "(send ignore_unknown: true to score the others)", field="tags",
                           errors=[{"loc": ["body", "tags"], "type": "unknown_tag", "msg": f"unknown tag {t!r}"}
                                   for t in unknown[:100]])
    job.query = replace(job.query, candidates=np.array(known, dtype=np.int64),
                        top_k=top_k if top_k is not None else max(1, len(known)))
    if ignore_unknown:
        job.unknown_tags = unknown
