"""Input parts and the output directory of a tag-all job (the unit of work and of resumption).

The input (one Parquet file or a directory of them) is cut into numbered parts
from the Parquet metadata alone: consecutive row groups are packed into a part
of at most `part_rows` rows; a row group larger than that is split into row
ranges (rows before a range are decoded and skipped, so write big inputs with
row groups <= part_rows). The same input and part size always give the same
parts, so a rerun knows which parts are finished.

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
import os
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS.json"
LOCK_FILE = "_lock"


@dataclass
class Part:
    id: int
    path: str
    start: int            # rows [start, stop) of the file
    stop: int
    row_groups: list[int]
    first_row: int        # file row index of the first row of row_groups[0]

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"part-{self.id:05d}"


def list_inputs(users: str | Path) -> list[Path]:
    """A Parquet file, or every *.parquet under a directory (sorted; `_`/`.` names skipped)."""
    p = Path(users)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet")
                       if not any(c.startswith(("_", ".")) for c in f.relative_to(p).parts))
        if files:
            return files
        raise FileNotFoundError(f"{p}: no .parquet files")
    raise FileNotFoundError(f"{p}: no such file or directory")


def plan_parts(files: list[Path], part_rows: int) -> list[Part]:
    if part_rows < 1:
        raise ValueError(f"part_rows must be >= 1, got {part_rows}")
    parts: list[Part] = []

    def add(path: str, start: int, stop: int, groups: list[int], first: int) -> None:
        parts.append(Part(len(parts), path, start, stop, groups, first))

    for f in files:
        meta = pq.ParquetFile(f).metadata
        row = 0
        pending: list[int] = []
        pending_start = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if n == 0:
                continue
            if pending and (row - pending_start) + n > part_rows:
                add(str(f), pending_start, row, pending, pending_start)
                pending = []
            if n > part_rows:      # split one large row group into ranges
                for s in range(row, row + n, part_rows):
                    add(str(f), s, min(s + part_rows, row + n), [g], row)
            else:
                if not pending:
                    pending_start = row
                pending.append(g)
            row += n
        if pending:
            add(str(f), pending_start, row, pending, pending_start)
    return parts


def input_fingerprint(files: list[Path]) -> list[dict]:
    out = []
    for f in files:
        st = f.stat()
        out.append({"path": str(f.resolve()), "bytes": st.st_size, "rows": pq.ParquetFile(f).metadata.num_rows})
    return out


def iter_part(part: Part, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    """The part's rows as record batches of at most batch_size rows (only `columns`)."""
    pf = pq.ParquetFile(part.path)
    have = set(pf.schema_arrow.names)
    cols = [c for c in columns if c in have]
    cursor = part.first_row
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=part.row_groups, columns=cols,
                                 use_threads=False):
        lo, hi = cursor, cursor + batch.num_rows
        cursor = hi
        if hi <= part.start:
            continue
        if lo >= part.stop:
            break
        if lo < part.start or hi > part.stop:
            batch = batch.slice(max(part.start - lo, 0), min(part.stop, hi) - max(part.start, lo))
        if batch.num_rows:
            yield batch
        if hi >= part.stop:
            break


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


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


def write_json_atomic(final: Path, doc: dict) -> None:
    tmp = tmp_name(final)
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    _fsync_replace(tmp, final)


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


def part_to_dict(p: Part) -> dict:
    return asdict(p)


def part_from_dict(d: dict) -> Part:
    return Part(int(d["id"]), d["path"], int(d["start"]), int(d["stop"]), [int(g) for g in d["row_groups"]],
                int(d["first_row"]))
