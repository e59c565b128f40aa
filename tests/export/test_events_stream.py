"""The event stream path on real redis-servers: consumers with a group, dead letters, a consumer
killed with SIGKILL between applying and acknowledging, Redis killed and restarted with AOF, and
the one truth: a day's log replayed onto the previous day's snapshot = `mvke features load` of the
next day's snapshot, field by field."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model_export.events_job import read_events, replay
from model_export.features_job import FeaturesLoadConfig, load_features
from mvke.localredis import LocalRedis
from mvke.runtime.event_stream import GROUP, StreamConsumer, publish_events
from mvke.runtime.events import EventRules, feature_age_s, fold_user, log_row_events
from mvke.runtime.keys import Keys

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"age_bucket": "cat", "clicked_tags": "multi", "converted_tags": "multi", "clicks_bucket": "cat",
          "avg_ctr_bucket": "cat"}
EVENTS = {"histories": [{"field": "clicked_tags", "on": ["click"]},
                        {"field": "converted_tags", "on": ["conversion"], "distinct": True}],
          "counters": [{"field": "impressions_n", "on": ["impression"]}, {"field": "clicks_n", "on": ["click"]}],
          "buckets": [{"field": "clicks_bucket", "count": "clicks_n", "edges": [0, 2, 5, 10]},
                      {"field": "avg_ctr_bucket", "rate": ["clicks_n", "impressions_n"], "edges": [0.2, 0.4]}]}
META = {"name": "events-world", "fields": FIELDS, "max_lens": {"clicked_tags": 5, "converted_tags": 3},
        "tags": [f"t{i}" for i in range(12)], "events": EVENTS}
RULES = EventRules.from_meta(META)
DAY = 86_400


def day_log(day: int, users: int, rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        click = rng.random() < 0.4
        out.append({"user_id": f"u{rng.randrange(users)}", "timestamp": day * DAY + rng.randrange(DAY),
                    "tags": [f"t{rng.randrange(12)}" for _ in range(rng.randrange(1, 4))],
                    "click": int(click), "conversion": int(click and rng.random() < 0.4)})
    return out


def snapshot(base: dict[str, dict], log: list[dict], users: int, first_row: int = 0) -> dict[str, dict]:
    """The batch job: each user's values after the log (the log's rows -> events -> fold_user)."""
    events = [e for i, row in enumerate(log) for e in log_row_events(row, first_row + i)]
    out = {}
    for u in (f"u{i}" for i in range(users)):
        out[u] = fold_user(base.get(u, {"age_bucket": f"age{int(u[1:]) % 3}"}),
                           [e for e in events if e.user_id == u], RULES)
    return out


def write_dataset(path: Path, snap: dict[str, dict]) -> Path:
    """users.parquet (lists for multi fields, strings otherwise) + meta.json, as `mvke features load` reads."""
    path.mkdir(parents=True, exist_ok=True)
    cols = {"user_id": list(snap)}
    for name in [*FIELDS, *RULES.counter_fields]:
        multi = FIELDS.get(name) == "multi"
        cols[name] = [(v.get(name).split("|") if v.get(name) else None) if multi else v.get(name)
                      for v in snap.values()]
    pq.write_table(pa.table(cols), path / "users.parquet")
    (path / "meta.json").write_text(json.dumps(META))
    return path


def write_log(path: Path, log: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(log), path)
    return path


def user_values(r, prefix: str, users: int) -> dict[str, dict]:
    keys = Keys(prefix)
    return {f"u{i}": {k.decode(): v.decode() for k, v in r.hgetall(keys.user(f"u{i}")).items()
                      if not k.startswith(b"_")} for i in range(users)}


def load(path: Path, url: str, prefix: str) -> None:
    report = load_features(FeaturesLoadConfig(str(path), redis_url=url, key_prefix=prefix, workers=1,
                                              progress=False))
    assert report.rejected == 0


@pytest.mark.integration
def test_one_truth_replay_onto_yesterday_equals_todays_load(redis_server, tmp_path):
    """Day 1 snapshot + day 2's log as events (through the stream, out of order, twice) == day 2 snapshot."""
    users = 30
    log1, log2 = day_log(1, users, 400, seed=1), day_log(2, users, 400, seed=2)
    day1 = snapshot({}, log1, users)
    day2 = snapshot(day1, log2, users)
    assert day1 != day2
    r = redis_server.client()
    r.flushdb()
    load(write_dataset(tmp_path / "day2", day2), redis_server.url, "want")
    load(write_dataset(tmp_path / "day1", day1), redis_server.url, "got")
    events = read_events(write_log(tmp_path / "day2.parquet", log2))
    random.Random(0).shuffle(events)
    keys = Keys("got")
    publish_events(r, keys, events, partitions=4)
    publish_events(r, keys, events[:100], partitions=4)          # a producer's retry: duplicates
    stats = StreamConsumer(r, keys, RULES, partitions=4, batch=64, block_ms=10).run(max_idle_s=0.3)
    assert (stats.applied, stats.duplicate, stats.dead) == (len(events), 100, 0)
    got, want = user_values(r, "got", users), user_values(r, "want", users)
    stamps = r.hgetall(Keys("got").user("u0"))
    assert feature_age_s({k.decode(): v.decode() for k, v in stamps.items()}) < 60   # _loaded_at and _event_at
    for u in want:
        assert got[u] == want[u], u
    assert got == day2   # and what the load wrote is exactly the batch derivation
    r.flushdb()


@pytest.mark.integration
def test_dead_letters_carry_the_reason_and_the_consumer_goes_on(redis_client):
    keys = Keys()
    good = log_row_events({"user_id": "u1", "timestamp": 5, "tags": ["t1"], "click": 1, "conversion": 0}, 0)
    publish_events(redis_client, keys, good, partitions=2)
    redis_client.xadd(keys.events_stream(0), {"e": "{not json"})
    redis_client.xadd(keys.events_stream(1), {"e": json.dumps({"event_id": "x", "user_id": "u2", "ts": 1,
                                                               "type": "view"})})
    redis_client.xadd(keys.events_stream(1), {"other": "1"})
    stats = StreamConsumer(redis_client, keys, RULES, partitions=2, block_ms=10).run(max_idle_s=0.2)
    assert (stats.applied, stats.dead) == (2, 3)
    dead = [f for _, f in redis_client.xrange(keys.events_dead)]
    reasons = sorted(f[b"reason"].decode() for f in dead)
    assert any(x.startswith("event: not JSON") for x in reasons)
    assert "type: must be one of impression, click, conversion, got 'view'" in reasons
    assert any("no `e` field" in x for x in reasons)
    for p in range(2):   # everything acknowledged, nothing pending
        assert redis_client.xpending(keys.events_stream(p), GROUP)["pending"] == 0


def _consumer(url: str, rules: Path, name: str, extra_env: dict | None = None, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "mvke.cli", "features", "stream", "--redis", url,
                             "--rules", str(rules), "--partitions", "2", "--name", name, "--batch", "50",
                             "--block-ms", "20", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


@pytest.mark.integration
@pytest.mark.slow
def test_consumer_killed_mid_batch_loses_nothing_applies_once(redis_server, tmp_path):
    """SIGKILL between apply and XACK; a second consumer claims the pending entries (XAUTOCLAIM), applies
    them again (duplicates: no change) and the result equals applying every event once."""
    r = redis_server.client()
    r.flushdb()
    rules = tmp_path / "meta.json"
    rules.write_text(json.dumps(META))
    log = day_log(1, 20, 300, seed=7)
    events = [e for i, row in enumerate(log) for e in log_row_events(row, i)]
    publish_events(r, Keys(), events, partitions=2)
    victim = _consumer(redis_server.url, rules, "victim", {"MVKE_EVENTS_PAUSE_BEFORE_ACK_S": "30"})
    try:
        line = victim.stdout.readline()
        assert "pausing before XACK" in line, victim.stderr.read() if victim.poll() is not None else line
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        victim.kill()
    pending = sum(r.xpending(Keys().events_stream(p), GROUP)["pending"] for p in range(2))
    assert pending > 0
    heir = _consumer(redis_server.url, rules, "heir", None, "--claim-idle-ms", "100", "--max-idle-s", "1.5")
    out, err = heir.communicate(timeout=60)
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["claimed"] == pending and stats["dead"] == 0
    # the victim applied the claimed entries before it died: for the heir they are duplicates
    assert (stats["duplicate"], stats["applied"]) == (pending, len(events) - pending)
    assert sum(r.xpending(Keys().events_stream(p), GROUP)["pending"] for p in range(2)) == 0
    # compared with a plain replay of every event once, on a fresh prefix
    replay(events, "apply", client=r, keys=Keys("ref"), rules=RULES)
    assert user_values(r, "mvke", 20) == user_values(r, "ref", 20)
    r.flushdb()


@pytest.mark.integration
def test_redis_killed_with_aof_loses_no_acknowledged_event(tmp_path):
    """appendfsync always: every XADD acknowledged before a SIGKILL of redis-server is there after restart."""
    server = LocalRedis(data_dir=tmp_path / "aof", extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    try:
        r = server.client()
        log = day_log(1, 10, 120, seed=3)
        events = [e for i, row in enumerate(log) for e in log_row_events(row, i)]
        publish_events(r, Keys(), events, partitions=2)      # acknowledged
        r.close()
        server.kill()
        server.start()
        r = server.client()
        assert sum(r.xlen(Keys().events_stream(p)) for p in range(2)) == len(events)
        stats = StreamConsumer(r, Keys(), RULES, partitions=2, block_ms=10).run(max_idle_s=0.2)
        assert stats.applied == len(events)
        got = user_values(r, "mvke", 10)
        assert got == {u: fold_user(None, [e for e in events if e.user_id == u], RULES) for u in got}
        r.close()
    finally:
        server.stop()


@pytest.mark.integration
def test_max_rate_paces_the_consumer_and_applies_everything(redis_client):
    """--max-rate: 600 events at 2,000/s take at least 0.3 s minus the first batch's share (batches of 100 are
    paid for after they are applied); unpaced, the same events are not held back at all."""
    import time
    keys = Keys()
    events = [e for i in range(300) for e in log_row_events(
        {"user_id": f"r{i % 50}", "timestamp": 10 + i, "tags": ["t1"], "click": 1, "conversion": 0}, i)][:600]
    publish_events(redis_client, keys, events, partitions=2)
    consumer = StreamConsumer(redis_client, keys, RULES, partitions=2, batch=50, block_ms=10, max_rate=2000)
    t0 = time.monotonic()
    stats = consumer.run(max_events=len(events))
    took = time.monotonic() - t0
    assert stats.applied == len(events) and stats.dead == 0
    assert took >= (len(events) - 100) / 2000, took


@pytest.mark.integration
def test_an_entry_that_is_not_utf8_is_a_dead_letter_with_its_bytes_escaped(redis_client):
    keys = Keys()
    redis_client.xadd(keys.events_stream(0), {"e": b"\xff\xfe{"})
    good = log_row_events({"user_id": "u9", "timestamp": 5, "tags": ["t1"], "click": 0, "conversion": 0}, 0)
    publish_events(redis_client, keys, good, partitions=2)
    stats = StreamConsumer(redis_client, keys, RULES, partitions=2, block_ms=10).run(max_idle_s=0.2)
    assert (stats.applied, stats.dead) == (1, 1)
    (_, dead), = redis_client.xrange(keys.events_dead)
    assert dead[b"event"] == b"\\xff\\xfe{" and dead[b"reason"].startswith(b"event: not JSON")
