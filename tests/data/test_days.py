"""A world with days (mvke/data/days.py): layout, point-in-time features, daily changes, the window
view, vocabulary growth, and the guard that the default two-day world stays byte-identical."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mvke.cli import main
from mvke.data.dataset import build_schema, read_table
from mvke.data.days import (
    DaysConfig,
    DaysLayout,
    day_start,
    generate_days,
    grow_schema,
    grow_tags,
    id_map,
    parse_day,
    view,
)
from mvke.data.synthetic import SynthConfig, generate

TINY = {"users": 300, "tags": 60, "ads": 300, "categories": 12, "segments": 4, "seed": 0}
DAYS = DaysConfig(days=4, join_rate=0.1, quiet_rate=0.1, tag_birth=0.2, tag_retire=0.2)


@pytest.fixture(scope="module")
def days_dir(tmp_path_factory) -> Path:
    return generate_days(SynthConfig(**TINY), DAYS, tmp_path_factory.mktemp("days"))


def test_default_two_day_world_is_byte_identical():
    """Guard: the two-day world (and every result computed on it) is what it was before days existed.
    The digest is of the rows' values and meta.json, so a pyarrow upgrade does not move it."""
    d = generate(SynthConfig(users=300, tags=50, ads=200, categories=10, seed=7),
                 Path(pytest.importorskip("tempfile").mkdtemp()), progress=False)
    h = hashlib.sha256()
    for name in ("train", "test", "users"):
        h.update(json.dumps(read_table(d / f"{name}.parquet").to_pylist(), sort_keys=True, default=str).encode())
    h.update((d / "meta.json").read_bytes())
    assert h.hexdigest() == "5268023fc729567c3a30c4689f0a02e319b21c868d1dc31cc07555892479335e"


def test_layout_and_determinism(days_dir, tmp_path):
    layout = DaysLayout(days_dir)
    assert layout.days() == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    assert (days_dir / "snapshots" / "day=2025-12-31" / "users.parquet").exists()
    log = layout.log("2026-01-02")
    assert {"timestamp", "user_id", "ad_id", "tags", "click", "conversion", "p_click", "p_conversion"} <= set(log.columns)
    lo = day_start(parse_day("2026-01-02"))
    assert log["timestamp"].between(lo, lo + 86_399).all()
    again = generate_days(SynthConfig(**TINY), DAYS, tmp_path / "again")
    for day in layout.days():
        pd.testing.assert_frame_equal(layout.log(day), DaysLayout(again).log(day))


def test_days_change_users_tags_and_ads(days_dir):
    layout = DaysLayout(days_dir)
    meta = layout.meta
    users = [set(layout.log(d)["user_id"]) for d in layout.days()]
    assert users[-1] - users[0], "new users join"
    assert users[0] - users[-1], "some users go quiet"
    born, retired = np.array(meta["tag_days"]["born"]), np.array(meta["tag_days"]["retired"])
    for k, day in enumerate(layout.days()):
        seen = {t for ts in layout.log(day)["tags"] for t in ts}
        idx = {meta["tags"].index(t) for t in seen}
        assert all(born[i] <= k < retired[i] for i in idx), f"day {day}: a tag outside its lifetime"
    first, last = set(layout.tags_in(layout.days()[:1])), set(layout.tags_in(layout.days()[-1:]))
    assert last - first and first - last, "tags appear and retire"
    # one vocabulary: histories name the catalogue's tags
    snap = pd.read_parquet(days_dir / "snapshots" / "day=2026-01-03" / "users.parquet")
    assert {t for h in snap["clicked_tags"] for t in h} <= set(meta["tags"])


def _violations(events: pd.DataFrame, snap: pd.DataFrame, as_of: int) -> int:
    """Users whose tag histories name a tag they had not clicked / converted on before `as_of`."""
    bad = 0
    for field, label in (("clicked_tags", "click"), ("converted_tags", "conversion")):
        before = events[(events["timestamp"] < as_of) & (events[label] == 1)]
        known = before.explode("tags").groupby("user_id")["tags"].agg(set)
        for uid, hist in zip(snap["user_id"], snap[field]):
            bad += not set(hist) <= known.get(uid, set())
    return bad


def test_features_are_point_in_time(days_dir):
    """Every impression is joined with features as of its day's start (<= its timestamp), and those
    features use only events before that time; the same check finds the leak of a same-day snapshot."""
    layout = DaysLayout(days_dir)
    events = pd.concat([layout.log(d) for d in layout.days()], ignore_index=True)
    for day in layout.days():
        users, as_of = layout.features_for(day)
        log = layout.log(day)
        assert as_of is not None and (log["timestamp"] >= as_of).all()
        assert set(log["user_id"]) <= set(users["user_id"]), "every impression has a feature row"
        assert _violations(events, users, as_of) == 0, day
    leaky = pd.read_parquet(days_dir / "snapshots" / "day=2026-01-03" / "users.parquet")   # end of the same day
    assert _violations(events, leaky, day_start(parse_day("2026-01-03"))) > 0


def test_window_view_encodes_each_day_with_its_own_snapshot(days_dir):
    layout = DaysLayout(days_dir)
    days = layout.window("2026-01-04", 2)
    assert days == ["2026-01-02", "2026-01-03"]
    v = view(layout, days)
    tags = layout.tags_in(days)
    schema = build_schema(v.dataset(tags))
    split = v.encode(schema, tags)
    assert len(split) == sum(len(layout.log(d)) for d in days)
    # the same user on two days: features of two snapshots (histories grew in between)
    u = v.rows["user_id"].value_counts().index[0]
    rows = np.flatnonzero(split.user_ids == u)
    per_day = [split.multi_ids[rows[v.rows["timestamp"].to_numpy()[rows] < day_start(parse_day(d))]] for d in days[1:]]
    assert len(per_day[0]) and not np.array_equal(split.multi_ids[rows[0]], split.multi_ids[rows[-1]])


def test_grown_vocabularies_keep_known_ids(days_dir):
    layout = DaysLayout(days_dir)
    old_v, new_v = view(layout, ["2026-01-01"]), view(layout, ["2026-01-03"])
    old_tags, new_tags = layout.tags_in(["2026-01-01"]), layout.tags_in(["2026-01-03"])
    old, new = build_schema(old_v.dataset(old_tags)), build_schema(new_v.dataset(new_tags))
    grown = grow_schema(old, new)
    assert grown.num_ids > old.num_ids
    m = id_map(old, grown)
    for i, f in enumerate(old.fields):
        g = grown.fields[grown.position[f.name]]
        assert g.vocab[: len(f.vocab)] == f.vocab
        for value, oid in old.value_ids[i].items():
            assert m[oid] == grown.value_ids[grown.position[f.name]][value]
    tags = grow_tags(old_tags, new_tags)
    assert tags[: len(old_tags)] == old_tags and set(new_tags) <= set(tags)


def test_synth_days_command(tmp_path, capsys):
    assert main(["data", "synth", "--days", "2", "--start", "2026-03-01", "--users", "200", "--tags", "40",
                 "--out", str(tmp_path)]) == 0
    assert DaysLayout(tmp_path).days() == ["2026-03-01", "2026-03-02"]
    assert main(["data", "synth", "--days", "2", "--start", "March", "--out", str(tmp_path / "x")]) == 2
    assert "day must be YYYY-MM-DD" in capsys.readouterr().err


def test_split_daily_writes_the_days_layout(tmp_path, capsys):
    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "own-data"
    assert main(["data", "split", "--by-time", "--daily", str(example / "log.parquet"), "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    layout = DaysLayout(tmp_path)
    log = pd.read_parquet(example / "log.parquet")
    assert layout.days() == report["train_days"] and len(layout.days()) >= 2
    assert sum(len(layout.log(d)) for d in layout.days()) == len(log)
    for d in layout.days():
        lo = day_start(parse_day(d))
        assert layout.log(d)["timestamp"].between(lo, lo + 86_399).all()
    users, as_of = layout.features_for(layout.days()[-1])
    assert as_of is None and set(log["user_id"]) <= set(users["user_id"])   # one row per user: not point-in-time
    tags = layout.tags_in(layout.days()[:1])
    v = view(layout, layout.days()[:1])
    assert len(v.encode(build_schema(v.dataset(tags)), tags)) == len(layout.log(layout.days()[0]))


def test_tag_histories_are_the_event_rules_folded_day_by_day(days_dir):
    """One truth on the days world: each day's end snapshot = the day before's with that day's clicks
    and conversions applied by the event rules (EVENT_RULES, the path of `mvke features stream`)."""
    from mvke.data.days import EVENT_RULES
    from mvke.runtime.events import EventRules, fold_user, log_row_events
    layout = DaysLayout(days_dir)
    rules = EventRules.from_dict(EVENT_RULES)
    fields = [h.field for h in rules.histories]
    assert fields == ["clicked_tags", "converted_tags"]

    def stored(snap: pd.DataFrame) -> dict[str, dict[str, str]]:
        return {u: {f: "|".join(row[f]) for f in fields if len(row[f])} for u, row in
                zip(snap["user_id"], snap[fields].to_dict("records"))}
    for day in layout.days()[1:]:
        before = stored(layout.features_for(day)[0])
        after = stored(pd.read_parquet(days_dir / "snapshots" / f"day={day}" / "users.parquet"))
        events: dict[str, list] = {}
        for i, row in enumerate(layout.log(day).to_dict("records")):
            for e in log_row_events({**row, "tags": list(row["tags"])}, i):
                events.setdefault(e.user_id, []).append(e)
        assert sum(len(v) for v in events.values()) > len(layout.log(day))        # clicks and conversions too
        folded = {u: fold_user(before.get(u, {}), events.get(u, []), rules) for u in after}
        assert folded == after, day
