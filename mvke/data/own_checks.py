"""Own data checked up front: what train, export and features load would refuse later, found before a
file is written, each error naming the file, the column, the row (0-based, as the file stores it) and the value.

`mvke data split` runs every check here; `read_meta` and the label check also run in every
reader of a dataset directory (`mvke train`, `mvke experiment`), so a rule lives once:

* meta.json: field kinds (`cat` | `multi`), `max_lens`, a catalogue of distinct tag names;
* labels: 0/1 values (the value and its row, not the dtype), nulls (the row);
* times: Unix seconds, not milliseconds or microseconds (said, with the conversion); date
  strings that do not parse (the row and the value);
* user ids: strings or integers, never null, float or boolean, the same type in the log and
  users.parquet (the service looks a user up by its text: 123.0 would never be found);
* list fields: no item containing `|`, the feature store's separator, and no nested list
  (`mvke features load` rejects such a user: mvke/runtime/feature_values.py `items_problem`);
* a warning (not an error) for impressions with an empty tag list: they train nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mvke.runtime.encoded import MULTI_SEP
from mvke.runtime.feature_values import FIELD_KINDS, items_problem


class DataError(ValueError):
    """Bad input data; the message names the file and the column."""

    def __init__(self, file: str | Path, column: str | None, message: str):
        where = f"{file}" + (f", column {column!r}" if column else "")
        super().__init__(f"{where}: {message}")
        self.file, self.column = str(file), column


def _show(v: Any) -> str:
    """A value as the user wrote it (numpy scalars as plain Python ones)."""
    return repr(v.item() if isinstance(v, np.generic) else v)


def _first(mask: pd.Series | np.ndarray) -> int:
    return int(np.asarray(mask).argmax())


# ---- meta.json -------------------------------------------------------------------------------------------
def check_meta(meta: dict[str, Any], path: Path) -> None:
    """Kinds, max_lens and tags of a meta.json (keys present: read_meta checked them)."""
    fields = meta["fields"]
    if not isinstance(fields, dict) or not fields:
        raise DataError(path, "fields", f"expected an object field name -> kind, got {fields!r}")
    for name, kind in fields.items():
        if kind not in FIELD_KINDS:
            raise DataError(path, "fields", f"field {name!r}: kind {kind!r} is not one of {', '.join(FIELD_KINDS)} "
                                            "(cat: one value per user; multi: a list of values)")
    for name, n in (meta.get("max_lens") or {}).items():
        if fields.get(name) != "multi":
            raise DataError(path, "max_lens", f"{name!r} is not a multi field of 'fields'")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(path, "max_lens", f"{name!r}: expected an integer >= 1, got {n!r}")
    tags = meta["tags"]
    if not isinstance(tags, list) or not tags:
        raise DataError(path, "tags", "expected a non-empty list of tag names")
    seen: set[str] = set()
    for i, t in enumerate(tags):
        if not isinstance(t, str) or not t:
            raise DataError(path, "tags", f"item {i}: expected a tag name (a non-empty string), got {t!r}")
        if t in seen:
            raise DataError(path, "tags", f"tag {t!r} is listed twice (item {i}): a tag's id is its place in the list")
        seen.add(t)


# ---- labels ----------------------------------------------------------------------------------------------
def check_labels(col: pd.Series, path: Path, column: str) -> None:
    """0/1 per row: a null names its row, another value names itself and its row."""
    missing = col.isna().to_numpy()
    if missing.any():
        raise DataError(path, column, f"missing label in row {_first(missing)} ({int(missing.sum())} rows): every "
                                      "impression needs both labels (0 when it did not happen)")
    if pd.api.types.is_bool_dtype(col):
        return
    if not pd.api.types.is_numeric_dtype(col):
        kinds = col.map(lambda v: isinstance(v, (bool, int, float, np.integer, np.floating)))
        row = _first(~kinds.to_numpy()) if not kinds.all() else 0
        v = col.iloc[row]
        raise DataError(path, column, f"expected integer 0/1 labels, got {type(v).__name__} {_show(v)} in row {row}: "
                                      "write the labels as integers")
    bad = ~col.isin([0, 1]).to_numpy()
    if bad.any():
        row = _first(bad)
        raise DataError(path, column, f"expected 0/1 labels, got {_show(col.iloc[row])} in row {row} "
                                      f"({int(bad.sum())} rows are not 0 or 1)")


# ---- times -----------------------------------------------------------------------------------------------
# Unix time units by magnitude: seconds reach 1e11 only in the year 5138, milliseconds since 1973
# are above it, microseconds above 1e14, nanoseconds above 1e17.
_UNITS = ((1e17, "nanoseconds", 1_000_000_000, "ns"), (1e14, "microseconds", 1_000_000, "us"),
          (1e11, "milliseconds", 1_000, "ms"))


def check_unix_unit(times: pd.Series, path: Path, column: str) -> None:
    """Numeric times must be Unix seconds: say which unit they look like and how to convert."""
    values = times.dropna().abs()
    if values.empty:
        return
    typical = float(values.median())
    for floor, unit, per_s, code in _UNITS:
        if typical >= floor:
            row = int(times.index.get_loc(values.index[0])) if not times.isna().iloc[0] else 0
            v = times.iloc[row]
            when = pd.to_datetime(int(v), unit=code, utc=True).isoformat()
            raise DataError(path, column, f"times look like {unit} since 1970 (row {row}: {_show(v)} = {when}), "
                                          f"Unix seconds are expected: convert with `df[{column!r}] // {per_s}` or "
                                          f"write a Parquet timestamp (`pd.to_datetime(df[{column!r}], unit={code!r})`)")


def check_time_strings(times: pd.Series, path: Path, column: str) -> None:
    """Every present date string parses (ISO-8601); the first that does not is named with its row."""
    parsed = pd.to_datetime(times, utc=True, format="ISO8601", errors="coerce")
    bad = (parsed.isna() & times.notna()).to_numpy()
    if bad.any():
        row = _first(bad)
        raise DataError(path, column, f"cannot read {_show(times.iloc[row])} (row {row}; {int(bad.sum())} rows) as a time: "
                                      "write ISO-8601 (2024-05-01 or 2024-05-01T12:30:00Z), a Parquet timestamp "
                                      "or Unix seconds")


# ---- user ids --------------------------------------------------------------------------------------------
def _id_type(col: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(col):
        return "boolean"
    if pd.api.types.is_integer_dtype(col):
        return "integer"
    if pd.api.types.is_float_dtype(col):
        return "float"
    kinds = {type(v).__name__ for v in col.dropna().head(10_000)}
    return "string" if kinds <= {"str"} else "mixed (" + ", ".join(sorted(kinds)) + ")"


def check_user_ids(col: pd.Series, path: Path) -> str:
    """user_id: never null or empty, strings or integers; -> its type (for `check_same_id_type`)."""
    missing = (col.isna() | (col.astype(str) == "")).to_numpy()
    if missing.any():
        raise DataError(path, "user_id", f"missing user id in row {_first(missing)} ({int(missing.sum())} rows)")
    kind = _id_type(col)
    if kind not in ("string", "integer"):
        row = 0
        if kind.startswith("mixed"):
            row = _first(~col.map(lambda v: isinstance(v, str)).to_numpy())
        raise DataError(path, "user_id", f"user ids must be strings (or integers), got {kind} ({_show(col.iloc[row])} in row "
                                         f"{row}): the service looks users up by their text, and a float id "
                                         "123.0 is stored as '123.0'; write them as strings")
    return kind


def check_same_id_type(log_kind: str, log_path: Path, users_kind: str, users_path: Path) -> None:
    if log_kind != users_kind:
        raise DataError(users_path, "user_id", f"user ids are {users_kind}s here and {log_kind}s in {log_path.name}: "
                                               "the split joins them by value; write user_id as strings in both")


# ---- lists -----------------------------------------------------------------------------------------------
def check_list_items(col: pd.Series, path: Path, column: str) -> None:
    """The items of a multi field's lists, by the feature-value rules `mvke features load` applies
    (mvke/runtime/feature_values.py `items_problem`: single values, none holding the list separator)."""
    lists = col.map(lambda v: list(v) if isinstance(v, (list, tuple, np.ndarray)) else [])
    problems = lists.map(items_problem)
    bad = problems.notna().to_numpy()
    if bad.any():
        row = _first(bad)
        item = next(x for x in lists.iloc[row] if items_problem([x]))
        raise DataError(path, column, f"row {row}: item {_show(item)}: {problems.iloc[row]} ({int(bad.sum())} rows): "
                                      f"`mvke features load` would reject these users; replace {MULTI_SEP!r} in "
                                      "the values (e.g. with '/') and keep one value per item")


def empty_tag_lists(tags: pd.Series, path: Path) -> str | None:
    """A warning (or None): impressions whose ad has no tag teach the model nothing about any tag."""
    empty = int(tags.map(lambda v: v is None or len(v) == 0).sum())
    if not empty:
        return None
    return (f"{path}, column 'tags': {empty} of {len(tags)} impressions have an empty tag list; they are kept "
            "but train nothing (an ad needs at least one tag)")
