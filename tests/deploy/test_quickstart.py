"""The README's main job, end to end with a small data size: data -> train -> export ->
publish -> feature store -> serve on a private redis-server, then a real request."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mvke.localredis import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class _Output:
    """Collects the job's output in a thread (the pipe must not fill up while it serves)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        self.thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _start(work: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MVKE_WORK_DIR": str(work), "MVKE_DEMO_USERS": "300", "MVKE_DEMO_EPOCHS": "1",
           "MVKE_PRIVATE_REDIS": "1", "PORT": str(port), "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)
    return subprocess.Popen([sys.executable, "scripts/quickstart.py"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_ready(proc: subprocess.Popen, out: _Output, port: int, timeout: float) -> float:
    """Ready = the job printed its curl line (what a person waits for) and /readyz says 200."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, out.text
        if "curl -s -X POST" in out.text:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"not ready after {timeout}s: {out.text}")


def _stop(proc: subprocess.Popen, out: _Output) -> str:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    out.thread.join(timeout=10)
    return out.text


def test_main_job_end_to_end_then_fast_restart(tmp_path):
    port = free_port()
    proc = _start(tmp_path, port)
    out = _Output(proc)
    try:
        _wait_ready(proc, out, port, timeout=400)
        r = httpx.post(f"http://127.0.0.1:{port}/users/u0000042/tags", json={"top_k": 3}, timeout=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["tasks"]) == {"interest", "intention"}
        assert all(len(v) == 3 for v in body["tasks"].values())
        assert body["feature_source"] == "store"
    finally:
        first = _stop(proc, out)
    assert "private redis-server" in first, first
    assert "curl -s -X POST" in first, first
    assert (tmp_path / "redis" / "dump.rdb").exists(), "the private Redis was not saved on shutdown"

    # Second run: everything exists, nothing is retrained; the model and features come back from disk.
    proc = _start(tmp_path, port)
    out = _Output(proc)
    try:
        _wait_ready(proc, out, port, timeout=120)
        r = httpx.post(f"http://127.0.0.1:{port}/users/u0000042/tags", json={"top_k": 1}, timeout=5)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == body["model_version"]
    finally:
        second = _stop(proc, out)
    assert "training" not in second and "exporting" not in second
