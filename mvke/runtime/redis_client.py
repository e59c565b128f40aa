"""Connecting to Redis: one node or a Redis Cluster, with AUTH and TLS, for every stage.

Every Redis user of the project (service, publish, rollback, `mvke models`, features
load, tag-all's Redis output, the quick start) connects through `connect` (sync) or
`connect_async` (asyncio), so all of them accept the same URLs:

    redis://[[user]:password@]host:port[/db]          one node
    rediss://...?ssl_ca_certs=/path/ca.pem            one node over TLS (server certificate checked)
    redis+cluster://[[user]:password@]host:port       a Redis Cluster (any node; the rest is discovered)
    rediss+cluster://...?ssl_ca_certs=/path/ca.pem    a Redis Cluster over TLS

or a plain `redis://` / `rediss://` URL with `MVKE_REDIS_CLUSTER=true` in the environment
(handy where the URL comes from elsewhere, e.g. a managed service's connection string).
A URL's scheme wins over the variable. Query parameters are redis-py's connection options
(`ssl_ca_certs`, `ssl_cert_reqs=none` for a self-signed test server, `ssl_check_hostname`,
`socket_timeout`, ...). Cluster mode uses redis-py's own cluster clients
(`redis.cluster.RedisCluster`, `redis.asyncio.cluster.RedisCluster`): they route each key
to its slot's master and follow MOVED/ASK redirections while slots migrate.

redis-py's cluster errors (`RedisClusterException`: no node reachable, a slot not covered)
are not `RedisError`s: callers catch `REDIS_ERRORS`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Union
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.exceptions import RedisClusterException, RedisError

from mvke.runtime.keys import DEFAULT_URL, redis_url

CLUSTER_ENV = "MVKE_REDIS_CLUSTER"
REDIS_URL_HELP = (f"Redis URL (default $REDIS_URL or {DEFAULT_URL}): redis://[user:password@]host:port/db, "
                  "rediss://... for TLS (?ssl_ca_certs=PATH), redis+cluster://host:port (or "
                  f"{CLUSTER_ENV}=true) for a Redis Cluster")
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# Everything a Redis call can raise that means "Redis is not answering as it should".
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException)

SyncClient = Union[redis.Redis, "redis.cluster.RedisCluster"]


@dataclass(frozen=True)
class RedisTarget:
    """Where to connect: a URL redis-py understands (redis:// or rediss://) and whether it is a cluster."""
    url: str
    cluster: bool

    @property
    def display(self) -> str:
        """The URL without its password (for logs and summaries)."""
        return redact(self.url) + (" (cluster)" if self.cluster else "")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def resolve(url: str | None = None, cluster: bool | None = None) -> RedisTarget:
    """URL (default `$REDIS_URL`, else redis://127.0.0.1:6379/0) and cluster flag (scheme, argument, env)."""
    url = redis_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in _CLUSTER_SCHEMES:
        url = urlunsplit(parts._replace(scheme=_CLUSTER_SCHEMES[scheme]))
        return RedisTarget(_without_db(url), True)
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"redis URL: unsupported scheme {parts.scheme!r} in {redact(url)} "
                         "(redis://, rediss://, redis+cluster://, rediss+cluster://)")
    if cluster is None:
        cluster = _truthy(os.environ.get(CLUSTER_ENV))
    return RedisTarget(_without_db(url) if cluster else url, bool(cluster))


def _without_db(url: str) -> str:
    """A cluster has database 0 only: drop a `/0` path (anything else is an error)."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    if path not in ("", "0"):
        raise ValueError(f"redis URL: a Redis Cluster has only database 0, got /{path} in {redact(url)}")
    return urlunsplit(parts._replace(path=""))


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str | None = None, cluster: bool | None = None, **kwargs: Any) -> SyncClient:
    """A sync client: `redis.Redis` for one node, `redis.cluster.RedisCluster` for a cluster."""
    target = url if isinstance(url, RedisTarget) else resolve(url, cluster)
    if target.cluster:
        from redis.cluster import RedisCluster
        return RedisCluster.from_url(target.url, **kwargs)
    return redis.Redis.from_url(target.url, **kwargs)


def connect_async(url: str | None = None, cluster: bool | None = None, *, pool_size: int | None = None,
                  pool_wait_s: float | None = None, **kwargs: Any):
    """An asyncio client: `redis.asyncio.Redis` or `redis.asyncio.cluster.RedisCluster`.

    One node: with `pool_size`, a blocking pool of that many connections that waits up
    to `pool_wait_s` for a free one and then raises (redis-py's default pool raises at
    once). Cluster: `pool_size` connections per node; beyond that redis-py raises
    `MaxConnectionsError` at once (its cluster nodes have no blocking pool).
    """
    import redis.asyncio as aioredis
    target = url if isinstance(url, RedisTarget) else resolve(url, cluster)
    if target.cluster:
        from redis.asyncio.cluster import RedisCluster
        if pool_size:
            kwargs["max_connections"] = pool_size
        return RedisCluster.from_url(target.url, **kwargs)
    if pool_size:
        pool = aioredis.BlockingConnectionPool.from_url(target.url, max_connections=pool_size,
                                                        timeout=pool_wait_s, **kwargs)
        return aioredis.Redis(connection_pool=pool)
    return aioredis.Redis.from_url(target.url, **kwargs)


def is_cluster(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.cluster import RedisCluster
    return isinstance(client, (RedisCluster, AsyncCluster))


def describe_error(e: BaseException) -> str:
    """A one-line reason for a 503 or a CLI error ("ConnectionError: Error 111 connecting to ...")."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
