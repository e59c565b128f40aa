"""The batched feature fetch on one Redis node: HGETALL of many keys in one round trip, on connections
of its own that speak RESP through hiredis (C), without redis-py's per-command layers.

Why a client of its own: the fetch is the one Redis call on the tagging hot path, and redis-py 8's
pipeline spends about four times the CPU of the read itself on each key (Command objects, argument
checks, its observability hooks): 440-490 vs 104 us of client CPU per 16-key batch, one process,
AMD EPYC, load 10 (docs/results/predictor_ab). Everything else (models, events, audiences, the CLI)
keeps redis-py.

It behaves as the client it replaces: AUTH and SELECT from the URL, `timeout_s` per call, at most
`pool_size` connections with a wait of `pool_wait_s` for a free one, and redis-py's exception types
(ConnectionError, TimeoutError, ResponseError), so the caller answers 503 with the reason. A
connection that failed or was cut off mid-reply is closed, never reused: the next call connects
anew, so the service recovers by itself when Redis is back. TLS (rediss://) keeps redis-py's
pipeline (`PipelineHashReader`), as does a Redis Cluster (service/cluster_fetch.py).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _command(*args: bytes) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def _hgetall(keys: list[str]) -> bytes:
    return b"".join(b"*2\r\n$7\r\nHGETALL\r\n$%d\r\n%b\r\n" % (len(k), k) for k in (key.encode() for key in keys))


def _as_dict(reply: list) -> dict[str, str]:
    pairs = iter(reply)
    return dict(zip(pairs, pairs))


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parser: Any
    where: str

    async def call(self, payload: bytes, replies: int) -> list:
        """Send `payload` (`replies` commands) -> their replies, in order (error replies as values)."""
        self.writer.write(payload)
        out: list = []
        gets, read = self.parser.gets, self.reader.read
        while len(out) < replies:
            reply = gets()
            if reply is False:          # hiredis: not a whole reply yet
                data = await read(1 << 16)
                if not data:
                    raise RedisConnectionError(f"Connection to {self.where} closed by the server.")
                self.parser.feed(data)
            else:
                out.append(reply)
        return out

    def close(self) -> None:
        self.writer.close()


class NodeHashReader:
    """HGETALL of many keys on one Redis node (a redis:// URL)."""

    def __init__(self, url: str, timeout_s: float, pool_size: int, pool_wait_s: float):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 6379
        self.where = f"{self.host}:{self.port}"
        self.hello = self._hello(parts)
        self.timeout_s, self.pool_wait_s = timeout_s, pool_wait_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(pool_size)

    @staticmethod
    def supports(url: str) -> bool:
        """Plain redis:// (TLS and clusters keep redis-py)."""
        return urlsplit(url).scheme == "redis"

    @staticmethod
    def _hello(parts) -> list[bytes]:
        """The commands a new connection sends first: AUTH and SELECT as the URL asks."""
        first = []
        if parts.password is not None:
            who = [unquote(parts.username).encode()] if parts.username else []
            first.append(_command(b"AUTH", *who, unquote(parts.password).encode()))
        db = parse_qs(parts.query).get("db", [parts.path.strip("/") or "0"])[0]
        if db not in ("", "0"):
            first.append(_command(b"SELECT", db.encode()))
        return first

    async def hgetall_many(self, keys: list[str]) -> list[dict[str, str]]:
        """The hashes of `keys`, aligned ({} for a missing key); redis-py's errors as it would raise them."""
        if self._slots.locked():    # every connection busy: wait for one, as redis-py's blocking pool does
            try:
                await asyncio.wait_for(self._slots.acquire(), self.pool_wait_s)
            except TimeoutError:
                raise RedisConnectionError(f"no free connection to {self.where} within {self.pool_wait_s} s") from None
        else:
            await self._slots.acquire()
        try:
            replies = await self._call(_hgetall(keys), len(keys))
        finally:
            self._slots.release()
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))
        return [_as_dict(r) for r in replies]

    async def _call(self, payload: bytes, replies: int) -> list:
        conn = self._idle.pop() if self._idle else None
        try:
            async with asyncio.timeout(self.timeout_s):
                if conn is None:
                    conn = await self._connect()
                out = await conn.call(payload, replies)
        except BaseException as e:      # also a cancelled call: its replies would be read by the next one
            if conn is not None:
                conn.close()
            if isinstance(e, TimeoutError):
                raise RedisTimeoutError(f"Timeout reading from {self.where}") from None
            if isinstance(e, OSError):
                raise RedisConnectionError(f"Error {e.errno} connecting to {self.where}. {e.strerror}.") from None
            raise
        self._idle.append(conn)
        return out

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        conn = _Connection(reader, writer, hiredis.Reader(encoding="utf-8"), self.where)
        if self.hello:
            for reply in await conn.call(b"".join(self.hello), len(self.hello)):
                if isinstance(reply, hiredis.ReplyError):
                    conn.close()
                    raise ResponseError(str(reply))
        return conn

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


class PipelineHashReader:
    """The same call on redis-py's client (TLS and whatever else `NodeHashReader` does not speak)."""

    def __init__(self, redis: Any):
        self.redis = redis

    async def hgetall_many(self, keys: list[str]) -> list[dict[str, str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            return await pipe.execute()

    async def aclose(self) -> None:
        pass
