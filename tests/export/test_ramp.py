"""`mvke promote --auto` (model_export/ramp.py): the canary steps 1 -> 10 -> 50 -> promoted while its
live figures stay inside the policy, holds while a step is too young or too small, and is rolled back
on errors or a poor shadow overlap; real Redis, the versions' keys written as `mvke publish` leaves them."""
from __future__ import annotations

import time

import pytest

from model_export.ramp import auto_promote
from mvke.cli import main
from mvke.runtime.keys import Keys
from mvke.training.gate import load_policy

A, B = "a" * 16, "b" * 16
KEYS = Keys()


@pytest.fixture
def two_versions(redis_client):
    """Active A, canary B at 1% (what `mvke cycle` leaves after a passed day)."""
    r = redis_client
    now = time.time()
    for i, v in enumerate((A, B)):
        r.set(KEYS.manifest(v), "{}")
        r.zadd(KEYS.versions, {v: now + i})
        r.sadd(KEYS.stored, v)
    r.set(KEYS.active, A)
    r.set(KEYS.canary, f"{B}:1")
    return r


def _serve(r, version: str, answers: int, errors: int = 0, shadow: tuple[int, float, float] | None = None):
    """What the service adds to the version's live counters."""
    r.hincrby(KEYS.live(version), "answers", answers)
    r.hincrby(KEYS.live(version), "errors", errors)
    if shadow:
        n, jaccard, shift = shadow
        r.hincrby(KEYS.live(version), "shadow_n", n)
        r.hincrbyfloat(KEYS.live(version), "shadow_jaccard_sum", n * jaccard)
        r.hincrbyfloat(KEYS.live(version), "shadow_shift_sum", n * shift)


def test_the_ramp_steps_and_promotes(two_versions):
    r, policy, t = two_versions, load_policy(None), 1_000_000.0
    assert auto_promote(r, KEYS, policy, now=t)["decision"] == "started"
    _serve(r, B, 600, shadow=(300, 0.8, 0.01))
    held = auto_promote(r, KEYS, policy, now=t + 4000)
    assert held["decision"] == "hold" and held["reasons"] == ["600 answers of 1000"]
    _serve(r, B, 600)
    held = auto_promote(r, KEYS, policy, now=t + 60)
    assert held["decision"] == "hold" and "step lasted 60 s" in held["reasons"][0]
    stepped = auto_promote(r, KEYS, policy, now=t + 4000)
    assert (stepped["decision"], stepped["to_percent"]) == ("stepped", 10)
    assert r.get(KEYS.canary).decode() == f"{B}:10"
    # the next step counts from its own start: the 1,200 answers of the first do not carry over
    assert auto_promote(r, KEYS, policy, now=t + 8000)["reasons"] == ["0 answers of 1000"]
    _serve(r, B, 5000)
    assert auto_promote(r, KEYS, policy, now=t + 8000)["to_percent"] == 50
    _serve(r, B, 5000)
    done = auto_promote(r, KEYS, policy, now=t + 12000)
    assert (done["decision"], done["active"], done["previous"]) == ("promoted", B, A)
    assert r.get(KEYS.active).decode() == B and r.get(KEYS.canary) is None and not r.exists(KEYS.ramp)
    assert auto_promote(r, KEYS, policy)["decision"] == "none"


@pytest.mark.parametrize("errors, shadow, reason", [
    (5, None, "error rate 0.0033 > 0.001"),
    (0, (300, 0.05, 0.01), "shadow Jaccard@20 0.050 < 0.1"),
    (0, (300, 0.9, 0.5), "shadow score shift 0.5000 > 0.25"),
])
def test_a_bad_canary_is_rolled_back(two_versions, errors, shadow, reason):
    r, policy = two_versions, load_policy(None)
    auto_promote(r, KEYS, policy, now=0.0)
    _serve(r, B, 1500, errors, shadow)
    out = auto_promote(r, KEYS, policy, now=10.0)   # a bad step rolls back at once, young or not
    assert out["decision"] == "rolled back" and reason in out["reasons"][0]
    assert r.get(KEYS.active).decode() == A and r.get(KEYS.canary) is None
    assert r.zscore(KEYS.versions, B) < 0   # marked rolled back from: never re-activated by a rollback


def test_the_command_exits_1_on_a_rollback(two_versions, redis_server, capsys):
    r = two_versions
    argv = ["promote", "--auto", "--redis", redis_server.url]
    assert main(argv) == 0 and '"decision": "started"' in capsys.readouterr().out
    _serve(r, B, 1000, errors=100)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1 and '"rolled back"' in capsys.readouterr().out
