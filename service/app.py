"""FastAPI app: POST /users/{user_id}/tags, POST /tags:batch, versions, health, readiness,
metrics, model info, the /ui inspector page and offline /docs.

Layout follows KServe's model server: the models are loaded (and hot-swapped) by
`ModelRegistry`; readiness is gated on a loaded model and a Redis that answers;
liveness does not depend on either. The request path is
fetch features -> encode -> run tower -> score -> rank (service/tagger.py).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from contextlib import asynccontextmanager
from pathlib import Path as FilePath

from fastapi import Body, FastAPI, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mvke.runtime.redis_client import REDIS_ERRORS
from mvke.runtime.versions import published_versions
from service import events as events_route
from service import profiles
from service.logs import setup_logging
from service.middleware import EdgeMiddleware
from service.oip.install import install_oip
from service.openapi import ERRORS, ServedOpenAPI
from service.schemas import (BatchRequest, BatchResponse, BatchUser, TagOptions, TagRequest, TagResponse,
                             VersionsResponse)
from service.settings import Settings
from service.state import (ServiceState, error_doc, error_response, json_response, render, validate_request)
from service.tagger import ServiceError, TagResult, unavailable

log = logging.getLogger("mvke.service")
UI_DIR = FilePath(__file__).resolve().parent / "ui"
UI_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def _json_int(i: int) -> int | str:
    return i if -(1 << 63) <= i < (1 << 64) else str(i)


def _batch_options(defaults: TagOptions | None, user) -> TagOptions:
    if defaults is None:
        return user
    own = {name: getattr(user, name) for name in user.model_fields_set if name != "user_id"}
    return defaults.model_copy(update=own)


async def tag_batch(state: ServiceState, body: BatchRequest) -> list:
    """One answer per user, in order; a user's error (404, 409, 422, ...) is its answer, not the call's."""
    limit = state.settings.max_batch_users
    if len(body.users) > limit:
        raise ServiceError(422, f"users: at most {limit} users per call, got {len(body.users)}", field="users")
    answers: list = [None] * len(body.users)
    jobs, where = [], []
    for i, raw in enumerate(body.users):
        try:
            user = BatchUser.model_validate(raw, strict=True)
        except ValidationError as e:   # this user's own 422, located in the batch
            doc = validation_doc([{**err, "loc": ("body", "users", i, *err["loc"])} for err in e.errors()])
            if any(err["loc"][:1] == ("user_id",) for err in e.errors()):   # no user to answer: the call's 422
                raise ServiceError(422, doc["detail"], field=doc["field"], errors=doc["errors"]) from None
            answers[i] = {"user_id": raw["user_id"], "status": 422, "error": doc}
            continue
        try:
            jobs.append(validate_request(state, user.user_id, _batch_options(body.defaults, user)))
            where.append(i)
        except ServiceError as e:
            answers[i] = e
    if jobs:
        for i, res in zip(where, await state.tagger.process(jobs)):
            answers[i] = res
    return [render(a) if isinstance(a, TagResult) else a if isinstance(a, dict) else
            {"user_id": raw["user_id"], "status": a.status, "error": error_doc(a)}
            for raw, a in zip(body.users, answers)]


async def list_versions(state: ServiceState) -> dict:
    registry = state.registry
    try:   # the one reader of the list (mvke/runtime/versions.py), in a worker thread
        published = await asyncio.to_thread(published_versions, state.redis_models, state.keys)
    except REDIS_ERRORS as e:
        raise unavailable(f"redis unavailable: {type(e).__name__}") from None
    canary = registry.canary_setting     # what this service routes by (Redis, or MVKE_CANARY)
    loaded = registry.loaded()
    versions = [{"version": v.version, "model": v.model, "created_at": v.created_at, "published_at": v.published_at,
                 "bytes": v.bytes, "active": v.active, "canary": canary is not None and v.version == canary.version,
                 "rolled_back": v.rolled_back, "loaded": v.version in loaded, "gate": v.gate} for v in published]
    active = next((v.version for v in published if v.active), None)
    return {"active": active,
            "canary": None if canary is None else {"version": canary.version, "percent": canary.percent,
                                                   "source": canary.source},
            "versions": versions}


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return json_response(validation_doc(e.errors()), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        # 400: FastAPI could not read the body (e.g. not UTF-8); 413: too large
        return json_response({"detail": e.detail, "field": "body" if e.status_code in (400, 413) else None},
                             e.status_code, getattr(e, "headers", None))


def _echo(value):
    """Inputs echoed in `errors` are cut short (a 100 kB user id is not sent back)."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[:200]).decode("utf-8", "replace")
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} characters)"
    return value


def validation_doc(raw_errors) -> dict:
    # Echo inputs safely: orjson refuses ints beyond 64 bits (a 1e30 written as an int), and a body sent
    # without a JSON content type comes back as raw bytes that need not be UTF-8. Both were 500s.
    errors = jsonable_encoder([{**err, "input": _echo(err.get("input"))} if "input" in err else err
                               for err in raw_errors],
                              custom_encoder={Exception: str, int: _json_int,
                                              bytes: lambda b: b.decode("utf-8", "replace")})
    for err in errors:
        err.pop("url", None)
    first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # loc is ("body", <char offset>): the body is the culprit
        where, msg = "body", f"{first.get('msg')} at character {first['loc'][-1]}"
    else:
        loc = [p for p in first.get("loc", []) if p not in ("body", "path")]
        where = ".".join(str(p) for p in loc) or "body"
        msg = first.get("msg")
    return {"detail": f"{where}: {msg}", "field": where, "errors": errors}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    setup_logging(settings.log_level)
    state = ServiceState(settings)
    grpc_server = None     # the Open Inference Protocol's gRPC server (service/oip), when MVKE_GRPC_PORT is set

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        if grpc_server is not None:
            await grpc_server.start()
        m = state.registry.current
        log.info("service started", extra={"redis": state.redis_target.display,
                                           "batching": settings.batching, "ort_threads": settings.ort_threads(),
                                           "version": m.version if m else None,
                                           "provider": m.provider if m else None,
                                           "api_keys": state.api_keys.enabled})
        yield
        if grpc_server is not None:
            await grpc_server.stop()
        await audiences.aclose()
        await state.stop()

    app = ServiceApp(title="MVKE tag service", version="0.2.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                     **_telemetry_option(settings.otel),
                     description="Ranked interest and intention tags per user (MVKE, KDD 2022): top tags, candidate "
                              "scoring, many users per call, explanations, pinned and canary versions.")
    app.state.svc = state
    _install_handlers(app)
    _install_tag_routes(app, state)
    _install_info_routes(app, state)
    events_route.install(app, state, error_responses(state, 400, 401, 413, 415, 422, 503), json_response)
    profiles.install(app, state, error_responses(state, 401, 404, 422, 503), json_response)
    from service.audiences import install as install_audiences
    audiences = install_audiences(app, state, lambda *codes: error_responses(state, *codes), json_response)
    _install_pages(app)
    app.openapi = ServedOpenAPI(app, state)
    edge = EdgeMiddleware(app.handle, metrics=state.metrics, max_body_bytes=settings.max_body_bytes,
                          access_log=settings.access_log, api_keys=state.api_keys)
    app.state.edge = edge                                   # the HTTP protocol's way in (service/http_protocol.py)
    grpc_server, app.edge = install_oip(app, state, edge)   # /v2 routes; the edge's /v2 errors in the OIP shape
    app.state.grpc_server = grpc_server
    return app


class ServiceApp(FastAPI):
    """FastAPI with the edge (service/middleware.py) in front of it rather than inside its middleware stack:
    a tagging request on the fast path is answered before FastAPI's and Starlette's per-request layers (the
    OpenTelemetry check, the error middleware) run; every other request goes through them unchanged (`handle`)."""

    edge = None   # the ASGI app in front; set by create_app

    async def __call__(self, scope, receive, send) -> None:
        if self.edge is not None and scope["type"] == "http":
            scope["app"] = self
            await self.edge(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        """FastAPI itself (routing, dependencies, the exception handlers)."""
        await super().__call__(scope, receive, send)


def _telemetry_option(on: bool) -> dict:
    """FastAPI's `telemetry` argument with its OpenTelemetry off (versions before it have none to turn off)."""
    if on or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def error_responses(state: ServiceState, *codes: int) -> dict:
    """The OpenAPI `responses` of a route: these statuses (401 only when API keys are on)."""
    return {c: ERRORS[c] for c in codes if c != 401 or state.api_keys.enabled}


def _install_tag_routes(app: FastAPI, state: ServiceState) -> None:
    @app.post("/users/{user_id}/tags", response_model=TagResponse,
              responses=error_responses(state, 400, 401, 404, 409, 413, 414, 415, 422, 503))
    async def tag_user(user_id: str = Path(min_length=1, max_length=128, examples=["u0000042"],
                                           description="the user; 404 when it is not in the feature store "
                                                       "and the body has no `features`"),
                       body: TagRequest | None = Body(None)) -> Response:
        """Ranked tags per task for one user (features from the store and/or the body)."""
        job = validate_request(state, user_id, body or TagRequest())
        return json_response(render(await state.tag(job)))

    @app.post("/tags:batch", response_model=BatchResponse,
              responses=error_responses(state, 400, 401, 413, 415, 422, 503))
    async def tags_batch(body: BatchRequest) -> Response:
        """Many users in one call (each with its own options); one answer per user, in order. A user's
        own error (unknown user 404, bad option 422, version 404/409) is in its answer, with its status."""
        return json_response({"results": await tag_batch(state, body)})


def _install_info_routes(app: FastAPI, state: ServiceState) -> None:
    settings = state.settings

    @app.get("/models", response_model=VersionsResponse, responses=error_responses(state, 401, 503))
    async def models() -> Response:
        """Published versions, newest first: which is active, which is the canary, which this process has loaded."""
        return json_response(await list_versions(state))

    @app.get("/healthz")
    async def healthz() -> Response:
        """Alive (does not depend on Redis or a model)."""
        return json_response({"status": "alive"})

    @app.get("/readyz", responses={503: {"description": "no model loaded or Redis not answering"}})
    async def readyz() -> Response:
        """200 with the active version once a model is loaded and Redis answers, else 503 with the reason
        (a version that failed to load: its error, attempt count and when it is tried next). While a newer
        active or canary version fails to load, the 200 also names it under `load_errors` (a canary whose
        features the feature store does not match is not loaded: its reason is there); an active version
        served although the store does not match it is named under `schema_mismatch`."""
        return await readiness(state)

    @app.get("/model", responses=error_responses(state, 401, 503))
    async def model_info() -> Response:
        """The active version's manifest summary and the ONNX Runtime provider."""
        m = state.registry.current
        if m is None:
            return json_response({"detail": state.registry.last_error or "no model loaded"}, 503)
        return json_response({**m.manifest.summary(), "provider": m.provider,
                              "scoring": m.scoring, "approximate": m.approximate,
                              "ort_threads": settings.ort_threads(), "batching": settings.batching,
                              "serving": settings.serving_summary()})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"},
                        **(error_responses(state, 401) if settings.metrics_need_key else {})})
    async def metrics() -> Response:
        """Prometheus metrics (requests per route/status and per model version, step timings, batch sizes)."""
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def readiness(state: ServiceState) -> Response:
    """/readyz: a model loaded and Redis answering (KServe's readiness, separate from liveness)."""
    m = state.registry.current
    if m is None:
        return json_response({"ready": False, "reason": state.registry.not_ready_reason()}, 503)
    load_errors = state.registry.load_errors()
    try:
        await asyncio.wait_for(state.redis.ping(), state.settings.redis_timeout_s)
    except (*REDIS_ERRORS, asyncio.TimeoutError, OSError) as e:
        return json_response({"ready": False, "reason": f"redis unavailable: {type(e).__name__}"}, 503,
                             {"Retry-After": "1"})
    doc = {"ready": True, "model_version": m.version}
    if state.registry.canary is not None:
        doc["canary_version"] = state.registry.canary.version
    if load_errors:
        doc["load_errors"] = load_errors
    mismatches = state.registry.schema_mismatches()
    if mismatches:
        doc["schema_mismatch"] = mismatches
    return json_response(doc)


def _install_pages(app: FastAPI) -> None:
    """GET /ui (the inspector page) and GET /docs, both from files in installed packages (no CDN)."""
    from fastapi.staticfiles import StaticFiles

    @app.get("/ui", include_in_schema=False)
    async def ui() -> Response:
        return HTMLResponse((UI_DIR / "index.html").read_bytes())

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(name: str) -> Response:
        if name not in UI_FILES:
            return json_response({"detail": f"no such file: {name}", "field": None}, 404)
        return Response((UI_DIR / name).read_bytes(), media_type=UI_FILES[name])

    from swagger_ui_bundle import swagger_ui_path
    app.mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="openapi.json", title="MVKE tag service",
                                   swagger_js_url="docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="docs/assets/swagger-ui.css",
                                   swagger_favicon_url="docs/assets/favicon-32x32.png")
