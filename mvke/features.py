"""User feature schema, vocabularies and id encoding.

The contract every stage shares: training builds a `FeatureSchema` from the
training split, export writes it into the manifest, the service and the batch
tagger rebuild it from there. numpy only (the service never imports torch).

Id layout (one embedding table for all fields, so the user tower is a single
Gather in ONNX): global id 0 is padding; field f owns ids
`offset_f .. offset_f + len(vocab_f)`, where `offset_f` itself is that field's
out-of-vocabulary id and `offset_f + 1 + i` is its i-th known value.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

PAD_ID = 0
MULTI_SEP = "|"  # separator of multi-valued fields in the feature store
FIELD_KINDS = ("cat", "multi")


class FeatureError(ValueError):
    """A raw feature value that cannot be encoded; `field` names the culprit."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


@dataclass
class FieldSpec:
    """One user feature field.

    Args:
        name: column name in the data and hash field in the feature store.
        kind: "cat" (one value; bucketised numbers are categorical too) or
            "multi" (a list of values, mean-pooled in the tower).
        max_len: the longest list kept for a multi field (the most recent
            values, which sources list first).
        vocab: known values in id order (built on the training split only).
    """

    name: str
    kind: str
    max_len: int = 1
    vocab: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in FIELD_KINDS:
            raise ValueError(f"field {self.name!r}: kind must be one of {FIELD_KINDS}, got {self.kind!r}")


@dataclass
class FeatureSchema:
    fields: list[FieldSpec]

    def __post_init__(self) -> None:
        self._index: dict[str, int] = {}
        self._lookup: list[dict[str, int]] = []
        self.offsets: list[int] = []
        offset = 1
        for f in self.fields:
            self.offsets.append(offset)
            self._lookup.append({v: offset + 1 + i for i, v in enumerate(f.vocab)})
            offset += 1 + len(f.vocab)
        self.num_ids = offset
        self.cat_fields = [f for f in self.fields if f.kind == "cat"]
        self.multi_fields = [f for f in self.fields if f.kind == "multi"]
        # Model order: single-valued fields first, then multi-valued ones.
        self.model_order = self.cat_fields + self.multi_fields
        self._pos = {f.name: i for i, f in enumerate(self.fields)}
        self.multi_len = max([f.max_len for f in self.multi_fields], default=1)

    # ---- construction -------------------------------------------------
    @classmethod
    def build(cls, columns: Mapping[str, Iterable[Any]], kinds: Mapping[str, str],
              max_lens: Mapping[str, int] | None = None, min_count: int = 1) -> "FeatureSchema":
        """Vocabularies from training data (`columns[name]` = the values of that column)."""
        specs = []
        for name, kind in kinds.items():
            counts: Counter[str] = Counter()
            for v in columns[name]:
                if kind == "multi":
                    counts.update(str(x) for x in (v if v is not None else []))
                elif v is not None:
                    counts[str(v)] += 1
            vocab = sorted(k for k, c in counts.items() if c >= min_count)
            specs.append(FieldSpec(name, kind, (max_lens or {}).get(name, 1) if kind == "multi" else 1, vocab))
        return cls(specs)

    def to_dict(self) -> dict:
        return {"fields": [asdict(f) for f in self.fields]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "FeatureSchema":
        return cls([FieldSpec(**f) for f in d["fields"]])

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    # ---- encoding -----------------------------------------------------
    def _id(self, field_pos: int, value: Any) -> int:
        return self._lookup[field_pos].get(str(value), self.offsets[field_pos])

    def encode_rows(self, rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Raw rows -> (cat_ids [B, F_cat], multi_ids [B, F_multi, L]) int64.

        A missing field maps to its OOV id (cat) or an empty list (multi).
        Multi values may be lists or `MULTI_SEP`-joined strings (feature store).
        Raises FeatureError naming the field for values of the wrong type.
        """
        B = len(rows)
        cat = np.empty((B, len(self.cat_fields)), dtype=np.int64)
        multi = np.zeros((B, len(self.multi_fields), self.multi_len), dtype=np.int64)
        for b, row in enumerate(rows):
            for j, f in enumerate(self.cat_fields):
                pos = self._pos[f.name]
                v = row.get(f.name)
                if v is None:
                    cat[b, j] = self.offsets[pos]
                    continue
                if isinstance(v, (list, tuple, dict, set, np.ndarray)):
                    raise FeatureError(f.name, f"expected one value, got {type(v).__name__}")
                cat[b, j] = self._id(pos, v)
            for j, f in enumerate(self.multi_fields):
                pos = self._pos[f.name]
                v = row.get(f.name)
                if v is None or (isinstance(v, (str, bytes)) and len(v) == 0):
                    continue
                if isinstance(v, (str, bytes)):
                    v = (v.decode() if isinstance(v, bytes) else v).split(MULTI_SEP)
                elif isinstance(v, np.ndarray):
                    v = v.tolist()
                elif not isinstance(v, (list, tuple)):
                    raise FeatureError(f.name, f"expected a list of values, got {type(v).__name__}")
                lookup, oov = self._lookup[pos], self.offsets[pos]
                for i, x in enumerate(v[: f.max_len]):
                    if isinstance(x, (list, tuple, dict, set, np.ndarray)):
                        raise FeatureError(f.name, "list items must be scalar values")
                    multi[b, j, i] = lookup.get(str(x), oov)
        return cat, multi

    def field_of_id(self) -> np.ndarray:
        """For each global id, the index of its field in model order (-1 for padding)."""
        out = np.full(self.num_ids, -1, dtype=np.int64)
        order = {f.name: i for i, f in enumerate(self.model_order)}
        for pos, f in enumerate(self.fields):
            out[self.offsets[pos]: self.offsets[pos] + 1 + len(f.vocab)] = order[f.name]
        return out


def to_store_value(value: Any) -> str:
    """Raw value -> feature-store string (multi-valued fields are `|`-joined)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return MULTI_SEP.join(str(x) for x in value)
    return "" if value is None else str(value)
