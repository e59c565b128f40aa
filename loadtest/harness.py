"""Shared plumbing of the load tests: private Redis, publishing, servers, requests, load runs.

Everything binds to 127.0.0.1 and uses private redis-servers on free ports
(never the shared instance on 6379); every load run is bounded in time.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from bisect import bisect_left
from itertools import accumulate
from pathlib import Path
from typing import Any, Sequence

import httpx

from mvke.localredis import LocalRedis, free_port
from mvke.runtime.contract import Manifest
from mvke.runtime.encoded import MULTI_SEP
from mvke.runtime.keys import Keys
from mvke.runtime.redis_client import connect   # one node or a cluster (redis+cluster://)
from mvke.runtime.versions import active_version

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ---- data in Redis -----------------------------------------------------------
def start_redis() -> LocalRedis:
    return LocalRedis().start()


def pipeline(work: str | Path, model: str, redis_url: str | None = None, epochs: int = 1,
             log: str | Path | None = None, extra: Sequence[str] = ()) -> dict:
    """`mvke pipeline --data-source synth --model MODEL --epochs 1 --work WORK [--redis URL]` -> its summary.

    Steps whose output exists are skipped: the first call builds data, checkpoint and bundle; a call
    with a (fresh, private) Redis then only publishes and loads the feature store."""
    cmd = [PY, "-m", "mvke.cli", "pipeline", "--data-source", "synth", "--model", model, "--epochs", str(epochs),
           "--work", str(work), *extra] + (["--redis", redis_url] if redis_url else [])
    with open(log or os.devnull, "a") as err:
        out = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mvke(*args: str) -> str:
    """One `mvke` command (export, publish, features load, ...) -> its stdout; its stderr in the error."""
    res = subprocess.run([PY, "-m", "mvke.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"mvke {' '.join(args)} failed: {res.stderr[-2000:]}")
    return res.stdout


def serve_bundle(redis_url: str, bundle: str | Path, data: str | Path) -> list[str]:
    """Publish `bundle` and load the users of `data` into a (private) Redis -> the stored user ids."""
    mvke("publish", str(bundle), "--redis", redis_url)
    mvke("features", "load", "--data", str(data), "--redis", redis_url)
    return scan_user_ids(redis_url)


def scan_user_ids(redis_url: str, prefix: str = "mvke", limit: int = 1_000_000) -> list[str]:
    r = connect(redis_url, decode_responses=True, socket_timeout=30)
    try:
        head = f"{prefix}:user:"
        out = []
        for key in r.scan_iter(match=head + "*", count=5000):
            out.append(key[len(head):])
            if len(out) >= limit:
                break
        return sorted(out)
    finally:
        r.close()


def sample_features(redis_url: str, user_ids: Sequence[str], n: int = 50, prefix: str = "mvke",
                    seed: int = 0) -> list[dict[str, Any]]:
    """Raw feature dicts of a few stored users (multi fields as lists, by the active model's schema):
    bodies for 'new' users."""
    r = connect(redis_url, decode_responses=True, socket_timeout=30)
    try:
        keys = Keys(prefix)
        manifest = Manifest.from_json(r.get(keys.manifest(active_version(r, keys))))
        kinds = {f["name"]: f["kind"] for f in manifest.features["fields"]}
        rng = random.Random(seed)
        picks = rng.sample(list(user_ids), min(n, len(user_ids)))
        out = []
        for uid in picks:
            row = r.hgetall(keys.user(uid))
            # only the model's fields (the loader's bookkeeping, e.g. _loaded_at, is not a feature)
            out.append({k: (v.split(MULTI_SEP) if v else []) if kinds[k] == "multi" else v
                        for k, v in row.items() if k in kinds})
        return out
    finally:
        r.close()


# ---- request mixes -----------------------------------------------------------
def parse_mix(spec: str) -> list[tuple[int, float]]:
    """'5:0.2,20:0.6,50:0.2' -> [(5, .2), (20, .6), (50, .2)] (weights need not sum to 1)."""
    out = []
    for part in spec.split(","):
        k, _, w = part.partition(":")
        out.append((int(k), float(w or 1)))
    return out


class UserSampler:
    """Draws user ids uniformly (zipf=0) or Zipf-skewed: rank r has weight 1/r^zipf."""

    def __init__(self, user_ids: Sequence[str], zipf: float = 0.0, seed: int = 0):
        if not user_ids:
            raise ValueError("no user ids to draw from (empty feature store?)")
        self.ids = list(user_ids)
        self.rng = random.Random(seed)
        self.rng.shuffle(self.ids)  # which users are hot is random, not alphabetical
        self.cum = list(accumulate(1.0 / (r ** zipf) for r in range(1, len(self.ids) + 1))) if zipf > 0 else None

    def draw(self) -> str:
        if self.cum is None:
            return self.ids[self.rng.randrange(len(self.ids))]
        return self.ids[bisect_left(self.cum, self.rng.random() * self.cum[-1])]


def make_requests(user_ids: Sequence[str], n: int = 4096, zipf: float = 0.0,
                  topk_mix: str | None = "20:1", new_share: float = 0.0,
                  feature_examples: Sequence[dict] = (), seed: int = 0) -> list[list]:
    """[method, path, body-or-None] rows for loadgen: stored users, plus `new_share` of requests
    for users not in the store with their features in the body."""
    import orjson
    rng = random.Random(seed + 1)
    users = UserSampler(user_ids, zipf, seed)
    mix = parse_mix(topk_mix) if topk_mix else []
    ks, cum = [k for k, _ in mix], list(accumulate(w for _, w in mix))
    out = []
    for i in range(n):
        body: dict[str, Any] = {}
        if ks:
            body["top_k"] = ks[bisect_left(cum, rng.random() * cum[-1])]
        if feature_examples and rng.random() < new_share:
            uid = f"new-{seed}-{i}"
            body["features"] = feature_examples[i % len(feature_examples)]
        else:
            uid = users.draw()
        out.append(["POST", f"/users/{uid}/tags", orjson.dumps(body).decode() if body else None])
    return out


# ---- load runs ---------------------------------------------------------------
def run_load(port: int, requests: list[list], concurrency: int, duration: float, warmup: float = 1.0,
             rate: float | None = None, timeline: bool = False, grace: float = 5.0) -> dict:
    """One bounded loadgen run in its own process -> its JSON summary (answers still missing
    `grace` seconds after the end are counted as "unfinished")."""
    spec = {"host": "127.0.0.1", "port": port, "requests": requests, "concurrency": concurrency,
            "duration": duration, "warmup": warmup, "rate": rate, "timeline": timeline, "grace": grace}
    proc = subprocess.run([PY, "-m", "loadtest.loadgen", "-"], input=json.dumps(spec), capture_output=True,
                          text=True, cwd=ROOT, timeout=warmup + duration + grace + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- servers -----------------------------------------------------------------
class Server:
    """A uvicorn server (the service via `mvke serve`, or any ASGI app) on 127.0.0.1:<free port>."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 ready_path: str = "/readyz", log: str | Path | None = None, root: str | Path = ROOT):
        self.port = port or free_port()
        self.root = Path(root)   # the checkout whose code runs (`python -m` imports from its working directory)
        self.args = [a.replace("{port}", str(self.port)) for a in args]
        self.env = {**os.environ, **(env or {})}
        self.ready_path = ready_path
        self.log = Path(log) if log else None
        self.proc: subprocess.Popen | None = None

    @classmethod
    def service(cls, redis_url: str, workers: int | None = 1, env: dict[str, str] | None = None, **kw) -> "Server":
        """`mvke serve`; workers None: the service's own default (MVKE_WORKERS)."""
        return cls([PY, "-m", "mvke.cli", "serve", "--host", "127.0.0.1", "--port", "{port}"]
                   + (["--workers", str(workers)] if workers is not None else []),
                   {"REDIS_URL": redis_url, "MVKE_LOG_LEVEL": "WARNING", **(env or {})}, **kw)

    @classmethod
    def asgi(cls, app: str, workers: int = 1, env: dict[str, str] | None = None, **kw) -> "Server":
        """Same server settings as `mvke serve` (service/cli.py)."""
        return cls([PY, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", "{port}", "--workers", str(workers),
                    "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
                    "--timeout-keep-alive", "30", "--backlog", "2048"], env, **kw)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "Server":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {' '.join(self.args)}"
                                   + (f" (log: {self.log})" if self.log else ""))
            try:
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout:.0f}s: {' '.join(self.args)}")

    def pids(self) -> list[int]:
        """The worker processes (uvicorn's children when it forks workers, else the server itself)."""
        import psutil
        if not self.proc:
            return []
        p = psutil.Process(self.proc.pid)
        kids = [c for c in p.children(recursive=True) if "python" in (c.name() or "").lower()]
        # uvicorn --workers N: a supervisor plus N worker processes (and a resource tracker for spawn)
        workers = [c for c in kids if "multiprocessing.resource_tracker" not in " ".join(c.cmdline())]
        return [c.pid for c in workers] or [p.pid]

    def rss_mb(self) -> list[float]:
        import psutil
        out = []
        for pid in self.pids():
            try:
                out.append(psutil.Process(pid).memory_info().rss / 2**20)
            except psutil.Error:
                pass
        return out

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers only
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
