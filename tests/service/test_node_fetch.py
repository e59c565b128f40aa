"""The hot path's own Redis reader (service/node_fetch.py) against a real redis-server: the same hashes
as redis-py, AUTH and SELECT from the URL, redis-py's errors, and recovery after an outage."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mvke.localredis import LocalRedis
from mvke.runtime.redis_client import REDIS_ERRORS
from service.node_fetch import NodeHashReader, PipelineHashReader

pytestmark = pytest.mark.integration


def _reader(url: str, timeout_s: float = 1.0, pool_size: int = 4, pool_wait_s: float = 0.2) -> NodeHashReader:
    return NodeHashReader(url, timeout_s, pool_size, pool_wait_s)


def test_same_hashes_as_redis_py(redis_server, redis_client):
    import redis.asyncio as aioredis
    big = "|".join(f"tag{i:05d}" for i in range(20_000))     # a reply larger than one socket read
    redis_client.hset("nf:u1", mapping={"age": "30", "hist": "a|b|c", "name": "Zoë ✓"})
    redis_client.hset("nf:u2", mapping={"hist": big, "empty": ""})
    keys = ["nf:u1", "nf:missing", "nf:u2", "nf:u1"]

    async def both():
        node = _reader(redis_server.url)
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            return [await node.hgetall_many(keys) for _ in range(3)], await PipelineHashReader(client).hgetall_many(keys)
        finally:
            await node.aclose()
            await client.aclose()

    ours, theirs = asyncio.run(both())
    assert all(answer == theirs for answer in ours)
    assert theirs[1] == {} and theirs[2]["hist"] == big and theirs[0]["name"] == "Zoë ✓"


def test_auth_user_and_database_from_the_url():
    with LocalRedis(password="s3cret:/@x", username="tagger") as server:
        server.client(db=3).hset("nf:u", mapping={"f": "v"})
        url = server.url.rsplit("/", 1)[0] + "/3"
        assert asyncio.run(_reader(url).hgetall_many(["nf:u"])) == [{"f": "v"}]
        wrong = url.replace("s3cret", "nope")
        with pytest.raises(ResponseError, match="WRONGPASS|invalid"):
            asyncio.run(_reader(wrong).hgetall_many(["nf:u"]))


def test_error_reply_keeps_the_connection_in_step(redis_server, redis_client):
    redis_client.set("nf:str", "x")
    redis_client.hset("nf:h", mapping={"f": "v"})

    async def run():
        node = _reader(redis_server.url, pool_size=1)
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await node.hgetall_many(["nf:h", "nf:str", "nf:h"])
        return await node.hgetall_many(["nf:h"])       # the same (only) connection, still in step

    assert asyncio.run(run()) == [{"f": "v"}]


def test_outage_is_a_redis_error_and_the_reader_recovers(private_redis):
    private_redis.client().hset("nf:u", mapping={"f": "v"})

    async def run():
        node = _reader(private_redis.url, timeout_s=0.5)
        assert await node.hgetall_many(["nf:u"]) == [{"f": "v"}]
        private_redis.stop()
        with pytest.raises(REDIS_ERRORS) as down:
            await node.hgetall_many(["nf:u"])
        private_redis.start()
        private_redis.client().hset("nf:u", mapping={"f": "again"})
        return down.value, await node.hgetall_many(["nf:u"])

    error, after = asyncio.run(run())
    assert isinstance(error, RedisConnectionError) and str(private_redis.port) in str(error)
    assert after == [{"f": "again"}]


def test_a_stalled_server_times_out_and_the_pool_bounds_the_waiters(private_redis):
    private_redis.client().hset("nf:u", mapping={"f": "v"})

    async def run():
        node = _reader(private_redis.url, timeout_s=0.3, pool_size=1, pool_wait_s=0.05)
        await node.hgetall_many(["nf:u"])                   # one connection, made while the server answers
        os.kill(private_redis.proc.pid, signal.SIGSTOP)
        try:
            first, second = await asyncio.gather(node.hgetall_many(["nf:u"]), node.hgetall_many(["nf:u"]),
                                                 return_exceptions=True)
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        return first, second, await node.hgetall_many(["nf:u"])

    first, second, after = asyncio.run(run())
    assert isinstance(first, RedisTimeoutError)
    assert isinstance(second, RedisConnectionError) and "no free connection" in str(second)
    assert after == [{"f": "v"}]     # a new connection: the timed-out one was closed, its late reply never read
