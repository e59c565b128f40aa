"""`mvke tag-all --audiences`: the tag -> users index of a run, as Roaring bitmaps (mvke/runtime/audience.py).

Built once every part is done, from the Parquet parts the run wrote (not from the actors' memory): the
index then says exactly what the output says, a resumed job builds it the same way, and the tagging
actors stay untouched. Paper section 1: advertisers choose tags and need to know whom they reach.

    tags/part-*.parquet (user_id, task, rank, tag, score; rows grouped by user, parts in input order)
      -> dense user numbers: 0, 1, 2, ... in order of first appearance (the user-id dictionary)
      -> rows the rule admits (rank <= top_k, score >= min_score if set)
      -> per part: sort by (task, tag), one bitmap update per group (numbers ascending: appends)
      -> out/audiences/ {meta.json, users.parquet, bitmaps.parquet}          (beside the Parquet output)
      -> Redis (with --redis): the version's keys, then the `latest` pointer  (mvke/runtime/keys.py)

Why numbers in output order: within a part users are contiguous and increasing, so each bitmap grows
at its end (cheap appends into Roaring's last container) and a tag's users are stored in runs of
nearby numbers.
"""
from __future__ import annotations

import array
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyroaring import BitMap

from mvke.runtime.audience import USER_CHUNK, AudienceMeta, AudienceRule, encode_user_chunk
from mvke.runtime.keys import Keys

log = logging.getLogger("mvke.batch")

KEEP_VERSIONS = 3
WRITE_BATCH_BYTES = 8 << 20     # one pipeline round trip per ~8 MB of bitmaps (a Redis reply buffer stays small)
_COLUMNS = ["user_id", "task", "rank", "tag", "score"]


@dataclass
class AudienceIndex:
    meta: AudienceMeta
    user_ids: pa.Array                    # string; row n = user number n
    bitmaps: dict[str, list[BitMap]]      # task -> one bitmap per catalogue tag (tags.json order)

    def bytes(self) -> int:
        """Serialised size of the bitmaps (what Redis and bitmaps.parquet hold, before Parquet's compression)."""
        return sum(len(b.serialize()) for bms in self.bitmaps.values() for b in bms if b)


def version_id(model_version: str, source: dict, rule: AudienceRule) -> str:
    """Content address of an index: same model, input, top_k and rule -> same version (a rerun republishes
    nothing)."""
    doc = json.dumps({"model_version": model_version, "source": source, "rule": rule.to_dict()}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


class _Builder:
    def __init__(self, tasks: list[str], catalogue: list[str], rule: AudienceRule):
        self.tasks, self.catalogue, self.rule = tasks, catalogue, rule
        self.task_code = {t: i for i, t in enumerate(tasks)}
        self.tag_code = {t: i for i, t in enumerate(catalogue)}
        self.bitmaps = [BitMap() for _ in range(len(tasks) * len(catalogue))]   # key = task * T + tag
        self.runs = 0                        # users (row runs) so far
        self.last_uid: str | None = None     # the previous batch's last user (a user's rows may straddle batches)
        self.run_ids: list[pa.Array] = []    # each run's user id, in order

    def _codes(self, col: pa.Array, table: dict[str, int], what: str) -> np.ndarray:
        enc = col.dictionary_encode() if not pa.types.is_dictionary(col.type) else col
        mapping = []
        for v in enc.dictionary.to_pylist():
            if v not in table:
                raise ValueError(f"tag-all output has {what} {v!r}, which the model's catalogue does not know")
            mapping.append(table[v])
        return np.asarray(mapping, dtype=np.int64)[enc.indices.to_numpy(zero_copy_only=False)]

    def _user_runs(self, uid: pa.Array) -> np.ndarray:
        """[n] run number (user number before deduplication) of each row."""
        n = len(uid)
        start = np.ones(n, dtype=bool)
        if n > 1:
            start[1:] = pc.not_equal(uid.slice(1), uid.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        if n and self.last_uid is not None and uid[0].as_py() == self.last_uid:
            start[0] = False
        run = np.cumsum(start, dtype=np.int64) - 1 + self.runs   # -1 + runs: the straddling user keeps its number
        starts = np.flatnonzero(start)
        self.run_ids.append(uid.take(pa.array(starts)))
        self.runs += len(starts)
        if n:
            self.last_uid = uid[n - 1].as_py()
        return run

    def add_file(self, path: Path) -> None:
        keys, nums = [], []
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 18, columns=_COLUMNS):
            uid = batch.column("user_id")
            if pa.types.is_dictionary(uid.type):
                uid = uid.cast(pa.string())
            run = self._user_runs(uid)
            keep = batch.column("rank").to_numpy(zero_copy_only=False) <= self.rule.top_k
            if self.rule.min_score is not None:
                keep &= batch.column("score").to_numpy(zero_copy_only=False) >= np.float32(self.rule.min_score)
            key = (self._codes(batch.column("task"), self.task_code, "task") * len(self.catalogue)
                   + self._codes(batch.column("tag"), self.tag_code, "tag"))
            keys.append(key[keep])
            nums.append(run[keep])
        if not keys:
            return
        key, num = np.concatenate(keys), np.concatenate(nums).astype(np.uint32)   # [rows kept]
        order = np.argsort(key, kind="stable")          # stable: numbers stay ascending inside a group
        key, num = key[order], num[order]
        bounds = np.flatnonzero(np.diff(key)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(key)]):
            # array('I') is pyroaring's fast path (a numpy array would be read element by element)
            self.bitmaps[int(key[lo])].update(array.array("I", num[lo:hi].tobytes()))

    def finish(self) -> tuple[pa.Array, list[BitMap]]:
        ids = pa.concat_arrays(self.run_ids) if self.run_ids else pa.array([], pa.string())
        enc = ids.dictionary_encode()       # first-appearance order: unique ids keep their run number
        users = enc.dictionary
        if len(users) == len(ids):
            return users, self.bitmaps
        # the same user id in several input rows: one number for all its runs (rare: remap every bitmap)
        log.warning("audiences: %d duplicate user ids merged", len(ids) - len(users))
        remap = enc.indices.to_numpy(zero_copy_only=False).astype(np.uint32)
        out = []
        for b in self.bitmaps:
            out.append(BitMap(array.array("I", np.sort(remap[np.asarray(b.to_array(), dtype=np.int64)]).tobytes()))
                       if b else BitMap())
        return users, out


def build_index(files: list[Path], tasks: list[str], catalogue: list[str], rule: AudienceRule, model_version: str,
                source: dict) -> AudienceIndex:
    """The index of tag-all's output parts (in part order)."""
    b = _Builder(tasks, catalogue, rule)
    for f in files:
        b.add_file(f)
    users, flat = b.finish()
    T = len(catalogue)
    for bm in flat:
        bm.run_optimize()      # runs where a popular tag covers stretches of consecutive users
        bm.shrink_to_fit()
    bitmaps = {t: flat[i * T:(i + 1) * T] for i, t in enumerate(tasks)}
    meta = AudienceMeta(version=version_id(model_version, source, rule), model_version=model_version, tasks=tasks,
                        tags=catalogue, users=len(users), rule=rule,
                        sizes={t: [len(bm) for bm in bms] for t, bms in bitmaps.items()},
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source=source)
    return AudienceIndex(meta, users, bitmaps)


# ---- beside the Parquet output ------------------------------------------------------------------
BITMAPS_SCHEMA = pa.schema([("task", pa.string()), ("tag", pa.string()), ("size", pa.int64()),
                            ("bitmap", pa.large_binary())])


def write_files(index: AudienceIndex, out_dir: Path) -> Path:
    """out_dir/{meta.json, users.parquet, bitmaps.parquet}, written under a temporary name and renamed (a
    reader of the directory sees the old index or the new one)."""
    tmp = out_dir.with_name("." + out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": index.user_ids}), tmp / "users.parquet")
    with pq.ParquetWriter(tmp / "bitmaps.parquet", BITMAPS_SCHEMA, compression="none") as w:
        for task, bms in index.bitmaps.items():
            rows = [(tag, len(b), b.serialize()) for tag, b in zip(index.meta.tags, bms) if b]
            w.write_table(pa.table({"task": [task] * len(rows), "tag": [r[0] for r in rows],
                                    "size": [r[1] for r in rows], "bitmap": [r[2] for r in rows]},
                                   schema=BITMAPS_SCHEMA))
    (tmp / "meta.json").write_text(index.meta.to_json())
    old = out_dir.with_name("." + out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def read_files(out_dir: Path) -> AudienceIndex:
    meta = AudienceMeta.from_json((out_dir / "meta.json").read_text())
    users = pq.read_table(out_dir / "users.parquet").column("user_id").combine_chunks()
    bitmaps = {t: [BitMap() for _ in meta.tags] for t in meta.tasks}
    for row in pq.read_table(out_dir / "bitmaps.parquet").to_pylist():
        bitmaps[row["task"]][meta.tag_index(row["tag"])] = BitMap.deserialize(row["bitmap"])
    return AudienceIndex(meta, users, bitmaps)


# ---- Redis ----------------------------------------------------------------------------------------
def publish(index: AudienceIndex, r, keys: Keys, keep: int = KEEP_VERSIONS) -> dict:
    """Write the version's keys (bitmaps, user dictionary, then meta), check them, then flip `latest`.

    The pointer moves in one MULTI after every key of the version is written and counted, so a reader that
    resolves `latest` reads a complete version; versions are never modified after, so its reads never mix
    two. Content-addressed: a version already complete in Redis is not written again.
    """
    meta, v = index.meta, index.meta.version
    written = False
    if not r.exists(keys.audience_meta(v)):
        r.delete(*keys.audience_keys(v, meta.tasks)[1:])    # leftovers of an attempt killed half-way
        _write_version(index, r, keys)
        written = True
    pipe = r.pipeline(transaction=True)
    pipe.set(keys.audiences_latest, v)
    pipe.zadd(keys.audiences_versions, {v: time.time()})
    pipe.execute()
    retired = _retire(r, keys, keep, v)
    return {"version": v, "written": written, "latest": keys.audiences_latest, "retired": retired}


def _write_version(index: AudienceIndex, r, keys: Keys) -> None:
    meta, v = index.meta, index.meta.version
    pipe, pending, want = r.pipeline(transaction=False), 0, {}
    for task, bms in index.bitmaps.items():
        key, n = keys.audience_task(v, task), 0
        for tag, b in zip(meta.tags, bms):
            if not b:
                continue     # nobody carries it: no field (meta.sizes says 0; the catalogue says it exists)
            raw = b.serialize()
            pipe.hset(key, tag, raw)
            n += 1
            pending += len(raw)
            if pending >= WRITE_BATCH_BYTES:
                pipe.execute()
                pending = 0
        want[key] = n
    ids = index.user_ids
    for c, lo in enumerate(range(0, len(ids), USER_CHUNK)):
        pipe.hset(keys.audience_users(v), str(c), encode_user_chunk(ids.slice(lo, USER_CHUNK).to_pylist()))
        pending += USER_CHUNK * 12
        if pending >= WRITE_BATCH_BYTES:
            pipe.execute()
            pending = 0
    pipe.execute()
    want[keys.audience_users(v)] = -(-len(ids) // USER_CHUNK)
    check = r.pipeline(transaction=False)
    for key in want:
        check.hlen(key)
    got = dict(zip(want, check.execute()))
    bad = {k: (got[k], n) for k, n in want.items() if got[k] != n}
    if bad:
        raise RuntimeError(f"audience version {v}: fields written != expected: {bad}")
    r.set(keys.audience_meta(v), meta.to_json())     # last: a version with meta is complete


def _retire(r, keys: Keys, keep: int, latest: str) -> list[str]:
    """Delete versions beyond the newest `keep` (never the latest one)."""
    old = [x.decode() if isinstance(x, bytes) else x for x in r.zrange(keys.audiences_versions, 0, -keep - 1)]
    gone = []
    for v in old:
        if v == latest:
            continue
        raw = r.get(keys.audience_meta(v))
        tasks = AudienceMeta.from_json(raw).tasks if raw else []
        r.delete(keys.audience_meta(v))      # first: a reader finds the version gone, not half-gone
        r.unlink(*keys.audience_keys(v, tasks)[1:])
        r.zrem(keys.audiences_versions, v)
        gone.append(v)
    return gone


# ---- the tag-all hook -------------------------------------------------------------------------------
def audience_rule(top_k: int | None, min_score: float | None, written_top_k: int) -> AudienceRule:
    """--audience-top-k / --audience-min-score -> the rule; a top_k beyond the rows written is refused (those
    tags were never written, so the index could not say whether a user carries them)."""
    k = written_top_k if top_k is None else top_k
    if k > written_top_k:
        raise ValueError(f"--audience-top-k {k} > --top-k {written_top_k}: only the written rows can be indexed")
    return AudienceRule(k, min_score)


def run_for_job(cfg, jd, parts, manifest, blobs) -> dict:
    """tag_all.run's one call: build from the finished parts, write beside them (out/audiences/), publish to
    Redis when the job has --redis -> the summary's "audiences" entry."""
    from batch.parts import JOB_FILE
    from mvke.runtime.contract import TAGS_FILE
    spec = json.loads((jd.root / JOB_FILE).read_text())
    source = {k: spec.get(k) for k in ("input", "part_rows", "parts", "model", "tasks", "top_k")}
    rule = audience_rule(cfg.audience_top_k, cfg.audience_min_score, spec["top_k"])
    t0 = time.perf_counter()
    index = build_index([jd.tags_file(p) for p in parts], manifest.task_names, json.loads(blobs[TAGS_FILE]), rule,
                        manifest.version, source)
    build_s = time.perf_counter() - t0
    where = write_files(index, jd.root / "audiences")
    summary = {"version": index.meta.version, "users": index.meta.users, "rule": rule.to_dict(),
               "bitmap_bytes": index.bytes(), "build_s": round(build_s, 3), "dir": str(where), "redis": None}
    if cfg.redis_url:
        from mvke.runtime.redis_client import connect
        r = connect(cfg.redis(), None, socket_timeout=120, socket_connect_timeout=10)
        try:
            summary["redis"] = publish(index, r, Keys(cfg.key_prefix))
        finally:
            r.close()
    return summary
