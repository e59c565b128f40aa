"""`mvke tag-all`: the top K tags per task for every user, offline, on Ray Data.

Paper section 4.3: the user tower runs once per user; the tag side (gates, tag
embeddings) is precomputed, so scoring all 1,780 tags of a task is two matrix
products per batch of users. This job does that for a whole user table:

    users.parquet --plan--> parts (row ranges, numbered)
        ray.data.from_items(pending parts)
        .map_batches(PartTagger, ActorPoolStrategy(size=N actors), 1 CPU each)
            per part: read Parquet in batches -> vectorised encode (FeatureSchema.encode)
                      -> ONNX user tower (one ORT session per actor, 1 thread)
                      -> scores of every tag of every task, top K, probabilities of the K
                         (mvke.runtime.scoring.rank, as the service) -> Parquet (+ Redis)
        driver: progress bar, markers, summary

The model comes from a bundle directory or from Redis (the active version, read
in one MULTI and checked against the manifest's sha256s: mvke.runtime.versions),
and is turned into an ORT session and prepared tag sides by
`mvke.runtime.model.build_model`: the code the service uses, so batch and online
answers agree.

Why the actor reads and writes its part itself instead of `ray.data.read_parquet`
-> map_batches -> `write_parquet`: a part is the unit of resumption, so its rows
must not be re-blocked across actors; and keeping features and tags inside the
actor moves only part descriptors and counts through the object store: per user,
an actor costs the same CPU as the same loop without Ray, and Ray's cost is a
fixed ~12 CPU-seconds per job (start-up, Ray Data's helper actors; figures in
docs/results/batch_tagging.md). Memory is bounded by one batch per actor
whatever the number of users: a part is read in `batch_size` row batches and
written row group by row group.

Resumable: each finished part writes its Parquet file(s) atomically and then a
done marker (layout in batch/parts.py); a rerun with the same arguments skips
finished parts, so a killed job restarted finishes with every user exactly once.
Bad rows (no user id, a list in a single-valued field, a scalar where a list is
expected, ...) are counted and written to rejects/ with the reason; the job goes on, and fails at
the end (exit 2, no _SUCCESS.json, no Redis summary) when more than --max-reject-rate (1%) were rejected.

Output rows: user_id (string), task (string), rank (int16, 1 = best), tag
(string), score (float32, the model's probability), K rows per task per user.
Redis layout of --to-redis: see mvke/runtime/keys.py and batch/redis_out.py.

Cluster use (--address): every node needs this project installed (`pip install
.[batch]`) and the input, the output directory and a --bundle directory on a
shared filesystem at the same path.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.parts import (AtomicParquetWriter, JobDir, Part, input_fingerprint, iter_part, job_lock, list_inputs,
                         part_from_dict, part_to_dict, plan_parts, write_json_atomic)
from mvke.runtime.column_encoder import plain_array
from mvke.runtime.contract import BundleError, read_bundle
from mvke.runtime.keys import Keys, redis_url
from mvke.runtime.encoded import EncodedBatch
from mvke.runtime.feature_values import MISSING_USER_ID, first_problems
from mvke.runtime.model import LoadedModel
from mvke.runtime.parts import DEFAULT_MAX_REJECT_RATE, reject_rate_error
from mvke.runtime.system import container_cpus

log = logging.getLogger("mvke.batch")

STOP_AFTER_ENV = "MVKE_TAG_ALL_STOP_AFTER_PARTS"   # testing hook: exit after N parts, like a killed job
STOP_EXIT_CODE = 75

OUTPUT_SCHEMA = pa.schema([("user_id", pa.string()), ("task", pa.string()), ("rank", pa.int16()),
                           ("tag", pa.string()), ("score", pa.float32())])
# What the actor hands the Parquet writer: the string columns as dictionaries (indices into the batch's
# user ids, the task names, the tag catalogue), written as Parquet dictionary pages without hashing 40
# strings per user; no Arrow schema is stored, so readers see OUTPUT_SCHEMA's plain strings.
# Statistics only on the numeric columns (min/max of unsorted ids would not prune anything).
_WRITE_SCHEMA = pa.schema([("user_id", pa.dictionary(pa.int32(), pa.string())),
                           ("task", pa.dictionary(pa.int8(), pa.string())), ("rank", pa.int16()),
                           ("tag", pa.dictionary(pa.int32(), pa.string())), ("score", pa.float32())])
_WRITE_OPTIONS = {"store_schema": False, "write_statistics": ["rank", "score"]}
REJECT_SCHEMA = pa.schema([("user_id", pa.string()), ("field", pa.string()), ("reason", pa.string())])
# Users per tower call inside a batch: measured on the default model, the ONNX tower takes 11.0 instead
# of 13.5 us of CPU per user at 512 than at 4,096, and the [chunk, T] score arrays stay in cache. A chunk
# is just a smaller batch: the same tags and, up to float rounding of the GEMMs, the same scores as a
# request for the same user.
SCORE_CHUNK = 512


@dataclass
class TagAllConfig:
    users: str
    out: str
    bundle: str | None = None
    redis_url: str | None = None       # model source when no bundle; target of --to-redis
    top_k: int = 20
    address: str | None = None         # Ray cluster; None: a local Ray on this machine
    to_redis: bool = False
    batch_size: int = 4096
    part_rows: int = 65_536
    workers: int | None = None         # actors; default one per CPU of the Ray cluster
    provider: str = "cpu"              # ORT provider: cpu | cuda | auto
    ort_threads: int = 1
    key_prefix: str = "mvke"
    redis_ttl_s: int | None = None
    progress: bool = True
    ann: str = "auto"                  # candidate indexes: auto (from ann_min_tags tags) | on | off
    ann_min_tags: int = 50_000
    audiences: bool = False            # also build the tag -> users index (batch/audiences.py)
    audience_top_k: int | None = None  # its rule: rank <= this (default: top_k, i.e. every written row)
    audience_min_score: float | None = None   # ... and score >= this
    max_reject_rate: float = DEFAULT_MAX_REJECT_RATE   # more rejected users fail the job (no success marker)
    if_new_version: bool = False       # with to_redis: nothing to do when Redis's profiles are this version's

    def redis(self) -> str:
        return redis_url(self.redis_url)


def _redis_display(cfg: TagAllConfig) -> str:
    from mvke.runtime.redis_client import resolve
    return resolve(cfg.redis()).display


def _redis_cluster(cfg: TagAllConfig) -> bool:
    from mvke.runtime.redis_client import resolve
    return resolve(cfg.redis()).cluster


# ---- model source --------------------------------------------------------------
def load_model_source(cfg: TagAllConfig):
    """(manifest, blobs) from --bundle, else the active version in Redis; sha256-verified either way."""
    if cfg.bundle:
        return read_bundle(cfg.bundle, verify=True)
    from mvke.runtime.redis_client import connect, redact
    from mvke.runtime.versions import active_version, read_version
    r = connect(cfg.redis(), socket_timeout=30)
    try:
        keys = Keys(cfg.key_prefix)
        version = active_version(r, keys)
        if version is None:
            raise BundleError(f"no active model in {redact(cfg.redis())} ({keys.active} is not set); give --bundle")
        return read_version(r, keys, version, verify=True)
    finally:
        r.close()


# ---- the work of one part (used by the Ray actor and by the benchmark without Ray) ----
class BatchResult(NamedTuple):
    table: pa.Table | None                        # output rows (None: every row was rejected)
    rejects: list[tuple]                          # (user_id, field, reason)
    user_ids: pa.Array                            # the tagged users, aligned with `ranked`
    ranked: list[tuple[np.ndarray, np.ndarray]]   # per task: tag indices [n, k], probabilities [n, k]


class PartWorker:
    """Model + encoder (+ Redis writer) of one process; `run(part)` tags one part."""

    def __init__(self, manifest, blobs: dict[str, bytes], job: dict[str, Any]):
        from mvke.runtime.model import build_model
        from mvke.runtime.system import limit_threads
        self.job = job
        # this actor process's thread limits, once: numpy's scoring GEMMs and FAISS get as many threads as
        # ONNX Runtime (OpenBLAS would start a thread per core)
        self.blas_capped = limit_threads(job["ort_threads"])
        self.model = build_model(manifest, blobs, job["provider"], job["ort_threads"], ann_mode=job.get("ann", "auto"),
                                 ann_min_tags=job.get("ann_min_tags", 50_000), search_threads=job["ort_threads"])
        self.columns = ["user_id"] + self.model.schema.names
        self.kinds = {f.name: f.kind for f in self.model.schema.fields}
        self.tasks = self.model.manifest.task_names
        self.task_arr = pa.array(self.tasks, type=pa.string())
        self.tag_arr = pa.array(self.model.tags, type=pa.string())
        self.k = min(job["top_k"], self.model.manifest.num_tags)
        self.dir = JobDir(job["out"])
        self.redis = None
        if job.get("to_redis"):
            from batch.redis_out import UserTagWriter
            self.redis = UserTagWriter(job["redis_url"], self.model.version, self.tasks, self.model.tags,
                                       job["key_prefix"], job.get("redis_ttl_s"), job.get("redis_cluster"))

    def output_table(self, uids: pa.Array, ranked: list[tuple[np.ndarray, np.ndarray]]) -> pa.Table:
        """Rows ordered by user, then task, then rank (string columns dictionary-encoded, see _WRITE_SCHEMA)."""
        n, T, k = len(uids), len(ranked), self.k
        idx = np.stack([r[0] for r in ranked], axis=1).reshape(-1).astype(np.int32)   # [n, T, k] flattened
        scores = np.stack([r[1] for r in ranked], axis=1).reshape(-1).astype(np.float32)
        user_rows = np.repeat(np.arange(n, dtype=np.int32), T * k)
        task_rows = np.tile(np.repeat(np.arange(T, dtype=np.int8), k), n)
        rank = np.tile(np.arange(1, k + 1, dtype=np.int16), n * T)
        dict_ = pa.DictionaryArray.from_arrays
        return pa.Table.from_arrays([dict_(user_rows, uids), dict_(task_rows, self.task_arr), pa.array(rank),
                                     dict_(idx, self.tag_arr), pa.array(scores)], schema=_WRITE_SCHEMA)

    def tag_batch(self, batch: pa.RecordBatch) -> "BatchResult":
        user_ids, missing = user_id_column(batch)
        reasons = {int(r): ("user_id", MISSING_USER_ID) for r in np.flatnonzero(missing)}
        # the user id first, then the first bad raw value (the rules and reasons of `mvke features load`)
        for r, why in first_problems(batch, self.kinds).items():
            reasons.setdefault(r, why)
        enc = self.model.encode(batch)
        for r, e in enc.errors.items():
            reasons.setdefault(r, (e.field, e.reason))
        rejects = [(user_ids[r].as_py(), field, why) for r, (field, why) in sorted(reasons.items())]
        uids, cat, multi = user_ids, enc.cat_ids, enc.multi_ids
        if reasons:
            keep = np.array([r for r in range(batch.num_rows) if r not in reasons], dtype=np.int64)
            uids, cat, multi = user_ids.take(pa.array(keep)), cat[keep], multi[keep]
        if len(uids) == 0:
            return BatchResult(None, rejects, uids, [])
        ranked = rank_users(self.model, EncodedBatch(cat, multi), self.k)
        return BatchResult(self.output_table(uids, ranked), rejects, uids, ranked)

    def run(self, part: Part) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        writer = AtomicParquetWriter(self.dir.tags_file(part), _WRITE_SCHEMA, **_WRITE_OPTIONS)
        users = rows = 0
        rejects: list[tuple] = []
        try:
            for batch in iter_part(part, self.columns, self.job["batch_size"]):
                res = self.tag_batch(batch)
                rejects.extend(res.rejects)
                if res.table is not None:
                    writer.write(res.table)
                    users += len(res.user_ids)
                    rows += res.table.num_rows
                    if self.redis is not None:
                        self.redis.write(res.user_ids.to_pylist(), res.ranked)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        rejects_file = self.dir.rejects_file(part)
        if rejects:
            rw = AtomicParquetWriter(rejects_file, REJECT_SCHEMA)
            rw.write(pa.Table.from_pylist([dict(zip(REJECT_SCHEMA.names, r)) for r in rejects], REJECT_SCHEMA))
            rw.commit()
        else:
            rejects_file.unlink(missing_ok=True)   # a stale one from an earlier, different attempt
        stats = {"part": part.id, "input_rows": part.rows, "users": users, "rows": rows, "rejected": len(rejects),
                 "redis_users": users if self.redis is not None else 0,
                 "seconds": round(time.perf_counter() - t0, 3), "cpu_s": round(time.process_time() - c0, 3),
                 "pid": os.getpid(),
                 "blas_capped": self.blas_capped, "provider": self.model.provider}
        write_json_atomic(self.dir.marker(part), stats)
        return stats


class PartTagger:
    """Ray Data callable class: one model (ORT session) per actor; each batch is a few part descriptors."""

    def __init__(self, model_ref: list, job: dict[str, Any]):
        import ray
        manifest, blobs = ray.get(model_ref[0])
        self.worker = PartWorker(manifest, blobs, job)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.worker.run(part_from_dict(d)) for d in batch.to_pylist()])


def user_id_column(batch: pa.RecordBatch | pa.Table, name: str = "user_id") -> tuple[pa.Array, np.ndarray]:
    """(user ids as strings, [B] bool: missing). str() of non-string ids, as the feature-store loader does
    (an int id 42 -> "42"); null, "" and NaN count as missing."""
    if name not in batch.schema.names:
        raise ValueError(f"input has no {name!r} column")
    col = plain_array(batch.column(name))
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            or getattr(pa.types, "is_string_view", lambda _: False)(col.type)):
        col = pa.array([None if v is None or (isinstance(v, float) and v != v) else str(v)
                        for v in col.to_pylist()], type=pa.string())
    elif not pa.types.is_string(col.type):
        col = col.cast(pa.string())
    return col, pc.fill_null(pc.equal(col, ""), True).to_numpy(zero_copy_only=False)


def rank_users(model: LoadedModel, users: EncodedBatch, k: int, chunk: int = SCORE_CHUNK
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encoded users -> per task (manifest order): top-k tag indices [B, k] and probabilities [B, k] (float32),
    ranked by the predictor (`LoadedModel.rank`, as the service) `chunk` users at a time."""
    B = len(users)
    k = min(k, model.manifest.num_tags)
    out = [(np.empty((B, k), dtype=np.int64), np.empty((B, k), dtype=np.float32)) for _ in model.sides]
    for lo in range(0, B, chunk):
        rows = slice(lo, min(lo + chunk, B))
        for (idx, prob), r in zip(out, model.rank(users.take(rows), k).values()):
            idx[rows] = r.tag_index
            prob[rows] = r.scores
    return out


# ---- the driver -----------------------------------------------------------------
def _cpus() -> int:
    return max(1, int(container_cpus()))


def _init_ray(cfg: TagAllConfig) -> bool:
    """Start (local) or join (--address) Ray unless this process already did. True if we own it."""
    import ray
    if ray.is_initialized():
        return False
    # quiet: no token-auth notice (the local cluster still uses a token)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    common = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if cfg.address:
        ray.init(address=cfg.address, **common)
    else:
        # address="local": never attach to somebody else's Ray on this machine
        ray.init(address="local", num_cpus=_cpus(), include_dashboard=False,
                 object_store_memory=256 * 1024 * 1024, **common)
    return True


def _quiet_ray_data() -> None:
    from ray.data import DataContext
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False       # ours counts users; Ray Data's would count parts
    ctx.enable_operator_progress_bars = False
    ctx.verbose_stats_logs = False
    if hasattr(ctx, "enable_auto_log_stats"):
        ctx.enable_auto_log_stats = False
    # "Starting execution", "Progress bars disabled", ...: only errors
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def job_spec(cfg: TagAllConfig, manifest, files: list[Path], parts: list[Part]) -> dict:
    """What must be equal for a rerun to resume into the same output directory."""
    return {"input": input_fingerprint(files), "part_rows": cfg.part_rows, "parts": len(parts),
            "model_version": manifest.version, "model": manifest.model, "tasks": manifest.task_names,
            "top_k": min(cfg.top_k, manifest.num_tags), "to_redis": cfg.to_redis,
            "redis_target": (_redis_display(cfg) if cfg.to_redis else None),
            "key_prefix": cfg.key_prefix if cfg.to_redis else None, "ann": cfg.ann, "ann_min_tags": cfg.ann_min_tags,
            **_audience_spec(cfg, manifest)}


def _audience_spec(cfg: TagAllConfig, manifest) -> dict:
    """The audience rule in the job spec, only when --audiences (older output directories still resume)."""
    if not cfg.audiences:
        return {}
    from batch.audiences import audience_rule
    return {"audiences": audience_rule(cfg.audience_top_k, cfg.audience_min_score,
                                       min(cfg.top_k, manifest.num_tags)).to_dict()}


def _fail_on_rejects(cfg: TagAllConfig, jd: JobDir, counts: dict) -> None:
    """The job fails (no success marker, no Redis summary) above --max-reject-rate (mvke/runtime/parts.py)."""
    rejected = counts["rejected"]
    reasons = []
    if rejected:
        first = sorted(Path(jd.rejects).glob("*.parquet"))[:1]
        rows = pq.read_table(first[0]).slice(0, 100).to_pylist() if first else []
        reasons = [f"{r['field']}: {r['reason']}" for r in rows]
    error = reject_rate_error(counts["users"], rejected, cfg.max_reject_rate, reasons, jd.rejects, "tag-all")
    if error:
        raise RuntimeError(error)


def _profiles_current(cfg: TagAllConfig) -> dict | None:
    """--if-new-version: the summary of "nothing to do" when Redis's completed profiles
    ({prefix:usertags}:latest, switched when a job completes) are the active version's, else None (run
    the job). Two reads, before the model's files are fetched: a scheduler may call this every hour."""
    from mvke.runtime.redis_client import connect
    from mvke.runtime.versions import active_version
    keys = Keys(cfg.key_prefix)
    r = connect(cfg.redis(), socket_timeout=30)
    try:
        version, latest = active_version(r, keys), r.get(keys.user_tags_latest)
    finally:
        r.close()
    if version is None or latest is None or latest.decode() != version:
        return None     # no active version: load_model_source says so
    return {"model_version": version, "skipped": f"the profiles of v{version} are complete "
            f"({keys.user_tags_latest} names it): nothing to do", "redis": {"latest": keys.user_tags_latest}}


def run(cfg: TagAllConfig) -> dict:
    """Tag every user of cfg.users; returns the summary (also written to out/_SUCCESS.json)."""
    if cfg.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {cfg.top_k}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    t0 = time.perf_counter()
    if cfg.if_new_version and (current := _profiles_current(cfg)) is not None:
        return current
    manifest, blobs = load_model_source(cfg)
    cfg = dataclasses.replace(cfg, out=cfg.out.replace("{version}", manifest.version))
    out_root = Path(cfg.out).resolve()
    # an --out inside the --users directory must not read its own results back as users on a rerun
    files = [f for f in list_inputs(cfg.users) if not f.resolve().is_relative_to(out_root)]
    if not files:
        raise FileNotFoundError(f"{cfg.users}: no input .parquet files outside --out")
    parts = plan_parts(files, cfg.part_rows)
    jd = JobDir(cfg.out)
    jd.create()
    with job_lock(jd.root):
        resumed = jd.check_spec(job_spec(cfg, manifest, files, parts))
        jd.clean_tmp()
        done = jd.finished()
        pending = [p for p in parts if p.name not in done]
        total = sum(p.rows for p in parts)
        if resumed:
            log.warning("resuming %s: %d of %d parts already done", jd.root, len(parts) - len(pending), len(parts))
        if pending:
            jd.clear_success()
            _run_parts(cfg, manifest, blobs, pending, total, total - sum(p.rows for p in pending))
        finished = jd.finished()
        missing = [p.name for p in parts if p.name not in finished]
        if missing:
            raise RuntimeError(f"{len(missing)} parts did not finish (first {missing[0]}); rerun to resume")
        counts = {k: sum(m[k] for m in finished.values()) for k in ("input_rows", "users", "rows", "rejected")}
        _fail_on_rejects(cfg, jd, counts)
        summary = {"model_version": manifest.version, "model": manifest.model, "tasks": manifest.task_names,
                   "top_k": min(cfg.top_k, manifest.num_tags), "parts": len(parts),
                   "parts_this_run": len(pending), "resumed": resumed, **counts,
                   "seconds_this_run": round(time.perf_counter() - t0, 3),
                   "tags": str(jd.tags), "rejects": str(jd.rejects),
                   "redis": None}
        if cfg.to_redis:
            from batch.redis_out import write_job_summary
            write_job_summary(cfg.redis(), manifest.version,
                              {k: summary[k] for k in ("model", "tasks", "top_k", "users", "rejected")},
                              cfg.key_prefix, cfg.redis_ttl_s)
            keys = Keys(cfg.key_prefix)
            summary["redis"] = {"users": keys.user_tags(manifest.version, "<user_id>"),
                                "summary": keys.user_tags_summary(manifest.version), "latest": keys.user_tags_latest}
        if cfg.audiences:   # from the finished parts' Parquet, after every part is done
            from batch.audiences import run_for_job
            summary["audiences"] = run_for_job(cfg, jd, parts, manifest, blobs)
        jd.write_success(summary)
    return summary


def _run_parts(cfg: TagAllConfig, manifest, blobs, pending: list[Part], total: int, initial: int) -> None:
    import ray
    from tqdm.auto import tqdm

    owned = _init_ray(cfg)
    try:
        _quiet_ray_data()
        workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, cfg.ort_threads))
        workers = min(workers, len(pending))
        job = {"out": str(Path(cfg.out).resolve()), "batch_size": cfg.batch_size, "top_k": cfg.top_k,
               "provider": cfg.provider, "ort_threads": cfg.ort_threads, "to_redis": cfg.to_redis,
               "ann": cfg.ann, "ann_min_tags": cfg.ann_min_tags,
               "redis_url": cfg.redis() if cfg.to_redis else None, "key_prefix": cfg.key_prefix,
               # resolved here: an actor does not see the driver's MVKE_REDIS_CLUSTER
               "redis_cluster": _redis_cluster(cfg) if cfg.to_redis else None,
               "redis_ttl_s": cfg.redis_ttl_s}
        model_ref = ray.put((manifest, blobs))
        ds = ray.data.from_items([part_to_dict(p) for p in pending], override_num_blocks=len(pending))
        # Ray Data's actor defaults restart a dead actor and retry its part (parts are idempotent).
        # No runtime_env: the workers Ray pre-starts become the actors (numpy's BLAS threads are capped
        # in the actor itself, see PartWorker).
        ds = ds.map_batches(PartTagger, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cfg.ort_threads,
                            num_gpus=1 if cfg.provider == "cuda" else None,
                            fn_constructor_kwargs={"model_ref": [model_ref], "job": job})
        stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
        finished = 0
        with tqdm(total=total, initial=initial, unit="user", unit_scale=True, desc="tag-all",
                  disable=not cfg.progress, smoothing=0.1) as bar:
            for stats in ds.iter_rows():
                bar.update(stats["input_rows"])
                finished += 1
                if stop_after and finished >= stop_after:
                    # testing hook: die mid-job. SystemExit (not os._exit) so that ray.shutdown() still
                    # kills the actors: parts in flight stay unfinished, nothing keeps running behind us.
                    raise SystemExit(STOP_EXIT_CODE)
    finally:
        if owned:
            ray.shutdown()

