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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mvke.data.dataset import TASK_LABELS, write_dataset

BASIC_FIELDS = {  # name -> number of distinct values
    "age_bucket": 8, "gender": 3, "education": 6, "city_tier": 5,
    "device_os": 4, "device_price_bucket": 6, "marital_status": 4, "occupation": 20,
}
# name -> (latent space, facet or -1 for "all facets, tag-specific", item kind, max_len)
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


class _World:
    """The latent state: users, tags, ads and how they interact."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        U, M, D, C, T = cfg.users, cfg.facets, cfg.latent_dim, cfg.categories, cfg.tags
        self.segment = rng.integers(0, cfg.segments, U)
        seg_mu = rng.normal(0, 1, (cfg.segments, M, D))
        self.z_click = seg_mu[self.segment] + 0.8 * rng.normal(0, 1, (U, M, D))      # [U, M, D]
        self.z_conv = cfg.rho * self.z_click + np.sqrt(1 - cfg.rho ** 2) * rng.normal(0, 1, (U, M, D))
        prop = rng.multivariate_normal([0, 0], [[0.25, 0.1], [0.1, 0.25]], U)
        self.beta, self.gamma = prop[:, 0], prop[:, 1]                                  # click / conv propensity
        self.activity = rng.gamma(2.0, 1.0, U)
        self.centroids = rng.normal(0, 1, (C, D))                                        # [C, D]
        self.tag_cat = rng.integers(0, C, T)
        self.tag_cat[:C] = np.arange(C)  # no empty category
        self.w = self.centroids[self.tag_cat] + 0.6 * rng.normal(0, 1, (T, D))           # [T, D]
        self.facet_click = rng.integers(0, M, C)
        other = rng.integers(0, M, C)
        self.facet_conv = np.where(rng.random(C) < cfg.same_facet_prob, self.facet_click, other)
        self.tags_of_cat = [np.flatnonzero(self.tag_cat == c) for c in range(C)]
        self._make_ads()

    def _make_ads(self) -> None:
        cfg, rng = self.cfg, self.rng
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
        self.ad_pop = rng.permutation(pop / pop.sum())

    def drift(self) -> None:
        cfg, rng = self.cfg, self.rng
        self.z_click = self.z_click + cfg.drift * rng.normal(0, 1, self.z_click.shape)
        self.z_conv = self.z_conv + cfg.drift * rng.normal(0, 1, self.z_conv.shape)
        # 30% of ads swap their popularity with another ad.
        idx = np.flatnonzero(rng.random(cfg.ads) < 0.3)
        self.ad_pop[idx] = self.ad_pop[rng.permutation(idx)]
        self.ad_pop /= self.ad_pop.sum()

    def affinity(self, users: np.ndarray, tags: np.ndarray, space: str) -> np.ndarray:
        """<z_{u, facet(tag)}, w_tag> / sqrt(D), scaled; tags == -1 give 0."""
        z = self.z_click if space == "click" else self.z_conv
        facet_of_cat = self.facet_click if space == "click" else self.facet_conv
        t = np.maximum(tags, 0)
        facet = facet_of_cat[self.tag_cat[t]]
        a = np.einsum("nd,nd->n", z[users, facet], self.w[t]) / np.sqrt(self.cfg.latent_dim)
        return np.where(tags >= 0, self.cfg.affinity_scale * a, 0.0)

    def impressions(self, per_user: float) -> dict[str, np.ndarray]:
        cfg, rng = self.cfg, self.rng
        n = rng.poisson(per_user * self.activity / self.activity.mean()) + 1
        users = np.repeat(np.arange(cfg.users), n)
        ads = rng.choice(cfg.ads, len(users), p=self.ad_pop)
        tags = self.ad_tags[ads]                                                         # [N, 3]
        n_tags = (tags >= 0).sum(1)
        aff_c = sum(self.affinity(users, tags[:, j], "click") for j in range(3)) / n_tags
        aff_v = sum(self.affinity(users, tags[:, j], "conv") for j in range(3)) / n_tags
        return {"users": users, "tags": tags, "logit_click": self.beta[users] + aff_c,
                "logit_conv": self.gamma[users] + aff_v}


def _basic_attributes(world: _World, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, n in BASIC_FIELDS.items():
        seg_logits = rng.normal(0, 1.2, (world.cfg.segments, n))
        g = -np.log(-np.log(rng.random((world.cfg.users, n))))
        out[name] = np.array([f"{name[:3]}{v}" for v in np.argmax(seg_logits[world.segment] + g, 1)])
    return out


def _histories(world: _World, rng: np.random.Generator) -> dict[str, list[list[str]]]:
    cfg = world.cfg
    U = cfg.users
    out = {}
    for name, (space, facet, kind, max_len) in HISTORY_FIELDS.items():
        z = world.z_click if space == "click" else world.z_conv
        if kind == "cat":
            if facet == -2:   # search: a random facet per user
                zf = z[np.arange(U), rng.integers(0, cfg.facets, U)]
            else:
                zf = z[:, facet % cfg.facets]  # fewer than 4 facets: histories share facets
            logits = 1.5 * zf @ world.centroids.T / np.sqrt(cfg.latent_dim)                  # [U, C]
            prefix = "c"
        else:
            facet_of_cat = world.facet_click if space == "click" else world.facet_conv
            tag_facet = facet_of_cat[world.tag_cat]                                            # [T]
            logits = np.einsum("umd,td->umt", z, world.w)[:, tag_facet, np.arange(cfg.tags)]   # [U, T]
            logits = 1.5 * logits / np.sqrt(cfg.latent_dim)
            prefix = "t"
        picks = _gumbel_topk(rng, logits, max_len)
        noise = rng.random(picks.shape) < cfg.history_noise
        picks = np.where(noise, rng.integers(0, logits.shape[1], picks.shape), picks)
        lengths = np.minimum(max_len, rng.poisson(world.activity * max_len / 3) + 1)
        out[name] = [[f"{prefix}{v:04d}" for v in picks[u, : lengths[u]]] for u in range(U)]
    return out


def _bucket(x: np.ndarray, n: int = 10) -> np.ndarray:
    edges = np.quantile(x, np.linspace(0, 1, n + 1)[1:-1])
    return np.searchsorted(edges, x)


def _statistics(world: _World, rng: np.random.Generator) -> dict[str, np.ndarray]:
    U = world.cfg.users
    act = np.log(world.activity)
    raw = {
        "avg_ctr_bucket": world.beta + 0.3 * rng.normal(0, 1, U),
        "avg_cvr_bucket": world.gamma + 0.3 * rng.normal(0, 1, U),
        "active_days_bucket": act + 0.5 * rng.normal(0, 1, U),
        "impressions_bucket": act + 0.2 * rng.normal(0, 1, U),
        "clicks_bucket": act + world.beta + 0.3 * rng.normal(0, 1, U),
        "conversions_bucket": act + world.beta + world.gamma + 0.4 * rng.normal(0, 1, U),
        "session_length_bucket": rng.normal(0, 1, U),
        "spend_bucket": world.gamma + 0.8 * rng.normal(0, 1, U),
    }
    return {k: np.array([f"b{b}" for b in _bucket(v)]) for k, v in raw.items()}


def generate(cfg: SynthConfig, out: str | Path, progress: bool = True) -> Path:
    """Write a synthetic dataset (Parquet + meta.json) to `out`."""
    rng = np.random.default_rng(cfg.seed)
    world = _World(cfg, rng)
    users = {"user_id": np.array([f"u{u:07d}" for u in range(cfg.users)])}
    users |= _basic_attributes(world, rng)
    users |= _histories(world, rng)
    users |= _statistics(world, rng)
    users_df = pd.DataFrame(users)

    tag_names = np.array([f"cat{world.tag_cat[t]:02d}/tag{t:04d}" for t in range(cfg.tags)])
    train = world.impressions(cfg.train_impressions_per_user)
    b_click = _calibrate_intercept(train["logit_click"], cfg.ctr_target)
    # Conversion rate is per click: weight each impression by its click probability.
    b_conv = _calibrate_intercept(train["logit_conv"], cfg.cvr_target, _sigmoid(train["logit_click"] + b_click))
    frames = []
    for day in ("train", "test"):
        if day == "test":
            world.drift()
            imp = world.impressions(cfg.test_impressions_per_user)
        else:
            imp = train
        p_click = _sigmoid(imp["logit_click"] + b_click)
        p_conv_given_click = _sigmoid(imp["logit_conv"] + b_conv)
        click = rng.random(len(p_click)) < p_click
        conversion = click & (rng.random(len(p_click)) < p_conv_given_click)
        tags = [[tag_names[t] for t in row if t >= 0] for row in imp["tags"]]
        frames.append(pd.DataFrame({
            "user_id": users["user_id"][imp["users"]], "tags": tags,
            TASK_LABELS["interest"]: click.astype(np.int8),
            TASK_LABELS["intention"]: conversion.astype(np.int8),
            "p_click": p_click.astype(np.float32),
            "p_conversion": (p_click * p_conv_given_click).astype(np.float32),
        }))
    kinds = {n: "cat" for n in BASIC_FIELDS} | {n: "multi" for n in HISTORY_FIELDS} | {n: "cat" for n in STAT_FIELDS}
    max_lens = {n: spec[3] for n, spec in HISTORY_FIELDS.items()}
    meta = {
        "name": "synthetic", "generator": asdict(cfg), "fields": kinds, "max_lens": max_lens,
        "tags": tag_names.tolist(),
        "tag_facets": {"click": world.facet_click[world.tag_cat].tolist(),
                       "conversion": world.facet_conv[world.tag_cat].tolist()},
    }
    return write_dataset(out, frames[0], frames[1], users_df, meta)
