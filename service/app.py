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

from fastapi import Body, FastAPI, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mvke.runtime.redis_client import REDIS_ERRORS
from service.logs import setup_logging
from service.middleware import EdgeMiddleware
from service.schemas import ErrorResponse, TagRequest, TagResponse
from service.settings import Settings
from service.state import ServiceState, error_response, json_response, render, validate_request
from service.tagger import ServiceError

log = logging.getLogger("mvke.service")


def _json_int(i: int) -> int | str:
    return i if -(1 << 63) <= i < (1 << 64) else str(i)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    setup_logging(settings.log_level)
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        m = state.registry.current
        log.info("service started", extra={"redis": state.redis_target.display,
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
        except (*REDIS_ERRORS, asyncio.TimeoutError, OSError) as e:
            return json_response({"ready": False, "reason": f"redis unavailable: {type(e).__name__}"}, 503,
                                 {"Retry-After": "1"})
        return json_response({"ready": True, "model_version": m.version})

    @app.get("/model")
    async def model_info() -> Response:
        m = state.registry.current
        if m is None:
            return json_response({"detail": state.registry.last_error or "no model loaded"}, 503)
        return json_response({**m.manifest.summary(), "provider": m.provider,
                              "ort_threads": settings.ort_threads(), "batching": settings.batching,
                              "serving": settings.serving_summary()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(EdgeMiddleware, metrics=state.metrics, max_body_bytes=settings.max_body_bytes,
                       access_log=settings.access_log)
    return app
