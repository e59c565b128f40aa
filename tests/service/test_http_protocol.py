"""The HTTP protocol's read-whole path for POST /users/{id}/tags (service/http_protocol.py), on a live
service (uvicorn with the service's protocol, a real redis-server): HTTP/1.1 behaviour that the ASGI path
gave for free must hold here too. The byte-for-byte equality with the FastAPI route is
tests/service/test_hot_path.py's (its service runs this protocol)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import httpx

from tests.service.test_service import (LiveService, make_settings, published, svc, svc_r,  # noqa: F401  (fixtures)
                                        svc_redis, synth_user)

TAG = "/users/{}/tags"


def request(path: str, body: bytes | None = b"{}", method: str = "POST", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + (body or b"")


def read_answers(sock: socket.socket, n: int, timeout: float = 10.0) -> list[tuple[int, dict, bytes]]:
    """n HTTP/1.1 answers (each with a Content-Length) read off one connection, in the order they came."""
    sock.settimeout(timeout)
    data, out = b"", []
    while len(out) < n:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = data[:head_end].decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            end = head_end + 4 + int(headers["content-length"])
            if len(data) >= end:
                out.append((int(lines[0].split()[1]), headers, data[head_end + 4:end]))
                data = data[end:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {len(out)} of {n} answers")
        data += chunk
    return out


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, socket.timeout):
        return False


def tag_requests_counted(svc) -> float:
    text = svc.client.get("/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^mvke_requests_total\{[^}]*route="/users/\{user_id\}/tags"[^}]*\} ([0-9.e+]+)$', text, re.M))


def test_pipelined_requests_are_answered_in_order(svc, synth_user):
    """Six requests in one write (read-whole ones, one the app answers, one with a body the schema refuses,
    an unknown user, an Open Inference one): six answers in the order asked, each equal to the same request
    sent alone."""
    oip = json.dumps({"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [synth_user]}],
                      "parameters": {"top_k": 2}}).encode()
    asks = [request(TAG.format(synth_user), b'{"top_k": 3}'), request("/healthz", None, "GET"),
            request(TAG.format(synth_user), b'{"top_k": 0}'), request(TAG.format("nobody-here")),
            request("/v2/models/mvke/infer", oip),
            request(TAG.format(synth_user), b'{"top_k": 1, "tasks": ["intention"]}')]
    with socket.create_connection(("127.0.0.1", svc.port)) as sock:
        sock.sendall(b"".join(asks))
        together = read_answers(sock, len(asks))
    alone = []
    for ask in asks:
        with socket.create_connection(("127.0.0.1", svc.port)) as sock:
            sock.sendall(ask)
            alone += read_answers(sock, 1)
    assert [a[0] for a in together] == [200, 200, 422, 404, 200, 200]
    assert [(a[0], a[2]) for a in together] == [(a[0], a[2]) for a in alone]
    assert list(json.loads(together[5][2])["tasks"]) == ["intention"]
    assert {o["name"] for o in json.loads(together[4][2])["outputs"]} >= {"interest_tags", "interest_scores"}


def test_body_arriving_late_and_chunked_bodies(svc, synth_user):
    """Headers first and the body 200 ms later (the read-whole path waits for it), and a chunked body
    (uvicorn's own path): both answered as the plain request is."""
    body = b'{"top_k": 4}'
    want = svc.tag(synth_user, {"top_k": 4}).json()
    with socket.create_connection(("127.0.0.1", svc.port)) as sock:
        ask = request(TAG.format(synth_user), body)
        sock.sendall(ask[:-len(body)])
        time.sleep(0.2)
        sock.sendall(ask[-len(body):])
        (late,) = read_answers(sock, 1)
        chunked = (f"POST {TAG.format(synth_user)} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n").encode() + body + b"\r\n0\r\n\r\n"
        sock.sendall(chunked)
        (by_chunks,) = read_answers(sock, 1)
    for status, _, raw in (late, by_chunks):
        got = json.loads(raw)
        assert status == 200 and got["tasks"] == want["tasks"] and len(got["tasks"]["interest"]) == 4


def test_connection_close_http10_and_keep_alive(svc, synth_user):
    """`Connection: close` and HTTP/1.0 without keep-alive: answered, then closed by the server; plain
    HTTP/1.1: the connection stays open for the next request."""
    with socket.create_connection(("127.0.0.1", svc.port)) as sock:
        sock.sendall(request(TAG.format(synth_user), extra="Connection: close\r\n"))
        ((status, headers, _),) = read_answers(sock, 1)
        assert status == 200 and headers["connection"] == "close" and closed_by_server(sock)
    with socket.create_connection(("127.0.0.1", svc.port)) as sock:
        sock.sendall(request(TAG.format(synth_user)).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        ((status, headers, _),) = read_answers(sock, 1)
        assert status == 200 and headers["connection"] == "close" and closed_by_server(sock)
    with socket.create_connection(("127.0.0.1", svc.port)) as sock:
        for _ in range(3):
            sock.sendall(request(TAG.format(synth_user)))
            ((status, headers, _),) = read_answers(sock, 1)
            assert status == 200 and "connection" not in headers
        assert not closed_by_server(sock, timeout=0.3)


def test_client_gone_mid_body_harms_nothing(svc, synth_user):
    """A client that sends half a body and disconnects: no answer owed, the service goes on answering."""
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", svc.port)) as sock:
            sock.sendall(request(TAG.format(synth_user), b'{"top_k": 3}   ')[:-6])
    assert svc.tag(synth_user, {"top_k": 2}).status_code == 200
    assert svc.client.get("/readyz").status_code == 200


def test_request_id_metrics_and_size_limit_on_the_read_whole_path(svc, synth_user):
    """The edge's duties hold: the client's request id echoed (a new one otherwise), one count per request
    in /metrics under the route's label, and a body over the limit refused (413) before it is read."""
    before = tag_requests_counted(svc)
    r = svc.tag(synth_user, {"top_k": 1}, headers={"x-request-id": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    other = svc.tag(synth_user, {"top_k": 1})
    assert re.fullmatch(r"[0-9a-f]{16}", other.headers["x-request-id"])
    assert tag_requests_counted(svc) == before + 2
    limit = svc.settings.max_body_bytes
    big = httpx.post(f"{svc.url}{TAG.format(synth_user)}", content=b" " * (limit + 1),
                     headers={"content-type": "application/json"}, timeout=10)
    assert big.status_code == 413 and big.json()["field"] == "body"


def test_content_length_rules():
    """Which bodies the read-whole path takes: one valid length (none = 0); chunked or doubtful -> uvicorn's path."""
    from service.http_protocol import content_length
    assert content_length([(b"content-length", b"12")]) == 12
    assert content_length([(b"host", b"x")]) == 0
    assert content_length([(b"transfer-encoding", b"chunked")]) is None
    assert content_length([(b"content-length", b"3"), (b"content-length", b"3")]) is None
    assert content_length([(b"content-length", b"-1")]) is None
    assert content_length([(b"content-length", b"4"), (b"transfer-encoding", b"chunked")]) is None


def test_a_request_cancelled_at_shutdown_gets_500_and_the_connection_closes(svc_redis, published, synth_user):
    """A request still waiting (on a stopped Redis) when the graceful-shutdown period ends is cancelled: it
    gets uvicorn's 500 and its connection is closed, as on the ASGI path (not silence on an open socket)."""
    s = LiveService(make_settings(svc_redis.url, published("mvke-mt"), redis_timeout_s=30, request_timeout_s=30))
    s.server.config.timeout_graceful_shutdown = 0.5
    s.start()
    try:
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            os.kill(svc_redis.proc.pid, signal.SIGSTOP)
            try:
                sock.sendall(request(TAG.format(synth_user)))
                time.sleep(0.3)                      # it waits on the stopped feature store
                s.server.should_exit = True
                ((status, headers, body),) = read_answers(sock, 1)
                closed = closed_by_server(sock)
            finally:
                os.kill(svc_redis.proc.pid, signal.SIGCONT)
    finally:
        s.stop()
    assert (status, body, headers["connection"], closed) == (500, b"Internal Server Error", "close", True)
