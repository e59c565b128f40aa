"""The README's two commands from a fresh clone: the main job (`bash scripts/run.sh`) end to end
with a small data size, then again (everything reused), and the test command (`bash scripts/test.sh`,
collection only: the suite does not run itself). Without REDIS_URL the job writes only into a
private redis-server of its own: a decoy Redis where the job looks for one stays empty.

"Fresh clone": the working tree's tracked and not-ignored files copied into a temporary
directory (what `git clone` of this tree would give, uncommitted edits included), so nothing the
job left in this checkout (.mvke-local, data/) helps it. The clone's .venv is a link to this
checkout's, whose set-up stamp matches the clone's files: scripts/setup.sh then returns at once
instead of downloading everything again; PYTHONPATH makes the clone's code the one that runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from mvke.localredis import LocalRedis, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# The decoy may see what a client does to say hello and what this test asks; never a write.
DECOY_ALLOWED = {"ping", "info", "hello", "client", "command", "config", "dbsize"}


def readme_commands() -> list[str]:
    """The shell lines of the README's quick start (its first bash block)."""
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def readme_sample_answer() -> dict:
    """The answer the README shows for its first request of `POST /users/{id}/tags` (top_k 3)."""
    api = README.split("## The API", 1)[1]
    return json.loads(re.search(r"```json\n(.*?)```", api, re.S).group(1))


def fresh_clone(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    key = hashlib.sha256((dest / "pyproject.toml").read_bytes() + (dest / "scripts/setup.sh").read_bytes())
    if not list((ROOT / ".venv").glob(f".mvke-setup-*-{key.hexdigest()[:16]}")):
        pytest.fail("this checkout's .venv was set up for other pyproject.toml/setup.sh files: "
                    "run `bash scripts/setup.sh` first")
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


class Job:
    """One run of a README command in the clone; its output is collected in a thread."""

    def __init__(self, clone: Path, command: str, env: dict):
        self.proc = subprocess.Popen(["bash", "-c", command], cwd=clone, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, port: int, timeout: float) -> None:
        """Ready = the job printed its curl line (what a person waits for) and /readyz says 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.text
            if "curl -s -X POST" in self.text:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        self.proc.kill()
        pytest.fail(f"not ready after {timeout}s: {self.text}")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        return self.text


def run_printed_curl(text: str) -> dict:
    """The curl line the job printed, run as printed (by curl when there is one)."""
    line = next(s.strip() for s in text.splitlines() if s.strip().startswith("curl -s -X POST"))
    if shutil.which("curl"):
        out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30, check=True).stdout
        return json.loads(out)
    args = shlex.split(line)
    return httpx.post(next(a for a in args if a.startswith("http")), content=args[args.index("-d") + 1],
                      headers={"content-type": "application/json"}, timeout=10).json()


@pytest.fixture
def decoy():
    """A redis-server where the job looks for a Redis that happens to answer."""
    server = LocalRedis().start()
    yield server
    server.stop()


def test_readme_commands_from_a_fresh_clone_never_write_into_a_found_redis(tmp_path, decoy):
    commands = readme_commands()
    assert "bash scripts/run.sh" in commands and "bash scripts/test.sh" in commands, commands
    clone = fresh_clone(tmp_path / "mvke")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVKE_") and k not in ("REDIS_URL", "PORT")}
    env.update({"PYTHONPATH": str(clone), "PYTHONUNBUFFERED": "1", "PORT": str(port),
                "MVKE_DEMO_USERS": "300", "MVKE_DEMO_TAGS": "40", "MVKE_DEMO_EPOCHS": "1",
                "MVKE_PROBE_REDIS_URL": decoy.url})

    job = Job(clone, "bash scripts/run.sh", env)
    try:
        job.wait_ready(port, timeout=400)
        body = run_printed_curl(job.text)
    finally:
        first = job.stop()
    assert set(body["tasks"]) == {"interest", "intention"} and body["feature_source"] == "store", body
    assert all(len(v) == 3 for v in body["tasks"].values())
    sample = readme_sample_answer()           # the README shows what the service returns, as it returns it
    assert list(sample) == list(body), (list(sample), list(body))
    for task, entries in sample["tasks"].items():
        assert len(entries) == len(body["tasks"][task]) == 3
        assert all(list(e) == list(body["tasks"][task][0]) for e in entries)
        assert all(len(repr(e["score"]).split(".")[1]) > 4 for e in entries), entries   # full floats
    assert f"a Redis answers at {decoy.url}; this job does not write into it" in first, first
    assert "started a private redis-server" in first and "oracle" in first and "ready in" in first, first
    assert (clone / ".mvke-local" / "redis" / "dump.rdb").exists(), "the private Redis was not saved on shutdown"
    assert "Traceback" not in first and "Warning" not in first and "color_message" not in first, first

    job = Job(clone, "bash scripts/run.sh", env)        # everything reused: no data, training or export
    try:
        job.wait_ready(port, timeout=120)
        assert run_printed_curl(job.text)["model_version"] == body["model_version"]
    finally:
        second = job.stop()
    assert "==> training" not in second and "==> exporting" not in second, second

    decoy_client = decoy.client()
    commands_seen = {k.removeprefix("cmdstat_").split("|")[0] for k in decoy_client.info("commandstats")}
    assert decoy_client.dbsize() == 0 and commands_seen <= DECOY_ALLOWED, commands_seen

    tests = subprocess.run(["bash", "-c", "bash scripts/test.sh --collect-only -q -p no:cacheprovider"], cwd=clone,
                           env=env, capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    per_file = [int(n) for n in re.findall(r"^tests/\S+\.py: (\d+)$", tests.stdout, re.M)]   # test.sh's -q, twice
    assert sum(per_file) > 100, tests.stdout[-1500:] + tests.stderr[-1500:]
