"""Tag-all-shaped output rows, synthesised: the input of the audience figures and tests.

For 1M and 10M users the audience figures (scripts/audience_bench.py) do not run the model: they
write rows in tag-all's exact output layout (user_id, task, rank, tag, score; top k per task, rows
by user, task, rank; Parquet parts of 65,536 users, dictionary-encoded as tag-all writes them), with
a skewed (Zipf) tag popularity over the catalogue, the last tag never drawn (an audience of 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TASKS = ("interest", "intention")
N_TAGS = 1780


def catalogue(n_tags: int = N_TAGS) -> list[str]:
    return [f"cat{t % 40:02d}/tag{t:04d}" for t in range(n_tags)]


def _popularity(n_tags: int, skew: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n_tags + 1) ** skew
    w[-1] = 0.0                         # the last tag: nobody carries it
    return w / w.sum()


def _draw_distinct(n: int, k: int, cdf: np.ndarray, rng: np.random.Generator, draws: int = 0) -> np.ndarray:
    """[n, k] distinct tag ids per row, by popularity without replacement: the first k distinct values of
    `draws` draws with replacement (successive sampling), vectorised; rows short of k distinct draw again."""
    draws = draws or 3 * k
    d = np.searchsorted(cdf, rng.random((n, draws)), side="right").clip(0, len(cdf) - 2)   # [n, draws]
    order = np.argsort(d, axis=1, kind="stable")
    sv = np.take_along_axis(d, order, axis=1)
    first = np.ones_like(sv, dtype=bool)
    first[:, 1:] = sv[:, 1:] != sv[:, :-1]
    pos = np.sort(np.where(first, order, draws), axis=1)[:, :k]          # first occurrences, in draw order
    short = np.flatnonzero(pos[:, -1] == draws)
    out = np.take_along_axis(d, np.minimum(pos, draws - 1), axis=1)
    if len(short):
        out[short] = _draw_distinct(len(short), k, cdf, rng, draws * 2)
    return out


def synth_parts(out: Path, users: int, n_tags: int = N_TAGS, k: int = 20, tasks=TASKS, part_rows: int = 65_536,
                skew: float = 1.0, seed: int = 0) -> tuple[list[Path], list[str]]:
    """Parquet parts in tag-all's output layout (rows by user, task, rank; scores descending) -> (files, catalogue)."""
    from batch.tag_all import _WRITE_OPTIONS, _WRITE_SCHEMA
    rng = np.random.default_rng(seed)
    tags = catalogue(n_tags)
    cdf = np.cumsum(_popularity(n_tags, skew))
    tag_arr, task_arr = pa.array(tags), pa.array(list(tasks))
    (out / "tags").mkdir(parents=True, exist_ok=True)
    files = []
    T = len(tasks)
    for p, lo in enumerate(range(0, users, part_rows)):
        n = min(part_rows, users - lo)
        uids = pa.array([f"u{i:08d}" for i in range(lo, lo + n)])
        idx = np.stack([_draw_distinct(n, k, cdf, rng) for _ in tasks], axis=1).reshape(-1).astype(np.int32)
        scores = np.sort(rng.random((n, T, k), dtype=np.float32), axis=2)[:, :, ::-1].reshape(-1)
        d = pa.DictionaryArray.from_arrays
        table = pa.Table.from_arrays(
            [d(np.repeat(np.arange(n, dtype=np.int32), T * k), uids),
             d(np.tile(np.repeat(np.arange(T, dtype=np.int8), k), n), task_arr),
             pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), n * T)), d(idx, tag_arr), pa.array(scores)],
            schema=_WRITE_SCHEMA)
        f = out / "tags" / f"part-{p:05d}.parquet"
        pq.write_table(table, f, **_WRITE_OPTIONS)
        files.append(f)
    return files, tags
