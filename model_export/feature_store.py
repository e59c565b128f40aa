"""The feature store: raw user feature rows -> one Redis hash per user.

The service reads these hashes (`mvke:user:<id>`) and maps raw values to ids
with the active manifest's vocabularies, so the store is model-independent and
survives model versions. Multi-valued fields are stored `|`-joined.

`validate_row` is the per-row rule (the column-wise checks of feature_writer.py
follow it); `load_rows` / `load_dataset_users` load in this process;
`mvke features load` is features_job.py (processes, resumable by part).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from model_export.feature_writer import LOADED_AT_FIELD, FeatureSink, StoreColumns, load_stamp, store_columns
from mvke.runtime.feature_values import MISSING_USER_ID, is_missing, value_problem
from mvke.runtime.features import to_store_value
from mvke.runtime.keys import Keys


@dataclass
class LoadReport:
    loaded: int = 0
    bad_rows: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def users_per_second(self) -> float:
        return self.loaded / self.seconds if self.seconds else 0.0


def validate_row(row: Mapping[str, Any], kinds: Mapping[str, str]) -> tuple[dict[str, str] | None, str | None, str | None]:
    """-> (hash mapping, None, None) or (None, field, reason)."""
    uid = row.get("user_id")
    if is_missing(uid) or str(uid) == "":
        return None, "user_id", MISSING_USER_ID
    mapping = {}
    for name, kind in kinds.items():
        v = row.get(name)
        if is_missing(v):
            continue  # missing -> OOV / empty at serving time
        problem = value_problem(kind, v)     # the rules of every entry point (mvke/runtime/feature_values.py)
        if problem:
            return None, name, problem
        mapping[name] = to_store_value(v)
    return mapping, None, None


def _write(sink: FeatureSink, uids: list[str], mappings: list[dict[str, str]], names: list[str]) -> None:
    columns = [(n, pa.array([m.get(n) for m in mappings], pa.string())) for n in names]
    sink.write(StoreColumns(pa.array(uids, pa.string()), columns))


def load_rows(rows: Iterable[Mapping[str, Any]], kinds: Mapping[str, str], r, keys: Keys | None = None,
              batch_size: int = 1000, total: int | None = None, progress: bool = True,
              ttl_s: int | None = None) -> LoadReport:
    """Python rows (checked one by one with `validate_row`) -> the feature store, on one node or a cluster.

    Each user's hash is replaced atomically (MULTI/DEL/HSET/EXEC per user, one key: legal on a
    cluster): a reader never sees a user between the DEL and the HSET of a re-load.
    """
    keys = keys or Keys()
    report = LoadReport()
    t0 = time.perf_counter()
    sink = FeatureSink(r, keys.user(""), load_stamp(), ttl_s)
    names = list(kinds)
    uids: list[str] = []
    mappings: list[dict[str, str]] = []
    try:
        with tqdm(total=total, unit="user", desc="features", disable=not progress) as bar:
            for row in rows:
                mapping, bad_field, reason = validate_row(row, kinds)
                if mapping is None:
                    report.bad_rows.append({"user_id": str(row.get("user_id")), "field": bad_field, "reason": reason})
                    continue
                uids.append(str(row["user_id"]))
                mappings.append(mapping)
                if len(uids) >= batch_size:
                    _write(sink, uids, mappings, names)
                    report.loaded += len(uids)
                    bar.update(len(uids))
                    uids, mappings = [], []
            if uids:
                _write(sink, uids, mappings, names)
                report.loaded += len(uids)
                bar.update(len(uids))
            sink.flush()
    finally:
        sink.close()
    report.seconds = time.perf_counter() - t0
    return report


def load_dataset_users(data_dir: str | Path, r, keys: Keys | None = None, progress: bool = True,
                       ttl_s: int | None = None) -> LoadReport:
    """A dataset's users.parquet into the feature store, in this process (`mvke features load` runs
    features_job.load_features: several processes, resumable by part)."""
    from model_export.features_job import read_kinds, record_schema, users_source
    keys = keys or Keys()
    files, home = users_source(data_dir)
    kinds = read_kinds(home)
    report = LoadReport()
    t0 = time.perf_counter()
    sink = FeatureSink(r, keys.user(""), load_stamp(), ttl_s)
    try:
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=None, use_threads=False):
                cols = store_columns(batch, kinds)
                report.bad_rows += [dict(zip(("user_id", "field", "reason"), b)) for b in cols.rejects]
                sink.write(cols)
                report.loaded += len(cols.user_ids)
        sink.flush()
    finally:
        sink.close()
    report.seconds = time.perf_counter() - t0
    record_schema(r, keys, files, kinds, report.loaded)
    return report


def read_user(r, user_id: str, keys: Keys | None = None) -> dict[str, str] | None:
    keys = keys or Keys()
    raw = r.hgetall(keys.user(user_id))
    if not raw:
        return None
    return {k.decode(): v.decode() for k, v in raw.items() if k.decode() != LOADED_AT_FIELD}
