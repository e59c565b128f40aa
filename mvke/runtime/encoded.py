"""What encoding produces: the ids of a batch of users and the rows that did not encode.

The leaf under the feature schema (features.py) and its two encoder paths
(row_encoder.py, column_encoder.py): they read the schema's `FieldIds`, so that they import
this module and not the schema (no import runs back up).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAD_ID = 0
MULTI_SEP = "|"  # separator of multi-valued fields in the feature store


@dataclass(frozen=True)
class FieldIds:
    """One field's part of the id layout (features.py): its out-of-vocabulary id and known value -> id."""

    name: str
    kind: str                  # "cat" | "multi"
    max_len: int               # longest list kept (multi)
    oov: int
    ids: dict[str, int]        # known value -> global id (oov + 1 + its vocabulary index)
    vocab: list[str]


class FeatureError(ValueError):
    """A raw feature value that cannot be encoded; `field` names the culprit."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


@dataclass
class EncodedBatch:
    """Ids of a batch of users, aligned with the input rows.

    A row in `errors` did not encode (a value of the wrong type); its ids are
    placeholders (OOV / padding) that must not be scored.
    """

    cat_ids: np.ndarray                                            # [B, F_cat] int64
    multi_ids: np.ndarray                                          # [B, F_multi, L] int64
    errors: dict[int, FeatureError] = field(default_factory=dict)  # row -> why it did not encode
    # [B, sum K, D]: the user tower's output, once the predictor has computed it (LoadedModel.expert_outputs)
    expert_outputs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.cat_ids)

    @property
    def ok(self) -> np.ndarray:
        """[B] bool: rows that encoded."""
        mask = np.ones(len(self.cat_ids), dtype=bool)
        if self.errors:
            mask[list(self.errors)] = False
        return mask

    def take(self, rows: list[int] | np.ndarray | slice) -> "EncodedBatch":
        """These rows (in this order), with the tower output if it is known; row numbers restart at 0."""
        picked = range(len(self.cat_ids))[rows] if isinstance(rows, slice) else \
            (rows.tolist() if isinstance(rows, np.ndarray) else rows)
        pos = {r: n for n, r in enumerate(picked)} if self.errors else {}
        return EncodedBatch(self.cat_ids[rows], self.multi_ids[rows],
                            {pos[r]: e for r, e in self.errors.items() if r in pos},
                            None if self.expert_outputs is None else self.expert_outputs[rows])

    def ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(cat_ids, multi_ids); raises the first failing row's FeatureError (for inputs that must be clean)."""
        if self.errors:
            raise self.errors[min(self.errors)]
        return self.cat_ids, self.multi_ids
