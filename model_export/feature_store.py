"""`mvke features load`: raw user feature rows -> one Redis hash per user.

The service reads these hashes (`mvke:user:<id>`) and maps raw values to ids
with the active manifest's vocabularies, so the store is model-independent and
survives model versions. Multi-valued fields are stored `|`-joined.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import redis
from tqdm.auto import tqdm

from mvke.runtime.features import MULTI_SEP, to_store_value
from mvke.runtime.keys import Keys


LOADED_AT_FIELD = "_loaded_at"


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
    if uid is None or (isinstance(uid, float) and np.isnan(uid)) or str(uid) == "":
        return None, "user_id", "missing user id"
    mapping = {}
    for name, kind in kinds.items():
        v = row.get(name)
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue  # missing -> OOV / empty at serving time
        if kind == "multi":
            if not isinstance(v, (list, tuple)):
                return None, name, f"expected a list, got {type(v).__name__}"
            if any(isinstance(x, (list, tuple, dict)) or MULTI_SEP in str(x) for x in v):
                return None, name, f"list items must be scalars without {MULTI_SEP!r}"
        elif isinstance(v, (list, tuple, dict)):
            return None, name, f"expected one value, got {type(v).__name__}"
        mapping[name] = to_store_value(v)
    return mapping, None, None


def load_rows(rows: Iterable[Mapping[str, Any]], kinds: Mapping[str, str], r: redis.Redis,
              keys: Keys | None = None, batch_size: int = 1000, total: int | None = None,
              progress: bool = True) -> LoadReport:
    keys = keys or Keys()
    report = LoadReport()
    t0 = time.perf_counter()
    stamp = str(int(time.time()))
    # MULTI per batch: a reader never sees a user between the DEL and the HSET of a re-load.
    pipe = r.pipeline(transaction=True)
    pending = 0
    with tqdm(total=total, unit="user", desc="features", disable=not progress) as bar:
        for row in rows:
            mapping, bad_field, reason = validate_row(row, kinds)
            if mapping is None:
                report.bad_rows.append({"user_id": str(row.get("user_id")), "field": bad_field, "reason": reason})
                continue
            key = keys.user(str(row["user_id"]))
            # Replace the whole hash so a re-load leaves no stale field behind.
            pipe.delete(key)
            # `_loaded_at` keeps the hash alive for a user whose every feature is empty
            # (still a known user, all fields OOV); the encoder ignores unknown fields.
            pipe.hset(key, mapping={**mapping, LOADED_AT_FIELD: stamp})
            pending += 1
            if pending >= batch_size:
                pipe.execute()
                report.loaded += pending
                bar.update(pending)
                pending = 0
        if pending:
            pipe.execute()
            report.loaded += pending
            bar.update(pending)
    report.seconds = time.perf_counter() - t0
    return report


def load_dataset_users(data_dir: str | Path, r: redis.Redis, keys: Keys | None = None,
                       progress: bool = True) -> LoadReport:
    import json

    import pyarrow.parquet as pq
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    table = pq.read_table(data_dir / "users.parquet")
    rows = table.to_pylist()
    return load_rows(rows, meta["fields"], r, keys, total=len(rows), progress=progress)


def read_user(r: redis.Redis, user_id: str, keys: Keys | None = None) -> dict[str, str] | None:
    keys = keys or Keys()
    raw = r.hgetall(keys.user(user_id))
    if not raw:
        return None
    return {k.decode(): v.decode() for k, v in raw.items() if k.decode() != LOADED_AT_FIELD}
