"""Measure what a new user waits for: README's main command from a fresh clone, twice.

Clones REPO at REF into a new directory, runs `bash scripts/run.sh` there (set-up,
then the main job), timestamps every line it prints, sends the first request once
the job prints its curl line, stops it, then runs it a second time (everything
reused). Prints the timeline (set-up, each step, first answer) with the CPU model
and load averages, and writes it as JSON. Standard library only, so it runs with
any python3 before the clone has a venv.

    python3 scripts/first_run_timeline.py --repo /path/to/repo --ref main --out timeline.json
    python3 scripts/first_run_timeline.py ... --cold-pip-cache   # pip downloads into an empty cache

Without REDIS_URL in --env the job picks its Redis itself; pass
`--env MVKE_PRIVATE_REDIS=1` to measure commits older than the private-Redis default.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

READY_MARK = "curl -s -X POST"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_marker(line: str) -> bool:
    """Lines that start a phase: set-up's own lines and the job's `==>` steps."""
    s = line.strip()
    return s.startswith("==>") or s.startswith("setup:") or s.startswith("ready in")


def run_once(clone: Path, env: dict, port: int, log: Path, timeout: float) -> dict:
    t0 = time.monotonic()
    load_before = os.getloadavg()
    proc = subprocess.Popen(["bash", "scripts/run.sh"], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[tuple[float, str]] = []

    def pump() -> None:
        with log.open("w") as f:
            for line in iter(proc.stdout.readline, ""):
                t = time.monotonic() - t0
                lines.append((t, line.rstrip("\n")))
                f.write(f"{t:9.2f} {line}")
                f.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    first_answer = None
    try:
        while time.monotonic() - t0 < timeout and proc.poll() is None:
            if any(READY_MARK in text for _, text in lines):
                first_answer = _first_answer(port, t0)
                if first_answer:
                    break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(10)
    markers = [(round(t, 1), text.strip()[:110]) for t, text in lines if is_marker(text)]
    return {"first_answer_s": first_answer and round(first_answer[0], 1), "answer": first_answer and first_answer[1],
            "exit_code": proc.returncode, "markers": markers, "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "lines": len(lines), "log": str(log)}


def _first_answer(port: int, t0: float) -> tuple[float, str] | None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/users/u0000042/tags", data=b'{"top_k": 3}',
                                 headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return time.monotonic() - t0, r.read().decode()[:400]
    except OSError:
        return None


def print_run(name: str, run: dict) -> None:
    print(f"\n{name}: first answer at {run['first_answer_s']} s (exit {run['exit_code']}, "
          f"load {run['load_before']} -> {run['load_after']})")
    prev = 0.0
    for t, text in run["markers"]:
        print(f"  {t:8.1f} s  (+{t - prev:6.1f})  {text}")
        prev = t
    if run["first_answer_s"] is not None:
        print(f"  {run['first_answer_s']:8.1f} s  (+{run['first_answer_s'] - prev:6.1f})  first 200 answer")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="repository to clone (path or URL)")
    p.add_argument("--ref", default="HEAD", help="commit or branch to check out (default HEAD)")
    p.add_argument("--dir", help="where to clone (default: a new temporary directory)")
    p.add_argument("--cold-pip-cache", action="store_true", help="give pip an empty cache (PIP_CACHE_DIR)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the job")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the first answer per run")
    p.add_argument("--out", help="write the timeline as JSON here")
    a = p.parse_args()

    base = Path(a.dir or tempfile.mkdtemp(prefix="mvke-first-run-"))
    clone = base / "mvke"
    subprocess.run(["git", "clone", "-q", a.repo, str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", a.ref], check=True)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MVKE_", "VIRTUAL_ENV")) and k != "REDIS_URL"}
    env.update({"PORT": str(port), "PYTHONUNBUFFERED": "1"})
    if a.cold_pip_cache:
        env["PIP_CACHE_DIR"] = str(base / "pip-cache")
    env.update(kv.split("=", 1) for kv in a.env)
    result = {"repo": a.repo, "commit": commit, "cpu_model": cpu_model(), "cpus": os.cpu_count(),
              "cold_pip_cache": a.cold_pip_cache, "env": a.env, "clone": str(clone), "runs": {}}
    print(f"{commit} on {result['cpu_model']} x{result['cpus']}, clone {clone}", flush=True)
    for name in ("first", "second"):
        run = run_once(clone, env, port, base / f"{name}-run.log", a.timeout)
        result["runs"][name] = run
        print_run(f"{name} run", run)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0 if all(r["first_answer_s"] is not None for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
