"""FastAPI app: POST /users/{user_id}/tags, health, readiness, metrics, model info.

Layout follows KServe's model server: the model is loaded (and hot-swapped) by
`ModelRegistry`; readiness is gated on a loaded model and a Redis that answers;
liveness does not depend on either. The request path is
fetch features -> encode -> run tower -> score -> rank (service/tagger.py).
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import orjson
import redis
import redis.asyncio as aioredis
from fastapi import Body, FastAPI, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mvke.runtime.keys import Keys
from service.batcher import DynamicBatcher
from service.logs import setup_logging
from service.metrics import ServiceMetrics
from service.middleware import EdgeMiddleware
from service.registry import ModelRegistry
from service.schemas import ErrorResponse, TagRequest, TagResponse
from service.settings import Settings
from service.tagger import ServiceError, TagJob, TagResult, Tagger

log = logging.getLogger("mvke.service")


def json_response(doc, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def _json_int(i: int) -> int | str:
    return i if -(1 << 63) <= i < (1 << 64) else str(i)


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
        # redis-py's default pool raises once it has handed out max_connections; a blocking pool waits
        # up to redis_pool_wait_s and then fails with a RedisError, which becomes a 503.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.redis_pool_size, timeout=settings.redis_pool_wait_s,
            decode_responses=True, **common)
        self.redis = aioredis.Redis(connection_pool=pool)
        # model reads run in a worker thread (mvke.runtime.versions): a small synchronous client
        self.redis_models = redis.Redis.from_url(settings.redis_url, max_connections=4, **common)
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    setup_logging(settings.log_level)
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        m = state.registry.current
        log.info("service started", extra={"redis": settings.redis_url.split("@")[-1],
                                           "batching": settings.batching, "ort_threads": settings.ort_threads(),
                                           "version": m.version if m else None,
                                           "provider": m.provider if m else None})
        yield
        await state.stop()

    app = FastAPI(title="MVKE tag service", version="0.1.0", lifespan=lifespan,
                  description="Ranked interest and intention tags per user (MVKE, KDD 2022).")
    app.state.svc = state

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        # Echo inputs safely: orjson refuses ints beyond 64 bits (a 1e30 written as an int), and a body sent
        # without a JSON content type comes back as raw bytes that need not be UTF-8. Both were 500s.
        errors = jsonable_encoder(e.errors(), custom_encoder={Exception: str, int: _json_int,
                                                              bytes: lambda b: b.decode("utf-8", "replace")})
        first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # loc is ("body", <char offset>): the body is the culprit
            where, msg = "body", f"{first.get('msg')} at character {first['loc'][-1]}"
        else:
            loc = [p for p in first.get("loc", []) if p != "body"]
            if len(loc) > 2 and loc[0] == "features":  # drop pydantic's union-member tags (".str", ".list[...]")
                loc = loc[:2]
            where = ".".join(str(p) for p in loc) or "body"
            msg = first.get("msg")
        return json_response({"detail": f"{where}: {msg}", "field": where, "errors": errors}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        # 400: FastAPI could not read the body (e.g. not UTF-8); 413: too large
        return json_response({"detail": e.detail, "field": "body" if e.status_code in (400, 413) else None},
                             e.status_code, getattr(e, "headers", None))

    @app.post("/users/{user_id}/tags", response_model=TagResponse,
              responses={404: {"model": ErrorResponse, "description": "user not in the feature store"},
                         413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                         503: {"model": ErrorResponse, "description": "no model, Redis down, or overloaded"}})
    async def tag_user(user_id: str = Path(min_length=1, max_length=128, examples=["u0000042"]),
                       body: TagRequest | None = Body(None)) -> Response:
        """Ranked tags per task for one user (features from the store and/or the body)."""
        job = validate_request(state, user_id, body or TagRequest())
        return json_response(render(await state.tag(job)))

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "alive"})

    @app.get("/readyz")
    async def readyz() -> Response:
        m = state.registry.current
        if m is None:
            return json_response({"ready": False, "reason": state.registry.last_error or "no model loaded"}, 503)
        try:
            await asyncio.wait_for(state.redis.ping(), settings.redis_timeout_s)
        except (RedisError, asyncio.TimeoutError, OSError) as e:
            return json_response({"ready": False, "reason": f"redis unavailable: {type(e).__name__}"}, 503,
                                 {"Retry-After": "1"})
        return json_response({"ready": True, "model_version": m.version})

    @app.get("/model")
    async def model_info() -> Response:
        m = state.registry.current
        if m is None:
            return json_response({"detail": state.registry.last_error or "no model loaded"}, 503)
        return json_response({**m.manifest.summary(), "provider": m.provider,
                              "ort_threads": settings.ort_threads(), "batching": settings.batching})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(EdgeMiddleware, metrics=state.metrics, max_body_bytes=settings.max_body_bytes,
                       access_log=settings.access_log)
    return app
