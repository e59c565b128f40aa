"""Benchmark of `mvke tag-all` (not a test): `python -m batch.bench --users 1000000`.

1. Model: `--bundle DIR`, else a default mvke-mt bundle under `--work`, built once by
   `mvke pipeline --data-source synth --epochs 1` and reused afterwards.
2. Users: the synthetic dataset's users.parquet resampled column by column to
   `--users` rows (every value from the real vocabularies, new combinations),
   written with row groups of `--part-rows` (one part each); reused when present.
3. Ceiling: the same code without Ray on the same batches (read into memory
   first): encode -> ORT tower -> logits -> top-k -> probabilities, in a loop, in
   1 process and in P processes at once (P = the job's actors). Also P processes
   doing exactly an actor's work on a part (Parquet read and write included).
4. The Ray job on every user: wall time (Ray start-up separately), users/s, and
   peak RSS sampled every 0.2 s: driver + Ray workers, and everything Ray started.
5. Prints a JSON report (and writes it to `--json`), with the load average of
   the machine before and after each phase.
"""
from __future__ import annotations

import os

# One BLAS thread everywhere (numpy reads these at import): the job runs one actor per core.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


# ---- inputs -------------------------------------------------------------------------
def default_model(work: Path) -> tuple[Path, Path]:
    """(bundle, its dataset) of `mvke pipeline --data-source synth --epochs 1` under `work` (built once)."""
    work.mkdir(parents=True, exist_ok=True)
    print("bench: mvke pipeline --data-source synth --model mvke-mt --epochs 1", file=sys.stderr, flush=True)
    with open(work / "prepare.log", "a") as log:
        out = subprocess.run([sys.executable, "-m", "mvke.cli", "pipeline", "--data-source", "synth", "--model",
                              "mvke-mt", "--epochs", "1", "--work", str(work)], check=True, stdout=subprocess.PIPE,
                             stderr=log, text=True).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    return Path(summary["bundle"]), Path(summary["data"])


def make_users(src: Path, out: Path, n: int, row_group: int, seed: int = 0) -> Path:
    """n user rows: user_id b00000000.. + every feature column sampled independently from src."""
    if out.exists() and pq.ParquetFile(out).metadata.num_rows == n:
        return out
    base = pq.read_table(src)
    features = [c for c in base.column_names if c != "user_id"]
    schema = pa.schema([pa.field("user_id", pa.string())] + [base.schema.field(c) for c in features])
    rng = np.random.default_rng(seed)
    tmp = out.with_name(f".{out.name}.tmp")
    with pq.ParquetWriter(tmp, schema) as w:
        for start in range(0, n, row_group):
            m = min(row_group, n - start)
            cols = [pa.array([f"b{i:08d}" for i in range(start, start + m)], pa.string())]
            cols += [base.column(c).take(pa.array(rng.integers(0, base.num_rows, m))) for c in features]
            w.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=row_group)
    tmp.replace(out)
    return out


# ---- the ceiling: same code, no Ray ----------------------------------------------------
def _ceiling_proc(bundle: str, part: dict, batch_size: int, k: int, with_io: str | None, q) -> None:
    from batch.parts import iter_part, part_from_dict
    from batch.tag_all import PartWorker, rank_users
    from mvke.runtime.contract import read_bundle
    manifest, blobs = read_bundle(bundle)
    job = {"out": with_io or "/nonexistent", "batch_size": batch_size, "top_k": k, "provider": "cpu",
           "ort_threads": 1, "to_redis": False}
    w = PartWorker(manifest, blobs, job)
    p = part_from_dict(part)
    if with_io:                       # exactly an actor's work on one part
        t0, c0 = time.perf_counter(), time.process_time()
        stats = w.run(p)
        q.put({"users": stats["users"], "seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0})
        return
    batches = list(iter_part(p, w.columns, batch_size))      # read first: the loop is compute only
    schema = w.model.schema
    e = schema.encode(batches[0])
    rank_users(w.model, e.take(slice(0, 64)), k)   # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for b in batches:
        e = schema.encode(b)
        rank_users(w.model, e, k)
        n += b.num_rows
    q.put({"users": n, "seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0})


def ceiling(bundle: Path, parts: list, procs: int, batch_size: int, k: int, with_io: Path | None = None) -> dict:
    from batch.parts import part_to_dict
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_ceiling_proc, args=(str(bundle), part_to_dict(parts[i]), batch_size, k,
                                                   str(with_io) if with_io else None, q)) for i in range(procs)]
    for p in ps:
        p.start()
    res = [q.get() for _ in ps]
    for p in ps:
        p.join()
    users = sum(r["users"] for r in res)
    wall = max(r["seconds"] for r in res)
    return {"processes": procs, "users": users, "users_per_s": round(users / wall),
            "per_process_users_per_s": [round(r["users"] / r["seconds"]) for r in res],
            "cpu_share": round(sum(r["cpu"] for r in res) / sum(r["seconds"] for r in res), 2),
            "us_cpu_per_user": round(sum(r["cpu"] for r in res) / users * 1e6, 1)}


# ---- memory -------------------------------------------------------------------------------
class RssSampler(threading.Thread):
    """Peak RSS of this process and its descendants (Ray's processes and workers), and their CPU time.

    Groups: driver (this process); actors (ray::MapWorker..., the job's ORT sessions);
    idle Ray workers (ray::IDLE, pre-started by Ray); Ray's own processes (gcs_server,
    raylet, agents, Ray Data's stats/autoscaling actors). RSS double-counts shared pages
    (the object store mapping).
    """

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        import psutil
        self.me = psutil.Process()
        self.every = every
        self.stop = threading.Event()
        self.cpu0 = sum(self.me.cpu_times()[:2])
        self.cpu = {}                 # pid -> (group, user+system seconds), last seen
        self.cpu_names = {}           # pid -> (process name, user+system seconds)
        self.names: set[str] = set()
        self.peak = {"driver_plus_actors_mb": 0, "driver_plus_all_workers_mb": 0, "all_processes_mb": 0,
                     "driver_mb": 0, "per_actor_max_mb": 0, "actors": 0, "idle_workers": 0}

    @staticmethod
    def group(name: str) -> str:
        if "MapWorker" in name:
            return "actor"
        if name.startswith("ray::IDLE"):
            return "idle"
        return "system"          # gcs_server, raylet, agents, Ray Data's own actors (stats, autoscaling)

    def sample(self) -> None:
        import psutil
        mb = 1024 * 1024
        driver = self.me.memory_info().rss
        self.cpu[self.me.pid] = ("driver", sum(self.me.cpu_times()[:2]) - self.cpu0)
        rss = {"actor": 0, "idle": 0, "system": 0}
        count = {"actor": 0, "idle": 0, "system": 0}
        amax = 0
        for c in self.me.children(recursive=True):
            try:
                name, r, cpu = c.name(), c.memory_info().rss, sum(c.cpu_times()[:2])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            g = self.group(name)
            self.names.add(name)
            rss[g] += r
            count[g] += 1
            if g == "actor":
                amax = max(amax, r)
            self.cpu[c.pid] = (g, cpu)
            self.cpu_names[c.pid] = (name.split("(")[0].split(".")[0], cpu)
        pk = self.peak
        pk["driver_plus_actors_mb"] = max(pk["driver_plus_actors_mb"], round((driver + rss["actor"]) / mb))
        pk["driver_plus_all_workers_mb"] = max(pk["driver_plus_all_workers_mb"],
                                               round((driver + rss["actor"] + rss["idle"]) / mb))
        pk["all_processes_mb"] = max(pk["all_processes_mb"], round((driver + sum(rss.values())) / mb))
        pk["driver_mb"] = max(pk["driver_mb"], round(driver / mb))
        pk["per_actor_max_mb"] = max(pk["per_actor_max_mb"], round(amax / mb))
        pk["actors"] = max(pk["actors"], count["actor"])
        pk["idle_workers"] = max(pk["idle_workers"], count["idle"])

    def cpu_by_name(self) -> dict:
        out: dict[str, float] = {}
        for name, cpu in self.cpu_names.values():
            out[name] = out.get(name, 0.0) + cpu
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def cpu_by_group(self) -> dict:
        out: dict[str, float] = {}
        for g, cpu in self.cpu.values():
            out[g] = out.get(g, 0.0) + cpu
        return {k: round(v, 1) for k, v in out.items()}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sample()
            except Exception:
                pass
            time.sleep(self.every)


# ---- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m batch.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--bundle", help="bundle directory (default: build/reuse one with `mvke pipeline` under WORK)")
    ap.add_argument("--users-source", help="dataset directory whose users.parquet is resampled (default: the "
                                           "pipeline's synthetic dataset); only when WORK/users_N.parquet is missing")
    ap.add_argument("--work", default="/tmp/mvke-batch-bench", help="inputs, outputs and the default bundle")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--part-rows", type=int, default=65_536)
    ap.add_argument("--workers", type=int, help="actors (default: one per CPU)")
    ap.add_argument("--skip-ceiling", action="store_true")
    ap.add_argument("--json", help="write the report here too")
    a = ap.parse_args(argv)

    from batch.parts import list_inputs, plan_parts
    from batch.tag_all import TagAllConfig, _cpus, _init_ray, run
    from mvke.runtime.system import loadavg
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    users = work / f"users_{a.users}.parquet"
    bundle, data = (Path(a.bundle), None) if a.bundle else default_model(work)
    if not (users.exists() and pq.ParquetFile(users).metadata.num_rows == a.users):
        data = data or Path(a.users_source or default_model(work)[1])
        make_users(data / "users.parquet", users, a.users, a.part_rows)
    manifest = json.loads((bundle / "manifest.json").read_text())
    parts = plan_parts(list_inputs(users), a.part_rows)
    workers = a.workers or _cpus()
    report: dict = {"users": a.users, "tasks": [t["name"] for t in manifest["tasks"]], "tags": manifest["num_tags"],
                    "top_k": a.top_k, "batch_size": a.batch_size, "part_rows": a.part_rows, "parts": len(parts),
                    "workers": workers, "cpus": os.cpu_count(), "model": manifest["model"],
                    "model_version": manifest["version"]}

    if not a.skip_ceiling:
        print(f"bench: ceiling (no Ray), load {loadavg()}", file=sys.stderr, flush=True)
        report["load_before_ceiling"] = loadavg()
        report["ceiling_1_process"] = ceiling(bundle, parts, 1, a.batch_size, a.top_k)
        report["ceiling_n_processes"] = ceiling(bundle, parts, workers, a.batch_size, a.top_k)
        io_dir = work / "ceiling_io"
        shutil.rmtree(io_dir, ignore_errors=True)
        from batch.parts import JobDir
        JobDir(io_dir).create()
        report["in_process_with_io_n_processes"] = ceiling(bundle, parts, workers, a.batch_size, a.top_k, io_dir)
        shutil.rmtree(io_dir, ignore_errors=True)

    out = work / f"out_{a.users}"
    shutil.rmtree(out, ignore_errors=True)
    print(f"bench: tag-all on {a.users:,} users, load {loadavg()}", file=sys.stderr, flush=True)
    report["load_before_job"] = loadavg()
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    cfg = TagAllConfig(users=str(users), out=str(out), bundle=str(bundle), top_k=a.top_k, batch_size=a.batch_size,
                       part_rows=a.part_rows, workers=workers)
    _init_ray(cfg)
    t_init = time.perf_counter() - t0
    summary = run(cfg)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    sampler.sample()                  # CPU times of every process before Ray goes away
    import ray
    ray.shutdown()
    markers = [json.loads(p.read_text()) for p in (out / "_parts").glob("*.done")]
    busy = sum(m["seconds"] for m in markers)
    job_s = wall - t_init
    report["job"] = {
        "wall_s_total": round(wall, 1), "ray_init_s": round(t_init, 1), "run_s": round(job_s, 1),
        "users": summary["users"], "rows": summary["rows"], "rejected": summary["rejected"],
        "users_per_s": round(summary["users"] / wall), "users_per_s_excl_ray_init": round(summary["users"] / job_s),
        "actor_busy_s": round(busy, 1), "actor_users_per_s_when_busy": round(summary["users"] / busy * workers),
        "blas_capped_in_actors": sorted({";".join(m.get("blas_capped") or []) for m in markers}),
        "output_bytes": sum(f.stat().st_size for f in (out / "tags").glob("*.parquet")),
    }
    report["peak_rss"] = sampler.peak
    cpu = sampler.cpu_by_group()
    part_cpu = sum(m.get("cpu_s", 0.0) for m in markers)
    total_cpu = sum(cpu.values())
    report["cpu"] = {"seconds_by_process_group": cpu, "actors_in_parts_s": round(part_cpu, 1),
                     "total_s": round(total_cpu, 1),
                     "us_per_user_in_parts": round(part_cpu / summary["users"] * 1e6, 1),
                     "us_per_user_all_processes": round(total_cpu / summary["users"] * 1e6, 1),
                     "actor_cpu_outside_parts_s": round(cpu.get("actor", 0.0) - part_cpu, 1),
                     # driver, Ray's processes, actor start-up (imports, model load): all not tagging users
                     "share_outside_parts": round(1 - part_cpu / total_cpu, 3) if total_cpu else None}
    report["cpu_s_by_process_name"] = sampler.cpu_by_name()
    report["load_after_job"] = loadavg()
    if "ceiling_n_processes" in report:
        ceil = report["ceiling_n_processes"]["users_per_s"]
        report["ratio_to_ceiling"] = round(report["job"]["users_per_s"] / ceil, 3)
        report["ratio_to_ceiling_excl_ray_init"] = round(report["job"]["users_per_s_excl_ray_init"] / ceil, 3)
        report["ratio_to_in_process_with_io"] = round(
            report["job"]["users_per_s_excl_ray_init"] / report["in_process_with_io_n_processes"]["users_per_s"], 3)
        # load-independent: CPU per user of the compute loop (or of the same work with I/O) over the CPU per
        # user of the whole Ray job, every process included (1.0 = Ray costs nothing)
        all_cpu = report["cpu"]["us_per_user_all_processes"]
        report["cpu_efficiency_vs_ceiling"] = round(report["ceiling_n_processes"]["us_cpu_per_user"] / all_cpu, 3)
        report["cpu_efficiency_vs_in_process_with_io"] = round(
            report["in_process_with_io_n_processes"]["us_cpu_per_user"] / all_cpu, 3)
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
