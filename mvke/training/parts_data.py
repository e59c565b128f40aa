"""`prepare` for datasets of millions of users: part by part, each user's fields encoded once.

mvke/training/experiment.py prepares every seed's data with `prepare_any`: a dataset written in parts
(`mvke data synth` above 65,536 users) is read here, in bounded memory, with the same vocabularies,
splits and rows in the same order as `trainer.prepare` (tests/training/test_learning_curve.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mvke.data.dataset import EncodedSplit, Gathered, RawDataset, encode_samples, encode_users, read_meta
from mvke.training.distributed import find_parts, scan_parts, validation_mask
from mvke.training.trainer import EncodedData, prepare


def prepare_parts(data_dir: str | Path, valid_fraction: float = 0.1) -> EncodedData:
    """`prepare` in bounded memory, part by part (a dataset of millions of users): the same vocabularies,
    splits and rows in the same order as `prepare`, but each user's fields are
    encoded once and gathered per sample (`Gathered`), and no raw table is kept (`dataset` holds
    only the path and meta). Vocabularies: the streamed trainer's scan (`scan_parts`)."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir / "meta.json")
    parts = find_parts(data_dir)
    schema = scan_parts(parts, meta, valid_fraction).schema
    pieces: dict[str, list[tuple[EncodedSplit, np.ndarray]]] = {"train": [], "valid": [], "test": []}
    users_seen = []
    for part in parts:
        users = encode_users(pq.read_table(part.users, columns=["user_id", *meta["fields"]]).to_pandas(), schema)
        rows = pq.read_table(part.train).to_pandas()
        is_valid = validation_mask(rows, valid_fraction, part.train)
        offset = sum(len(u.user_ids) for u in users_seen)
        for name, df in (("train", rows[~is_valid]), ("valid", rows[is_valid]),
                         ("test", pq.read_table(part.test).to_pandas())):
            pos = users.rows_of(df, data_dir)
            pieces[name].append((encode_samples(df, meta["tags"], None, None, users.user_ids[pos]), pos + offset))
        users_seen.append(users)
    cat = np.concatenate([u.cat_ids for u in users_seen])
    multi = np.concatenate([u.multi_ids for u in users_seen])
    empty = pd.DataFrame()
    split = {name: _joined(p, cat, multi) for name, p in pieces.items()}
    return EncodedData(RawDataset(data_dir, meta, empty, empty, empty), schema, split["train"], split["valid"],
                       split["test"])


def _joined(pieces: list[tuple[EncodedSplit, np.ndarray]], cat: np.ndarray, multi: np.ndarray) -> EncodedSplit:
    """The parts' rows of one split as one split, their user fields gathered from the users' tables."""
    splits = [s for s, _ in pieces]
    index = np.concatenate([i for _, i in pieces])
    probs = None if splits[0].true_probs is None else np.concatenate([s.true_probs for s in splits])
    return EncodedSplit(Gathered(cat, index), Gathered(multi, index), np.concatenate([s.tag_ids for s in splits]),
                        np.concatenate([s.labels for s in splits]), probs, np.concatenate([s.user_ids for s in splits]))


def prepare_any(data_dir: str | Path, valid_fraction: float = 0.1) -> EncodedData:
    """`prepare_parts` for a dataset written in parts (train.parquet a directory), `prepare` otherwise."""
    parted = (Path(data_dir) / "train.parquet").is_dir()
    return (prepare_parts if parted else prepare)(data_dir, valid_fraction)
