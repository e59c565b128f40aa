"""The on-disk sample format every data source writes, and its loader.

A dataset directory holds:

* `meta.json`: name, user fields and their kinds (`cat` | `multi`), max list
  lengths, the tag catalogue, optional oracle AUCs;
* `train.parquet`, `test.parquet`: one row per impression: `user_id`, `tags`
  (list of tag names), `click`, `conversion` (0/1), optionally the true
  probabilities `p_click`, `p_conversion`, and optionally the user fields
  inline (when they change per event, as histories do in MovieLens);
* `users.parquet`: the latest raw feature row per user (what the feature store
  holds; samples without inline fields are joined to it by `user_id`).

Each of the three tables is either one Parquet file or a directory of part files
(`train.parquet/part-00000.parquet`, ...: `mvke data synth` writes large datasets
so, `DatasetWriter`); parts with the same name hold the same users, and a user
never straddles two parts (mvke/training/distributed.py streams them part by part).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mvke.data.own_checks import DataError, check_labels, check_meta
from mvke.runtime.features import FeatureSchema
from mvke.runtime.parts import list_inputs

TASKS = ("interest", "intention")
TASK_LABELS = {"interest": "click", "intention": "conversion"}
MAX_TAGS_PER_AD = 3  # tag ids per sample fed to the tag tower (pooled)


def write_dataset(out: str | Path, train: pd.DataFrame, test: pd.DataFrame,
                  users: pd.DataFrame, meta: dict[str, Any]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in (("train", train), ("test", test), ("users", users)):
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out / f"{name}.parquet")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


SPLITS = ("train", "test", "users")


class DatasetWriter:
    """Writes a dataset table by table, a block of rows at a time, with bounded memory.

    `parted=False`: one Parquet file per table, each `add` appending row groups to it.
    `parted=True`: a directory of part files per table; `add(name, df, part=k)` appends to
    `NAME.parquet/part-{k:05d}.parquet` (parts must come in order: a new part closes the last).
    meta.json is written last (`close`), so a directory without it is an unfinished dataset.
    The schema of each table is the first block's; later blocks are converted to it.
    """

    def __init__(self, out: str | Path, parted: bool = False, keep_parts: int = 0):
        """`keep_parts` > 0 (parted only): keep parts 0 .. keep_parts-1 an earlier run finished and write
        the rest (`resume_point`); their schema is the schema of what is added."""
        self.out, self.parted = Path(out), parted
        self.out.mkdir(parents=True, exist_ok=True)
        self._schemas: dict[str, pa.Schema] = {}
        self._writers: dict[str, tuple[int, pq.ParquetWriter]] = {}
        (self.out / "meta.json").unlink(missing_ok=True)
        for name in SPLITS:   # whatever an earlier run left (a file or a directory of parts)
            old = self.out / f"{name}.parquet"
            if keep_parts and parted and old.is_dir():
                self._schemas[name] = pq.read_schema(old / "part-00000.parquet")
                for f in old.glob("*.parquet"):
                    if f.name >= f"part-{keep_parts:05d}.parquet":
                        f.unlink()
            elif old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()

    @staticmethod
    def resume_point(out: str | Path) -> int:
        """How many leading parts an earlier parted run finished: every table has the part and its
        Parquet footer reads (a part cut off mid-write has none). 0 when there is nothing to keep."""
        out = Path(out)
        if not all((out / f"{name}.parquet").is_dir() for name in SPLITS):
            return 0
        k = 0
        while True:
            for name in SPLITS:
                try:
                    pq.read_metadata(out / f"{name}.parquet" / f"part-{k:05d}.parquet")
                except Exception:   # missing or cut off: this part is not finished
                    return k
            k += 1

    def add(self, name: str, df: pd.DataFrame, part: int = 0) -> None:
        schema = self._schemas.get(name)
        table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
        self._schemas.setdefault(name, table.schema)
        current = self._writers.get(name)
        if current is None or current[0] != part:
            if current is not None:
                current[1].close()
            if self.parted:
                (self.out / f"{name}.parquet").mkdir(exist_ok=True)
                path = self.out / f"{name}.parquet" / f"part-{part:05d}.parquet"
            else:
                path = self.out / f"{name}.parquet"
            current = self._writers[name] = (part, pq.ParquetWriter(path, self._schemas[name]))
        current[1].write_table(table)

    def close(self, meta: dict[str, Any]) -> Path:
        for _, writer in self._writers.values():
            writer.close()
        self._writers.clear()
        (self.out / "meta.json").write_text(json.dumps(meta, indent=1))
        return self.out


def read_table(path: str | Path) -> pa.Table:
    """A Parquet file, or the part files of a directory (sorted by name) as one table."""
    path = Path(path)
    if not path.is_dir():
        return pq.read_table(path)
    return pa.concat_tables([pq.read_table(f) for f in list_inputs(path)])


def _read_parquet(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(path, None, "file not found")
    try:
        df = read_table(path).to_pandas()
    except Exception as e:  # pyarrow raises many types for a corrupt file
        raise DataError(path, None, f"not a readable Parquet file ({e})") from e
    if len(df) == 0:
        raise DataError(path, None, "file has no rows")
    return df


def _require(df: pd.DataFrame, path: Path, column: str, kind: str) -> None:
    if column not in df.columns:
        raise DataError(path, column, "missing column")
    col = df[column]
    if kind == "label":
        check_labels(col, path, column)
    elif kind in ("list", "multi"):
        bad = col.map(lambda v: not isinstance(v, (list, np.ndarray)) and v is not None)
        if bad.any():
            raise DataError(path, column, f"expected lists of values, got {type(col[bad].iloc[0]).__name__}")
    elif kind == "cat":
        bad = col.map(lambda v: isinstance(v, (list, np.ndarray, dict)))
        if bad.any():
            raise DataError(path, column, "expected one value per row, got a list")


@dataclass
class RawDataset:
    path: Path
    meta: dict[str, Any]
    train: pd.DataFrame
    test: pd.DataFrame
    users: pd.DataFrame

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    @property
    def tags(self) -> list[str]:
        return list(self.meta["tags"])


def read_meta(meta_path: Path) -> dict[str, Any]:
    """meta.json, checked for the keys every reader needs."""
    if not meta_path.exists():
        raise DataError(meta_path, None, "file not found")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(meta_path, None, f"invalid JSON ({e})") from e
    for key in ("fields", "tags"):
        if key not in meta:
            raise DataError(meta_path, key, "missing key")
    check_meta(meta, meta_path)
    return meta


def check_samples(df: pd.DataFrame, path: Path, meta: dict[str, Any]) -> None:
    """The columns of a file of impressions (a split, or the log `mvke data split` cuts)."""
    _require(df, path, "user_id", "cat")
    _require(df, path, "tags", "list")
    for label in TASK_LABELS.values():
        _require(df, path, label, "label")
    inline = [n for n in meta["fields"] if n in df.columns]
    if inline and len(inline) != len(meta["fields"]):
        missing = next(n for n in meta["fields"] if n not in df.columns)
        raise DataError(path, missing, "missing column (other user fields are inline)")
    for name in inline:
        _require(df, path, name, meta["fields"][name])


def load_dataset(path: str | Path) -> RawDataset:
    """Read and validate a dataset directory (errors name file and column)."""
    path = Path(path)
    meta = read_meta(path / "meta.json")
    users_path = path / "users.parquet"
    users = _read_parquet(users_path)
    _require(users, users_path, "user_id", "cat")
    for name, kind in meta["fields"].items():
        _require(users, users_path, name, kind)
    splits = {}
    for split in ("train", "test"):
        p = path / f"{split}.parquet"
        df = _read_parquet(p)
        check_samples(df, p, meta)
        splits[split] = df
    return RawDataset(path, meta, splits["train"], splits["test"], users)


@dataclass
class Gathered:
    """An [N, ...] array read as `table[index]` on access, never held whole: a split keeps each
    user's encoded fields once instead of once per impression (a synthetic user has ~16
    training impressions, so 16x less memory for the fields). Indexing with rows gives a
    plain array; `take` gives another Gathered. Only row indexing is supported (enough for
    the trainer, the test metrics and MVKE's diagnostics)."""

    table: np.ndarray         # [U, ...] one row per user
    index: np.ndarray         # [N] row of `table` for each sample

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.table.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.table.dtype

    def __getitem__(self, rows) -> np.ndarray:
        return self.table[self.index[rows]]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:   # np.asarray: the whole array, materialised
        out = self.table[self.index]
        return out if dtype is None else out.astype(dtype)

    def take(self, rows: np.ndarray) -> "Gathered":
        return Gathered(self.table, self.index[rows])


def take_rows(a: np.ndarray | Gathered, rows: np.ndarray) -> np.ndarray | Gathered:
    """a[rows], a Gathered staying one (np.ndarray.take flattens: not the same operation)."""
    return a.take(rows) if isinstance(a, Gathered) else a[rows]


@dataclass
class EncodedSplit:
    """Model-ready arrays of one split (rows aligned)."""

    cat_ids: np.ndarray | Gathered    # [N, F_cat] int64
    multi_ids: np.ndarray | Gathered  # [N, F_multi, L] int64
    tag_ids: np.ndarray       # [N, MAX_TAGS_PER_AD] int64, 0 = padding
    labels: np.ndarray        # [N, n_tasks] float32, columns in TASKS order
    true_probs: np.ndarray | None  # [N, n_tasks] float32 (synthetic only)
    user_ids: np.ndarray      # [N] str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "EncodedSplit":
        return EncodedSplit(take_rows(self.cat_ids, idx), take_rows(self.multi_ids, idx), self.tag_ids[idx],
                            self.labels[idx], None if self.true_probs is None else self.true_probs[idx],
                            self.user_ids[idx])


def build_schema(ds: RawDataset) -> FeatureSchema:
    """Vocabularies from the training split only (users seen in training for joined fields)."""
    kinds = ds.meta["fields"]
    if all(n in ds.train.columns for n in kinds):
        source = ds.train
    else:
        source = ds.users[ds.users["user_id"].isin(set(ds.train["user_id"]))]
    return FeatureSchema.build({n: source[n] for n in kinds}, kinds, ds.meta.get("max_lens", {}))


def tag_index(tags: list[str]) -> dict[str, int]:
    """Tag name -> tag id (0 is padding / unknown tag)."""
    return {t: i + 1 for i, t in enumerate(tags)}


@dataclass
class EncodedUsers:
    """Each user's encoded fields once (the last feature row of a user wins)."""
    user_ids: np.ndarray      # [U] str
    cat_ids: np.ndarray       # [U, F_cat] int64
    multi_ids: np.ndarray     # [U, F_multi, L] int64

    def rows_of(self, df: pd.DataFrame, path: Path) -> np.ndarray:
        """Row of each sample's user ([N] int64); DataError naming the first user without a feature row."""
        pos = pd.Index(self.user_ids).get_indexer(df["user_id"])
        if (pos < 0).any():
            missing = df["user_id"][pos < 0].iloc[0]
            raise DataError(path / "users.parquet", "user_id", f"no feature row for user {missing!r}")
        return pos


def encode_users(users: pd.DataFrame, schema: FeatureSchema) -> EncodedUsers:
    users = users.drop_duplicates("user_id", keep="last")
    cat, multi = schema.encode(users[schema.names].to_dict("records")).ids()
    return EncodedUsers(users["user_id"].to_numpy(), cat, multi)


def encode_samples(df: pd.DataFrame, tags: list[str], cat, multi, user_ids: np.ndarray | None = None) -> EncodedSplit:
    """A split from its rows' encoded user fields (arrays or Gathered) and the rows' tags and labels;
    `user_ids`: the rows' user ids if already at hand (shared strings: less memory than the column's)."""
    tix = tag_index(tags)
    tag_ids = np.zeros((len(df), MAX_TAGS_PER_AD), dtype=np.int64)
    for i, row_tags in enumerate(df["tags"]):
        for j, t in enumerate(list(row_tags)[:MAX_TAGS_PER_AD]):
            tag_ids[i, j] = tix.get(t, 0)
    labels = np.stack([df[TASK_LABELS[t]].to_numpy(np.float32) for t in TASKS], 1)
    probs = None
    if "p_click" in df.columns:
        probs = np.stack([df["p_click"].to_numpy(np.float32), df["p_conversion"].to_numpy(np.float32)], 1)
    return EncodedSplit(cat, multi, tag_ids, labels, probs, df["user_id"].to_numpy() if user_ids is None else user_ids)


def encode_split(ds: RawDataset, df: pd.DataFrame, schema: FeatureSchema) -> EncodedSplit:
    names = schema.names
    if all(n in df.columns for n in names):
        cat, multi = schema.encode(df[names].to_dict("records")).ids()
    else:
        # Encode each user once, then gather per sample.
        users = encode_users(ds.users, schema)
        pos = users.rows_of(df, ds.path)
        cat, multi = users.cat_ids[pos], users.multi_ids[pos]
    return encode_samples(df, ds.tags, cat, multi)
