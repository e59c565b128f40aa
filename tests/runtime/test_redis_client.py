"""mvke/redis_client.py: one URL grammar for single nodes, clusters, AUTH and TLS (real servers)."""
from __future__ import annotations

import asyncio

import pytest
import redis

from mvke.runtime.redis_client import REDIS_ERRORS, connect, connect_async, is_cluster, redact, resolve
from tests.fixtures.redis_cluster import ACL_PASSWORD, ACL_USER, PASSWORD


def test_resolve_picks_cluster_mode_from_the_scheme_or_the_environment(monkeypatch):
    monkeypatch.delenv("MVKE_REDIS_CLUSTER", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert resolve("redis://h:1/0") == resolve("redis://h:1/0", cluster=False)
    assert not resolve("redis://h:1/0").cluster
    t = resolve("redis+cluster://u:p@h:7000")
    assert t.cluster and t.url == "redis://u:p@h:7000"
    assert resolve("rediss+cluster://h:7000/0?ssl_ca_certs=/ca.pem").url == "rediss://h:7000?ssl_ca_certs=/ca.pem"
    monkeypatch.setenv("MVKE_REDIS_CLUSTER", "true")
    assert resolve("redis://h:7000/0") == resolve("redis+cluster://h:7000")
    assert not resolve("redis://h:1", cluster=False).cluster     # an explicit argument wins over the env
    monkeypatch.setenv("REDIS_URL", "rediss://h:9/0")
    assert resolve().url == "rediss://h:9"


def test_resolve_refuses_what_a_cluster_or_redis_py_cannot_do():
    with pytest.raises(ValueError, match="database 0"):
        resolve("redis+cluster://h:7000/3")
    with pytest.raises(ValueError, match="unsupported scheme 'http'"):
        resolve("http://h:1")


def test_redact_hides_only_the_password():
    assert redact("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact("rediss+cluster://:pw@h:1") == "rediss+cluster://:***@h:1"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert "pw" not in resolve("redis+cluster://:pw@h:1").display


def test_password_and_acl_user_from_the_url(password_redis, acl_redis):
    for server in (password_redis, acl_redis):
        r = connect(server.url)
        r.set("k", "v")
        assert r.get("k") == b"v"
        r.close()
    assert f"{ACL_USER}:{ACL_PASSWORD}@" in acl_redis.url
    with pytest.raises(redis.AuthenticationError):
        connect(acl_redis.url.replace(ACL_PASSWORD, "wrong")).ping()
    with pytest.raises(redis.AuthenticationError):       # the default user is off: no anonymous access
        connect(f"redis://127.0.0.1:{acl_redis.port}/0").ping()
    with pytest.raises(redis.AuthenticationError):
        connect(f"redis://127.0.0.1:{password_redis.port}/0").ping()


def test_tls_with_the_servers_ca_and_refused_without_it(tls_redis):
    assert tls_redis.url.startswith("rediss://") and "ssl_ca_certs=" in tls_redis.url
    r = connect(tls_redis.url)
    assert r.ping() and r.connection_pool.connection_kwargs.get("ssl_ca_certs")
    r.close()
    unverified = tls_redis.url.split("?")[0]                       # system CAs do not know our test CA
    with pytest.raises(redis.ConnectionError, match="(?i)certificate"):
        connect(unverified).ping()
    plain = f"redis://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"   # TLS port, plain client
    with pytest.raises(REDIS_ERRORS):
        connect(plain, socket_timeout=1).ping()


def test_async_clients_over_tls_and_acl(tls_redis, acl_redis):
    async def roundtrip(url: str) -> bytes:
        r = connect_async(url, pool_size=4, pool_wait_s=0.2)
        try:
            await r.set("ak", "av")
            return await r.get("ak")
        finally:
            await r.aclose()
    assert asyncio.run(roundtrip(tls_redis.url)) == b"av"
    assert asyncio.run(roundtrip(acl_redis.url)) == b"av"


def test_cluster_url_gives_a_cluster_client_that_spreads_keys(redis_cluster, cluster_client):
    r = connect(redis_cluster.url)
    assert is_cluster(r) and redis_cluster.url.startswith("redis+cluster://")
    for i in range(300):
        r.hset(f"mvke:user:u{i}", mapping={"f": str(i)})
    per_node = [n.client().dbsize() for n in redis_cluster.nodes]
    assert sum(per_node) == 300 and min(per_node) > 50, per_node      # every master holds a share
    # one hash tag = one slot: a MULTI over it is legal; over two slots it is refused
    with r.pipeline(transaction=True) as p:
        p.set("{mvke}:a", 1).set("{mvke}:b", 2).execute()
    with pytest.raises(REDIS_ERRORS, match="(?i)slot"):
        with r.pipeline(transaction=True) as p:
            p.set("a", 1).set("b", 2).execute()
    r.close()


def test_cluster_chosen_by_the_environment_variable(redis_cluster, cluster_client, monkeypatch):
    monkeypatch.setenv("MVKE_REDIS_CLUSTER", "1")
    plain = redis_cluster.url.replace("redis+cluster://", "redis://")
    r = connect(plain)
    assert is_cluster(r)
    r.set("x", 1)
    r.close()

    async def check() -> bool:
        ar = connect_async(plain, pool_size=8)
        try:
            await ar.set("y", 2)
            return is_cluster(ar) and await ar.get("y") == b"2"
        finally:
            await ar.aclose()
    assert asyncio.run(check())
