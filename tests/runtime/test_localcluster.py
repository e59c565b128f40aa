"""The test clusters' own start-up (mvke/localcluster.py): a cluster whose nodes do not agree in time is
made again on fresh ports instead of failing every cluster test of the session."""
from __future__ import annotations

import pytest

from mvke.localcluster import ClusterNotReady, LocalRedisCluster, redis_cli_binary


@pytest.mark.integration
def test_a_cluster_that_does_not_agree_in_time_is_made_again_on_fresh_ports(monkeypatch):
    try:
        redis_cli_binary()
    except RuntimeError as e:
        pytest.skip(f"needs redis-cli: {e}")
    real_wait, calls = LocalRedisCluster.wait_ok, []

    def first_attempt_times_out(self, timeout=30.0):
        calls.append([n.port for n in self.nodes])
        if len(calls) == 1:
            raise ClusterNotReady("the Redis Cluster did not become ready (simulated)")
        real_wait(self, timeout)
    monkeypatch.setattr(LocalRedisCluster, "wait_ok", first_attempt_times_out)
    cluster = LocalRedisCluster(masters=3)
    first_ports = [n.port for n in cluster.nodes]
    try:
        cluster.start()
        assert len(calls) == 2 and calls[0] == first_ports and set(calls[1]).isdisjoint(first_ports)
        with cluster.client() as c:
            c.set("k", "v")
            assert c.get("k") == b"v"
    finally:
        cluster.stop()
    with pytest.raises(ClusterNotReady):       # always too slow: the last attempt's reason is raised
        monkeypatch.setattr(LocalRedisCluster, "wait_ok",
                            lambda self, timeout=30.0: (_ for _ in ()).throw(ClusterNotReady("never")))
        LocalRedisCluster(masters=3).start(attempts=2)
