"""Data stage: synthetic generator, MovieLens-100K loader, sample format checks, vocabularies and encoding of splits."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mvke.data.dataset import DataError, build_schema, encode_split, load_dataset, read_table, write_dataset
from mvke.data.movielens import build as build_ml100k
from mvke.data.synthetic import (BASIC_FIELDS, DAY_SECONDS, HISTORY_FIELDS, STAT_FIELDS, USER_BLOCK, SynthConfig,
                                 World, dataset_meta, generate, generate_block)

SMALL = dict(users=300, tags=50, ads=200, categories=10)


def _frames(d: Path) -> dict[str, pd.DataFrame]:
    return {n: read_table(d / f"{n}.parquet").to_pandas() for n in ("train", "test", "users")}


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory) -> Path:
    return generate(SynthConfig(**SMALL, seed=7), tmp_path_factory.mktemp("small_synth"), progress=False)


# ---------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_under_a_seed(tmp_path):
    a = generate(SynthConfig(**SMALL, seed=3), tmp_path / "a", progress=False)
    b = generate(SynthConfig(**SMALL, seed=3), tmp_path / "b", progress=False)
    c = generate(SynthConfig(**SMALL, seed=4), tmp_path / "c", progress=False)
    fa, fb, fc = _frames(a), _frames(b), _frames(c)
    for name in fa:
        pd.testing.assert_frame_equal(fa[name], fb[name])
    assert json.loads((a / "meta.json").read_text()) == json.loads((b / "meta.json").read_text())
    # Another seed: another world (features, labels and probabilities all change).
    for col in ("gender", "occupation", "avg_ctr_bucket"):
        assert (fa["users"][col] != fc["users"][col]).any(), col
    assert not fa["train"]["p_click"].equals(fc["train"]["p_click"])
    assert len(fa["train"]) != len(fc["train"]) or not fa["train"]["click"].equals(fc["train"]["click"])


@pytest.mark.parametrize("ctr, cvr", [(0.30, 0.25), (0.10, 0.50)])
def test_synthetic_rates_follow_the_config(tmp_path, ctr, cvr):
    d = generate(SynthConfig(users=500, tags=50, ads=200, categories=10, ctr_target=ctr, cvr_target=cvr, seed=0),
                 tmp_path, progress=False)
    f = _frames(d)
    tr, te = f["train"], f["test"]
    # The intercepts are calibrated on a fixed calibration population of the same world, so the
    # generated users' true probabilities meet the targets up to the spread between populations.
    assert tr["p_click"].mean() == pytest.approx(ctr, abs=0.015)
    assert tr["p_conversion"].sum() / tr["p_click"].sum() == pytest.approx(cvr, abs=0.02)
    # Sampled labels: within sampling noise on the training day, drift on the test day.
    assert tr["click"].mean() == pytest.approx(ctr, abs=0.03)
    assert tr["conversion"].sum() / tr["click"].sum() == pytest.approx(cvr, abs=0.06)
    assert te["click"].mean() == pytest.approx(ctr, abs=0.04)
    assert te["conversion"].sum() / te["click"].sum() == pytest.approx(cvr, abs=0.08)


def test_synthetic_structure(small_synth):
    f = _frames(small_synth)
    meta = json.loads((small_synth / "meta.json").read_text())
    tags = set(meta["tags"])
    assert len(tags) == SMALL["tags"] == len(meta["tags"])
    for split in ("train", "test"):
        df = f[split]
        assert df["click"].sum() > 0 and df["conversion"].sum() > 0
        # A conversion only ever follows a click.
        assert (df["conversion"] <= df["click"]).all()
        assert df["conversion"].isin([0, 1]).all() and df["click"].isin([0, 1]).all()
        # True probabilities are probabilities, and p(conversion) = p(click) * p(cvr | click).
        for col in ("p_click", "p_conversion"):
            assert df[col].between(0, 1).all(), col
        assert (df["p_conversion"] <= df["p_click"] + 1e-7).all()
        # Ads carry 1-3 catalogue tags.
        n_tags = df["tags"].map(len)
        assert n_tags.between(1, 3).all()
        assert set(n_tags) == {1, 2, 3}
        assert all(t in tags for row in df["tags"] for t in row)
        # Every user has impressions on both days.
        assert set(df["user_id"]) == set(f["users"]["user_id"])
    # 26 user fields: 8 basic attributes, 10 histories, 8 bucketised statistics.
    fields = meta["fields"]
    assert len(fields) == 26 == len(BASIC_FIELDS) + len(HISTORY_FIELDS) + len(STAT_FIELDS)
    assert [n for n, k in fields.items() if k == "multi"] == list(HISTORY_FIELDS)
    users = f["users"]
    assert list(users.columns) == ["user_id", *fields]
    assert users["user_id"].is_unique and len(users) == SMALL["users"]
    for name, max_len in meta["max_lens"].items():
        lens = users[name].map(len)
        assert lens.between(1, max_len).all(), name
    for name in STAT_FIELDS:
        assert users[name].nunique() == 10, name  # deciles
    load_dataset(small_synth)  # the on-disk format validates


def test_synthetic_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="categories"):
        SynthConfig(tags=30, categories=40)


def test_synthetic_accepts_fewer_than_four_facets(tmp_path):
    d = generate(SynthConfig(users=100, tags=30, ads=50, categories=10, facets=2), tmp_path, progress=False)
    assert len(_frames(d)["users"]) == 100


def test_synthetic_facet_knob_spreads_the_histories():
    assert [SynthConfig(facets=m).facet_of_slot(j) for m in (4, 8, 2) for j in range(4)] == \
        [0, 1, 2, 3, 0, 2, 4, 6, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="world must be one of"):
        SynthConfig(world="round")


def test_flat_world_has_one_preference_vector_per_user():
    flat = World(SynthConfig(**SMALL, world="flat", facets=5, seed=2))
    users = flat.draw_users(np.arange(50), np.random.default_rng(0))
    for m in range(1, 5):
        np.testing.assert_array_equal(users.z_click[:, m], users.z_click[:, 0])
    np.testing.assert_array_equal(users.z_conv, users.z_click)
    drifted = flat.drifted(users, np.random.default_rng(1))
    np.testing.assert_array_equal(drifted.z_click[:, 3], drifted.z_click[:, 0])
    facets = World(SynthConfig(**SMALL, facets=5, seed=2)).draw_users(np.arange(50), np.random.default_rng(0))
    assert not np.allclose(facets.z_click[:, 1], facets.z_click[:, 0])
    assert not np.allclose(facets.z_conv, facets.z_click)


def test_synthetic_blocks_do_not_depend_on_the_other_users(tmp_path):
    """A block is drawn from its own stream: the first USER_BLOCK users are the same in a larger world."""
    cfg = dict(tags=50, ads=200, categories=10, seed=5)
    small = _frames(generate(SynthConfig(users=USER_BLOCK, **cfg), tmp_path / "a", progress=False))
    large = _frames(generate(SynthConfig(users=USER_BLOCK + 7, **cfg), tmp_path / "b", progress=False))
    for name in ("users", "train", "test"):
        part = large[name][large[name]["user_id"].isin(set(small["users"]["user_id"]))].reset_index(drop=True)
        pd.testing.assert_frame_equal(part, small[name])
    assert len(large["users"]) == USER_BLOCK + 7


def _digest(table: pa.Table) -> str:
    return hashlib.sha256(json.dumps(table.to_pylist()).encode()).hexdigest()[:16]


def test_synthetic_data_is_the_data_of_before(tmp_path):
    """Digests of the tables written by the in-memory generator of f222129 (before synth wrote block by block
    and its string building was vectorised): same seed, same bytes. An intended change of the generator
    changes them; say so in its commit."""
    d = generate(SynthConfig(users=5000, tags=50, ads=200, categories=10, seed=7), tmp_path, progress=False)
    got = {n: (t.num_rows, _digest(t)) for n in ("train", "test", "users") for t in [read_table(d / f"{n}.parquet")]}
    assert got == {"train": (81430, "1a9ac07c01f40766"), "test": (35591, "9ae81f4d6c0cca90"),
                   "users": (5000, "43ec87ac2e18dda0")}


def test_synthetic_parts_and_one_file_hold_the_same_tables(tmp_path):
    """2 part files, 1 part file and one plain file per table: the same tables, and the same as
    concatenating every block in memory (how synth wrote a dataset before)."""
    cfg = SynthConfig(users=USER_BLOCK + 300, tags=50, ads=200, categories=10, seed=4)
    two = generate(cfg, tmp_path / "two", progress=False, part_users=USER_BLOCK)
    one = generate(cfg, tmp_path / "one", progress=False, part_users=2 * USER_BLOCK)
    flat = generate(cfg, tmp_path / "flat", progress=False, part_users=0)
    world = World(cfg)
    whole = [generate_block(world, b) for b in range(2)]
    ref = write_dataset(tmp_path / "ref", *(pd.concat([w[n] for w in whole], ignore_index=True)
                                           for n in ("train", "test", "users")), dataset_meta(world))
    assert sorted(p.name for p in (two / "train.parquet").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert [p.name for p in (one / "users.parquet").iterdir()] == ["part-00000.parquet"]
    assert (flat / "train.parquet").is_file()
    for name in ("train", "test", "users"):
        expect = pq.read_table(ref / f"{name}.parquet")
        for d in (two, one, flat):
            assert read_table(d / f"{name}.parquet").equals(expect), (d.name, name)
    # A part holds whole users: the users of part k are exactly the users of its samples.
    for k in range(2):
        users = set(pq.read_table(two / "users.parquet" / f"part-{k:05d}.parquet")["user_id"].to_pylist())
        for name in ("train", "test"):
            assert set(pq.read_table(two / f"{name}.parquet" / f"part-{k:05d}.parquet")["user_id"].to_pylist()) == users
    a, b = load_dataset(two), load_dataset(flat)
    for name in ("train", "test", "users"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    assert a.meta == b.meta


def test_synthetic_in_several_processes_writes_the_same_dataset(tmp_path):
    """--jobs 2: blocks drawn in two processes, written in order: the same tables and meta as one
    process, and a resume with jobs keeps the finished parts."""
    cfg = SynthConfig(users=3 * USER_BLOCK + 20, tags=50, ads=200, categories=10, seed=5)
    one = generate(cfg, tmp_path / "one", progress=False, part_users=USER_BLOCK)
    two = generate(cfg, tmp_path / "two", progress=False, part_users=USER_BLOCK, jobs=2)
    for name in ("train", "test", "users"):
        assert read_table(two / f"{name}.parquet").equals(read_table(one / f"{name}.parquet")), name
    assert json.loads((two / "meta.json").read_text()) == json.loads((one / "meta.json").read_text())
    (two / "meta.json").unlink()
    for name in ("train", "test", "users"):
        (two / f"{name}.parquet" / "part-00003.parquet").unlink()
    generate(cfg, two, progress=False, part_users=USER_BLOCK, resume=True, jobs=2)
    assert read_table(two / "train.parquet").equals(read_table(one / "train.parquet"))


def test_synthetic_rewrite_replaces_the_other_layout(tmp_path):
    cfg = SynthConfig(users=USER_BLOCK + 10, tags=50, ads=200, categories=10, seed=4)
    generate(cfg, tmp_path, progress=False, part_users=USER_BLOCK)
    generate(SynthConfig(**SMALL, seed=4), tmp_path, progress=False, part_users=0)
    assert (tmp_path / "train.parquet").is_file() and len(load_dataset(tmp_path).users) == SMALL["users"]
    generate(cfg, tmp_path, progress=False, part_users=USER_BLOCK)
    assert len(list((tmp_path / "users.parquet").iterdir())) == 2
    assert len(load_dataset(tmp_path).users) == USER_BLOCK + 10
    with pytest.raises(ValueError, match="multiple of 4096"):
        generate(cfg, tmp_path / "bad", progress=False, part_users=1000)


def test_synthetic_resume_keeps_finished_parts_and_gives_the_same_tables(tmp_path):
    """An interrupted parted run (a part cut off mid-write, no meta.json) resumed gives the one-shot tables;
    another config is refused; the finished parts are not rewritten."""
    cfg = SynthConfig(users=3 * USER_BLOCK + 50, tags=50, ads=200, categories=10, seed=6)
    whole = generate(cfg, tmp_path / "whole", progress=False, part_users=USER_BLOCK)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    (cut / "meta.json").unlink()
    for name in ("train", "users"):   # part 2 cut off mid-write in two tables, part 3 never started
        f = cut / f"{name}.parquet" / "part-00002.parquet"
        f.write_bytes(f.read_bytes()[:1000])
    for name in ("train", "test", "users"):
        (cut / f"{name}.parquet" / "part-00003.parquet").unlink()
    from mvke.data.dataset import DatasetWriter
    assert DatasetWriter.resume_point(cut) == 2
    kept = (cut / "train.parquet" / "part-00001.parquet").stat().st_mtime_ns
    with pytest.raises(ValueError, match="another config or seed"):
        generate(SynthConfig(users=cfg.users, tags=50, ads=200, categories=10, seed=7), cut, progress=False,
                 part_users=USER_BLOCK, resume=True)
    generate(cfg, cut, progress=False, part_users=USER_BLOCK, resume=True)
    assert (cut / "train.parquet" / "part-00001.parquet").stat().st_mtime_ns == kept
    for name in ("train", "test", "users"):
        assert read_table(cut / f"{name}.parquet").equals(read_table(whole / f"{name}.parquet")), name
    assert json.loads((cut / "meta.json").read_text()) == json.loads((whole / "meta.json").read_text())
    with pytest.raises(ValueError, match="in parts"):
        generate(cfg, tmp_path / "flat", progress=False, part_users=0, resume=True)


_PEAK_RSS = """
import resource, sys, tempfile
from mvke.data.synthetic import SynthConfig, generate
with tempfile.TemporaryDirectory() as d:
    generate(SynthConfig(users=int(sys.argv[1]), tags=200, ads=500, categories=20, seed=3), d, progress=False,
             part_users=int(sys.argv[2]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.parametrize("part_users", [0, USER_BLOCK])
def test_synthetic_peak_memory_does_not_grow_with_users(part_users):
    """Peak RSS of synth at 2 and 8 blocks of users, each in a fresh process. Holding every block until the
    end (the generator before) measured 395 MB and 892 MB for 2 and 10 blocks (ratio 2.3); block by block,
    288 and 293 MB (1.02)."""
    import subprocess
    import sys

    def peak_kib(users: int) -> int:
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(users), str(part_users)], capture_output=True,
                             text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])
    small, large = peak_kib(2 * USER_BLOCK), peak_kib(8 * USER_BLOCK)
    assert large / small < 1.3, (small, large)


def test_synthetic_timestamps_order_each_users_days(small_synth):
    f = _frames(small_synth)
    for split, lo, hi in (("train", 0, DAY_SECONDS), ("test", DAY_SECONDS, 2 * DAY_SECONDS)):
        ts = f[split]["timestamp"]
        assert ts.between(lo, hi - 1).all(), split
        assert (f[split].groupby("user_id")["timestamp"].diff().dropna() >= 0).all(), split


# ---------------------------------------------------------------- MovieLens-100K
# ml100k holds ~500k samples with 20-genre histories: the checks below work on
# the Arrow columns (flattened lists, integer genre codes) to stay fast.
@pytest.fixture(scope="module")
def ml_raw(ml100k_source):
    """The raw ml-100k files, read here independently of mvke.data.movielens."""
    inter = pd.read_csv(ml100k_source / "ml-100k.inter", sep="\t", dtype=str)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    inter["rating"] = inter["rating"].astype(float)
    inter["timestamp"] = inter["timestamp"].astype(float).astype(np.int64)
    items = pd.read_csv(ml100k_source / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    items.columns = [c.split(":")[0] for c in items.columns]
    item_genres = {i: [g for g in c.split() if g != "unknown"] for i, c in zip(items["item_id"], items["class"])}
    inter["genres"] = inter["item_id"].map(lambda i: item_genres.get(i, []))
    genres = sorted({g for gs in item_genres.values() for g in gs})
    users = np.array(sorted(inter["user_id"].unique()))
    # first_ts[u, g]: when user u first rated (liked) a movie of genre g; int64 max if never.
    ev = inter.explode("genres").dropna(subset=["genres"])
    u = np.searchsorted(users, ev["user_id"].to_numpy())
    g = np.searchsorted(genres, ev["genres"].to_numpy())
    ts = ev["timestamp"].to_numpy()
    first = {}
    liked = ev["rating"].to_numpy() >= 4
    for col, keep in (("history_genres", np.ones(len(ev), bool)), ("history_liked_genres", liked)):
        f = np.full((len(users), len(genres)), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(f, (u[keep], g[keep]), ts[keep])
        first[col] = f
    # Per user, events in time order: (timestamps, ratings, genre lists).
    by_user = {uid: (grp["timestamp"].to_numpy(), grp["rating"].to_numpy(), grp["genres"].tolist())
               for uid, grp in inter.sort_values("timestamp", kind="stable").groupby("user_id")}
    return {"inter": inter, "item_genres": item_genres, "genres": genres, "users": users, "first": first,
            "by_user": by_user}


@pytest.fixture(scope="module")
def ml_samples(ml100k_dir):
    """Train + test samples: scalar columns as a DataFrame, list columns left in Arrow."""
    tables = [pq.read_table(ml100k_dir / f"{s}.parquet") for s in ("train", "test")]
    table = pa.concat_tables(tables)
    scalars = ["user_id", "item_id", "timestamp", "click", "conversion"]
    df = table.select(scalars).to_pandas()
    df["split"] = np.repeat(["train", "test"], [len(t) for t in tables])
    return {"df": df, "table": table, "schema": tables[0].schema, "test_schema": tables[1].schema}


def _flat_codes(column: pa.ChunkedArray, vocabulary: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A list<string> column -> (row of each entry, index of each entry in vocabulary); -1 = unknown."""
    arr = column.combine_chunks()
    parents = pc.list_parent_indices(arr).to_numpy()
    enc = pc.list_flatten(arr).dictionary_encode()
    lut = np.array([vocabulary.index(v) if v in vocabulary else -1 for v in enc.dictionary.to_pylist()] + [-1])
    return parents, lut[enc.indices.to_numpy(zero_copy_only=False)]


def test_ml100k_histories_hold_only_strictly_earlier_events(ml_samples, ml_raw):
    df, table = ml_samples["df"], ml_samples["table"]
    user = np.searchsorted(ml_raw["users"], df["user_id"].to_numpy())
    assert (ml_raw["users"][user] == df["user_id"].to_numpy()).all()
    ts = df["timestamp"].to_numpy()
    picks = {"history_genres": 0, "history_liked_genres": 4}  # minimum rating of an event that counts
    # (1) Every sample: each history genre was rated (liked) by that user at a time
    # strictly before the sample's timestamp.
    for col in picks:
        rows, codes = _flat_codes(table[col], ml_raw["genres"])
        assert len(rows) > len(df) and (codes >= 0).all()
        first = ml_raw["first"][col][user[rows], codes]
        late = np.flatnonzero(first >= ts[rows])
        assert late.size == 0, (f"{col}: future genre in the history of {late.size} entries, e.g. row "
                                f"{df.iloc[rows[late[0]]].to_dict()}")
    # (2) A sample of rows, in full: the history is min(20, available) genre
    # entries, all taken (as a multiset) from the strictly earlier events.
    idx = np.random.default_rng(0).choice(len(df), 600, replace=False)
    sub = table.take(pa.array(idx)).select(["user_id", "timestamp", *picks]).to_pylist()
    nonempty = 0
    for row in sub:
        times, ratings, genre_lists = ml_raw["by_user"][row["user_id"]]
        n_past = int(np.searchsorted(times, row["timestamp"], side="left"))  # strictly earlier
        for col, min_rating in picks.items():
            available = Counter(g for k in range(n_past) if ratings[k] >= min_rating for g in genre_lists[k])
            got = Counter(row[col])
            assert not got - available, (col, row["user_id"], row["timestamp"], got - available)
            assert len(row[col]) == min(20, sum(available.values())), (col, row["user_id"], row["timestamp"])
        nonempty += bool(row["history_genres"])
    assert nonempty > 0.9 * len(sub)


def test_ml100k_split_per_user_by_time(ml_samples, ml_raw):
    df = ml_samples["df"]
    train, test = df[df["split"] == "train"], df[df["split"] == "test"]
    last_train = train.groupby("user_id")["timestamp"].max()
    first_test = test.groupby("user_id")["timestamp"].min()
    users = last_train.index.intersection(first_test.index)
    assert len(users) == len(ml_raw["users"]) == 943
    assert (last_train[users] <= first_test[users]).all()
    pos_train = train[train["click"] == 1].groupby("user_id").size()
    pos_test = test[test["click"] == 1].groupby("user_id").size()
    total = pos_train.add(pos_test, fill_value=0)
    frac = pos_train / total
    assert frac.between(0.75, 0.85).all(), frac.describe()
    assert ((pos_train - 0.8 * total).abs() < 1).all()
    # Every rating of a movie with a genre is one positive, nothing more.
    inter = ml_raw["inter"]
    assert int(total.sum()) == int((inter["genres"].map(len) > 0).sum())


def test_ml100k_labels_and_negatives(ml_samples, ml_raw):
    df, inter = ml_samples["df"], ml_raw["inter"]
    pos, neg = df[df["click"] == 1], df[df["click"] == 0]
    assert len(neg) == 4 * len(pos)
    # Positives: the raw ratings; conversion = rated >= 4.
    m = pos.merge(inter[["user_id", "item_id", "timestamp", "rating"]], on=["user_id", "item_id", "timestamp"],
                  how="left", validate="one_to_one")
    assert m["rating"].notna().all()
    assert (m["conversion"] == (m["rating"] >= 4).astype(int)).all()
    # Negatives: items the user never rated, labels 0/0, at the moment of a positive.
    assert (neg["conversion"] == 0).all()
    clash = neg.merge(inter[["user_id", "item_id"]], on=["user_id", "item_id"])
    assert clash.empty, clash.head()
    neg_at = neg[["user_id", "timestamp"]].drop_duplicates()
    assert len(neg_at.merge(pos[["user_id", "timestamp"]].drop_duplicates())) == len(neg_at)


def test_ml100k_tags_are_real_genres(ml_samples, ml_raw, ml100k_dir):
    df, table, genres = ml_samples["df"], ml_samples["table"], ml_raw["genres"]
    assert len(genres) == 18
    assert (ml_raw["inter"]["item_id"] == "267").any()  # the raw data does rate it ...
    assert ml_raw["item_genres"]["267"] == []           # ... and it has no real genre
    assert not (df["item_id"] == "267").any()
    rows, codes = _flat_codes(table["tags"], genres)
    assert (codes >= 0).all()
    assert (np.bincount(rows, minlength=len(df)) > 0).all()  # every sample has a tag
    idx = np.arange(0, len(df), 97)
    for item, tags in zip(df["item_id"].to_numpy()[idx], table["tags"].take(pa.array(idx)).to_pylist()):
        assert tags == ml_raw["item_genres"][item]
    # The on-disk format: inline user fields with the types meta.json declares.
    meta = json.loads((ml100k_dir / "meta.json").read_text())
    assert meta["tags"] and set(meta["tags"]) == set(genres)
    for schema in (ml_samples["schema"], ml_samples["test_schema"]):
        assert pa.types.is_list(schema.field("tags").type)
        for label in ("click", "conversion"):
            assert pa.types.is_integer(schema.field(label).type)
        for name, kind in meta["fields"].items():
            t = schema.field(name).type
            assert pa.types.is_list(t) if kind == "multi" else pa.types.is_string(t) or pa.types.is_large_string(t)
    users = pd.read_parquet(ml100k_dir / "users.parquet")
    assert list(users.columns) == ["user_id", *meta["fields"]] and len(users) == 943


# ---------------------------------------------------------------- bad data
@pytest.fixture(scope="module")
def valid_dir(tmp_path_factory) -> Path:
    return generate(SynthConfig(users=60, tags=30, ads=40, categories=10, seed=2),
                    tmp_path_factory.mktemp("valid"), progress=False)


def _rewrite(path: Path, change) -> None:
    df = pd.read_parquet(path)
    df = change(df)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)


def _drop(col):
    return lambda df: df.drop(columns=[col])


def _set(col, fn):
    def change(df):
        df = df.copy()
        df[col] = fn(df[col])
        return df
    return change


def _empty_file(d: Path, name: str) -> None:
    (d / name).write_bytes(b"")


BAD_DATA = {
    "missing test file": ("test.parquet", None, lambda d: (d / "test.parquet").unlink()),
    "missing users file": ("users.parquet", None, lambda d: (d / "users.parquet").unlink()),
    "missing meta file": ("meta.json", None, lambda d: (d / "meta.json").unlink()),
    "missing label column": ("train.parquet", "click", lambda d: _rewrite(d / "train.parquet", _drop("click"))),
    "missing tags column": ("test.parquet", "tags", lambda d: _rewrite(d / "test.parquet", _drop("tags"))),
    "missing user field": ("users.parquet", "gender", lambda d: _rewrite(d / "users.parquet", _drop("gender"))),
    "string labels": ("train.parquet", "click",
                      lambda d: _rewrite(d / "train.parquet", _set("click", lambda c: c.astype(str)))),
    "label out of 0/1": ("test.parquet", "conversion",
                         lambda d: _rewrite(d / "test.parquet", _set("conversion", lambda c: c * 2))),
    "list in a categorical field": ("users.parquet", "occupation",
                                    lambda d: _rewrite(d / "users.parquet",
                                                       _set("occupation", lambda c: c.map(lambda v: [v])))),
    "string in a multi field": ("users.parquet", "read_categories",
                                lambda d: _rewrite(d / "users.parquet",
                                                   _set("read_categories", lambda c: c.map("|".join)))),
    "tags not lists": ("train.parquet", "tags",
                       lambda d: _rewrite(d / "train.parquet", _set("tags", lambda c: c.map(lambda v: v[0])))),
    "file with no rows": ("train.parquet", None, lambda d: _rewrite(d / "train.parquet", lambda df: df.iloc[:0])),
    "zero-byte file": ("test.parquet", None, lambda d: _empty_file(d, "test.parquet")),
    "meta without fields": ("meta.json", "fields", lambda d: (d / "meta.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "meta.json").read_text()).items() if k != "fields"}))),
    "meta not JSON": ("meta.json", None, lambda d: (d / "meta.json").write_text("{not json")),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_error_names_file_and_column(valid_dir, tmp_path, case):
    file, column, corrupt = BAD_DATA[case]
    d = tmp_path / "ds"
    shutil.copytree(valid_dir, d)
    load_dataset(d)  # valid before the change
    corrupt(d)
    with pytest.raises(DataError) as err:
        load_dataset(d)
    msg = str(err.value)
    assert file in msg and Path(err.value.file).name == file
    assert err.value.column == column
    if column:
        assert repr(column) in msg


def test_sample_without_feature_row_names_users_file(valid_dir, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(valid_dir, d)
    first = pd.read_parquet(d / "test.parquet")["user_id"].iloc[0]
    _rewrite(d / "users.parquet", lambda df: df[df["user_id"] != first])
    ds = load_dataset(d)
    schema = build_schema(ds)
    with pytest.raises(DataError, match=r"users\.parquet, column 'user_id'") as err:
        encode_split(ds, ds.test, schema)
    assert first in str(err.value)


def _copy_source(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
        lines = (src / name).read_text().splitlines(keepends=True)
        (dst / name).write_text("".join(lines[:3000]))  # a short file is enough to fail on
    return dst


def _rewrite_atomic(path: Path, change) -> None:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    change(df).to_csv(path, sep="\t", index=False)


@pytest.mark.parametrize("file, column", [("ml-100k.inter", "rating"), ("ml-100k.inter", "timestamp"),
                                          ("ml-100k.item", "class"), ("ml-100k.user", "zip_code")])
def test_ml100k_source_missing_column(ml100k_source, tmp_path, file, column):
    src = _copy_source(ml100k_source, tmp_path / "src")
    _rewrite_atomic(src / file, lambda df: df.drop(columns=[c for c in df.columns if c.split(":")[0] == column]))
    with pytest.raises(DataError) as err:
        build_ml100k(tmp_path / "out", source=src)
    assert file in str(err.value) and repr(column) in str(err.value)
    assert err.value.column == column


def test_ml100k_source_bad_values_and_missing_file(ml100k_source, tmp_path):
    src = _copy_source(ml100k_source, tmp_path / "src")

    def bad_ts(df):
        df.loc[5, "timestamp:float"] = "yesterday"
        return df
    _rewrite_atomic(src / "ml-100k.inter", bad_ts)
    with pytest.raises(DataError, match=r"ml-100k\.inter, column 'timestamp'.*yesterday"):
        build_ml100k(tmp_path / "out", source=src)
    (src / "ml-100k.user").unlink()
    shutil.copy(ml100k_source / "ml-100k.inter", src / "ml-100k.inter")
    with pytest.raises(DataError, match=r"ml-100k\.user: file not found"):
        build_ml100k(tmp_path / "out", source=src)


def _tiny_raw(tmp_path: Path, inline: bool) -> Path:
    users = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "gender": ["m", "f", "only_test"],
                          "hist": [["a"], ["a", "b"], ["only_test_item", "a"]]})
    samples = {
        "train": pd.DataFrame({"user_id": ["u1", "u2", "u1"], "tags": [["t1"], ["t2"], ["t1", "t2"]],
                               "click": [1, 0, 1], "conversion": [0, 0, 1]}),
        "test": pd.DataFrame({"user_id": ["u3", "u1"], "tags": [["t2"], ["t1"]], "click": [1, 0],
                              "conversion": [1, 0]}),
    }
    if inline:
        for df in samples.values():
            for col in ("gender", "hist"):
                df[col] = df["user_id"].map(users.set_index("user_id")[col])
    meta = {"name": "tiny", "fields": {"gender": "cat", "hist": "multi"}, "max_lens": {"hist": 4},
            "tags": ["t1", "t2"]}
    return write_dataset(tmp_path / ("inline" if inline else "joined"), samples["train"], samples["test"], users, meta)


@pytest.mark.parametrize("inline", [False, True])
def test_vocabularies_come_from_the_training_split_only(tmp_path, inline):
    ds = load_dataset(_tiny_raw(tmp_path, inline))
    s = build_schema(ds)
    gender, hist = s.fields
    assert gender.vocab == ["f", "m"] and hist.vocab == ["a", "b"]
    enc = encode_split(ds, ds.test, s)
    assert enc.cat_ids[0, 0] == s.offsets[0]                     # u3's gender only occurs in test
    assert enc.multi_ids[0, 0, 0] == s.offsets[1]                # so does its first history item
    assert enc.multi_ids[0, 0, 1] == s.offsets[1] + 1            # "a" is known
    assert enc.cat_ids[1, 0] == s.offsets[0] + 2                 # u1's "m"
    assert enc.labels.tolist() == [[1, 1], [0, 0]]
    assert enc.tag_ids.tolist() == [[2, 0, 0], [1, 0, 0]]
