"""Batch encoding of feature-store rows for the hot path.

`FeatureSchema.encode_rows` (mvke/features.py) is the reference: it accepts any
raw value (numbers, lists, `|`-joined strings), checks types and raises
`FeatureError`s naming the field. Rows read from the feature store are simpler:
every value is a `str` (multi-valued fields `|`-joined). For those,
`StoreRowEncoder` produces the same ids with a fraction of the Python work: one
prepared (name, vocabulary, OOV id) tuple per field, list comprehensions instead
of per-element numpy writes, and one array built per batch. Rows holding
anything else (request-body features) go through the reference encoder.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mvke.features import MULTI_SEP, FeatureSchema


class _Vocab(dict):
    """value -> id, the field's OOV id for anything else (so `map(vocab.__getitem__, ...)` runs in C)."""

    __slots__ = ("oov",)

    def __init__(self, table: Mapping[str, int], oov: int):
        super().__init__(table)
        self.oov = oov

    def __missing__(self, key: str) -> int:
        return self.oov


class StoreRowEncoder:
    def __init__(self, schema: FeatureSchema):
        pos = {f.name: i for i, f in enumerate(schema.fields)}
        lookups, offsets = schema._lookup, schema.offsets  # same tables as encode_rows
        self.schema = schema
        vocab = {f.name: _Vocab(lookups[pos[f.name]], offsets[pos[f.name]]) for f in schema.fields}
        self.cat = [(f.name, vocab[f.name].__getitem__, offsets[pos[f.name]]) for f in schema.cat_fields]
        self.multi = [(f.name, vocab[f.name].__getitem__, f.max_len) for f in schema.multi_fields]
        self.L = schema.multi_len
        self.pad = [0] * self.L
        self.kinds = {f.name: (vocab[f.name], f.max_len if f.kind == "multi" else 0) for f in schema.fields}

    def unknown_counts(self, features: Mapping[str, Any]) -> dict[str, int]:
        """Per feature of a request body, how many of the values the model will read are not in
        its vocabulary (they become the out-of-vocabulary id). Values of the wrong type are
        left to the encoder, which rejects them naming the field."""
        counts = {}
        for name, value in features.items():
            spec = self.kinds.get(name)
            if spec is None:
                continue
            vocab, max_len = spec
            if max_len:  # multi-valued: a list, or a `|`-joined string
                if isinstance(value, str):
                    value = value.split(MULTI_SEP) if value else []
                if not isinstance(value, list):
                    continue
                n = sum(1 for x in value[:max_len] if not isinstance(x, (list, dict)) and str(x) not in vocab)
            else:
                n = int(not isinstance(value, (list, dict)) and str(value) not in vocab)
            if n:
                counts[name] = n
        return counts

    @staticmethod
    def accepts(row: Mapping[str, Any]) -> bool:
        """True when every value is a str (as read from the feature store)."""
        for v in row.values():
            if type(v) is not str:
                return False
        return True

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of str values -> (cat_ids [B, F_cat], multi_ids [B, F_multi, L]) int64,
        identical to `FeatureSchema.encode_rows(rows)`."""
        B, L, pad, sep = len(rows), self.L, self.pad, MULTI_SEP
        cat_specs, multi_specs = self.cat, self.multi
        cat: list[int] = []
        multi: list[int] = []
        for row in rows:
            get = row.get
            cat += [oov if (v := get(name)) is None else lookup(v) for name, lookup, oov in cat_specs]
            for name, lookup, max_len in multi_specs:
                v = get(name)
                if not v:
                    multi += pad
                    continue
                items = v.split(sep, max_len)
                if len(items) > max_len:
                    del items[max_len:]
                multi += map(lookup, items)
                multi += pad[len(items):]
        cat_ids = np.array(cat, dtype=np.int64).reshape(B, len(cat_specs))
        multi_ids = np.array(multi, dtype=np.int64).reshape(B, len(multi_specs), L)
        return cat_ids, multi_ids
