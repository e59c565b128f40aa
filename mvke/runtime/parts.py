"""Parts of a users table: the unit of work and of resumption of the jobs that read one
(`mvke tag-all`, `mvke features load`).

The input (one Parquet file or a directory of them) is cut into numbered parts
from the Parquet metadata alone: consecutive row groups are packed into a part
of at most `part_rows` rows; a row group larger than that is split into row
ranges (rows before a range are decoded and skipped, so write big inputs with
row groups <= part_rows). The same input and part size always give the same
parts, so a rerun knows which parts are finished. Files a job writes go to a
dot-prefixed temporary name and are renamed into place (`write_json_atomic`).
A job that rejected more than `max_reject_rate` of its users (or handled none) has failed
(`reject_rate_error`, mvke/runtime/reject_rate.py): it says so, exits non-zero and writes no success marker.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mvke.runtime.reject_rate import DEFAULT_MAX_REJECT_RATE, reject_rate_error  # noqa: F401  (the jobs' rule)


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
    """What must be equal for a rerun to resume: path, size, modification time and rows of every input
    (a file rewritten in place with the same size is new input: its parts are not skipped)."""
    out = []
    for f in files:
        st = f.stat()
        out.append({"path": str(f.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "rows": pq.ParquetFile(f).metadata.num_rows})
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


def write_json_atomic(final: Path, doc: dict) -> None:
    tmp = tmp_name(final)
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    _fsync_replace(tmp, final)


def part_to_dict(p: Part) -> dict:
    return asdict(p)


def part_from_dict(d: dict) -> Part:
    return Part(int(d["id"]), d["path"], int(d["start"]), int(d["stop"]), [int(g) for g in d["row_groups"]],
                int(d["first_row"]))
