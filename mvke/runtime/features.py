"""User feature schema, vocabularies and the one encoder of raw values into ids.

The contract every stage shares: training builds a `FeatureSchema` from the
training split, export writes it into the manifest, the service and the batch
tagger rebuild it from there. `FeatureSchema.encode` is the only way any stage
turns raw values into ids: rows (training samples, request bodies, feature-store
hashes) go through mvke/runtime/row_encoder.py, Arrow tables (batch tagging)
through mvke/runtime/column_encoder.py; both give the same ids and the same
errors for the same values (tests/runtime/test_features.py). numpy only here
(pyarrow is imported only when an Arrow table is encoded).

Id layout (one embedding table for all fields, so the user tower is a single
Gather in ONNX): global id 0 is padding; field f owns ids
`offset_f .. offset_f + len(vocab_f)`, where `offset_f` itself is that field's
out-of-vocabulary id and `offset_f + 1 + i` is its i-th known value.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from mvke.runtime.encoded import MULTI_SEP, PAD_ID, EncodedBatch, FeatureError, FieldIds
from mvke.runtime.feature_values import FIELD_KINDS
from mvke.runtime.row_encoder import RowEncoder

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["FIELD_KINDS", "MULTI_SEP", "PAD_ID", "EncodedBatch", "FeatureError", "FeatureSchema", "FieldSpec",
           "to_store_value"]

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
        # per field (schema order): its OOV id, and known value -> global id
        self.offsets: list[int] = []
        self.value_ids: list[dict[str, int]] = []
        offset = 1
        for f in self.fields:
            self.offsets.append(offset)
            self.value_ids.append({v: offset + 1 + i for i, v in enumerate(f.vocab)})
            offset += 1 + len(f.vocab)
        self.num_ids = offset
        self.cat_fields = [f for f in self.fields if f.kind == "cat"]
        self.multi_fields = [f for f in self.fields if f.kind == "multi"]
        # Model order: single-valued fields first, then multi-valued ones.
        self.model_order = self.cat_fields + self.multi_fields
        self.position = {f.name: i for i, f in enumerate(self.fields)}
        self._names = [f.name for f in self.fields]      # read per request (missing fields): built once
        self.multi_len = max([f.max_len for f in self.multi_fields], default=1)
        # what the encoders read: per field (schema order) its id layout
        self.field_ids = [FieldIds(f.name, f.kind, f.max_len, off, ids, f.vocab)
                          for f, off, ids in zip(self.fields, self.offsets, self.value_ids)]
        self._encoders: dict[str, Any] = {}

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
        return self._names

    # ---- encoding -----------------------------------------------------
    def encode(self, data: "Sequence[Mapping[str, Any]] | pa.Table | pa.RecordBatch") -> EncodedBatch:
        """Raw feature values -> ids (global id layout in the module docstring).

        `data`: a sequence of rows (mappings field -> raw value: training samples,
        request features, feature-store hashes), or an Arrow table / record batch with
        one column per field (batch tagging). A missing field maps to its OOV id (cat)
        or an empty list (multi); multi values may be lists or `MULTI_SEP`-joined strings;
        unknown values map to the field's OOV id; fields not in the schema are ignored.
        A value of the wrong type (a list in a single-valued field, a scalar where a list
        is expected, a list of lists) is reported per row in `errors`, naming the field.
        """
        kind = "rows" if isinstance(data, (list, tuple)) else "columns"
        encoder = self._encoders.get(kind)
        if encoder is None:
            if kind == "rows":
                encoder = RowEncoder(self.field_ids)
            else:
                from mvke.runtime.column_encoder import ColumnEncoder   # pyarrow: batch tagging only
                encoder = ColumnEncoder(self.field_ids)
            self._encoders[kind] = encoder
        return encoder.encode(data)


def to_store_value(value: Any) -> str:
    """Raw value -> feature-store string (multi-valued fields are `|`-joined)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return MULTI_SEP.join(str(x) for x in value)
    return "" if value is None else str(value)


def random_users(schema: FeatureSchema, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random valid ids per field (including OOV ids and empty histories)."""
    cat = np.empty((n, len(schema.cat_fields)), dtype=np.int64)
    multi = np.zeros((n, len(schema.multi_fields), schema.multi_len), dtype=np.int64)
    pos = schema.position
    for j, f in enumerate(schema.cat_fields):
        off = schema.offsets[pos[f.name]]
        cat[:, j] = rng.integers(off, off + 1 + len(f.vocab), n)
    for j, f in enumerate(schema.multi_fields):
        off = schema.offsets[pos[f.name]]
        lengths = rng.integers(0, f.max_len + 1, n)
        for i in range(n):
            multi[i, j, : lengths[i]] = rng.integers(off, off + 1 + len(f.vocab), lengths[i])
    return cat, multi
