"""What a tagging request needs, shared by the FastAPI route (service/app.py) and the fast path
(service/middleware.py): the service's state, request validation against the loaded model, and
the JSON rendering of answers and errors. Both import it; it imports neither.
"""
from __future__ import annotations

import orjson
from fastapi.responses import Response

from mvke.runtime.keys import Keys
from mvke.runtime.redis_client import connect, connect_async, resolve
from service.batcher import DynamicBatcher
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from service.schemas import TagRequest
from service.settings import Settings
from service.tagger import ServiceError, TagJob, TagResult, Tagger


def json_response(doc, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def error_response(e: ServiceError) -> Response:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return json_response({"detail": e.message, "field": e.field}, e.status, headers)


def render(result: TagResult) -> dict:
    return {"user_id": result.user_id, "model_version": result.model_version, "model": result.model,
            "feature_source": result.feature_source,
            "tasks": {t: [{"tag": tag, "score": s} for tag, s in ranked] for t, ranked in result.tasks.items()}}


class ServiceState:
    """Everything the routes need, created in the lifespan."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.keys = Keys(settings.key_prefix)
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
        self.registry = ModelRegistry(settings, self.redis_models, self.metrics)
        self.tagger = Tagger(self.registry, self.redis, self.metrics, self.keys)
        self.batcher = DynamicBatcher(self.tagger, self.metrics, settings.max_batch_size, settings.max_wait_ms,
                                      settings.max_queue, settings.request_timeout_s) if settings.batching else None

    async def start(self) -> None:
        await self.registry.start()
        if self.batcher:
            await self.batcher.start()

    async def stop(self) -> None:
        if self.batcher:
            await self.batcher.stop()
        await self.registry.stop()
        if self.tagger.cluster_reader is not None:
            await self.tagger.cluster_reader.aclose()
        await self.redis.aclose()
        self.redis_models.close()

    async def tag(self, job: TagJob) -> TagResult:
        if self.batcher:
            return await self.batcher.submit(job)
        (result,) = await self.tagger.process([job])
        if isinstance(result, ServiceError):
            raise result
        return result


def validate_request(state: ServiceState, user_id: str, req: TagRequest) -> TagJob:
    s = state.settings
    model = state.tagger.model()  # 503 when no model is loaded
    top_k = req.top_k if req.top_k is not None else s.top_k_default
    if top_k > s.top_k_max:
        raise ServiceError(422, f"top_k: must be <= {s.top_k_max}, got {top_k}", field="top_k")
    tasks = req.tasks or model.manifest.task_names
    for t in tasks:
        if t not in model.sides:
            raise ServiceError(422, f"tasks: unknown task {t!r}; this model has {model.manifest.task_names}",
                               field="tasks")
    for t in req.exclude_tags:
        if t not in model.tag_index:
            raise ServiceError(422, f"exclude_tags: unknown tag {t!r}", field="exclude_tags")
    if req.features:
        names = set(model.schema.names)
        for name, value in req.features.items():
            if name not in names:
                raise ServiceError(422, f"features.{name}: unknown feature (known: {sorted(names)})",
                                   field=f"features.{name}")
            kind = model.schema.fields[model.schema.names.index(name)].kind
            if kind == "cat" and isinstance(value, list):
                raise ServiceError(422, f"features.{name}: expected one value, got a list", field=f"features.{name}")
    return TagJob(user_id, req.features, top_k, list(dict.fromkeys(tasks)), req.min_score, req.exclude_tags)
