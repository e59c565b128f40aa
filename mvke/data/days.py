"""A world that has days (`mvke data synth --days D`), its on-disk layout and the window view.

The paper's system retrains daily on the last days' logs; this module gives it days to
train on. Layout of a days directory (also what `mvke data split --by-time --daily` writes
from an own log):

    meta.json                                  fields, max_lens, the tag catalogue, `days`
    logs/day=YYYY-MM-DD/part-00000.parquet     impressions of that day: timestamp (Unix s),
                                               user_id, ad_id, tags, click, conversion,
                                               p_click, p_conversion (synthetic only)
    snapshots/day=YYYY-MM-DD/users.parquet     every known user's feature row at the END of
                                               that day (also one for the day before the first)
    users.parquet                              (own logs only) one row per user, used for every
                                               day that has no snapshot: not point-in-time

Point-in-time rule: an impression of day d is joined with the snapshot of day d-1, which
is built from events strictly before day d starts, so no feature of an impression uses
anything at or after its timestamp (tests/data/test_days.py proves it on the rows).

The synthetic story per day (on top of `mvke.data.synthetic.World`, whose two-day default
is untouched): the latent state moves by `drift * N(0, I)` (as the test day does), 30% of
the ads swap their popularity, `tag_birth` of the tags are born on a later day and
`tag_retire` retire on one (their ads stop running), `join_rate` new users join and
`quiet_rate` of the active users go quiet each day. Behaviour histories of tags
(`clicked_tags`, `converted_tags`) are the user's own earlier clicks and conversions, in
the catalogue's tag names, most recent first; the category histories name the
catalogue's categories (`cat07`), drawn from the state at the end of the day.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mvke.data.dataset import TASK_LABELS, EncodedSplit, RawDataset, encode_split
from mvke.data.synthetic import (
    ACTIVITY_MEAN,
    BASIC_FIELDS,
    DAY_SECONDS,
    HISTORY_FIELDS,
    STAT_FIELDS,
    SynthConfig,
    Users,
    World,
    _gumbel_topk,
    dataset_meta,
    user_names,
)
from mvke.runtime.features import FeatureSchema, FieldSpec

LOGS, SNAPSHOTS = "logs", "snapshots"

# The tag histories of `DaysWorld.snapshot` as event rules (mvke/runtime/events.py): a click puts its
# ad's tags in front of clicked_tags (the last listed first, as appending them reads backwards),
# one entry per tag, capped; a conversion does the same to converted_tags. The snapshot at the end
# of day d is the one before it with day d's events folded in (tests/data/test_days.py); the
# category histories and statistics are drawn from the latent state, not from events.
EVENT_RULES = {"histories": [{"field": name, "on": ["click" if space == "click" else "conversion"], "from": "tags",
                              "distinct": True, "within_event": "reversed", "max_len": max_len}
                             for name, (space, _, kind, max_len) in HISTORY_FIELDS.items() if kind == "tag"]}
PART = "part-00000.parquet"
USERS_FILE = "users.parquet"


def day_name(d: date) -> str:
    return d.isoformat()


def parse_day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as e:
        raise ValueError(f"day must be YYYY-MM-DD, got {text!r}") from e


def day_start(d: date) -> int:
    """Unix seconds of 00:00 UTC of day d."""
    return (d - date(1970, 1, 1)).days * DAY_SECONDS


def previous(day: str) -> str:
    return day_name(parse_day(day) - timedelta(days=1))


@dataclass
class DaysConfig:
    days: int = 8
    start: str = "2026-01-01"
    impressions_per_user: float = 8.0   # per active user and day
    join_rate: float = 0.05             # new users per day, share of the initial users
    quiet_rate: float = 0.03            # share of active users that go quiet each day (for good)
    tag_birth: float = 0.05             # share of tags born on a later day (uniform over days 1..D-1)
    tag_retire: float = 0.05            # share of tags retired on a day (uniform over days 1..D-1)
    ad_swap: float = 0.3                # share of ads swapping popularity each day

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ValueError(f"days must be >= 1, got {self.days}")
        parse_day(self.start)


# ------------------------------------------------------------------ the synthetic world
@dataclass
class _Population:
    users: Users                    # latent state of every user ever (joined or not yet)
    joined: np.ndarray              # [U] day index the user joins (0 = there from the start)
    quiet: np.ndarray               # [U] day index from which the user shows no impression (D = never)
    basic: dict[str, np.ndarray]    # fixed attributes
    clicked: list[list[str]] = field(default_factory=list)     # per user, most recent last
    converted: list[list[str]] = field(default_factory=list)


def _lifecycle(rng: np.random.Generator, n: int, share: float, days: int) -> np.ndarray:
    """A day index per item in 1..days-1 for `share` of the items, else the given default (0 / days)."""
    out = np.zeros(n, np.int64)
    if days > 1:
        pick = rng.random(n) < share
        out[pick] = rng.integers(1, days, int(pick.sum()))
    return out


class DaysWorld:
    """`World` (segments, tags, ads, intercepts) plus what changes from day to day."""

    def __init__(self, cfg: SynthConfig, days: DaysConfig):
        self.cfg, self.days = cfg, days
        self.world = World(cfg)
        rng = np.random.default_rng([cfg.seed, 5])   # streams 0-2 are the two-day world's
        D, T = days.days, cfg.tags
        self.tag_born = _lifecycle(rng, T, days.tag_birth, D)
        retire = _lifecycle(rng, T, days.tag_retire, D)
        self.tag_retired = np.where(retire > 0, np.maximum(retire, self.tag_born + 1), D + 1)
        self.rng = rng
        total = cfg.users + int(np.ceil(days.join_rate * cfg.users)) * max(D - 1, 0)
        users = self.world.draw_users(np.arange(total), rng)
        joined = np.zeros(total, np.int64)
        joined[cfg.users:] = 1 + (np.arange(total - cfg.users) // max(int(np.ceil(days.join_rate * cfg.users)), 1))
        self.pop = _Population(users, joined, np.full(total, D + 1, np.int64),
                               self.world.basic_attributes(users, rng),
                               [[] for _ in range(total)], [[] for _ in range(total)])
        self.ad_pop = self.world.ad_pop["train"].copy()
        self.cat_names = np.array([f"cat{c:02d}" for c in range(cfg.categories)], dtype=object)

    def tag_live(self, k: int) -> np.ndarray:
        return (self.tag_born <= k) & (k < self.tag_retired)

    def _advance(self, k: int) -> None:
        """State of day k from day k-1: drift, popularity swaps, users going quiet."""
        rng, pop = self.rng, self.pop
        pop.users = self.world.drifted(pop.users, rng)
        A = len(self.ad_pop)
        idx = np.flatnonzero(rng.random(A) < self.days.ad_swap)
        self.ad_pop[idx] = self.ad_pop[rng.permutation(idx)]
        active = (pop.joined < k) & (pop.quiet > k)
        going = active & (rng.random(len(active)) < self.days.quiet_rate)
        pop.quiet[going] = k

    def day_log(self, k: int) -> pd.DataFrame:
        """Impressions of day k (active users, live ads), labelled, sorted by user then time."""
        rng, pop, w = self.rng, self.pop, self.world
        active = np.flatnonzero((pop.joined <= k) & (pop.quiet > k))
        sub = Users(pop.users.ids[active], pop.users.segment[active], pop.users.z_click[active],
                    pop.users.z_conv[active], pop.users.beta[active], pop.users.gamma[active],
                    pop.users.activity[active])
        live = self.tag_live(k)
        ad_ok = ((w.ad_tags < 0) | live[np.maximum(w.ad_tags, 0)]).all(1)
        p = np.where(ad_ok, self.ad_pop, 0.0)
        n = rng.poisson(self.days.impressions_per_user * sub.activity / ACTIVITY_MEAN) + 1
        rows = np.repeat(np.arange(len(sub)), n)
        ads = rng.choice(self.cfg.ads, len(rows), p=p / p.sum())
        tags = w.ad_tags[ads]                                                                   # [N, 3]
        n_tags = (tags >= 0).sum(1)
        aff_c = sum(w.affinity(sub, rows, tags[:, j], "click") for j in range(3)) / n_tags
        aff_v = sum(w.affinity(sub, rows, tags[:, j], "conv") for j in range(3)) / n_tags
        ts = day_start(parse_day(self.days.start)) + k * DAY_SECONDS + rng.integers(0, DAY_SECONDS, len(rows))
        order = np.lexsort((ts, rows))
        imp = {"rows": rows[order], "tags": tags[order], "timestamp": ts[order],
               "logit_click": (sub.beta[rows] + aff_c)[order], "logit_conv": (sub.gamma[rows] + aff_v)[order]}
        df = w.labelled(sub, imp, rng)
        df.insert(2, "ad_id", ads[order].astype(np.int64))
        return df

    def _remember(self, log: pd.DataFrame) -> None:
        """Append the day's clicks and conversions to each user's history (the log is time-sorted per user)."""
        pos = log["user_id"].str[1:].astype(np.int64).to_numpy()
        for uid, tags, c, v in zip(pos, log["tags"], log[TASK_LABELS["interest"]], log[TASK_LABELS["intention"]]):
            if c:
                self.pop.clicked[uid].extend(tags)
            if v:
                self.pop.converted[uid].extend(tags)

    def snapshot(self, k: int) -> pd.DataFrame:
        """Feature rows at the end of day k (k = -1: before the first day) of every user known by then."""
        rng, pop, w, cfg = self.rng, self.pop, self.world, self.cfg
        # users joining tomorrow are known already: they signed up (attributes, no history yet)
        known = np.flatnonzero(pop.joined <= k + 1)
        users = Users(pop.users.ids[known], pop.users.segment[known], pop.users.z_click[known],
                      pop.users.z_conv[known], pop.users.beta[known], pop.users.gamma[known],
                      pop.users.activity[known])
        fields: dict = {"user_id": user_names(users.ids)}
        fields |= {n: v[known] for n, v in pop.basic.items()}
        for name, (space, slot, kind, max_len) in HISTORY_FIELDS.items():
            if kind == "tag":   # the user's own events, most recent first, distinct
                events = pop.clicked if space == "click" else pop.converted
                fields[name] = [list(dict.fromkeys(reversed(events[u])))[:max_len] for u in known]
                continue
            z = users.z_click if space == "click" else users.z_conv
            zf = z[np.arange(len(users)), rng.integers(0, cfg.facets, len(users))] if slot == -2 \
                else z[:, cfg.facet_of_slot(slot)]
            logits = 1.5 * zf @ w.centroids.T / np.sqrt(cfg.latent_dim)                        # [U, C]
            picks = _gumbel_topk(rng, logits, max_len)
            noise = rng.random(picks.shape) < cfg.history_noise
            picks = np.where(noise, rng.integers(0, cfg.categories, picks.shape), picks)
            lengths = np.minimum(max_len, rng.poisson(users.activity * max_len / 3) + 1)
            fields[name] = [row[:n].tolist() for row, n in zip(self.cat_names[picks], lengths)]
        fields |= w.statistics(users, rng)
        return pd.DataFrame(fields)

    def meta(self) -> dict:
        start = parse_day(self.days.start)
        meta = dataset_meta(self.world)
        meta.update(name="synthetic-days", days=[day_name(start + timedelta(days=k)) for k in range(self.days.days)],
                    days_generator=asdict(self.days),
                    tag_days={"born": self.tag_born.tolist(), "retired": self.tag_retired.tolist()})
        return meta


def _write(df: pd.DataFrame, path: Path) -> None:
    """Write under a temporary name, then rename: a file that exists is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    tmp.replace(path)


def generate_days(cfg: SynthConfig, days: DaysConfig, out: str | Path) -> Path:
    """Write the days layout (module docstring) for `days.days` days from `days.start`."""
    out = Path(out)
    dw = DaysWorld(cfg, days)
    start = parse_day(days.start)
    _write(dw.snapshot(-1), out / SNAPSHOTS / f"day={day_name(start - timedelta(days=1))}" / USERS_FILE)
    for k in range(days.days):
        if k:
            dw._advance(k)
        log = dw.day_log(k)
        name = day_name(start + timedelta(days=k))
        _write(log, out / LOGS / f"day={name}" / PART)
        dw._remember(log)
        _write(dw.snapshot(k), out / SNAPSHOTS / f"day={name}" / USERS_FILE)
    (out / "meta.json").write_text(json.dumps(dw.meta(), indent=1))
    return out


# ------------------------------------------------------------------ reading a days directory
class DaysLayout:
    """A days directory: its days, each day's log, the feature snapshot an impression of a day sees."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: not a days directory (write one with `mvke data synth --days D` "
                                    "or `mvke data split --by-time --daily`)")
        self.meta = json.loads(meta_path.read_text())

    def days(self) -> list[str]:
        return sorted(p.name.split("=", 1)[1] for p in (self.root / LOGS).glob("day=*") if p.is_dir())

    def log(self, day: str) -> pd.DataFrame:
        d = self.root / LOGS / f"day={day}"
        parts = sorted(d.glob("*.parquet"))
        if not parts:
            raise FileNotFoundError(f"{d}: no log for day {day}")
        return pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)

    def features_for(self, day: str) -> tuple[pd.DataFrame, int | None]:
        """The feature rows impressions of `day` are joined with, and the time they are as of:
        the snapshot at the end of the day before (None when only a root users.parquet exists)."""
        snap = self.root / SNAPSHOTS / f"day={previous(day)}" / USERS_FILE
        if snap.exists():
            return pq.read_table(snap).to_pandas(), day_start(parse_day(day))
        root_users = self.root / USERS_FILE
        if root_users.exists():
            return pq.read_table(root_users).to_pandas(), None
        raise FileNotFoundError(f"{snap}: no feature snapshot for the day before {day}")

    def window(self, day: str, size: int) -> list[str]:
        """The last `size` days before `day` that have a log."""
        return [d for d in self.days() if d < day][-size:]

    def tags_in(self, days: list[str]) -> list[str]:
        """The catalogue's tags that appear in the logs of `days`, in catalogue order."""
        seen: set[str] = set()
        for d in days:
            for ts in self.log(d)["tags"]:
                seen.update(ts)
        return [t for t in self.meta["tags"] if t in seen]


@dataclass
class DaysView:
    """The sample format of mvke/data/dataset.py over some days: each day's rows with the user
    fields of the snapshot they may see. Nothing is copied to disk; `frames` hold each day once."""

    layout: DaysLayout
    days: list[str]
    frames: list[tuple[pd.DataFrame, pd.DataFrame]]   # per day: (log, feature rows joined to it)

    @property
    def rows(self) -> pd.DataFrame:
        return pd.concat([log for log, _ in self.frames], ignore_index=True)

    def dataset(self, tags: list[str]) -> RawDataset:
        """A RawDataset over these days with the catalogue `tags` (users: the first day's snapshot)."""
        meta = {**self.layout.meta, "tags": list(tags)}
        rows = self.rows
        users = pd.concat([u for _, u in self.frames], ignore_index=True)
        return RawDataset(self.layout.root, meta, rows, rows.iloc[:0], users)

    def encode(self, schema: FeatureSchema, tags: list[str]) -> EncodedSplit:
        """Day by day: each user encoded once per snapshot, then gathered per row (encode_split)."""
        meta = {**self.layout.meta, "tags": list(tags)}
        parts = [encode_split(RawDataset(self.layout.root, meta, log, log, users), log, schema)
                 for log, users in self.frames]
        return concat_splits(parts)


def view(layout: DaysLayout, days: list[str]) -> DaysView:
    frames = []
    for d in days:
        users, _ = layout.features_for(d)
        frames.append((layout.log(d), users))
    return DaysView(layout, list(days), frames)


def concat_splits(parts: list[EncodedSplit]) -> EncodedSplit:
    probs = None if any(p.true_probs is None for p in parts) else np.concatenate([p.true_probs for p in parts])
    return EncodedSplit(np.concatenate([p.cat_ids for p in parts]), np.concatenate([p.multi_ids for p in parts]),
                        np.concatenate([p.tag_ids for p in parts]), np.concatenate([p.labels for p in parts]),
                        probs, np.concatenate([p.user_ids for p in parts]))


def grow_schema(old: FeatureSchema, new: FeatureSchema) -> FeatureSchema:
    """Warm start: every field keeps its known values (in their order) and appends the new ones
    (sorted), so a known value keeps its place within its field; `id_map` moves the ids."""
    fields = []
    for f in old.fields:
        known = set(f.vocab)
        extra = sorted(v for v in new.fields[new.position[f.name]].vocab if v not in known) \
            if f.name in new.position else []
        fields.append(FieldSpec(f.name, f.kind, f.max_len, list(f.vocab) + extra))
    return FeatureSchema(fields)


def id_map(old: FeatureSchema, grown: FeatureSchema) -> np.ndarray:
    """[old.num_ids] -> id in `grown` of the same (field, value) or the same field's OOV id; 0 -> 0."""
    out = np.zeros(old.num_ids, np.int64)
    for i, f in enumerate(old.fields):
        g = grown.position[f.name]
        out[old.offsets[i]] = grown.offsets[g]
        for v, oid in old.value_ids[i].items():
            out[oid] = grown.value_ids[g][v]
    return out


def grow_tags(old: list[str], new: list[str]) -> list[str]:
    """Known tags keep their ids (positions), new ones are appended in the order given."""
    known = set(old)
    return list(old) + [t for t in new if t not in known]


__all__ = [
    "BASIC_FIELDS",
    "STAT_FIELDS",
    "DaysConfig",
    "DaysLayout",
    "DaysView",
    "DaysWorld",
    "concat_splits",
    "day_name",
    "day_start",
    "generate_days",
    "grow_schema",
    "grow_tags",
    "id_map",
    "parse_day",
    "previous",
    "view",
]
