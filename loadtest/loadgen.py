"""A light HTTP/1.1 keep-alive load generator (asyncio + uvloop, raw sockets).

Used for every row of `loadtest.bench` so that all rows see the same client.
Locust (loadtest/locustfile.py) is the realistic, user-facing tool; this one
exists because on a 2-core machine the client must cost as little CPU as
possible: requests are pre-rendered bytes, responses are parsed just enough
to find the status and the end of the body (Content-Length or chunked).

Closed loop by default: `concurrency` connections, each sends its next request
as soon as the previous answer arrived. With `rate` set, requests are paced to
that many per second in total (open-ish loop over the same connections; if the
server falls behind, a connection sends as soon as it is free).

Run as a separate process:

    python -m loadtest.loadgen SPEC.json            # prints one JSON result line

SPEC: {"host", "port", "requests": [[method, path, body-or-null(, {header: value})], ...],
       "concurrency", "duration", "warmup", "rate" (optional), "timeline" (optional bool),
       "grace" (seconds to wait for answers in flight at the end, default 5; those still
       missing then are counted as "unfinished")}
"""
from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from typing import Any


def render(host: str, port: int, method: str, path: str, body: bytes | None, headers: dict | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    if body is not None:
        if not any(k.lower() == "content-type" for k in headers or {}):
            head += "Content-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n"
    elif method == "POST":
        head += "Content-Length: 0\r\n"
    return head.encode("latin-1") + b"\r\n" + (body or b"")


class Stats:
    def __init__(self, timeline: bool):
        self.lat: list[int] = []          # ns, only after warm-up
        self.status: dict[str, int] = {}
        self.measuring = False
        self.timeline = timeline
        self.per_second: dict[int, list] = {}   # second -> [count, errors, sum_ns, max_ns]
        self.t_start = 0.0

    def record(self, status: int, ns: int) -> None:
        if not self.measuring:
            return
        self.lat.append(ns)
        key = str(status)
        self.status[key] = self.status.get(key, 0) + 1
        if self.timeline:
            sec = int(time.perf_counter() - self.t_start)
            row = self.per_second.setdefault(sec, [0, 0, 0, 0])
            row[0] += 1
            row[1] += status >= 400
            row[2] += ns
            row[3] = max(row[3], ns)

    def error(self, kind: str) -> None:
        if self.measuring:
            self.status[kind] = self.status.get(kind, 0) + 1


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, client: "Client"):
        self.client = client
        self.buf = bytearray()
        self.t0 = 0
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.need = -1          # total bytes of the current response, -1 while the head is incomplete
        self.status = 0
        self.chunked = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def send(self, req: bytes) -> None:
        self.buf.clear()
        self.need = -1
        self.t0 = time.perf_counter_ns()
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                self.need = end + 4 + int(head[i + 17: j if j >= 0 else None])
                self.chunked = False
            else:
                self.chunked = b"transfer-encoding: chunked" in head
                self.need = end + 4
        if self.chunked:
            if not buf.endswith(b"0\r\n\r\n"):
                return
        elif len(buf) < self.need:
            return
        self.client.stats.record(self.status, time.perf_counter_ns() - self.t0)
        self.client.next(self)


class Client:
    def __init__(self, spec: dict[str, Any]):
        self.host, self.port = spec.get("host", "127.0.0.1"), int(spec["port"])
        self.reqs = [render(self.host, self.port, m, p, None if b is None else b.encode(), *extra)
                     for m, p, b, *extra in spec["requests"]]
        self.concurrency = int(spec["concurrency"])
        self.duration, self.warmup = float(spec["duration"]), float(spec.get("warmup", 1.0))
        self.rate = float(spec.get("rate") or 0)
        self.grace = float(spec.get("grace", 5.0))
        self.conns: set[Conn] = set()
        self.stats = Stats(bool(spec.get("timeline")))
        self.i = 0
        self.stop_at = 0.0
        self.next_send = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None

    def _req(self) -> bytes:
        self.i += 1
        return self.reqs[self.i % len(self.reqs)]

    def next(self, conn: Conn) -> None:
        now = time.perf_counter()
        if now >= self.stop_at:
            conn.transport.close()
            return
        if self.rate:
            self.next_send = max(self.next_send + 1.0 / self.rate, now - 0.05)
            delay = self.next_send - now
            if delay > 0:
                self.loop.call_later(delay, self._send_if_open, conn)
                return
        conn.send(self._req())

    def _send_if_open(self, conn: Conn) -> None:
        if conn.transport is not None and not conn.transport.is_closing():
            conn.send(self._req())

    async def _one(self, k: int) -> None:
        """One connection slot: reconnects after a server-side close until the run ends."""
        await asyncio.sleep(k * 0.0005)  # do not open all connections in the same instant
        while time.perf_counter() < self.stop_at:
            try:
                _, conn = await self.loop.create_connection(lambda: Conn(self), self.host, self.port)
            except OSError:
                self.stats.error("connect_error")
                await asyncio.sleep(0.05)
                continue
            self.conns.add(conn)
            self.next(conn)
            await conn.done
            self.conns.discard(conn)
            if time.perf_counter() < self.stop_at - 0.01:
                self.stats.error("conn_closed")

    async def run(self) -> dict[str, Any]:
        self.loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self.stop_at = t0 + self.warmup + self.duration
        self.next_send = t0
        tasks = [asyncio.ensure_future(self._one(k)) for k in range(self.concurrency)]

        async def start_measuring():
            await asyncio.sleep(self.warmup)
            self.stats.measuring = True
            self.stats.t_start = time.perf_counter()
        await start_measuring()
        self.loop.call_at(self.loop.time() + max(0.0, self.stop_at - time.perf_counter()),
                          setattr, self.stats, "measuring", False)  # count answers within the duration only
        done, pending = await asyncio.wait(tasks, timeout=self.duration + self.grace + 1.0)
        end = time.perf_counter()
        if pending:  # answers still missing after the grace period: count them and hang up
            for conn in list(self.conns):
                if conn.transport is not None and not conn.transport.is_closing():
                    self.stats.status["unfinished"] = self.stats.status.get("unfinished", 0) + 1  # noqa
                    conn.transport.abort()
            await asyncio.wait(pending, timeout=2.0)
            for t in pending:
                t.cancel()
        elapsed = min(end, self.stop_at) - self.stats.t_start
        return summarize(self.stats, elapsed)


def percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, math.ceil(q / 100.0 * len(sorted_vals)) - 1))  # nearest rank
    return sorted_vals[i] / 1e6


def summarize(stats: Stats, elapsed: float) -> dict[str, Any]:
    lat = sorted(stats.lat)
    n = len(lat)
    errors = sum(v for k, v in stats.status.items() if not (k.isdigit() and int(k) < 400))
    ok = n - sum(v for k, v in stats.status.items() if k.isdigit() and int(k) >= 400)
    out = {"requests": n, "seconds": round(elapsed, 3), "qps": n / elapsed if elapsed else 0.0,
           "ok_qps": ok / elapsed if elapsed else 0.0,
           "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90), "p95_ms": percentile(lat, 95),
           "p99_ms": percentile(lat, 99), "max_ms": lat[-1] / 1e6 if lat else float("nan"),
           "status": dict(sorted(stats.status.items())), "errors": errors,
           "error_rate": errors / max(1, n + sum(v for k, v in stats.status.items() if not k.isdigit()))}
    if stats.timeline:
        out["timeline"] = [[s, c, e, round(sm / max(c, 1) / 1e6, 3), round(mx / 1e6, 3)]
                           for s, (c, e, sm, mx) in sorted(stats.per_second.items())]
    return out


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(Client(spec).run())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(open(argv[0]).read() if argv and argv[0] != "-" else sys.stdin.read())
    print(json.dumps(run_spec(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
