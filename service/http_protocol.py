"""The service's HTTP/1.1 protocol: uvicorn's httptools protocol with two additions.

* JSON answers for requests the parser refuses. A request line too long for the parser (a path over
  65,535 bytes, e.g. a 100k-character user id: llhttp keeps URL offsets in 16 bits) or otherwise
  malformed never reaches the app; stock uvicorn answers it with a plain-text 400. This answers the same
  errors in the service's error shape: 414 naming `user_id` for an overlong tag route, else 400.
* The inference routes without ASGI. A `POST /users/{id}/tags` or an Open Inference
  `POST /v2/models/.../infer` with a Content-Length within the body limit is read whole here and handed
  to the edge (`EdgeMiddleware.serve_read`: the same request id, refusals, metrics and answer bytes as
  the ASGI path), and the answer is written in one `transport.write`. What it skips is uvicorn's
  per-request ASGI plumbing (the request/response cycle object, its receive/send messages and event,
  the proxy-headers layer, two writes per answer): +11% tagging QPS at c=32 on 2 cores
  (docs/results/predictor_ab/session4). A request the edge does not serve (a body the schema refuses,
  a non-JSON type, a /v2 refusal, ...) goes on through uvicorn's own cycle with the body already read,
  so its answer is the app's as before. Pipelined requests keep their order (uvicorn's queue); the
  keep-alive timer, graceful shutdown (a request cancelled at its end gets uvicorn's 500 and a closed
  connection) and a client that disconnects mid-request behave as in uvicorn. Differences: uvicorn's own
  access log line is not written for these answers (`mvke serve` turns it off; the edge's access log,
  `MVKE_ACCESS_LOG`, covers every request), and their latency in /metrics starts once the body is in.

`mvke serve` uses it (`HTTP_PROTOCOL` in service/cli.py); `MVKE_FAST_PATH=false` turns the second
addition off with the edge's own fast path.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

MAX_URL = 65535
log = logging.getLogger("mvke.service")
_INTERNAL_ERROR = (b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\nconnection: close\r\n\r\n"
                   b"Internal Server Error")


def parse_error_body(url: bytes, msg: str) -> tuple[int, bytes]:
    """(status, JSON body) for a request the HTTP parser refused; `url` is what it read of the target."""
    if len(url) > MAX_URL:
        field = "user_id" if url.startswith(b"/users/") else "path"
        detail = (f"{field}: the request path is longer than {MAX_URL} bytes"
                  + ("; a user_id has 1 to 128 characters" if field == "user_id" else ""))
        return 414, orjson.dumps({"detail": detail, "field": field})
    return 400, orjson.dumps({"detail": f"request: {msg.rstrip('.')} (not a valid HTTP/1.1 request)", "field": None})


def find_edge(app):
    """(the service app, its EdgeMiddleware) below uvicorn's wrappers (proxy headers, ...); (None, None)
    for an app that is not the service or whose fast path is off."""
    for _ in range(8):
        state = getattr(app, "state", None)
        edge = getattr(state, "edge", None) if state is not None else None
        if edge is not None:
            svc = getattr(state, "svc", None)
            return (app, edge) if svc is not None and svc.settings.fast_path else (None, None)
        app = getattr(app, "app", None)
        if app is None:
            break
    return None, None


class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
    _service_app = _edge = None

    def send_400_response(self, msg: str) -> None:
        status, body = parse_error_body(getattr(self, "url", b""), msg)
        reason = b"URI Too Long" if status == 414 else b"Bad Request"
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason), rendered_defaults(self.server_state)]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        self.transport.close()

    # -- the tag route without ASGI --------------------------------------------------------------
    def on_headers_complete(self) -> None:
        if not self._read_whole():
            return super().on_headers_complete()
        scope = self.scope
        scope["method"] = "POST"
        if (version := self.parser.get_http_version()) != "1.1":
            scope["http_version"] = version
        parsed = httptools.parse_url(self.url)
        path = parsed.path.decode("ascii")
        scope["path"], scope["raw_path"], scope["query_string"] = path, parsed.path, parsed.query or b""
        existing = self.cycle
        self.cycle = ReadCycle(self, scope, version != "1.0" and self.parser.should_keep_alive())
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:   # pipelined behind a request still being answered: queued, as uvicorn does
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def _read_whole(self) -> bool:
        """Whether this request is one for `ReadCycle`: a plain POST /users/.../tags or /v2/models/.../infer
        whose body has a length
        within the limit (no chunks, no 100-continue, no upgrade, no root path, under the concurrency limit)."""
        url = self.url
        if not (url.startswith(b"/users/") or url.startswith(b"/v2/models/")) or self.parser.get_method() != b"POST":
            return False
        if self._edge is None:   # found once per server (uvicorn's ServerState), not kept beyond it
            found = getattr(self.server_state, "mvke_edge", None)
            if found is None:
                found = self.server_state.mvke_edge = find_edge(self.app)
            self._service_app, self._edge = found
        edge = self._edge
        if edge is None or self.expect_100_continue or self.root_path or b"%" in url:
            return False
        if self.parser.should_upgrade():
            return False
        length = content_length(self.headers)
        if length is None or length > edge.max_body:
            return False
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            return False
        path = url.split(b"?", 1)[0]
        return path.endswith(b"/tags" if url.startswith(b"/users/") else b"/infer")

    def _start_asgi_task(self, cycle, app) -> None:
        if type(cycle) is not ReadCycle:
            return super()._start_asgi_task(cycle, app)
        context = contextvars.Context() if self.config.reset_contextvars else None   # as uvicorn does
        task = self.loop.create_task(cycle.run(), context=context)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's body length: 0 without a body, None when it is chunked or not one valid length."""
    length = None
    for name, value in headers:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
    return length or 0


def render_headers(headers) -> bytes:
    """(name, value) pairs as HTTP/1.1 header lines."""
    return b"".join(b"".join((name, b": ", value, b"\r\n")) for name, value in headers)


def rendered_defaults(server_state) -> bytes:
    """uvicorn's default headers (date, server) as bytes, rendered once per list (uvicorn swaps the list each
    second); kept on the server's own state."""
    headers = server_state.default_headers
    cached = getattr(server_state, "mvke_rendered", None)
    if cached is None or cached[0] is not headers:
        cached = server_state.mvke_rendered = (headers, render_headers(headers))
    return cached[1]


class ReadCycle:
    """One tagging request read whole, then answered by the edge; the attributes are those of uvicorn's
    `RequestResponseCycle` that the protocol reads and writes (body, flags, the event)."""

    def __init__(self, protocol: JsonErrorHttpToolsProtocol, scope: dict, keep_alive: bool):
        self.protocol, self.scope, self.keep_alive = protocol, scope, keep_alive
        self.body = bytearray()
        self.more_body = True
        self.disconnected = self.response_complete = False
        self.message_event = asyncio.Event()

    async def run(self) -> None:
        try:
            await self._answer()
        except BaseException as exc:   # a bug, or cancelled at shutdown: uvicorn's 500, and the connection closed
            log.error("exception while answering a request read whole", exc_info=exc)
            if not self.response_complete:
                self.keep_alive = False
                if not self.disconnected and not self.protocol.transport.is_closing():
                    self._write(STATUS_LINE[500], b"", _INTERNAL_ERROR, close=False)
                self._done()
            if not isinstance(exc, Exception):
                raise

    async def _answer(self) -> None:
        p = self.protocol
        while self.more_body and not self.disconnected:
            p.flow.resume_reading()
            await self.message_event.wait()
            self.message_event.clear()
        if self.disconnected:
            return
        answer = await p._edge.serve_read(p._service_app, self.scope["path"], dict(self.scope["headers"]),
                                          bytes(self.body))
        if answer is None:
            return await self._through_asgi()
        status, headers, body = answer
        if p.flow.write_paused and not self.disconnected:
            await p.flow.drain()
        if not self.disconnected:
            self._write(STATUS_LINE[status], render_headers(headers), b"\r\n" + body, close=not self.keep_alive)
        self._done()

    def _write(self, status_line: bytes, head: bytes, tail: bytes, close: bool) -> None:
        p = self.protocol
        p.transport.write(b"".join((status_line, rendered_defaults(p.server_state), head,
                                    b"connection: close\r\n" if close else b"", tail)))

    def _done(self) -> None:
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.protocol.transport.close()
        self.protocol.on_response_complete()

    async def _through_asgi(self) -> None:
        """The app answers it (uvicorn's cycle, the body already read); this cycle is complete when it is."""
        p = self.protocol
        cycle = RequestResponseCycle(
            scope=self.scope, transport=p.transport, flow=p.flow, logger=p.logger,
            access_logger=p.access_logger, access_log=p.access_log,
            default_headers=p.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=False, keep_alive=self.keep_alive, on_response=p.on_response_complete)
        cycle.body, cycle.more_body = self.body, False
        cycle.message_event.set()      # what its receive() waits for: the body is all there
        if p.cycle is self:
            p.cycle = cycle     # disconnects and shutdown now reach the cycle that answers
        await cycle.run_asgi(p.app)
        self.response_complete = True
