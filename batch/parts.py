"""The output directory of a tag-all job; its input parts are mvke/runtime/parts.py (re-exported here).

Output directory:

    _job.json                     what this directory holds: input fingerprint, parts,
                                  model version, top_k, ... (a rerun must match it)
    tags/part-00042.parquet       user_id, task, rank, tag, score of part 42's users
    rejects/part-00042.parquet    user_id, field, reason of its bad rows (only if any)
    _parts/part-00042.done        JSON counts; written last, after the files above
    _SUCCESS.json                 summary, once every part is done
    _lock                         the driver's file lock (one job per output directory)

Every file is written to a dot-prefixed temporary name in its directory and
renamed into place (readers such as `pyarrow.dataset` skip dot- and underscore-
prefixed names), so a killed job leaves either a complete part file or none.
A part counts as finished only when its marker exists; a rerun redoes the
others, overwriting their files, so no user is written twice.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from mvke.runtime.parts import (Part, _fsync_replace, input_fingerprint, iter_part, list_inputs,  # noqa: F401
                                part_from_dict, part_to_dict, plan_parts, tmp_name, write_json_atomic)

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS.json"
LOCK_FILE = "_lock"


class AtomicParquetWriter:
    """A Parquet file written batch by batch to a temporary name, renamed on commit()."""

    def __init__(self, final: Path, schema: pa.Schema, **options):
        self.final = final
        self.tmp = tmp_name(final)
        self.writer = pq.ParquetWriter(self.tmp, schema, **{"compression": "snappy", **options})

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def commit(self) -> None:
        self.writer.close()
        _fsync_replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class JobDir:
    def __init__(self, out: str | Path):
        self.root = Path(out)
        self.tags = self.root / "tags"
        self.rejects = self.root / "rejects"
        self.markers = self.root / "_parts"

    def create(self) -> None:
        for d in (self.root, self.tags, self.rejects, self.markers):
            d.mkdir(parents=True, exist_ok=True)

    def tags_file(self, part: Part) -> Path:
        return self.tags / f"{part.name}.parquet"

    def rejects_file(self, part: Part) -> Path:
        return self.rejects / f"{part.name}.parquet"

    def marker(self, part: Part) -> Path:
        return self.markers / f"{part.name}.done"

    def finished(self) -> dict[str, dict]:
        """part name -> its marker's counts."""
        out = {}
        if self.markers.is_dir():
            for m in self.markers.glob("part-*.done"):
                out[m.stem] = json.loads(m.read_text())
        return out

    def check_spec(self, spec: dict) -> bool:
        """Write _job.json, or check that an existing one describes the same job.

        Returns True when resuming. Raises ValueError naming the first difference.
        """
        path = self.root / JOB_FILE
        if path.exists():
            old = json.loads(path.read_text())
            for key in sorted(set(old) | set(spec)):
                if old.get(key) != spec.get(key):
                    raise ValueError(f"{self.root} holds another tag-all job ({key}: {old.get(key)!r} there, "
                                     f"{spec.get(key)!r} now); use a new --out or delete it")
            return True
        write_json_atomic(path, spec)
        return False

    def clean_tmp(self) -> int:
        """Remove temporary files of a killed run (only called under the job lock)."""
        n = 0
        for d in (self.root, self.tags, self.rejects, self.markers):
            if d.is_dir():
                for f in d.glob(".*.tmp-*"):
                    f.unlink(missing_ok=True)
                    n += 1
        return n

    def write_success(self, summary: dict) -> None:
        write_json_atomic(self.root / SUCCESS_FILE, summary)

    def clear_success(self) -> None:
        (self.root / SUCCESS_FILE).unlink(missing_ok=True)


@contextmanager
def job_lock(root: Path) -> Iterator[None]:
    """One tag-all driver per output directory: an OS file lock (filelock) on `_lock`, which the OS
    releases when its holder dies, however it dies (the file itself stays; only the lock matters)."""
    lock = FileLock(root / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ValueError(f"{root / LOCK_FILE}: another tag-all job runs on this output") from None
    try:
        yield
    finally:
        lock.release()
