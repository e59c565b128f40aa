"""The compiled apply (MVKE.APPLY, mvke/runtime/native/mvke_apply.c) against the Lua function it
replaces: the same random batches through both, side by side on one real Redis, must leave the same
user hashes, order keys and id sets, and count the same; plus its fallbacks."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from mvke.localredis import LocalRedis
from mvke.runtime.event_apply import EventApplier
from mvke.runtime.events import LOADED_AT_FIELD, Event, EventRules
from mvke.runtime.keys import Keys
from mvke.runtime.native_apply import module_path
from tests.runtime.test_events import RULES

pytestmark = pytest.mark.skipif(module_path() is None, reason="no C compiler: MVKE.APPLY not built")

SMALL = EventRules.from_dict({       # a short id horizon (late events) and caps of 1-2
    "histories": [{"field": "last_click", "on": ["click"], "max_len": 1},
                  {"field": "conv", "on": ["conversion", "click"], "distinct": True, "max_len": 2,
                   "within_event": "reversed"}],
    "counters": [{"field": "n", "on": ["click", "conversion"]}, {"field": "imp", "on": ["impression"]}],
    "buckets": [{"field": "rate_b", "rate": ["n", "imp"], "edges": [0.25, 1.0]}],
    "dedup_ids": 6})


def state(r, keys: Keys, user: str) -> tuple:
    """Everything an apply writes for one user, the applier's clock (`_event_at`) left out."""
    user_key, ev, seen = keys.user_event_keys(user)
    h = {k: v for k, v in r.hgetall(user_key).items() if k != b"_event_at"}
    return h, r.hgetall(ev), r.zrange(seen, 0, -1, withscores=True), r.ttl(ev) > 0, r.ttl(seen) > 0


def random_batch(rng: random.Random, next_id: list[int], users: int) -> list[Event]:
    events = []
    for _ in range(rng.randrange(1, 12)):
        if next_id[0] and rng.random() < 0.15:           # a duplicate of an earlier id (same content)
            i = rng.randrange(next_id[0])
        else:
            i = next_id[0]
            next_id[0] += 1
        r = random.Random(i)                             # an id's content is a function of the id
        tags = [f"t{r.randrange(6)}" for _ in range(r.randrange(1, 4))]
        events.append(Event(f"e{i}", f"u{r.randrange(users)}", 1000 + r.randrange(300),
                            r.choice(("impression", "click", "conversion")),
                            {"tags": tags, "category": [f"c{r.randrange(3)}"]}))
    return events


@pytest.mark.parametrize("rules", [RULES, SMALL], ids=["rules", "small"])
def test_native_writes_what_the_function_writes(redis_client, rules):
    """300 random batches (duplicates, late and out-of-order events, batch reloads in between):
    after every batch both prefixes hold the same state, and the counts agree."""
    rng = random.Random(5)
    lua, native = Keys("lua"), Keys("nat")
    by_lua = EventApplier(redis_client, lua, rules, apply="function")
    by_native = EventApplier(redis_client, native, rules, apply="native")
    next_id = [0]
    users = [f"u{i}" for i in range(5)]
    for step in range(300):
        if rng.random() < 0.05:                          # `mvke features load` of one user in between
            u = rng.choice(users)
            values = {LOADED_AT_FIELD: f"{step}.5", "clicked_tags": "p|q|r|s|t", "last_click": "z",
                      "conv": "a|b|c", "n": "3", "imp": "x7",       # a counter that is not a number
                      "rate_b": "old", "avg_ctr_bucket": "old"}      # buckets a zero rate must unset
            for keys in (lua, native):
                redis_client.delete(keys.user(u))
                redis_client.hset(keys.user(u), mapping=values)
        batch = random_batch(rng, next_id, len(users))
        a, b = by_lua.apply(batch), by_native.apply(batch)
        assert (a.applied, a.duplicate, a.late, a.failed) == (b.applied, b.duplicate, b.late, b.failed), step
        for u in users:
            assert state(redis_client, lua, u) == state(redis_client, native, u), (step, u)
    assert by_native.native and not by_lua.native


def test_native_fails_one_user_alone(redis_client):
    """A user whose key holds another type fails with the WRONGTYPE error; the others are applied."""
    keys = Keys()
    redis_client.set(keys.user("u1"), "a string")
    applier = EventApplier(redis_client, keys, RULES, apply="native")
    counts = applier.apply([Event("e1", "u1", 1000, "click", {"tags": ["x"]}),
                            Event("e2", "u2", 1000, "click", {"tags": ["x"]})])
    assert counts.applied == 1 and len(counts.failed) == 1
    assert "WRONGTYPE" in counts.failed[0][1]
    assert redis_client.hget(keys.user("u2"), "clicked_tags") == b"x"


def test_auto_takes_the_function_without_the_module_and_native_refuses():
    server = LocalRedis(apply_module=False).start()
    try:
        r = server.client()
        auto = EventApplier(r, Keys(), RULES)
        assert auto.apply([Event("e1", "u1", 1000, "click", {"tags": ["x"]})]).applied == 1
        assert auto.native is False
        with pytest.raises(RuntimeError, match="no MVKE.APPLY"):
            EventApplier(r, Keys(), RULES, apply="native").apply([Event("e2", "u1", 1000, "click", {"tags": ["y"]})])
        r.close()
    finally:
        server.stop()


def test_grouped_calls_keep_the_function(redis_client):
    """`--users-per-call N` > 1 groups users in one `_many` FCALL: the compiled command has no such form."""
    applier = EventApplier(redis_client, Keys(), RULES, users_per_call=4)
    assert applier.apply([Event("e1", "u1", 1000, "click", {"tags": ["x"]})]).applied == 1
    assert applier.native is False


def test_apply_module_command_prints_a_module_a_redis_can_load(tmp_path):
    """`mvke features apply-module` prints the built module; a redis-server given it with --loadmodule
    has MVKE.APPLY. Without a working compiler (CC=false, an empty cache) there is no module: None."""
    import os
    import subprocess
    import sys

    from mvke.runtime.event_apply import server_has_native
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "mvke.cli", "features", "apply-module"], cwd=root,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).is_file() and out.endswith(".so")
    server = LocalRedis(apply_module=False, extra_args=["--loadmodule", out]).start()
    try:
        r = server.client()
        assert server_has_native(r)
        r.close()
    finally:
        server.stop()
    env = {**os.environ, "CC": "false", "XDG_CACHE_HOME": str(tmp_path)}
    probe = subprocess.run([sys.executable, "-c", "from mvke.runtime.native_apply import module_path; "
                            "print(module_path())"], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "None" and "did not build" in probe.stderr
    assert not list(tmp_path.rglob("*.so"))


def test_rules_the_command_cannot_carry_keep_the_function(redis_client):
    """A field name holding the rule text's separators cannot reach MVKE.APPLY: auto runs the function."""
    rules = EventRules.from_dict({"counters": [{"field": "odd\x1fname", "on": ["click"]}]})
    applier = EventApplier(redis_client, Keys(), rules)
    assert applier.apply([Event("e1", "u1", 1000, "click", {"tags": ["x"]})]).applied == 1
    assert applier.native is False
    assert redis_client.hget(Keys().user("u1"), "odd\x1fname") == b"1"


SHARED = EventRules.from_dict({      # two rules counting into one field, as the function's table by name does
    "histories": [{"field": "h", "on": ["click"], "max_len": 4}],
    "counters": [{"field": "n", "on": ["click"]}, {"field": "n", "on": ["conversion"]},
                 {"field": "odd\x00name", "on": ["impression"]}],
    "buckets": [{"field": "n_b", "count": "n", "edges": [1, 4]}]})


def test_shared_counters_nul_names_and_empty_stored_items_match_the_function(redis_client):
    """Found by review: a field counted by two rules, a NUL in a name, a batch-loaded list with an empty
    item (kept as an entry, as the function's in-order path keeps it)."""
    lua, native = Keys("lua"), Keys("nat")
    for keys in (lua, native):
        redis_client.hset(keys.user("u1"), mapping={LOADED_AT_FIELD: "1.5", "h": "a||b", "n": "3"})
    batch = [Event("e1", "u1", 1000, "click", {"tags": ["x"]}), Event("e2", "u1", 1001, "conversion", {"tags": ["y"]}),
             Event("e3", "u1", 1002, "impression", {"tags": ["z"]})]
    a = EventApplier(redis_client, lua, SHARED, apply="function").apply(batch)
    b = EventApplier(redis_client, native, SHARED, apply="native").apply(batch)
    assert (a.applied, b.applied) == (3, 3)
    assert state(redis_client, lua, "u1") == state(redis_client, native, "u1")
    got = redis_client.hgetall(native.user("u1"))
    assert got[b"n"] == b"5" and got[b"h"] == b"x|a||b" and got[b"odd\x00name"] == b"1"


@pytest.mark.parametrize("args, error", [
    (["e1", "1", "click", str(1 << 30)], "count of lists"),        # would read far past the arguments
    (["e1", "1", "click", "-2"], "count of lists"),                # would never move on
    (["e1", "1", "click", "1", "tags"], "count of lists"),
    (["e1", "1", "click", "0", "extra"], "do not add up"),
])
def test_malformed_calls_are_refused_and_redis_lives(redis_client, args, error):
    keys = Keys().user_event_keys("u1")
    with pytest.raises(Exception, match=error):
        redis_client.execute_command("MVKE.APPLY", *keys, RULES.to_native(), 60, "1.0", *args)
    assert redis_client.ping()


@pytest.mark.parametrize("rules", [
    "k",                                                            # no field after the record's kind
    "k\x1f5\x1eb\x1fx\x1fnope\x1f\x1f2\x1f0\x1f1\x1fa\x1fb\x1fc",  # a bucket of an unknown counter
    "k\x1f5\x1eh\x1fh\x1ftags\x1f0\x1f0\x1f0\x1fclick",              # a cap of 0
    "k\x1f5\x1ec\x1fn\x1fclick\x1eb\x1fb\x1fn\x1f\x1f999999\x1f1",  # more edges than the text holds
])
def test_rules_text_that_is_not_rules_is_refused_and_redis_lives(redis_client, rules):
    keys = Keys().user_event_keys("u1")
    with pytest.raises(Exception, match="rules not understood"):
        redis_client.execute_command("MVKE.APPLY", *keys, rules, 60, "1.0", "e1", "1", "click", "0")
    assert redis_client.ping()
