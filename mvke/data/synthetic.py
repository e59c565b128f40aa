"""Synthetic ad logs with the schema of the MVKE paper (Table 2) and its two challenges.

The generative story (docs/DATA.md tells it in prose):

* every user has M latent preference *facets* (C2), drawn around the mean of a
  hidden user segment; conversion facets are correlated with, but not equal to,
  the click facets (C3, correlation `rho`);
* tags belong to categories; each category is driven by one click facet and
  one conversion facet (the same facet with probability `same_facet_prob`);
* an ad carries 1-3 tags; impression -> click -> conversion, a conversion only
  after a click; the true probabilities are recorded, so the oracle AUC is known;
* the 26 user fields are noisy views of the latent state: 8 basic attributes
  (from the segment), 10 behaviour histories (each from particular facets),
  8 bucketised statistics (from the user's click/conversion propensities);
* features are a snapshot at the end of the training day; on the test day the
  latent state and ad popularity drift.

Two worlds (`SynthConfig.world`): "facets" (the above) and "flat" (one preference
vector per user, shared by every facet and by both tasks: nothing for experts to
specialise on).

Generation is split into the world (`World`: everything shared by all users,
drawn from `seed` alone) and blocks of `USER_BLOCK` users (`generate_block`),
each from its own random stream, so a dataset can be written in parts with
bounded memory and any block can be regenerated on its own.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from mvke.data.dataset import TASK_LABELS, DatasetWriter

BASIC_FIELDS = {  # name -> number of distinct values
    "age_bucket": 8, "gender": 3, "education": 6, "city_tier": 5,
    "device_os": 4, "device_price_bucket": 6, "marital_status": 4, "occupation": 20,
}
# name -> (latent space, facet slot 0-3 or -1 for "all facets, tag-specific" / -2 "one random
# facet per user", item kind, max_len). Slot j reads facet j * M // 4 (M >= 4) or j mod M (M < 4).
HISTORY_FIELDS = {
    "read_categories": ("click", 0, "cat", 10),
    "video_categories": ("click", 1, "cat", 10),
    "game_categories": ("click", 2, "cat", 10),
    "news_topics": ("click", 3, "cat", 10),
    "search_keywords": ("click", -2, "cat", 10),
    "clicked_tags": ("click", -1, "tag", 20),
    "shop_categories": ("conv", 0, "cat", 10),
    "purchase_categories": ("conv", 2, "cat", 10),
    "app_install_categories": ("conv", 3, "cat", 10),
    "converted_tags": ("conv", -1, "tag", 10),
}
STAT_FIELDS = ["avg_ctr_bucket", "avg_cvr_bucket", "active_days_bucket", "impressions_bucket",
               "clicks_bucket", "conversions_bucket", "session_length_bucket", "spend_bucket"]
WORLDS = ("facets", "flat")
USER_BLOCK = 4096          # users per independently seeded block
CALIBRATION_USERS = 8192   # population the intercepts and statistic deciles are fitted on
DAY_SECONDS = 86_400
ACTIVITY_MEAN = 2.0        # mean of Gamma(2, 1)
SINGLE_FILE_USERS = 16 * USER_BLOCK  # up to this many users one file per table, above it parts (`generate`)
PART_USERS = USER_BLOCK    # users per part file of a parted dataset (about 65k training rows)


@dataclass
class SynthConfig:
    users: int = 20_000
    tags: int = 1_780
    categories: int = 40
    facets: int = 4
    segments: int = 12
    latent_dim: int = 8
    ads: int = 20_000
    train_impressions_per_user: float = 15.0
    test_impressions_per_user: float = 6.0
    ctr_target: float = 0.30          # mean click probability per impression
    cvr_target: float = 0.25          # mean conversion probability per click
    rho: float = 0.6                  # correlation of click and conversion facets (C3)
    same_facet_prob: float = 0.5      # a category's conversion facet equals its click facet
    affinity_scale: float = 1.6
    drift: float = 0.25               # test-day change of the latent state
    history_noise: float = 0.2        # share of history entries drawn at random
    world: str = "facets"             # "facets" | "flat" (module docstring)
    seed: int = 0

    def __post_init__(self) -> None:
        # Every category needs a tag, and a history draws max_len distinct items.
        longest = {kind: max(spec[3] for spec in HISTORY_FIELDS.values() if spec[2] == kind)
                   for kind in ("cat", "tag")}
        if self.categories < longest["cat"]:
            raise ValueError(f"categories must be >= {longest['cat']} (longest category history), "
                             f"got {self.categories}")
        if self.tags < max(self.categories, longest["tag"]):
            raise ValueError(f"tags must be >= categories ({self.categories}) and >= {longest['tag']} "
                             f"(longest tag history), got {self.tags}")
        for name in ("users", "ads", "facets", "segments", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.world not in WORLDS:
            raise ValueError(f"world must be one of {WORLDS}, got {self.world!r}")

    def facet_of_slot(self, slot: int) -> int:
        """The facet a history's fixed slot (0-3) reads: spread over M >= 4 facets, wrapped below."""
        return slot * self.facets // 4 if self.facets >= 4 else slot % self.facets


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _calibrate_intercept(logits: np.ndarray, target: float, weights: np.ndarray | None = None) -> float:
    """Intercept b with the (weighted) mean of sigmoid(logits + b) == target (bisection, deterministic)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.average(_sigmoid(logits + mid), weights=weights) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _gumbel_topk(rng: np.random.Generator, logits: np.ndarray, k: int) -> np.ndarray:
    """Sample k items without replacement per row, in order of the draw."""
    g = logits - np.log(-np.log(rng.random(logits.shape)))
    idx = np.argpartition(-g, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(g, idx, axis=1), axis=1)
    return np.take_along_axis(idx, order, axis=1)


@dataclass
class Users:
    """The latent state of a range of users (one block)."""

    ids: np.ndarray          # [U] global user index
    segment: np.ndarray      # [U]
    z_click: np.ndarray      # [U, M, D]
    z_conv: np.ndarray       # [U, M, D]
    beta: np.ndarray         # [U] click propensity
    gamma: np.ndarray        # [U] conversion propensity
    activity: np.ndarray     # [U]

    def __len__(self) -> int:
        return len(self.ids)


class World:
    """Everything shared by all users: segments, tags, ads, facet maps, intercepts, statistic deciles.

    Drawn from `default_rng([seed, 0])`; users come later, block by block (`generate_block`).
    """

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        M, D, C, T, S = cfg.facets, cfg.latent_dim, cfg.categories, cfg.tags, cfg.segments
        self.seg_mu = rng.normal(0, 1, (S, M, D))                                  # [S, M, D]
        self.attr_logits = {n: rng.normal(0, 1.2, (S, k)) for n, k in BASIC_FIELDS.items()}
        self.centroids = rng.normal(0, 1, (C, D))                                  # [C, D]
        self.tag_cat = rng.integers(0, C, T)
        self.tag_cat[:C] = np.arange(C)  # no empty category
        self.w = self.centroids[self.tag_cat] + 0.6 * rng.normal(0, 1, (T, D))     # [T, D]
        self.facet_click = rng.integers(0, M, C)
        other = rng.integers(0, M, C)
        self.facet_conv = np.where(rng.random(C) < cfg.same_facet_prob, self.facet_click, other)
        self.tags_of_cat = [np.flatnonzero(self.tag_cat == c) for c in range(C)]
        self._make_ads(rng)
        self.tag_names = np.array([f"cat{self.tag_cat[t]:02d}/tag{t:04d}" for t in range(T)])
        self._tag_names_obj = self.tag_names.astype(object)
        self._calibrate()

    def _make_ads(self, rng: np.random.Generator) -> None:
        cfg = self.cfg
        A, C = cfg.ads, cfg.categories
        cat_pop = 1.0 / np.arange(1, C + 1) ** 0.7
        cat_pop = rng.permutation(cat_pop / cat_pop.sum())
        ad_cat = rng.choice(C, A, p=cat_pop)
        n_tags = rng.choice([1, 2, 3], A, p=[0.5, 0.3, 0.2])
        self.ad_tags = np.full((A, 3), -1, dtype=np.int64)
        for a in range(A):
            for j in range(n_tags[a]):
                c = ad_cat[a] if (j == 0 or rng.random() < 0.7) else rng.integers(0, C)
                pool = self.tags_of_cat[c]
                self.ad_tags[a, j] = pool[rng.integers(0, len(pool))]
        pop = 1.0 / np.arange(1, A + 1) ** 0.8
        self.ad_pop = {"train": rng.permutation(pop / pop.sum())}
        # Test-day drift of the ads: 30% of them swap their popularity with another ad.
        test = self.ad_pop["train"].copy()
        idx = np.flatnonzero(rng.random(A) < 0.3)
        test[idx] = test[rng.permutation(idx)]
        self.ad_pop["test"] = test / test.sum()

    # -- users -----------------------------------------------------------------
    def draw_users(self, ids: np.ndarray, rng: np.random.Generator) -> Users:
        cfg = self.cfg
        U, M, D = len(ids), cfg.facets, cfg.latent_dim
        segment = rng.integers(0, cfg.segments, U)
        if cfg.world == "flat":   # one vector for every facet and both tasks
            z = self.seg_mu[segment, :1] + 0.8 * rng.normal(0, 1, (U, 1, D))
            z_click = z_conv = np.repeat(z, M, axis=1)
        else:
            z_click = self.seg_mu[segment] + 0.8 * rng.normal(0, 1, (U, M, D))                   # [U, M, D]
            z_conv = cfg.rho * z_click + np.sqrt(1 - cfg.rho ** 2) * rng.normal(0, 1, (U, M, D))
        prop = rng.multivariate_normal([0, 0], [[0.25, 0.1], [0.1, 0.25]], U)
        return Users(ids, segment, z_click, z_conv, prop[:, 0], prop[:, 1], rng.gamma(2.0, 1.0, U))

    def drifted(self, users: Users, rng: np.random.Generator) -> Users:
        """The test-day state: every facet vector moves by drift * N(0, I)."""
        d = self.cfg.drift
        if self.cfg.world == "flat":
            step = d * rng.normal(0, 1, (len(users), 1, self.cfg.latent_dim))
            z_click = z_conv = users.z_click + step
        else:
            z_click = users.z_click + d * rng.normal(0, 1, users.z_click.shape)
            z_conv = users.z_conv + d * rng.normal(0, 1, users.z_conv.shape)
        return Users(users.ids, users.segment, z_click, z_conv, users.beta, users.gamma, users.activity)

    def affinity(self, users: Users, rows: np.ndarray, tags: np.ndarray, space: str) -> np.ndarray:
        """<z_{u, facet(tag)}, w_tag> / sqrt(D), scaled; tags == -1 give 0. rows index into `users`."""
        z = users.z_click if space == "click" else users.z_conv
        facet_of_cat = self.facet_click if space == "click" else self.facet_conv
        t = np.maximum(tags, 0)
        facet = facet_of_cat[self.tag_cat[t]]
        a = np.einsum("nd,nd->n", z[rows, facet], self.w[t]) / np.sqrt(self.cfg.latent_dim)
        return np.where(tags >= 0, self.cfg.affinity_scale * a, 0.0)

    def impressions(self, users: Users, per_user: float, day: str, rng: np.random.Generator) -> dict:
        """Ads shown to `users` on one day, with timestamps and the logits before the intercepts."""
        n = rng.poisson(per_user * users.activity / ACTIVITY_MEAN) + 1
        rows = np.repeat(np.arange(len(users)), n)
        ads = rng.choice(self.cfg.ads, len(rows), p=self.ad_pop[day])
        tags = self.ad_tags[ads]                                                          # [N, 3]
        logit_click, logit_conv = self.logits(users, rows, tags)
        # Seconds since the start of the log, sorted within each user (lexsort: user, then time).
        start = 0 if day == "train" else DAY_SECONDS
        ts = start + rng.integers(0, DAY_SECONDS, len(rows))
        order = np.lexsort((ts, rows))
        return {"rows": rows[order], "tags": tags[order], "timestamp": ts[order],
                "logit_click": logit_click[order], "logit_conv": logit_conv[order]}

    def logits(self, users: Users, rows: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Click and conversion logits before the intercepts of the ads with `tags` ([N, 3], -1 padded)
        shown to users[rows]: propensity + the mean affinity over the ad's tags."""
        n_tags = (tags >= 0).sum(1)
        aff_c = sum(self.affinity(users, rows, tags[:, j], "click") for j in range(3)) / n_tags
        aff_v = sum(self.affinity(users, rows, tags[:, j], "conv") for j in range(3)) / n_tags
        return users.beta[rows] + aff_c, users.gamma[rows] + aff_v

    def _raw_statistics(self, users: Users, rng: np.random.Generator) -> dict[str, np.ndarray]:
        U = len(users)
        act = np.log(users.activity)
        return {
            "avg_ctr_bucket": users.beta + 0.3 * rng.normal(0, 1, U),
            "avg_cvr_bucket": users.gamma + 0.3 * rng.normal(0, 1, U),
            "active_days_bucket": act + 0.5 * rng.normal(0, 1, U),
            "impressions_bucket": act + 0.2 * rng.normal(0, 1, U),
            "clicks_bucket": act + users.beta + 0.3 * rng.normal(0, 1, U),
            "conversions_bucket": act + users.beta + users.gamma + 0.4 * rng.normal(0, 1, U),
            "session_length_bucket": rng.normal(0, 1, U),
            "spend_bucket": users.gamma + 0.8 * rng.normal(0, 1, U),
        }

    def _calibrate(self) -> None:
        """Intercepts and statistic deciles from a calibration population (its own random stream).

        b_click makes the mean p_click of its training-day impressions ctr_target; b_conv makes
        the p_click-weighted mean p(conversion | click) cvr_target. Fitting them on a fixed
        population instead of the generated users keeps every block independent of the others.
        """
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 2])
        users = self.draw_users(np.arange(CALIBRATION_USERS), rng)
        imp = self.impressions(users, cfg.train_impressions_per_user, "train", rng)
        self.b_click = _calibrate_intercept(imp["logit_click"], cfg.ctr_target)
        self.b_conv = _calibrate_intercept(imp["logit_conv"], cfg.cvr_target,
                                           _sigmoid(imp["logit_click"] + self.b_click))
        self.stat_edges = {k: np.quantile(v, np.linspace(0, 1, 11)[1:-1])
                           for k, v in self._raw_statistics(users, rng).items()}

    # -- user fields -------------------------------------------------------------
    def basic_attributes(self, users: Users, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = {}
        for name, n in BASIC_FIELDS.items():
            g = -np.log(-np.log(rng.random((len(users), n))))
            out[name] = np.array([f"{name[:3]}{v}" for v in np.argmax(self.attr_logits[name][users.segment] + g, 1)])
        return out

    def histories(self, users: Users, rng: np.random.Generator) -> dict[str, list[list[str]]]:
        cfg = self.cfg
        U = len(users)
        out = {}
        for name, (space, slot, kind, max_len) in HISTORY_FIELDS.items():
            z = users.z_click if space == "click" else users.z_conv
            if kind == "cat":
                if slot == -2:   # search: a random facet per user
                    zf = z[np.arange(U), rng.integers(0, cfg.facets, U)]
                else:
                    zf = z[:, cfg.facet_of_slot(slot)]
                logits = 1.5 * zf @ self.centroids.T / np.sqrt(cfg.latent_dim)                  # [U, C]
                prefix = "c"
            else:
                facet_of_cat = self.facet_click if space == "click" else self.facet_conv
                tag_facet = facet_of_cat[self.tag_cat]                                             # [T]
                logits = np.empty((U, cfg.tags))                                                   # [U, T]
                for m in range(cfg.facets):   # <z[u, facet(t)], w[t]>: each tag against its own facet only
                    sel = np.flatnonzero(tag_facet == m)
                    logits[:, sel] = np.einsum("ud,td->ut", z[:, m], self.w[sel])
                logits = 1.5 * logits / np.sqrt(cfg.latent_dim)
                prefix = "t"
            picks = _gumbel_topk(rng, logits, max_len)
            noise = rng.random(picks.shape) < cfg.history_noise
            picks = np.where(noise, rng.integers(0, logits.shape[1], picks.shape), picks)
            lengths = np.minimum(max_len, rng.poisson(users.activity * max_len / 3) + 1)
            names = np.array([f"{prefix}{v:04d}" for v in range(logits.shape[1])], dtype=object)
            out[name] = [row[:n].tolist() for row, n in zip(names[picks], lengths)]
        return out

    def statistics(self, users: Users, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {k: np.array([f"b{b}" for b in np.searchsorted(self.stat_edges[k], v)])
                for k, v in self._raw_statistics(users, rng).items()}

    # -- labels ------------------------------------------------------------------
    def labelled(self, users: Users, imp: dict, rng: np.random.Generator) -> pd.DataFrame:
        p_click = _sigmoid(imp["logit_click"] + self.b_click)
        p_conv_given_click = _sigmoid(imp["logit_conv"] + self.b_conv)
        click = rng.random(len(p_click)) < p_click
        conversion = click & (rng.random(len(p_click)) < p_conv_given_click)
        return pd.DataFrame({
            "user_id": user_names(users.ids)[imp["rows"]],
            "timestamp": imp["timestamp"].astype(np.int64),
            "tags": [row[:n].tolist() for row, n in   # an ad's tags come first, then -1 padding
                     zip(self._tag_names_obj[np.maximum(imp["tags"], 0)], (imp["tags"] >= 0).sum(1))],
            TASK_LABELS["interest"]: click.astype(np.int8),
            TASK_LABELS["intention"]: conversion.astype(np.int8),
            "p_click": p_click.astype(np.float32),
            "p_conversion": (p_click * p_conv_given_click).astype(np.float32),
        })


def user_names(ids: np.ndarray) -> np.ndarray:
    return np.array([f"u{u:07d}" for u in ids])


def blocks(cfg: SynthConfig) -> range:
    return range((cfg.users + USER_BLOCK - 1) // USER_BLOCK)


@dataclass
class Block:
    """One block of users: the latent state behind it and the tables written from it."""
    users: Users                      # training-day state (the features' snapshot)
    test_users: Users                 # drifted test-day state
    test_impressions: dict            # World.impressions of the test day (rows align with frames["test"])
    frames: dict[str, pd.DataFrame]   # users, train, test


def draw_block(world: World, block: int) -> Block:
    """Users `block * USER_BLOCK ..` (at most USER_BLOCK): their latent state, feature rows and both days' samples."""
    cfg = world.cfg
    rng = np.random.default_rng([cfg.seed, 1, block])
    lo = block * USER_BLOCK
    users = world.draw_users(np.arange(lo, min(cfg.users, lo + USER_BLOCK)), rng)
    fields = {"user_id": user_names(users.ids)}
    fields |= world.basic_attributes(users, rng)
    fields |= world.histories(users, rng)
    fields |= world.statistics(users, rng)
    train = world.labelled(users, world.impressions(users, cfg.train_impressions_per_user, "train", rng), rng)
    test_users = world.drifted(users, rng)
    test_imp = world.impressions(test_users, cfg.test_impressions_per_user, "test", rng)
    test = world.labelled(test_users, test_imp, rng)
    return Block(users, test_users, test_imp, {"users": pd.DataFrame(fields), "train": train, "test": test})


def generate_block(world: World, block: int) -> dict[str, pd.DataFrame]:
    """Users `block * USER_BLOCK ..` (at most USER_BLOCK): their feature rows and both days' samples."""
    return draw_block(world, block).frames


def dataset_meta(world: World) -> dict:
    cfg = world.cfg
    kinds = {n: "cat" for n in BASIC_FIELDS} | {n: "multi" for n in HISTORY_FIELDS} | {n: "cat" for n in STAT_FIELDS}
    return {
        "name": "synthetic" if cfg.world == "facets" else f"synthetic-{cfg.world}",
        "generator": asdict(cfg), "fields": kinds,
        "max_lens": {n: spec[3] for n, spec in HISTORY_FIELDS.items()},
        "tags": world.tag_names.tolist(),
        "tag_facets": {"click": world.facet_click[world.tag_cat].tolist(),
                       "conversion": world.facet_conv[world.tag_cat].tolist()},
        "history_facets": {n: (cfg.facet_of_slot(s) if s >= 0 else s) for n, (_, s, _, _) in HISTORY_FIELDS.items()},
    }


def part_blocks(cfg: SynthConfig, part_users: int | None) -> int:
    """Blocks per part file; 0 = one file per table. None: one file up to SINGLE_FILE_USERS, else
    parts of PART_USERS (what one streaming step of mvke/training/distributed.py reads at once)."""
    if part_users is None:
        part_users = 0 if cfg.users <= SINGLE_FILE_USERS else PART_USERS
    if part_users < 0 or part_users % USER_BLOCK:
        raise ValueError(f"part_users must be 0 (one file) or a multiple of {USER_BLOCK}, got {part_users}")
    return part_users // USER_BLOCK


# one World per worker process of `generate(jobs > 1)` (drawn from the config alone: the same in each)
_block_world: World | None = None


def _init_block_worker(cfg: SynthConfig) -> None:
    global _block_world
    _block_world = World(cfg)


def _block_in_worker(block: int) -> dict[str, pd.DataFrame]:
    assert _block_world is not None
    return generate_block(_block_world, block)


def _blocks_in_order(world: World, todo: range, jobs: int) -> Iterator[dict[str, pd.DataFrame]]:
    """generate_block for each block of `todo`, in order; `jobs` > 1 draws them in that many
    processes, at most 2 x jobs blocks ahead of the writer (memory stays bounded)."""
    if jobs <= 1:
        for b in todo:
            yield generate_block(world, b)
        return
    pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_block_worker,
                               initargs=(world.cfg,))
    try:
        ahead: deque = deque()
        blocks_left = iter(todo)
        for b in itertools.islice(blocks_left, 2 * jobs):
            ahead.append(pool.submit(_block_in_worker, b))
        while ahead:
            frames = ahead.popleft().result()
            nxt = next(blocks_left, None)
            if nxt is not None:
                ahead.append(pool.submit(_block_in_worker, nxt))
            yield frames
    finally:   # the writer failed or stopped early: draw nothing more
        pool.shutdown(wait=True, cancel_futures=True)


def generate(cfg: SynthConfig, out: str | Path, progress: bool = True, part_users: int | None = None,
             resume: bool = False, jobs: int = 1) -> Path:
    """Write a synthetic dataset (Parquet + meta.json) to `out`, block by block (bounded memory).

    `part_users` (a multiple of USER_BLOCK, `part_blocks`): users per part file, 0 for one file
    per table. The rows are the same whatever the layout: blocks are written in order.
    `resume` (parts only): keep the parts an interrupted run with the same config finished and
    write the rest; the first block is drawn again and compared, so another config is refused.
    `jobs` > 1: blocks drawn in that many processes (each block has its own random stream, so
    the dataset is byte-for-byte the one `jobs=1` writes); this process writes them in order.
    """
    world = World(cfg)
    per_part = part_blocks(cfg, part_users)
    keep = 0
    if resume:
        if not per_part:
            raise ValueError("resume needs a dataset written in parts (part_users > 0)")
        keep = DatasetWriter.resume_point(out)
        size = per_part * USER_BLOCK
        for k in range(keep):   # a finished part of another --users may hold fewer users: write it again
            rows = pq.read_metadata(Path(out) / "users.parquet" / f"part-{k:05d}.parquet").num_rows
            if rows != min(size, cfg.users - k * size):
                keep = k
                break
        if keep:
            again = pa.Table.from_pandas(generate_block(world, 0)["users"], preserve_index=False)
            first = pq.read_table(Path(out) / "users.parquet" / "part-00000.parquet").slice(0, len(again))
            if not first.equals(again):
                raise ValueError(f"{out}: its parts were written with another config or seed; "
                                 "resume needs the same --users/--tags/--seed/--world/--facets/--part-users")
    writer = DatasetWriter(out, parted=per_part > 0, keep_parts=keep)
    todo = blocks(cfg)[keep * per_part:]
    with contextlib.closing(_blocks_in_order(world, todo, jobs)) as drawn:
        for b, frames in tqdm(zip(todo, drawn), desc="synthetic users", unit="block", disable=not progress,
                              mininterval=1.0 if progress else 0.1, initial=keep * per_part, total=len(blocks(cfg))):
            for name, df in frames.items():
                writer.add(name, df, part=b // per_part if per_part else 0)
    return writer.close(dataset_meta(world))
