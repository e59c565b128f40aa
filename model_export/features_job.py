"""`mvke features load`: users Parquet -> feature store, in parallel, pipelined, resumable by part.

    users Parquet --plan (mvke/runtime/parts.py: row groups packed into parts)--> parts
      N worker processes, each with its own Redis connections (one per master):
        per part: read Parquet in batches -> column-wise checks + RESP (feature_writer.py)
                  -> send batch k while Redis works on batch k-1 -> marker file
      driver: progress bar, bad rows, summary

Resumable like `mvke tag-all`: a finished part writes its rejects file (if any) and
then a marker under the job directory (default `<users dir>/_features_load`); a rerun
of the same command skips finished parts. A marker only counts while the Redis it
describes still holds the job's token key (`Keys.features_job`): a Redis that was
flushed or replaced in between gets everything again. A finished job clears its
token, so running the command again reloads every user (the command's promise is "Redis
holds these features", not "this job ran once").

Bad rows (no user id, a list in a single-valued field, a scalar where a list is
expected, an item containing `|`) are counted, written to `rejects/part-*.parquet`
with the field and reason, and the rest is loaded (the reasons of `validate_row`).
A job that rejects more than `max_reject_rate` of its users (default 1%; every user of an
input that yields none) fails: `FeatureLoadError` (exit 2), no `_SUCCESS.json`, no schema
record. A job that succeeds records the schema it wrote (fields, kinds, fingerprint, sampled
values: mvke/runtime/store_schema.py) for `mvke publish` and the service to check models against.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from mvke.runtime.parts import (DEFAULT_MAX_REJECT_RATE, Part, input_fingerprint, iter_part, list_inputs,
                                part_from_dict, part_to_dict, plan_parts, reject_rate_error, write_json_atomic)
from model_export.feature_writer import FeatureLoadError, FeatureSink, load_stamp, store_columns
from mvke.runtime.keys import Keys
from mvke.runtime.redis_client import REDIS_ERRORS, RedisTarget, connect, describe_error, resolve

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS.json"
STOP_AFTER_ENV = "MVKE_FEATURES_STOP_AFTER_PARTS"   # testing hook: exit after N parts, like a killed job
REJECT_SCHEMA = pa.schema([("user_id", pa.string()), ("field", pa.string()), ("reason", pa.string())])
KEEP_BAD_ROWS = 1000                                 # bad rows kept in the report (all are in rejects/)


@dataclass
class FeaturesLoadConfig:
    users: str                        # dataset directory (meta.json + users.parquet) or users Parquet file/dir
    redis_url: str | None = None      # default $REDIS_URL
    cluster: bool | None = None       # None: from the URL scheme or MVKE_REDIS_CLUSTER
    kinds: dict[str, str] | None = None   # field -> cat|multi; default meta.json beside the users
    key_prefix: str = "mvke"
    workers: int = 0                  # processes; 0: default_workers (at most one per part)
    part_rows: int = 262_144
    batch_rows: int = 8_192
    ttl_s: int | None = None          # expire each user hash this many seconds after its load
    job_dir: str | None = None        # markers and rejects; default <users dir>/_features_load
    progress: bool = True
    max_reject_rate: float = DEFAULT_MAX_REJECT_RATE   # share of users rejected above which the job fails


@dataclass
class FeaturesLoadReport:
    loaded: int = 0
    rejected: int = 0
    parts: int = 0
    parts_this_run: int = 0
    resumed: bool = False
    redone: int = 0                   # users redone after MOVED/ASK (a slot migrating)
    seconds: float = 0.0
    workers: int = 1
    bad_rows: list[dict[str, str]] = field(default_factory=list)

    @property
    def users_per_second(self) -> float:
        return self.loaded / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "bad_rows"}
        out["seconds"] = round(self.seconds, 2)
        out["users_per_second"] = round(self.users_per_second)
        return out


def users_source(path: str | Path) -> tuple[list[Path], Path]:
    """-> (users Parquet files, the directory holding meta.json and the job directory by default)."""
    p = Path(path)
    if p.is_dir() and (p / "users.parquet").exists():   # a dataset: users.parquet is a file or a directory of parts
        return list_inputs(p / "users.parquet"), p
    files = list_inputs(p)
    return files, (p if p.is_dir() else p.parent)


def read_kinds(home: Path) -> dict[str, str]:
    meta = home / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: missing (it names each field's kind); give a dataset directory")
    meta = json.loads(meta.read_text())
    kinds = dict(meta["fields"])
    # the counters user events continue (mvke/runtime/events.py) are stored beside the model's fields
    for counter in meta.get("events", {}).get("counters", []):
        kinds.setdefault(counter["field"], "cat")
    return kinds


# ---- one part (run in a worker process, or in this one when workers == 1) ------------------------------
class PartLoader:
    """One Redis client + sink per process; `run(part)` loads one part and writes its marker."""

    def __init__(self, job: dict[str, Any]):
        self.job = job
        self.client = connect(job["redis_url"], job["cluster"], socket_timeout=60, socket_connect_timeout=10)
        self.root = Path(job["job_dir"])

    def run(self, part: Part) -> dict[str, Any]:
        t0 = time.perf_counter()
        sink = FeatureSink(self.client, self.job["key_prefix"], self.job["stamp"], self.job["ttl_s"])
        loaded, rejects = 0, []
        try:
            for batch in iter_part(part, ["user_id", *self.job["kinds"]], self.job["batch_rows"]):
                cols = store_columns(batch, self.job["kinds"])
                rejects += cols.rejects
                sink.write(cols)
                loaded += len(cols.user_ids)
            sink.flush()
        except REDIS_ERRORS as e:   # plain exceptions cross the process pool; the part stays unfinished
            raise FeatureLoadError(f"{part.name}: {describe_error(e)}") from None
        finally:
            sink.close()
        rejects_file = self.root / "rejects" / f"{part.name}.parquet"
        if rejects:
            tmp = rejects_file.with_name(f".{rejects_file.name}.tmp")
            pq.write_table(pa.Table.from_pylist([dict(zip(REJECT_SCHEMA.names, r)) for r in rejects],
                                                REJECT_SCHEMA), tmp)
            os.replace(tmp, rejects_file)
        else:
            rejects_file.unlink(missing_ok=True)
        stats = {"part": part.id, "rows": part.rows, "loaded": loaded, "rejected": len(rejects),
                 "redone": sink.redone, "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid(),
                 "bad_rows": [dict(zip(("user_id", "field", "reason"), r)) for r in rejects[:KEEP_BAD_ROWS]]}
        write_json_atomic(self.root / "_parts" / f"{part.name}.done",
                          {k: v for k, v in stats.items() if k != "bad_rows"})
        return stats

    def close(self) -> None:
        self.client.close()


_worker: PartLoader | None = None


def _init_worker(job: dict[str, Any]) -> None:
    global _worker
    _worker = PartLoader(job)


def _run_part(part: dict) -> dict[str, Any]:
    assert _worker is not None
    return _worker.run(part_from_dict(part))


# ---- the job ---------------------------------------------------------------------------------------------
def job_spec(cfg: FeaturesLoadConfig, files: list[Path], parts: list[Part], target_display: str) -> dict:
    """What must be equal for a rerun to resume (the token is added once the job starts)."""
    return {"input": input_fingerprint(files), "part_rows": cfg.part_rows, "parts": len(parts),
            "redis": target_display, "key_prefix": cfg.key_prefix, "ttl_s": cfg.ttl_s}


def _start_or_resume(root: Path, spec: dict, client) -> tuple[str, bool]:
    """-> (job token, resuming?). Resumes only an unfinished job whose token Redis still holds."""
    path = root / JOB_FILE
    if path.exists() and not (root / SUCCESS_FILE).exists():
        old = json.loads(path.read_text())
        token = old.pop("token", "")
        if old == spec and token and client.exists(Keys(spec["key_prefix"]).features_job(token)):
            return token, True
    for sub in ("_parts", "rejects"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / SUCCESS_FILE).unlink(missing_ok=True)
    for sub in ("_parts", "rejects"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:16]
    client.set(Keys(spec["key_prefix"]).features_job(token), json.dumps(spec))
    write_json_atomic(path, {**spec, "token": token})
    return token, False


def default_workers(target: RedisTarget) -> int:
    """One loader process per CPU, less one when Redis listens on this machine: redis-server needs
    about as much CPU per user as a loader (docs/SCALING.md), so on 2 cores one loader beside a
    local Redis outruns two (45,000 vs 37,900 users/s, median of 3 rounds: docs/SCALING.md)."""
    cpus = len(os.sched_getaffinity(0))
    host = urlsplit(target.url).hostname or "localhost"      # urlsplit lower-cases it
    local = host in ("localhost", "::1") or host.startswith("127.") or host == socket.gethostname().lower()
    return max(1, cpus - 1) if local else cpus


def load_features(cfg: FeaturesLoadConfig) -> FeaturesLoadReport:
    """Load every user of cfg.users into the feature store; see the module docstring."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    files, home = users_source(cfg.users)
    kinds = cfg.kinds or read_kinds(home)
    target = resolve(cfg.redis_url, cfg.cluster)
    parts = plan_parts(files, cfg.part_rows)
    root = Path(cfg.job_dir or home / "_features_load")
    root.mkdir(parents=True, exist_ok=True)
    client = connect(target, socket_timeout=30, socket_connect_timeout=10)
    try:
        try:
            token, resumed = _start_or_resume(root, job_spec(cfg, files, parts, target.display), client)
        except REDIS_ERRORS as e:
            raise RuntimeError(f"Redis at {target.display}: {describe_error(e)}") from e
        done = {m.stem for m in (root / "_parts").glob("part-*.done")}
        pending = [p for p in parts if p.name not in done]
        workers = max(1, min(cfg.workers or default_workers(target), len(pending) or 1))
        job = {"redis_url": target.url, "cluster": target.cluster, "key_prefix": Keys(cfg.key_prefix).user(""),
               "stamp": load_stamp(), "ttl_s": cfg.ttl_s, "kinds": kinds, "batch_rows": cfg.batch_rows,
               "job_dir": str(root)}
        report = FeaturesLoadReport(parts=len(parts), parts_this_run=len(pending), resumed=resumed, workers=workers)
        stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
        total = sum(p.rows for p in parts)
        with tqdm(total=total, initial=total - sum(p.rows for p in pending), unit="user", unit_scale=True,
                  desc="features", disable=not cfg.progress, smoothing=0.1) as bar:
            for n, stats in enumerate(_run_parts(job, pending, workers), 1):
                bar.update(stats["rows"])
                report.redone += stats["redone"]
                room = KEEP_BAD_ROWS - len(report.bad_rows)
                report.bad_rows += stats["bad_rows"][:max(room, 0)]
                if stop_after and n >= stop_after:
                    raise SystemExit(75)          # testing hook: die mid-job
        markers = [json.loads(m.read_text()) for m in (root / "_parts").glob("part-*.done")]
        missing = len(parts) - len(markers)
        if missing:
            raise RuntimeError(f"{missing} parts did not finish; rerun to resume")
        report.loaded = sum(m["loaded"] for m in markers)
        report.rejected = sum(m["rejected"] for m in markers)
        report.seconds = time.perf_counter() - t0
        check_reject_rate(report.loaded, report.rejected, cfg.max_reject_rate, report.bad_rows, root / "rejects")
        write_json_atomic(root / SUCCESS_FILE, report.summary())
        record_schema(client, Keys(cfg.key_prefix), files, kinds, report.loaded)
        client.delete(Keys(cfg.key_prefix).features_job(token))
        return report
    finally:
        client.close()


def check_reject_rate(loaded: int, rejected: int, max_rate: float, bad_rows: list[dict[str, str]],
                      where: Path | None = None) -> None:
    """Raise FeatureLoadError when more than `max_rate` of the users were rejected, or none was loaded."""
    reasons = [f"{b['field']}: {b['reason']}" for b in bad_rows]
    error = reject_rate_error(loaded, rejected, max_rate, reasons, where, "features load")
    if error:
        raise FeatureLoadError(error)


def sample_store_values(files: list[Path], kinds: dict[str, str]) -> tuple[dict[str, list[str]], str]:
    """-> (up to SAMPLE_VALUES stored values per field, a user id with features) from the first rows of the input."""
    from mvke.runtime.features import to_store_value
    from mvke.runtime.store_schema import SAMPLE_VALUES, sample_values
    if not files:
        return {}, ""
    pf = pq.ParquetFile(files[0])
    names = [n for n in kinds if n in pf.schema_arrow.names]
    out: dict[str, list[str]] = {n: [] for n in names}
    example = ""
    for batch in pf.iter_batches(batch_size=2_000, columns=["user_id", *names], use_threads=False):
        for name in names:
            for v in batch.column(name).to_pylist():
                out[name] += sample_values(to_store_value(v), kinds[name])
        example = next((str(u) for u in batch.column("user_id").to_pylist() if u is not None and str(u)), "")
        break                                   # the first rows are enough for a sample
    return {n: v[:SAMPLE_VALUES] for n, v in out.items()}, example


def record_schema(client, keys: Keys, files: list[Path], kinds: dict[str, str], users: int) -> None:
    """Record what a successful load wrote (mvke/runtime/store_schema.py), for publish and the service."""
    from mvke.runtime.store_schema import StoreSchema, write_store_schema
    source = str(files[0].parent if len(files) > 1 else files[0]) if files else ""
    samples, example = sample_store_values(files, kinds)
    write_store_schema(client, keys, StoreSchema(dict(kinds), samples, source, users, example_user=example))


def _run_parts(job: dict[str, Any], parts: list[Part], workers: int):
    """Stats of each finished part, in completion order."""
    if not parts:
        return
    if workers == 1:
        loader = PartLoader(job)
        try:
            for p in parts:
                yield loader.run(p)
        finally:
            loader.close()
        return
    # spawn: a clean interpreter per worker (no inherited sockets, no forked Arrow thread pools)
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        yield from pool.imap_unordered(_run_part, [part_to_dict(p) for p in parts])
