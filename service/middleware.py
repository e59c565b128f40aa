"""Pure-ASGI middleware (no BaseHTTPMiddleware overhead on the hot path):
request id, body size limit (413), request metrics and the optional access log."""
from __future__ import annotations

import logging
import time
import uuid

import orjson
from starlette.exceptions import HTTPException

from service.logs import request_id
from service.metrics import ServiceMetrics

log = logging.getLogger("mvke.service.access")
KNOWN_ROUTES = {"/healthz", "/readyz", "/metrics", "/model", "/docs", "/openapi.json"}


def route_label(path: str) -> str:
    if path.startswith("/users/") and path.endswith("/tags"):
        return "/users/{user_id}/tags"
    return path if path in KNOWN_ROUTES else "other"


class EdgeMiddleware:
    def __init__(self, app, metrics: ServiceMetrics, max_body_bytes: int, access_log: bool):
        self.app, self.metrics, self.max_body, self.access_log = app, metrics, max_body_bytes, access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        status = [500]
        started = [False]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await self._too_large(send_wrapper)
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise HTTPException(413, f"request body larger than {self.max_body} bytes")
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - t0
            route = route_label(scope.get("path", ""))
            code = str(status[0])
            self.metrics.requests.labels(route, code).inc()
            self.metrics.latency.labels(route, code).observe(elapsed)
            if self.access_log:
                log.info("request", extra={"method": scope.get("method"), "path": scope.get("path"),
                                           "status": status[0], "ms": round(elapsed * 1000, 3)})
            request_id.reset(token)

    async def _too_large(self, send) -> None:
        body = orjson.dumps({"detail": f"request body larger than {self.max_body} bytes", "field": "body"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
