"""Applying user events (mvke/runtime/events.py, event_apply.py) on a real redis-server: idempotency,
out-of-order events, history caps, cold start, the duplicate horizon, batch reloads, cluster slots,
and the Lua script against the batch derivation `fold_user` field by field."""
from __future__ import annotations

import random

import pytest

from mvke.runtime.event_apply import EventApplier, call_groups
from mvke.runtime.events import (
    EVENT_AT_FIELD,
    LOADED_AT_FIELD,
    Event,
    EventError,
    EventRules,
    feature_age_s,
    fold_user,
    log_row_events,
    order_key,
    parse_event,
)
from mvke.runtime.keys import Keys
from mvke.runtime.native_apply import module_path

RULES = EventRules.from_dict({
    "histories": [{"field": "clicked_tags", "on": ["click"]},
                  {"field": "converted_tags", "on": ["conversion"], "distinct": True},
                  {"field": "seen_categories", "on": ["impression"], "from": "category", "max_len": 2},
                  {"field": "clicked_back", "on": ["click"], "distinct": True, "within_event": "reversed",
                   "max_len": 5}],
    "counters": [{"field": "impressions_n", "on": ["impression"]}, {"field": "clicks_n", "on": ["click"]}],
    "buckets": [{"field": "clicks_bucket", "count": "clicks_n", "edges": [0, 1, 3]},
                {"field": "avg_ctr_bucket", "rate": ["clicks_n", "impressions_n"], "edges": [0.1, 0.3, 0.5]}],
    "dedup_ids": 256}, max_lens={"clicked_tags": 4, "converted_tags": 3})


@pytest.fixture(params=["function", "native"])
def apply_mode(request) -> str:
    """The tests of what an apply writes run with the Lua function and with the compiled MVKE.APPLY
    (the test Redis loads it: mvke/localredis.py; where no C compiler built it, the function only)."""
    if request.param == "native" and module_path() is None:
        pytest.skip("no C compiler: MVKE.APPLY not built")
    return request.param


def ev(i, user="u1", ts=1000, kind="click", tags=("t1",), **lists) -> Event:
    return Event(f"e{i}", user, ts, kind, {"tags": list(tags), **{k: list(v) for k, v in lists.items()}})


def stored(r, user="u1", keys=Keys()) -> dict:
    """The user's feature values (the bookkeeping fields `_loaded_at`/`_event_at` left out)."""
    return {k.decode(): v.decode() for k, v in r.hgetall(keys.user(user)).items() if not k.startswith(b"_")}


def random_events(n: int, users: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    return [Event(f"e{i}", f"u{rng.randrange(users)}", 1000 + rng.randrange(200),
                  rng.choice(("impression", "click", "conversion")),
                  {"tags": [f"t{rng.randrange(9)}" for _ in range(rng.randrange(1, 4))],
                   "category": [f"c{rng.randrange(4)}"]}) for i in range(n)]


def test_rules_from_meta_and_bad_rules():
    assert RULES.histories[0].max_len == 4 and RULES.histories[2].max_len == 2
    assert RULES.counter_fields == ["impressions_n", "clicks_n"]
    with pytest.raises(ValueError, match="counters"):
        EventRules.from_dict({"buckets": [{"field": "b", "count": "nope", "edges": [1]}]})
    with pytest.raises(ValueError, match="on"):
        EventRules.from_dict({"histories": [{"field": "h", "on": ["view"]}]})
    with pytest.raises(ValueError, match="events"):
        EventRules.from_meta({"fields": {}})


@pytest.mark.parametrize("doc, field", [
    ({"user_id": "u", "ts": 1, "type": "click"}, "event_id"),
    ({"event_id": "e", "user_id": "u{1}", "ts": 1, "type": "click"}, "user_id"),
    ({"event_id": "e", "user_id": "u", "ts": "1", "type": "click"}, "ts"),
    ({"event_id": "e", "user_id": "u", "ts": True, "type": "click"}, "ts"),
    ({"event_id": "e", "user_id": "u", "ts": 1, "type": "view"}, "type"),
    ({"event_id": "e", "user_id": "u", "ts": 1, "type": "click", "tags": "t1"}, "tags"),
    ({"event_id": "e", "user_id": "u", "ts": 1, "type": "click", "tags": ["a|b"]}, "tags.0"),
    ({"event_id": "e", "user_id": "u", "ts": 1, "type": "click", "colour": 1}, "colour"),
    ([1, 2], "event"),
])
def test_parse_event_names_the_field(doc, field):
    with pytest.raises(EventError) as e:
        parse_event(doc)
    assert e.value.field == field


def test_parse_event_round_trip():
    e = ev(1, category=["c1"])
    assert parse_event(__import__("json").loads(e.to_json())) == e
    assert order_key(5, "a") // 1_000_000 == 5


def test_lua_matches_batch_fold_in_any_order(redis_client, apply_mode):
    """Shuffled, in uneven batches, every event sent twice: the hashes equal the batch derivation."""
    events = random_events(400, users=6, seed=1)
    applier = EventApplier(redis_client, Keys(), RULES, apply=apply_mode)
    shuffled = events[:]
    random.Random(2).shuffle(shuffled)
    total = 0
    for i in range(0, len(shuffled), 37):
        counts = applier.apply(shuffled[i:i + 37])
        assert not counts.failed
        total += counts.applied
    assert total == len(events)
    again = applier.apply(events)
    assert (again.applied, again.duplicate) == (0, len(events))
    for u in range(6):
        want = fold_user(None, [e for e in events if e.user_id == f"u{u}"], RULES)
        assert stored(redis_client, f"u{u}") == want


def test_call_groups_bound_users_and_events_per_call():
    """--users-per-call 16: 16 users a call, fewer where their events reach 32 (a call blocks Redis); a heavy
    user is not split."""
    def sizes(counts):
        groups = {f"u{i}": [None] * n for i, n in enumerate(counts)}
        return [len(g) for g in call_groups(list(groups), groups, 16)]
    assert sizes([1] * 40) == [16, 16, 8]
    assert sizes([1, 1, 500, 1, 1]) == [3, 2]
    assert sizes([10] * 7) == [4, 3]
    assert sizes([]) == []
    groups = {f"u{i}": [None] for i in range(5)}
    assert [len(g) for g in call_groups(list(groups), groups, 2)] == [2, 2, 1]
    with pytest.raises(ValueError, match="users_per_call"):
        EventApplier(None, Keys(), RULES, users_per_call=0)


def test_users_grouped_in_one_call_match_one_call_each_and_fail_alone(redis_client):
    """`--users-per-call 16`: `_many` runs groups of users per call, with the same hashes and counts as one
    call per user (the default, and the cluster path here through a plain pipeline); a user whose key holds another type fails
    alone, in the middle of a group, without its neighbours' events counted twice or lost."""
    events = random_events(120, users=40, seed=11)       # ~3 per user: groups of ~10 users
    grouped, each = Keys("grouped"), Keys("each")
    for k in (grouped, each):
        redis_client.set(k.user("u17"), "not a hash")
    a, b = EventApplier(redis_client, grouped, RULES, users_per_call=16), EventApplier(redis_client, each, RULES)
    b.cluster = True          # the cluster path, through a plain pipeline
    c = EventApplier(redis_client, Keys("one"), RULES)     # the default: one call per user, through send_raw
    redis_client.set(Keys("one").user("u17"), "not a hash")
    bad = sum(e.user_id == "u17" for e in events)
    for applier in (a, b, c):
        counts = applier.apply(events)
        assert counts.applied == len(events) - bad and counts.duplicate == 0
        assert len(counts.failed) == bad and all("WRONGTYPE" in why for _, why in counts.failed)
        again = applier.apply(events)
        assert (again.applied, again.duplicate, len(again.failed)) == (0, len(events) - bad, bad)
    users = {e.user_id for e in events} - {"u17"}
    assert len(users) > 30
    for u in users:
        assert stored(redis_client, u, grouped) == stored(redis_client, u, each) == stored(redis_client, u, Keys("one")) != {}


def test_lua_in_time_order_with_late_ones_matches_batch_fold(redis_client, apply_mode):
    """Mostly in time order (the function's fast path: the values go in front of the stored text)
    with every 7th event held back and sent late (the general insert, which must read the order keys
    the fast path wrote), over batch-loaded values that have no order keys: equal to the fold."""
    events = sorted(random_events(600, users=4, seed=7), key=lambda e: e.order)
    base = {"clicked_tags": "p|q|r", "converted_tags": "t1|p", "clicked_back": "x|t2", LOADED_AT_FIELD: "5.0"}
    keys = Keys("inorder")
    for u in range(4):
        redis_client.hset(keys.user(f"u{u}"), mapping=base)
    applier = EventApplier(redis_client, keys, RULES, apply=apply_mode)
    held: list[Event] = []
    for i, e in enumerate(events):
        if i % 7 == 0:
            held.append(e)
        else:
            assert applier.apply([e]).applied == 1
        if i % 50 == 49:                  # the held-back ones, now behind newer entries
            assert applier.apply(held).applied == len(held)
            held = []
    assert applier.apply(held).applied == len(held)
    for u in range(4):
        mine = [e for e in events if e.user_id == f"u{u}"]
        want = fold_user({k: v for k, v in base.items() if not k.startswith("_")}, mine, RULES)
        assert stored(redis_client, f"u{u}", keys) == want


def test_a_batch_history_far_over_the_cap_is_cut_by_the_first_event(redis_client, apply_mode):
    """Batch data need not respect the events' caps: the first event cuts 3,000 entries to 4 (the fast
    path's tail cut is linear; an end-anchored pattern took seconds here, blocking Redis)."""
    keys = Keys("overcap")
    base = {"clicked_tags": "|".join(f"v{i}" for i in range(3000))}
    redis_client.hset(keys.user("u1"), mapping={**base, LOADED_AT_FIELD: "5.0"})
    assert EventApplier(redis_client, keys, RULES, apply=apply_mode).apply([ev(1, ts=1000, tags=("x", "y"))]).applied == 1
    got = stored(redis_client, "u1", keys)
    assert got["clicked_tags"] == "x|y|v0|v1" == fold_user(base, [ev(1, ts=1000, tags=("x", "y"))], RULES)["clicked_tags"]


def test_idempotent_same_batch_twice(redis_client, apply_mode):
    applier = EventApplier(redis_client, Keys(), RULES, apply=apply_mode)
    batch = [ev(1, ts=1000), ev(2, ts=1001, kind="impression", category=["c1"]), ev(3, ts=1002, tags=("t2",))]
    first = applier.apply(batch)
    state = stored(redis_client)
    second = applier.apply(batch)
    assert (first.applied, second.applied, second.duplicate) == (3, 0, 3)
    assert stored(redis_client) == state
    assert state["clicks_n"] == "2" and state["clicked_tags"] == "t2|t1"


def test_function_per_rule_set_and_reloaded_when_lost(redis_client):
    """The apply function is loaded once per rule set (two rule sets live side by side); a server that
    lost it (FUNCTION FLUSH, a new master) gets it again and the batch is applied, once."""
    a = EventApplier(redis_client, Keys(), RULES, apply="function")
    other = EventApplier(redis_client, Keys("other"), EventRules.from_dict({"counters": [{"field": "n", "on": ["click"]}]}),
                         apply="function")
    assert a.function != other.function
    assert a.apply([ev(1, ts=1000)]).applied == 1 and other.apply([ev(1, ts=1000)]).applied == 1
    listed = str(redis_client.function_list())        # RESP2 lists or RESP3 maps: the names are in it
    assert a.function in listed and other.function in listed
    redis_client.function_flush()
    counts = a.apply([ev(1, ts=1000), ev(2, ts=1001)])
    assert (counts.applied, counts.duplicate, counts.failed) == (1, 1, [])
    assert stored(redis_client)["clicked_tags"] == "t1|t1"


def test_out_of_order_event_lands_in_place_and_cap_holds(redis_client, apply_mode):
    applier = EventApplier(redis_client, Keys(), RULES, apply=apply_mode)
    applier.apply([ev(i, ts=1000 + 10 * i, tags=(f"t{i}",)) for i in range(4)])    # t3|t2|t1|t0 (cap 4)
    assert stored(redis_client)["clicked_tags"] == "t3|t2|t1|t0"
    applier.apply([ev(9, ts=1015, tags=("late",))])        # between t1 (1010) and t2 (1020)
    assert stored(redis_client)["clicked_tags"] == "t3|t2|late|t1"
    applier.apply([ev(10, ts=999, tags=("older",))])       # older than every kept entry: off the end
    assert stored(redis_client)["clicked_tags"] == "t3|t2|late|t1"
    applier.apply([ev(11, ts=2000, tags=("a", "b"))])      # one event, two tags, in their order
    assert stored(redis_client)["clicked_tags"] == "a|b|t3|t2"
    assert stored(redis_client)["clicked_back"].startswith("b|a|t3|t2")    # within_event: reversed


def test_distinct_history_keeps_the_most_recent(redis_client, apply_mode):
    applier = EventApplier(redis_client, Keys(), RULES, apply=apply_mode)
    applier.apply([ev(1, ts=100, kind="conversion", tags=("x", "y")), ev(2, ts=200, kind="conversion", tags=("z",))])
    applier.apply([ev(3, ts=150, kind="conversion", tags=("x",))])    # x again, later than 100, before z
    assert stored(redis_client)["converted_tags"] == "z|x|y"
    applier.apply([ev(4, ts=50, kind="conversion", tags=("z", "w"))])  # z is newer already; w fits last
    assert stored(redis_client)["converted_tags"] == "z|x|y"


def test_cold_start_creates_the_user_with_counters_and_buckets(redis_client, apply_mode):
    applier = EventApplier(redis_client, Keys(), RULES, apply=apply_mode)
    assert not redis_client.exists(Keys().user("new"))
    applier.apply([ev(1, user="new", kind="impression", category=["c7"]), ev(2, user="new", ts=1001)])
    got = stored(redis_client, "new")
    assert got == {"seen_categories": "c7", "clicked_tags": "t1", "clicked_back": "t1", "impressions_n": "1", "clicks_n": "1",
                   "clicks_bucket": "b1", "avg_ctr_bucket": "b3"}
    raw = redis_client.hgetall(Keys().user("new"))
    assert feature_age_s({k.decode(): v.decode() for k, v in raw.items()}) < 5
    assert LOADED_AT_FIELD.encode() not in raw and EVENT_AT_FIELD.encode() in raw


def test_duplicate_horizon_is_bounded_and_never_double_applies(redis_client, apply_mode):
    rules = EventRules.from_dict({"counters": [{"field": "n", "on": ["click"]}], "dedup_ids": 5})
    applier = EventApplier(redis_client, Keys(), rules, apply=apply_mode)
    applier.apply([ev(i, ts=1000 + i) for i in range(10)])
    assert redis_client.zcard(Keys().user_seen("u1")) == 5
    old = applier.apply([ev(0, ts=1000), ev(99, ts=1001)])      # beyond the horizon: late, not applied
    assert (old.applied, old.late) == (0, 2)
    assert stored(redis_client)["n"] == "10"


def test_batch_reload_resets_the_event_order(redis_client, apply_mode):
    keys = Keys()
    applier = EventApplier(redis_client, keys, RULES, apply=apply_mode)
    applier.apply([ev(1, ts=5000, tags=("a",))])
    redis_client.delete(keys.user("u1"))     # what `mvke features load` does: DEL + HSET with a new stamp
    redis_client.hset(keys.user("u1"), mapping={"clicked_tags": "p|q", LOADED_AT_FIELD: "123.5"})
    applier.apply([ev(2, ts=10, tags=("b",))])   # any event is newer than the batch values
    assert stored(redis_client)["clicked_tags"] == "b|p|q"


def test_fold_is_a_fold():
    """Two days folded one after the other = both days at once (the daily snapshots compose)."""
    events = random_events(300, users=3, seed=5)
    day1, day2 = [e for e in events if e.ts < 1100], [e for e in events if e.ts >= 1100]
    for u in ("u0", "u1", "u2"):
        mine = [e for e in events if e.user_id == u]
        once = fold_user(None, mine, RULES)
        twice = fold_user(fold_user(None, [e for e in day1 if e.user_id == u], RULES),
                          [e for e in day2 if e.user_id == u], RULES)
        assert once == twice


def test_log_rows_become_events():
    row = {"user_id": "u1", "timestamp": 1000, "tags": ["t1", "t2"], "click": 1, "conversion": 0}
    kinds = [e.type for e in log_row_events(row, 7)]
    assert kinds == ["impression", "click"]
    assert log_row_events(row, 7)[1].event_id == "u1:1000:7:click"


@pytest.mark.integration
def test_cluster_one_script_per_user_slot(cluster_client):
    """On a 3-master cluster: the three keys of a user share its slot, users spread over masters."""
    from redis.crc import key_slot
    keys = Keys()
    for u in ("u1", "abc", "user:42"):
        slots = {key_slot(k.encode()) for k in (keys.user(u), keys.user_events(u), keys.user_seen(u))}
        assert len(slots) == 1
    events = random_events(200, users=20, seed=3)
    applier = EventApplier(cluster_client, keys, RULES)
    assert applier.apply(events).applied == 200
    assert applier.apply(events).duplicate == 200
    for u in range(20):
        want = fold_user(None, [e for e in events if e.user_id == f"u{u}"], RULES)
        got = {k.decode(): v.decode() for k, v in cluster_client.hgetall(keys.user(f"u{u}")).items()
               if not k.startswith(b"_")}
        assert got == want


def test_feature_age_counts_from_the_later_of_load_and_event():
    assert feature_age_s({LOADED_AT_FIELD: "100.5", EVENT_AT_FIELD: "200"}, now=250) == 50
    assert feature_age_s({LOADED_AT_FIELD: b"100.5"}, now=250) == 149.5
    assert feature_age_s({"clicked_tags": "a"}, now=250) is None and feature_age_s(None) is None
    assert feature_age_s({LOADED_AT_FIELD: "300"}, now=250) == 0.0      # clocks apart: never negative
