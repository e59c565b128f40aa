"""uvicorn's httptools protocol with JSON answers for requests it cannot parse.

A request line too long for the parser (a path over 65,535 bytes, e.g. a 100k-character
user id: llhttp keeps URL offsets in 16 bits) or otherwise malformed never reaches the app;
stock uvicorn answers it with a plain-text 400. This answers the same errors in the
service's error shape: 414 naming `user_id` for an overlong tag route, else 400.
`mvke serve` uses it (`http="service.http_protocol:JsonErrorHttpToolsProtocol"`).
"""
from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_URL = 65535


def parse_error_body(url: bytes, msg: str) -> tuple[int, bytes]:
    """(status, JSON body) for a request the HTTP parser refused; `url` is what it read of the target."""
    if len(url) > MAX_URL:
        field = "user_id" if url.startswith(b"/users/") else "path"
        detail = (f"{field}: the request path is longer than {MAX_URL} bytes"
                  + ("; a user_id has 1 to 128 characters" if field == "user_id" else ""))
        return 414, orjson.dumps({"detail": detail, "field": field})
    return 400, orjson.dumps({"detail": f"request: {msg.rstrip('.')} (not a valid HTTP/1.1 request)", "field": None})


class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        status, body = parse_error_body(getattr(self, "url", b""), msg)
        reason = b"URI Too Long" if status == 414 else b"Bad Request"
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        self.transport.close()
