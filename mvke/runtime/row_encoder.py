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

from operator import call
from typing import Any, Mapping, Sequence

import numpy as np

from mvke.runtime.encoded import MULTI_SEP, EncodedBatch, FeatureError, FieldIds
from mvke.runtime.feature_values import INVALID_UTF8, is_missing, value_problem


class _Vocab(dict):
    """value -> id, the field's OOV id for anything else (so `map(vocab.__getitem__, ...)` runs in C)."""

    __slots__ = ("oov",)

    def __init__(self, table: Mapping[str, int], oov: int):
        super().__init__(table)
        self.oov = oov

    def __missing__(self, key: str) -> int:
        return self.oov


class RowEncoder:
    def __init__(self, fields: Sequence[FieldIds]):
        vocab = {f.name: _Vocab(f.ids, f.oov) for f in fields}
        self.cat = [(f.name, vocab[f.name].__getitem__, f.oov) for f in fields if f.kind == "cat"]
        self.multi = [(f.name, vocab[f.name].__getitem__, f.max_len) for f in fields if f.kind == "multi"]
        self.L = max((f.max_len for f in fields if f.kind == "multi"), default=1)
        self.pad = [0] * self.L
        # the all-str path's columns, so that its single-valued fields are one `map` in C
        self.cat_names = [name for name, _, _ in self.cat]
        self.cat_lookups = [lookup for _, lookup, _ in self.cat]
        self.multi_names = [name for name, _, _ in self.multi]

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
        # a missing field's None is no vocabulary key either: its lookup gives the field's OOV id
        cat += map(call, self.cat_lookups, map(get, self.cat_names))
        for v, (_, lookup, max_len) in zip(map(get, self.multi_names), self.multi):
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

    # ---- one value (also the column encoder's fallback); what is valid: feature_values.py ----------
    def cat_id(self, j: int, v: Any) -> int:
        """Id of one value of the j-th single-valued field (None -> OOV)."""
        name, lookup, oov = self.cat[j]
        if v is None:
            return oov
        problem = value_problem("cat", v, stored_ok=True)
        if problem:
            raise FeatureError(name, problem)
        return lookup(str(v))

    def multi_ids(self, j: int, v: Any) -> list[int]:
        """Ids of one value of the j-th multi-valued field (a list, or its stored `|`-joined string), padded
        to L (missing or "" -> empty)."""
        name, lookup, max_len = self.multi[j]
        if is_missing(v) or (isinstance(v, (str, bytes)) and len(v) == 0):
            return self.pad
        if isinstance(v, np.ndarray):
            v = v.tolist()
        problem = value_problem("multi", v[:max_len] if isinstance(v, (list, tuple)) else v, stored_ok=True)
        if problem:
            raise FeatureError(name, problem)
        if isinstance(v, (str, bytes)):
            try:
                v = (v.decode() if isinstance(v, bytes) else v).split(MULTI_SEP)
            except UnicodeDecodeError as e:
                raise FeatureError(name, INVALID_UTF8) from e
        items = v[:max_len]
        return [lookup(str(x)) for x in items] + self.pad[len(items):]


def _all_str(row: Mapping[str, Any]) -> bool:
    for v in row.values():
        if type(v) is not str:
            return False
    return True
