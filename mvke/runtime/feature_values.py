"""What a valid value of a feature field is, and how a bad one reads: the one place of these rules.

Raw values (a request's `features`, a users table read by `mvke features load` and `mvke tag-all`):

* a single-valued field (kind "cat") takes one scalar (a string, number or bool; bucketised numbers
  are categorical too);
* a multi-valued field (kind "multi") takes a list of scalars (a tuple, a numpy array or an Arrow
  list as well), none of them holding the feature store's list separator `|`;
* None (or a float NaN) is a missing value: the field's out-of-vocabulary id, or an empty list.

Stored values (the feature store's hashes, mvke/runtime/keys.py `user`) are strings; a multi field's
is its list `|`-joined. The encoders (row_encoder.py, column_encoder.py) read both forms
(`stored_ok=True`); every raw entry point checks with `value_problem` / `column_problems` first, so
the same bad value reads the same wherever it is sent (tests/runtime/test_feature_values.py).
pyarrow is imported only by the column functions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mvke.runtime.encoded import MULTI_SEP

if TYPE_CHECKING:
    import pyarrow as pa

FIELD_KINDS = ("cat", "multi")
NOT_SCALAR = (list, tuple, dict, set, np.ndarray)
MISSING_USER_ID = "missing user id"
ITEMS_SCALAR = "list items must be scalar values"
ITEMS_NO_SEP = f"list items must not contain {MULTI_SEP!r} (the feature store's list separator)"
INVALID_UTF8 = "invalid UTF-8"


def expected_one(got: str) -> str:
    return f"expected one value, got {got}"


def expected_list(got: str) -> str:
    return f"expected a list of values, got {got}"


def is_missing(v: Any) -> bool:
    """None or a float NaN: the value is absent (OOV for a single-valued field, empty for a list)."""
    return v is None or (isinstance(v, float) and v != v)


def value_problem(kind: str, v: Any, stored_ok: bool = False) -> str | None:
    """Why a Python value is not a valid value of a field of this kind (None: it is).
    stored_ok: a string (or bytes) in a multi field is its stored, `|`-joined form."""
    if is_missing(v):
        return None
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if kind == "cat":
        return expected_one(type(v).__name__) if isinstance(v, NOT_SCALAR) else None
    if isinstance(v, (str, bytes)) and stored_ok:
        return None
    if not isinstance(v, (list, tuple)):
        return expected_list(type(v).__name__)
    return items_problem(v, stored_ok)


def items_problem(items: Any, stored_ok: bool = False) -> str | None:
    """Why a list's items are not valid items of a multi field (None: they are)."""
    for x in items:
        if isinstance(x, NOT_SCALAR):
            return ITEMS_SCALAR
        if not stored_ok and isinstance(x, str) and MULTI_SEP in x:
            return ITEMS_NO_SEP
    return None


# ---- Arrow columns ---------------------------------------------------------------------------
def is_list_type(t: "pa.DataType") -> bool:
    import pyarrow as pa
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            or getattr(pa.types, "is_list_view", lambda _: False)(t)
            or getattr(pa.types, "is_large_list_view", lambda _: False)(t))


def is_string_type(t: "pa.DataType") -> bool:
    import pyarrow as pa
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view",
                                                                          lambda _: False)(t)


def is_nested_type(t: "pa.DataType") -> bool:
    import pyarrow as pa
    return is_list_type(t) or pa.types.is_struct(t) or pa.types.is_map(t)


def is_scalar_type(t: "pa.DataType") -> bool:
    import pyarrow as pa
    return not (is_nested_type(t) or pa.types.is_union(t) or pa.types.is_dictionary(t))


def python_name(t: "pa.DataType") -> str:
    """The Python type name of a value of Arrow type t, as `value_problem` reports it."""
    import pyarrow as pa
    is_ = pa.types
    for test, name in ((is_list_type, "list"), (is_.is_struct, "dict"), (is_.is_map, "dict"), (is_.is_integer, "int"),
                       (is_.is_floating, "float"), (is_.is_boolean, "bool"), (is_.is_binary, "bytes"),
                       (is_.is_large_binary, "bytes"), (is_.is_fixed_size_binary, "bytes"),
                       (is_.is_timestamp, "datetime"), (is_.is_date, "date"), (is_.is_time, "time"),
                       (is_.is_duration, "timedelta"), (is_.is_decimal, "Decimal"), (is_.is_null, "NoneType")):
        if test(t):
            return name
    return "str"


def present(col: "pa.Array") -> np.ndarray:
    """[n] bool: rows holding a value (not null, not a float NaN)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    has = col.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_floating(col.type):
        has &= ~pc.fill_null(pc.is_nan(col), False).to_numpy(zero_copy_only=False)
    return has


def column_problems(kind: str, col: "pa.Array", stored_ok: bool = False) -> list[tuple[np.ndarray, str]]:
    """The rows of an Arrow column (dictionary-decoded, one chunk) that are not valid values of a field of
    this kind, as (rows [n] bool, reason) pairs: `value_problem` for a whole column at once, in C++ where
    the type decides (a nested type in a single-valued field, a scalar type in a multi field) and per
    item only for list columns (nested items, items holding the separator)."""
    import pyarrow.compute as pc
    t = col.type
    if kind == "cat":
        return [(present(col), expected_one(python_name(t)))] if is_nested_type(t) else []
    if is_list_type(t):
        items = pc.list_flatten(col)
        if is_nested_type(items.type):
            return [(present(col), ITEMS_SCALAR)]
        if stored_ok or not is_string_type(items.type) or len(items) == 0:
            return []
        holds_sep = pc.fill_null(pc.match_substring(items, MULTI_SEP), False).to_numpy(zero_copy_only=False)
        if not holds_sep.any():
            return []
        rows = np.zeros(len(col), dtype=bool)
        rows[np.unique(pc.list_parent_indices(col).to_numpy(zero_copy_only=False)[holds_sep])] = True
        return [(rows, ITEMS_NO_SEP)]
    if stored_ok and (is_string_type(t) or python_name(t) == "bytes"):
        return []
    if is_scalar_type(t) or is_nested_type(t):
        return [(present(col), expected_list(python_name(t)))]
    return []


def first_problems(batch: "pa.RecordBatch | pa.Table", kinds: "dict[str, str]") -> dict[int, tuple[str, str]]:
    """Row -> (field, reason) of its first invalid raw value, fields in `kinds` order (absent columns are
    missing values): what `mvke features load` and `mvke tag-all` reject, with the same reasons."""
    import pyarrow as pa
    out: dict[int, tuple[str, str]] = {}
    names = set(batch.schema.names)
    for name, kind in kinds.items():
        if name not in names:
            continue
        col = batch.column(name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        for rows, reason in column_problems(kind, col):
            for r in np.flatnonzero(rows).tolist():
                out.setdefault(r, (name, reason))
    return out
