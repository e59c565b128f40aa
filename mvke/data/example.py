"""`mvke data example`: a small, complete "own data" input, written by code.

What a team brings from its own logs (docs/OWN_DATA.md): `log.parquet` (one row
per impression over several days, with its time), `users.parquet` (one feature
row per user) and `meta.json` (field kinds, list lengths, the tag catalogue).
`mvke data split --by-time` turns the three into a dataset directory.

The world is deliberately simple (not the paper-scale generator in
synthetic.py): each user likes a few of six categories, clicks follow that
liking, conversions follow a related but different liking, and the features
are noisy views of both, so a model trained on the example learns something.
Deterministic for a seed: the committed copy in docs/examples/own-data is this
function's output (tests/test_own_data.py regenerates and compares it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

CATEGORIES = ["sports", "travel", "games", "food", "music", "finance"]
TAGS_PER_CATEGORY = 8
FIELDS = {"age_bucket": "cat", "gender": "cat", "city_tier": "cat", "device_os": "cat",
          "clicked_tags": "multi", "read_categories": "multi"}
MAX_LENS = {"clicked_tags": 10, "read_categories": 4}


@dataclass
class ExampleConfig:
    users: int = 300
    days: int = 3
    first_day: str = "2024-05-01"
    impressions_per_day: float = 4.0
    seed: int = 0


def _tags() -> list[str]:
    return [f"{c}/tag{j:02d}" for c in CATEGORIES for j in range(TAGS_PER_CATEGORY)]


def _users(rng: np.random.Generator, n: int, tags: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """-> (users table, click liking [U, C], conversion liking [U, C])."""
    C = len(CATEGORIES)
    click_like = rng.dirichlet(np.full(C, 0.4), size=n)                             # [U, C]
    conv_like = 0.6 * click_like + 0.4 * rng.dirichlet(np.full(C, 0.4), size=n)     # related, not equal
    ages = rng.integers(0, 6, n)
    rows = []
    for u in range(n):
        cats = rng.choice(C, size=rng.integers(1, MAX_LENS["read_categories"] + 1), replace=False, p=click_like[u])
        tag_cats = rng.choice(C, size=rng.integers(0, MAX_LENS["clicked_tags"] + 1), p=click_like[u])
        rows.append({
            "user_id": f"user{u:04d}",
            "age_bucket": f"age{ages[u]}",
            "gender": str(rng.choice(["f", "m", "u"], p=[0.48, 0.48, 0.04])),
            "city_tier": f"tier{rng.integers(1, 5)}",
            "device_os": str(rng.choice(["android", "ios", "other"], p=[0.6, 0.35, 0.05])),
            "clicked_tags": [tags[c * TAGS_PER_CATEGORY + rng.integers(TAGS_PER_CATEGORY)] for c in tag_cats],
            "read_categories": [CATEGORIES[c] for c in cats],
        })
    return pd.DataFrame(rows), click_like, conv_like


def _log(rng: np.random.Generator, cfg: ExampleConfig, users: pd.DataFrame, click_like: np.ndarray,
         conv_like: np.ndarray, tags: list[str]) -> pd.DataFrame:
    C = len(CATEGORIES)
    start = pd.Timestamp(cfg.first_day, tz="UTC")
    rows = []
    for day in range(cfg.days):
        for u, uid in enumerate(users["user_id"]):
            for _ in range(1 + rng.poisson(cfg.impressions_per_day - 1)):
                cats = rng.choice(C, size=rng.integers(1, 3), replace=False)
                ad_tags = [tags[c * TAGS_PER_CATEGORY + rng.integers(TAGS_PER_CATEGORY)] for c in cats]
                p_click = 1 / (1 + np.exp(-(-1.6 + 6 * click_like[u, cats].mean())))
                p_conv = 1 / (1 + np.exp(-(-1.4 + 5 * conv_like[u, cats].mean())))
                click = int(rng.random() < p_click)
                rows.append({"timestamp": start + pd.Timedelta(days=day, seconds=int(rng.integers(86_400))),
                             "user_id": uid, "tags": ad_tags, "click": click,
                             "conversion": int(click and rng.random() < p_conv)})
    return pd.DataFrame(rows).sort_values(["timestamp", "user_id"], kind="stable").reset_index(drop=True)


def generate_example(out: str | Path, cfg: ExampleConfig | None = None) -> Path:
    """Write log.parquet, users.parquet and meta.json under `out`."""
    cfg = cfg or ExampleConfig()
    rng = np.random.default_rng(cfg.seed)
    tags = _tags()
    users, click_like, conv_like = _users(rng, cfg.users, tags)
    log = _log(rng, cfg, users, click_like, conv_like, tags)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(log, preserve_index=False), out / "log.parquet")
    pq.write_table(pa.Table.from_pandas(users, preserve_index=False), out / "users.parquet")
    meta = {"name": "own-data-example", "fields": FIELDS, "max_lens": MAX_LENS, "tags": tags}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def example_variant(src: str | Path, dst: str | Path, log=None, users=None, meta=None) -> Path:
    """A copy of an own-data example (`src`: log.parquet, users.parquet, meta.json) with its log, users table
    or meta.json passed through a function each (DataFrame -> DataFrame, dict -> dict): the bad inputs of
    the tests and of scripts/bad_inputs.py. -> the copy's log.parquet."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    m = json.loads((src / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps(meta(m) if meta else m))
    for name, change in (("log.parquet", log), ("users.parquet", users)):
        df = pd.read_parquet(src / name)
        pq.write_table(pa.Table.from_pandas(change(df) if change else df, preserve_index=False), dst / name)
    return dst / "log.parquet"


def with_value(df: pd.DataFrame, column: str, row: int, value) -> pd.DataFrame:
    """A copy of df whose cell (row, column) holds value (the column turned to objects, so any value fits)."""
    df = df.copy()
    df[column] = df[column].astype(object)
    df.at[row, column] = value
    return df
