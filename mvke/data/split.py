"""Validation split by time inside the training period (every model and dataset uses it).

Per user, the training events are grouped by timestamp (a MovieLens positive and
its sampled negatives share user and timestamp, so they form one group) and the
user's last groups go to validation: the latest `round(fraction * groups)` of
them. A group is never cut, and no validation event of a user comes before one
of that user's training events. Users with too few groups keep all of them in
training.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

TIME_COLUMN = "timestamp"


class SplitError(ValueError):
    """A validation split that cannot be made; the message says why."""


def time_validation_mask(train: pd.DataFrame, fraction: float, source: str = "train.parquet",
                         allow_empty: bool = False) -> np.ndarray:
    """Boolean mask over the rows of `train`: True = validation row.

    Raises SplitError for a fraction outside (0, 0.5], a missing or non-numeric
    timestamp column, a user left without a training event, or an empty validation set
    (unless `allow_empty`: a part of a dataset, whose other parts may hold the validation rows;
    the rule looks at each user's own rows only, so part by part it splits as on the whole).
    """
    if not 0.0 < fraction <= 0.5:
        raise SplitError(f"validation fraction must be in (0, 0.5], got {fraction}")
    if TIME_COLUMN not in train.columns:
        raise SplitError(f"{source}, column {TIME_COLUMN!r}: missing column (the validation split is by time; "
                         "regenerate the dataset with this version of `mvke data`)")
    ts = train[TIME_COLUMN]
    if not pd.api.types.is_numeric_dtype(ts) or ts.isna().any():
        raise SplitError(f"{source}, column {TIME_COLUMN!r}: expected numeric timestamps without gaps")
    groups = pd.DataFrame({"user": train["user_id"].to_numpy(), "ts": ts.to_numpy()}).drop_duplicates()
    groups = groups.sort_values(["user", "ts"], kind="stable")
    n_groups = groups.groupby("user", sort=False)["ts"].transform("size").to_numpy()
    from_end = groups.groupby("user", sort=False).cumcount(ascending=False).to_numpy()   # 0 = latest group
    n_valid = np.floor(fraction * n_groups + 0.5).astype(np.int64)
    if (n_valid >= n_groups).any():
        user = groups["user"].to_numpy()[np.argmax(n_valid >= n_groups)]
        raise SplitError(f"validation fraction {fraction} leaves user {user!r} with no training event")
    groups["valid"] = from_end < n_valid
    key = pd.MultiIndex.from_frame(groups[["user", "ts"]])
    rows = pd.MultiIndex.from_arrays([train["user_id"].to_numpy(), ts.to_numpy()])
    mask = groups["valid"].to_numpy()[key.get_indexer(rows)]
    if not mask.any() and not allow_empty:
        raise SplitError(f"validation fraction {fraction} gives an empty validation set: no user has "
                         f"{int(np.ceil(0.5 / fraction))} or more distinct training timestamps")
    return mask
