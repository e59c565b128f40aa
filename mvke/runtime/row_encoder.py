"""Rows of raw values -> ids: the row half of `FeatureSchema.encode` (mvke/runtime/features.py).

Two paths, the same ids:

* every value a `str` (feature-store hashes, as the service reads them; multi-valued
  fields `|`-joined): one prepared (name, vocabulary lookup, OOV id) tuple per field,
  list comprehensions and `map` over a dict whose `__missing__` returns the OOV id
  (the lookup runs in C), one array built per batch. This is the service's hot path.
* anything else (request bodies, training rows with lists, numbers, numpy arrays):
  value by value, `str(value)` looked up, type errors reported per row naming the field.

A batch may mix both; each row takes its own path.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from mvke.runtime.encoded import MULTI_SEP, EncodedBatch, FeatureError

if TYPE_CHECKING:
    from mvke.runtime.features import FeatureSchema

_NOT_SCALAR = (list, tuple, dict, set, np.ndarray)


class _Vocab(dict):
    """value -> id, the field's OOV id for anything else (so `map(vocab.__getitem__, ...)` runs in C)."""

    __slots__ = ("oov",)

    def __init__(self, table: Mapping[str, int], oov: int):
        super().__init__(table)
        self.oov = oov

    def __missing__(self, key: str) -> int:
        return self.oov


class RowEncoder:
    def __init__(self, schema: FeatureSchema):
        pos = schema.position
        vocab = {f.name: _Vocab(schema.value_ids[pos[f.name]], schema.offsets[pos[f.name]]) for f in schema.fields}
        self.cat = [(f.name, vocab[f.name].__getitem__, schema.offsets[pos[f.name]]) for f in schema.cat_fields]
        self.multi = [(f.name, vocab[f.name].__getitem__, f.max_len) for f in schema.multi_fields]
        self.L = schema.multi_len
        self.pad = [0] * self.L

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> EncodedBatch:
        cat: list[int] = []
        multi: list[int] = []
        errors: dict[int, FeatureError] = {}
        for b, row in enumerate(rows):
            if _all_str(row):
                self._str_row(row, cat, multi)
                continue
            try:
                c, m = self._any_row(row)
            except FeatureError as e:
                errors[b] = e
                c = [oov for _, _, oov in self.cat]
                m = self.pad * len(self.multi)
            cat += c
            multi += m
        B = len(rows)
        return EncodedBatch(np.array(cat, dtype=np.int64).reshape(B, len(self.cat)),
                            np.array(multi, dtype=np.int64).reshape(B, len(self.multi), self.L), errors)

    def _str_row(self, row: Mapping[str, str], cat: list[int], multi: list[int]) -> None:
        get, pad, sep = row.get, self.pad, MULTI_SEP
        cat += [oov if (v := get(name)) is None else lookup(v) for name, lookup, oov in self.cat]
        for name, lookup, max_len in self.multi:
            v = get(name)
            if not v:
                multi += pad
                continue
            items = v.split(sep, max_len)
            if len(items) > max_len:
                del items[max_len:]
            multi += map(lookup, items)
            multi += pad[len(items):]

    def _any_row(self, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        """One row of any raw values -> (cat ids, multi ids) as flat lists; FeatureError names the field."""
        cat = [self.cat_id(j, row.get(name)) for j, (name, _, _) in enumerate(self.cat)]
        multi: list[int] = []
        for j, (name, _, _) in enumerate(self.multi):
            multi += self.multi_ids(j, row.get(name))
        return cat, multi

    # ---- the rule for one value (also the column encoder's fallback) -----------------
    def cat_id(self, j: int, v: Any) -> int:
        """Id of one raw value of the j-th single-valued field (None -> OOV)."""
        name, lookup, oov = self.cat[j]
        if v is None:
            return oov
        if isinstance(v, _NOT_SCALAR):
            raise FeatureError(name, f"expected one value, got {type(v).__name__}")
        return lookup(str(v))

    def multi_ids(self, j: int, v: Any) -> list[int]:
        """Ids of one raw value of the j-th multi-valued field, padded to L (None or "" -> empty)."""
        name, lookup, max_len = self.multi[j]
        if v is None or (isinstance(v, (str, bytes)) and len(v) == 0):
            return self.pad
        if isinstance(v, (str, bytes)):
            try:
                v = (v.decode() if isinstance(v, bytes) else v).split(MULTI_SEP)
            except UnicodeDecodeError as e:
                raise FeatureError(name, "invalid UTF-8") from e
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        elif not isinstance(v, (list, tuple)):
            raise FeatureError(name, f"expected a list of values, got {type(v).__name__}")
        items = v[:max_len]
        for x in items:
            if isinstance(x, _NOT_SCALAR):
                raise FeatureError(name, "list items must be scalar values")
        return [lookup(str(x)) for x in items] + self.pad[len(items):]


def _all_str(row: Mapping[str, Any]) -> bool:
    for v in row.values():
        if type(v) is not str:
            return False
    return True
