"""Arrow columns -> ids: the column half of `FeatureSchema.encode` (mvke/runtime/features.py).

Encoding one Python dict per row (mvke/runtime/row_encoder.py) is right for a
request, far too slow for millions of users. `ColumnEncoder` gives exactly the
same ids and errors from Arrow columns, with the hashing done by Arrow's C++
kernels:

* string columns (the normal case) are looked up with `pyarrow.compute.index_in`
  against the field's vocabulary;
* other scalar columns (ints, floats, bools, ...) are dictionary-encoded first and
  only their distinct values go through Python (`str(value)`, as the row encoder does:
  `5.0` stays "5.0", `True` stays "True");
* list columns are flattened once; each item gets its position in its row, the
  first `max_len` are scattered into the [B, F_multi, L] array in one step;
* `|`-joined strings (the feature-store form of a multi field) are split by Arrow.

Rows with a value of the wrong type (a list in a single-valued field, a scalar
where a list is expected, a list of lists) are reported per row, the first
failing field in the row encoder's order (cat fields, then multi fields), so a
batch job keeps going. Column types that have no vectorised path (unions, lists
of structs, invalid UTF-8 binary) fall back to the row encoder's rule value by
value, so the result never depends on which path ran.
tests/runtime/test_features.py checks equality with the row encoder.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mvke.runtime.encoded import MULTI_SEP, EncodedBatch, FeatureError, FieldIds
from mvke.runtime.feature_values import column_problems, is_list_type, is_scalar_type, is_string_type
from mvke.runtime.row_encoder import RowEncoder


def plain_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array, dictionary columns decoded."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return col


class _Field:
    """Per-field lookup state (vocabulary -> global ids), built once per schema."""

    def __init__(self, f: FieldIds):
        self.name, self.kind, self.max_len = f.name, f.kind, f.max_len
        self.oov = f.oov
        self.lookup = f.ids
        self.vocab = pa.array(f.vocab, type=pa.string())
        # index in vocab -> global id; index len(vocab) (our stand-in for "not found") -> OOV
        self.ids = np.append(np.arange(self.oov + 1, self.oov + 1 + len(f.vocab), dtype=np.int64), self.oov)

    def str_ids(self, values: pa.Array) -> np.ndarray:
        """Ids of string values (null -> OOV), all in C++."""
        if not pa.types.is_string(values.type):
            values = values.cast(pa.string())
        idx = pc.index_in(values, value_set=self.vocab)
        idx = pc.fill_null(idx, len(self.vocab)).to_numpy(zero_copy_only=False)
        return self.ids[idx]

    def scalar_ids(self, values: pa.Array, item: bool = False) -> np.ndarray:
        """Ids of scalar values of any type: strings in C++, others via their distinct values.

        For cat fields a null is "missing" -> OOV; for list items (`item=True`) the row
        encoder does `str(None)` -> "None", looked up like any other value.
        """
        if is_string_type(values.type) and not item:
            return self.str_ids(values)
        enc = values.dictionary_encode()
        uniq = enc.dictionary.to_pylist()
        table = np.array([self.lookup.get(str(u), self.oov) for u in uniq] +
                         [self.lookup.get("None", self.oov) if item else self.oov], dtype=np.int64)
        idx = pc.fill_null(enc.indices, len(uniq)).to_numpy(zero_copy_only=False)
        return table[idx]


class ColumnEncoder:
    """Arrow batch -> EncodedBatch, equal to the row encoder on the same values."""

    def __init__(self, fields: Sequence[FieldIds]):
        self.cat = [_Field(f) for f in fields if f.kind == "cat"]
        self.multi = [_Field(f) for f in fields if f.kind == "multi"]
        self.multi_len = max((f.max_len for f in self.multi), default=1)
        self.rows = RowEncoder(fields)   # the rule value by value, for column types without a vectorised path

    def encode(self, batch: pa.RecordBatch | pa.Table) -> EncodedBatch:
        B = batch.num_rows
        names = set(batch.schema.names)
        cat = np.empty((B, len(self.cat)), dtype=np.int64)
        multi = np.zeros((B, len(self.multi), self.multi_len), dtype=np.int64)
        errors: dict[int, FeatureError] = {}

        def reject(rows: np.ndarray, field: str, why: str | list[str]) -> None:
            for n, r in enumerate(rows.tolist()):
                if r not in errors:   # first failing field wins, in the row encoder's order
                    errors[r] = FeatureError(field, why if isinstance(why, str) else why[n])

        for j, f in enumerate(self.cat):
            if f.name not in names:
                cat[:, j] = f.oov
                continue
            bad, why = self._encode_cat(plain_array(batch.column(f.name)), j, cat[:, j])
            if bad is not None:
                reject(bad, f.name, why)
        for j, f in enumerate(self.multi):
            if f.name not in names:
                continue
            bad, why = self._encode_multi(plain_array(batch.column(f.name)), j, multi[:, j])
            if bad is not None:
                reject(bad, f.name, why)
        return EncodedBatch(cat, multi, errors)

    # ---- single-valued fields ---------------------------------------------
    def _encode_cat(self, col: pa.Array, j: int, out: np.ndarray):
        f, t = self.cat[j], col.type
        if pa.types.is_null(t):
            out[:] = f.oov
            return None, None
        if is_scalar_type(t):
            out[:] = f.scalar_ids(col)
            return None, None
        problems = column_problems("cat", col, stored_ok=True)     # a nested type: every present row
        if problems:
            out[:] = f.oov
            return np.flatnonzero(problems[0][0]), problems[0][1]
        return self._fallback(col, lambda v: self.rows.cat_id(j, v), f.oov, out)

    # ---- multi-valued fields ----------------------------------------------
    def _encode_multi(self, col: pa.Array, j: int, out: np.ndarray):
        f, t = self.multi[j], col.type
        if pa.types.is_null(t):
            return None, None
        if pa.types.is_dictionary(t):
            col = col.dictionary_decode()
            t = col.type
        if is_string_type(t):
            if not pa.types.is_string(t):
                col = col.cast(pa.string())
            # "" means an empty list (as in the row encoder); otherwise split on MULTI_SEP
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
            self._scatter(pc.split_pattern(col, MULTI_SEP), f, out, strings=True)
            return None, None
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            try:
                as_str = col.cast(pa.string())
            except pa.ArrowInvalid:
                return self._fallback(col, lambda v: self.rows.multi_ids(j, v), 0, out)
            return self._encode_multi(as_str, j, out)
        if is_list_type(t) and is_scalar_type(t.value_type):
            self._scatter(col, f, out, strings=pa.types.is_string(t.value_type))
            return None, None
        if is_scalar_type(t) or pa.types.is_struct(t):           # a scalar (or struct) where a list is expected
            problems = column_problems("multi", col, stored_ok=True)
            return (np.flatnonzero(problems[0][0]), problems[0][1]) if problems else (None, None)
        return self._fallback(col, lambda v: self.rows.multi_ids(j, v), 0, out)

    def _scatter(self, lists: pa.Array, f: _Field, out: np.ndarray, strings: bool) -> None:
        """The first max_len items of every row's list -> out[row, :n] (null rows: empty)."""
        if len(lists) == 0:
            return
        if isinstance(lists, pa.ChunkedArray):
            lists = plain_array(lists)
        lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        total = int(lengths.sum())
        if total == 0:
            return
        items = pc.list_flatten(lists)
        rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        pos = np.arange(total, dtype=np.int64) - starts[rows]
        keep = pos < f.max_len
        if not keep.all():
            rows, pos = rows[keep], pos[keep]
            items = items.filter(pa.array(keep))
        if strings:
            # a null item is str(None) == "None" in the row encoder
            ids = f.str_ids(pc.fill_null(items, "None")) if items.null_count else f.str_ids(items)
        else:
            ids = f.scalar_ids(items, item=True)
        out[rows, pos] = ids

    @staticmethod
    def _fallback(col: pa.Array, rule, placeholder: int, out: np.ndarray):
        """The row encoder's rule value by value (column types without a vectorised path only)."""
        bad, why = [], []
        for r, v in enumerate(col.to_pylist()):
            try:
                out[r] = rule(v)
            except FeatureError as e:
                out[r] = placeholder
                bad.append(r)
                why.append(e.reason)
        return (np.array(bad, dtype=np.int64), why) if bad else (None, None)
