"""Pure-ASGI middleware (no BaseHTTPMiddleware overhead on the hot path):
request id, body size limit (413), request metrics, the optional access log,
and the fast path of POST /users/{user_id}/tags.

The fast path: a tagging request whose body `TagRequest` accepts (validated by
pydantic straight from the JSON bytes, `TagRequest.model_validate_json`: the one
request schema, no second copy of its rules) or that has no body is served here,
calling the same `validate_request`, `ServiceState.tag`, `render` and
`error_response` as the FastAPI route (service/state.py), but without FastAPI's
per-request machinery (routing, dependency solving, stdlib JSON). Anything else
(a body that is not JSON, that the schema refuses, a non-JSON content type, ...)
is passed to FastAPI unchanged, with the body replayed, so errors keep their
exact messages. Responses are byte-identical (tests/service/test_hot_path.py);
`MVKE_FAST_PATH=false` turns it off.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from service.logs import request_id
from service.metrics import ServiceMetrics
from service.schemas import TagRequest
from service.state import error_response, render, validate_request
from service.tagger import ServiceError

log = logging.getLogger("mvke.service.access")
TAG_ROUTE = "/users/{user_id}/tags"
_JSON_CT = b"application/json"
_NO_BODY = TagRequest()   # the request without a body (shared: nothing mutates a request)
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]   # status, headers, body


class RouteLabels:
    """Request path -> the metrics label of the route that serves it (its path template, e.g.
    `/users/{user_id}/tags`; "other" for none), derived from the app's own routes: a new route is
    labelled without a list to keep. Exact paths are one dict lookup; templated ones one regex each."""

    def __init__(self, routes):
        self.exact: dict[str, str] = {}
        self.templated: list[tuple[Any, str]] = []
        for route in routes:
            regex, template = getattr(route, "path_regex", None), getattr(route, "path", None)
            if regex is None or template is None:
                continue
            if "{" in template or not hasattr(route, "endpoint"):   # a parameter, or a mount (a prefix)
                self.templated.append((regex.match, template))
            else:
                self.exact[template] = template
        # the tag route first: nearly every request is one
        self.templated.sort(key=lambda pair: pair[1] != TAG_ROUTE)

    def __call__(self, path: str) -> str:
        label = self.exact.get(path)
        if label is not None:
            return label
        for match, template in self.templated:
            if match(path):
                return template
        return "other"


def is_json_type(ct: bytes | None) -> bool:
    if ct is None:
        return False
    media = ct.split(b";", 1)[0].strip().lower()
    return media == _JSON_CT or (media.startswith(b"application/") and media.endswith(b"+json"))


def has_body(headers: dict) -> bool:
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() not in (b"0", b"")
    return b"transfer-encoding" in headers


class EdgeMiddleware:
    def __init__(self, app, metrics: ServiceMetrics, max_body_bytes: int, access_log: bool, api_keys=None):
        self.app, self.metrics, self.max_body, self.access_log = app, metrics, max_body_bytes, access_log
        self.api_keys = api_keys if api_keys is not None and api_keys.enabled else None
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._svc: Any = None
        self._oip: Any = None        # the OIP inference fast path (service/oip/rest.py), False: none
        self._labels: RouteLabels | None = None     # built from the app's routes at the first request

    def _observe(self, route: str, code: int, elapsed: float) -> None:
        key = (route, str(code))
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (self.metrics.requests.labels(*key), self.metrics.latency.labels(*key))
        pair[0].inc()
        pair[1].observe(elapsed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid_header, token = self._request_id(headers)
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        path = scope.get("path", "")
        try:
            refusal = self.refusal(scope.get("method"), path, headers)
            if refusal is not None:
                await send_answer(send_wrapper, refusal)
            else:
                await self._forward(scope, receive, send_wrapper, path, headers)
        finally:
            self._finish(scope.get("app"), scope.get("method"), path, status[0], t0, token)

    async def serve_read(self, app, path: str, headers: dict, body: bytes) -> Answer | None:
        """A POST to the tag route or to an Open Inference `.../infer` whose body the HTTP protocol has read
        whole (service/http_protocol.py), answered here without ASGI: the same edge (request id, refusals,
        metrics, access log) and the same bytes as `__call__`; None, before anything is counted, when the
        ASGI path must answer it (FastAPI's errors, and /v2 refusals, which take the protocol's shape there)."""
        t0 = time.perf_counter()
        refusal = self.refusal("POST", path, headers)
        work = oip = None
        if path.startswith("/v2/"):
            oip = self._oip_of(app)
            where = oip.match(path) if oip and refusal is None else None
            if where is None:
                return None
            work = self._oip_answer(oip, where, headers, body)
        elif refusal is None:
            svc = self._service_of(app)
            user_id = self._fast_user(svc, path, headers)
            req = None if user_id is None else self._tag_request(headers, body)
            if req is None:
                return None
            work = self._tag(svc, user_id, req)
        rid_header, token = self._request_id(headers)
        status = 500
        try:
            status, out_headers, out = refusal if work is None else await work
            out_headers = [*out_headers, rid_header]
            if status >= 400 and oip:   # as OipErrorShape leaves it on the ASGI path
                out_headers, out = oip.reshape_error(out_headers, out)
            return status, out_headers, out
        finally:
            self._finish(app, "POST", path, status, t0, token)

    @staticmethod
    def _request_id(headers: dict):
        """(the x-request-id response header, the context token): the client's id, else a new one."""
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or os.urandom(8).hex()
        return (b"x-request-id", rid.encode("latin-1")), request_id.set(rid)

    def _finish(self, app, method, path: str, status: int, t0: float, token) -> None:
        elapsed = time.perf_counter() - t0
        if self._labels is None:
            self._labels = RouteLabels(getattr(app, "routes", ()))
        self._observe(self._labels(path), status, elapsed)
        if self.access_log:
            log.info("request", extra={"method": method, "path": path, "status": status,
                                       "ms": round(elapsed * 1000, 3)})
        request_id.reset(token)

    def refusal(self, method, path: str, headers: dict) -> Answer | None:
        """What no route may take, refused at the edge (no API key 401, too large 413, not JSON 415); else None."""
        if self.api_keys is not None and self.api_keys.protects(path) and not self.api_keys.allows(headers):
            return refusal_answer(401, "authorization: this route needs an API key "
                                  "(Authorization: Bearer <key> or X-API-Key: <key>)", "authorization",
                                  [(b"www-authenticate", b'Bearer realm="mvke"')])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return self._too_large()
        if method == "POST":
            ct = headers.get(b"content-type")
            # the Open Inference routes (/v2) also take the binary tensor extension (service/oip)
            if ct != _JSON_CT and not is_json_type(ct) and has_body(headers) and not path.startswith("/v2/"):
                got = ct.decode("latin-1")[:100] if ct else "no Content-Type"
                return refusal_answer(415, f"body: send it as JSON with the header "
                                      f"Content-Type: application/json (got {got})", "body")
        return None

    async def _forward(self, scope, receive, send, path: str, headers: dict) -> None:
        """The fast path for a tagging request; everything else (and what it hands back) to FastAPI, its body
        size limited as it streams in."""
        source = receive
        pending: list | None = []
        if scope.get("method") == "POST" and not scope.get("root_path"):
            if path.startswith("/users/") and path.endswith("/tags"):
                pending = await self._fast(scope, receive, send, path, headers)
            elif path.startswith("/v2/models/"):
                pending = await self._fast_oip(scope, receive, send, path, headers)
            if pending is None:
                return  # served
            if pending:
                async def source():  # replay what the fast path read, then the rest
                    return pending.pop(0) if pending else await receive()
        received = 0

        async def limited_receive():
            nonlocal received
            message = await source()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, f"request body larger than {self.max_body} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _fast(self, scope, receive, send, path: str, headers: dict) -> list | None:
        """Serve a well-formed tagging request -> None; else the body messages read so far
        (to replay to FastAPI; [] when nothing was read)."""
        svc = self._service_of(scope.get("app"))
        user_id = self._fast_user(svc, path, headers)
        if user_id is None:
            return []
        messages, body = await self._read_body(receive)
        if body is None:
            return messages
        req = self._tag_request(headers, body)
        if req is None:
            return [{"type": "http.request", "body": body, "more_body": False}]
        await send_answer(send, await self._tag(svc, user_id, req))
        return None

    @staticmethod
    def _fast_user(svc, path: str, headers: dict) -> str | None:
        """The user of a tagging request the fast path may serve (before its body is read), else None."""
        if svc is None or not svc.settings.fast_path:
            return None
        user_id = path[7:-5]
        if not user_id or "/" in user_id or len(user_id) > 128:
            return None
        ct = headers.get(b"content-type")
        if ct is not None and ct.split(b";", 1)[0].strip().lower() != _JSON_CT:
            return None
        return user_id

    @staticmethod
    def _tag_request(headers: dict, body: bytes) -> TagRequest | None:
        """The body as a TagRequest; None when FastAPI must answer it (its 422 / 400 messages)."""
        if not body:
            return _NO_BODY
        # FastAPI (strict_content_type, its default) parses a body as JSON only under a JSON content type
        if headers.get(b"content-type") is None:
            return None
        try:
            return TagRequest.model_validate_json(body)
        except ValidationError:
            return None

    @staticmethod
    async def _tag(svc, user_id: str, req: TagRequest) -> Answer:
        try:
            job = validate_request(svc, user_id, req)
            out = orjson.dumps(render(await svc.tag(job)))
        except ServiceError as e:
            # the response of the app's ServiceError handler, as when the route raises it
            return response_answer(error_response(e))
        return 200, [(b"content-length", str(len(out)).encode()), (b"content-type", _JSON_CT)], out

    async def _fast_oip(self, scope, receive, send, path: str, headers: dict) -> list | None:
        """An Open Inference Protocol inference request (service/oip/rest.py FastInfer) -> None when served;
        else the body messages read so far, to replay to FastAPI."""
        oip = self._oip_of(scope.get("app"))
        where = oip.match(path) if oip else None
        if where is None:
            return []
        messages, body = await self._read_body(receive)
        if body is None:
            return messages
        await send_answer(send, await self._oip_answer(oip, where, headers, body))
        return None

    @staticmethod
    async def _oip_answer(oip, where, headers: dict, body: bytes) -> Answer:
        return response_answer(await oip.answer(where, headers, body))

    def _oip_of(self, app):
        """The app's OIP inference fast path (found on the first request); False: none."""
        if self._oip is None:
            state = getattr(app, "state", None)
            self._oip = getattr(state, "oip_infer", None) or False
        return self._oip

    def _service_of(self, app):
        """The app's ServiceState (found on the first request)."""
        if self._svc is None:
            state = getattr(app, "state", None)
            self._svc = getattr(state, "svc", None) if state is not None else None
        return self._svc

    async def _read_body(self, receive) -> tuple[list, bytes | None]:
        """(the messages read, the whole body); body None when it is not all there within the size limit."""
        messages, size, more = [], 0, True
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None
            size += len(message.get("body", b""))
            if size > self.max_body:
                return messages, None
            more = message.get("more_body", False)
        return messages, messages[0].get("body", b"") if len(messages) == 1 else \
            b"".join(m.get("body", b"") for m in messages)

    def _too_large(self) -> Answer:
        return refusal_answer(413, f"request body larger than {self.max_body} bytes", "body")


def response_answer(response) -> Answer:
    """A Starlette response's (status, headers, body)."""
    return response.status_code, response.raw_headers, response.body


def refusal_answer(status: int, detail: str, field: str | None, extra: list | None = None) -> Answer:
    body = orjson.dumps({"detail": detail, "field": field})
    return status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *(extra or [])], body


async def send_answer(send, answer: Answer) -> None:
    status, headers, body = answer
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
