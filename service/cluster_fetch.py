"""The batched feature fetch on a Redis Cluster: one pipeline per master, the masters in parallel.

redis-py's cluster pipeline groups commands by node too, but when one master is down
its connection error aborts the whole pipeline, which redis-py then retries after
closing every connection and sleeping (about a second): one dead master would fail
the users of the healthy ones and stall the batcher. Here each master gets its own
plain pipeline on its own small pool without retries, so:

* a batch costs one round trip per master that holds some of its users;
* a master that is down fails only its users, at once (the service answers them 503
  with the reason, the others 200), and the slot map is re-read in the background
  (at most once a second) so a failover is picked up;
* users whose slot is migrating (MOVED, ASK, TRYAGAIN) are fetched again through the
  cluster client, which follows the redirection (no failed request during a reshard).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, SlotNotCoveredError, TryAgainError

from mvke.runtime.redis_client import REDIS_ERRORS

_REDIRECTED = (MovedError, AskError, TryAgainError)
# Retried through the cluster client: redirections, and a slot map that is briefly incomplete mid-reshard.
_RETRIED = (*_REDIRECTED, ClusterDownError, SlotNotCoveredError)
_REDIRECT_PAUSES_S = (0.0, 0.005, 0.02, 0.05)


class ClusterHashReader:
    """HGETALL of many keys on a cluster (`redis.asyncio.cluster.RedisCluster` from connect_async)."""

    def __init__(self, cluster: Any, pool_size: int = 64, pool_wait_s: float = 0.2):
        self.cluster, self.pool_size, self.pool_wait_s = cluster, pool_size, pool_wait_s
        self._masters: dict[str, aioredis.Redis] = {}
        self._refresh_task: asyncio.Task | None = None
        self._refreshed_at = 0.0

    def _client(self, node: Any) -> aioredis.Redis:
        """A plain client of one master: the cluster client's connection settings (AUTH, TLS, timeouts,
        decoding), a blocking pool, no retries (the caller decides what a failure means)."""
        client = self._masters.get(node.name)
        if client is None:
            pool = aioredis.BlockingConnectionPool(
                connection_class=node.connection_class, max_connections=self.pool_size, timeout=self.pool_wait_s,
                **{**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)})
            client = self._masters[node.name] = aioredis.Redis(connection_pool=pool)
        return client

    async def hgetall_many(self, keys: list[str]) -> list[dict | BaseException]:
        """Results aligned with `keys`: the hash, or the error that kept it from being read."""
        nodes = self.cluster.nodes_manager
        if not nodes.slots_cache:
            await self.cluster.initialize()
        results: list[Any] = [None] * len(keys)
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, key in enumerate(keys):
            try:
                node = nodes.get_node_from_slot(key_slot(key.encode()))
            except REDIS_ERRORS as e:          # a slot no master serves
                results[i] = e
                continue
            groups.setdefault(node.name, (node, []))[1].append(i)
        await asyncio.gather(*(self._node_batch(node, idx, keys, results) for node, idx in groups.values()))
        redirected = await self._follow_redirections(keys, results)
        if redirected or any(isinstance(r, BaseException) for r in results):
            self._refresh_soon()
        return results

    async def _follow_redirections(self, keys: list[str], results: list) -> bool:
        """Fetch again, through the cluster client, the keys whose slot was moving; True if there were any.

        A slot can be redirected twice in a row while `redis-cli --cluster reshard` finishes it (ASK from
        the source, then MOVED or TRYAGAIN while the slot map settles), so this tries a few rounds, the
        later ones after a short pause, before a redirection counts as this user's failure (503).
        """
        redo = [i for i, r in enumerate(results) if isinstance(r, _RETRIED)]
        if not redo:
            return False
        for pause_s in _REDIRECT_PAUSES_S:
            if pause_s:
                await asyncio.sleep(pause_s)
            again = await asyncio.gather(*(self.cluster.hgetall(keys[i]) for i in redo), return_exceptions=True)
            for i, r in zip(redo, again):
                results[i] = r
            redo = [i for i in redo if isinstance(results[i], _RETRIED)]
            if not redo:
                break
        return True

    async def _node_batch(self, node: Any, idx: list[int], keys: list[str], results: list) -> None:
        try:
            async with self._client(node).pipeline(transaction=False) as pipe:
                for i in idx:
                    pipe.hgetall(keys[i])
                values = await pipe.execute(raise_on_error=False)
        except REDIS_ERRORS as e:                  # this master is unreachable: its users only
            values = [e] * len(idx)
        for i, v in zip(idx, values):
            results[i] = v

    def _refresh_soon(self) -> None:
        """Re-read the slot map in the background, at most once a second."""
        now = time.monotonic()
        if now - self._refreshed_at < 1.0 or (self._refresh_task and not self._refresh_task.done()):
            return
        self._refreshed_at = now

        async def refresh() -> None:
            try:
                await self.cluster.nodes_manager.initialize()
            except Exception:  # no master answers now: the next failing batch tries again
                pass
        self._refresh_task = asyncio.create_task(refresh(), name="cluster-slot-map")

    async def aclose(self) -> None:
        for client in self._masters.values():
            await client.aclose()
        self._masters.clear()
