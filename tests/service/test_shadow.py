"""The canary's shadow on live traffic and the live figures per version (service/shadow.py, issue 23 §2.4):
with a canary published, requests the active version answers produce shadow figures in Redis
(`{prefix}:v<id>:live`) and /metrics, and `mvke promote --auto` steps the ramp on them, or rolls
back under a strict policy. Real redis-server, real ONNX Runtime, real HTTP."""
from __future__ import annotations

import asyncio

import pytest

from model_export.feature_store import load_dataset_users
from model_export.publish import publish
from model_export.ramp import auto_promote
from mvke.runtime.cycle_record import compare_top, read_live
from mvke.runtime.keys import Keys
from mvke.training.gate import parse_policy
from service.metrics import ServiceMetrics
from service.shadow import LiveRecorder
from tests.export.test_publish import make_variant
from tests.service.test_model_retry import _wait as wait_for
from tests.service.test_service import LiveService, _sample, make_settings, user_ids

PREFIX = "sh"
KEYS = Keys(PREFIX)


def test_compare_top_is_by_tag_name():
    a = {"interest": (["x", "y", "z"], [0.9, 0.8, 0.7])}
    b = {"interest": (["y", "x", "w"], [0.6, 0.5, 0.4]), "intention": (["q"], [0.1])}
    jaccard, shift = compare_top(a, b)
    assert jaccard == pytest.approx(2 / 4) and shift == pytest.approx(0.3)   # only the shared task counts
    assert compare_top(a, a) == (1.0, 0.0)


def test_a_full_shadow_queue_drops_and_never_blocks():
    async def run():
        rec = LiveRecorder(None, KEYS, ServiceMetrics(), make_settings("redis://unused", PREFIX, shadow_share=1.0,
                                                                       shadow_queue=2))
        active, canary = object(), object()
        rec.offer(active, canary, [{"u": i} for i in range(5)])     # not started: nobody drains
        rec.offer(active, None, [{"u": 9}])                        # no canary: nothing sampled
        return rec.queue.qsize(), rec.metrics.shadow_dropped._value.get()
    assert asyncio.run(run()) == (2, 3.0)


def test_live_counters_are_added_to_redis_and_kept_while_it_fails(redis_server, redis_client):
    from mvke.runtime.redis_client import connect_async

    async def run(url: str) -> LiveRecorder:
        client = connect_async(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        rec = LiveRecorder(client, KEYS, ServiceMetrics(), make_settings(url, PREFIX))
        rec.count("v1", 3, 1)
        rec.count("v1", 2, 0)
        await rec.flush()
        await client.aclose()
        return rec
    dead = asyncio.run(run("redis://127.0.0.1:9/0"))           # nothing listens: kept for the next flush
    assert (dead.pending["v1"].answers, dead.pending["v1"].errors) == (5, 1)
    assert asyncio.run(run(redis_server.url)).pending == {}
    live = read_live(redis_client, KEYS, "v1")
    assert (live.answers, live.errors, live.shadow_n) == (5, 1, 0)


@pytest.fixture
def ramping(private_redis, bundle, dataset_dir, tmp_path):
    """Active A, canary B (same scores, another id) at 10%, the synthetic users in the store."""
    r = private_redis.client()
    a_dir = bundle("mvke-mt")
    a = publish(a_dir, r, keys=KEYS)["version"]
    b = publish(make_variant(a_dir, tmp_path / "b", 1), r, keys=KEYS, canary_percent=10)["version"]
    load_dataset_users(dataset_dir("synthetic"), r, keys=KEYS, progress=False)
    yield r, a, b, user_ids(dataset_dir("synthetic"), 120, seed=3)
    r.close()


def _serve(s: LiveService, users: list[str], b: str) -> None:
    for u in users:
        assert s.tag(u, {"top_k": 5, "exclude_tags": []}).status_code == 200


def _wait(pred, timeout: float = 10.0):
    return wait_for(pred, timeout, "the condition")


@pytest.mark.integration
def test_shadow_figures_reach_redis_and_metrics_and_drive_the_ramp(ramping, private_redis):
    r, a, b, users = ramping
    lenient = parse_policy({"promotion": {"min_step_seconds": 0, "min_answers": 1, "min_shadow_samples": 5,
                                          "min_shadow_jaccard": 0.9, "max_shadow_shift": 0.01}})
    assert auto_promote(r, KEYS, lenient)["decision"] == "started"
    settings = make_settings(private_redis.url, PREFIX, shadow_share=1.0, live_flush_s=0.05)
    with LiveService(settings) as s:
        _wait(lambda: s.client.get("/readyz").json().get("canary_version") == b)
        _serve(s, users, b)
        # every answer counted for the version that gave it (flushed every 50 ms, after the answers)
        _wait(lambda: read_live(r, KEYS, a).answers + read_live(r, KEYS, b).answers == len(users))
        live_b = _wait(lambda: (lv := read_live(r, KEYS, b)).shadow_n >= 20 and lv)
        live_a = read_live(r, KEYS, a)
        assert live_b.answers >= 1 and live_a.shadow_n == 0
        assert live_a.errors == live_b.errors == 0
        means = live_b.means()
        # B scores as A does (its files scaled: ties at rank 20 may break otherwise): the lists agree
        assert means["jaccard_at_20"] > 0.99 and means["score_shift"] < 1e-3
        assert 0 < means["canary_seconds"] < 1.0
        metrics = s.client.get("/metrics").text
        assert _sample(metrics, "mvke_shadow_jaccard_count", version=b) >= 20
        assert _sample(metrics, "mvke_shadow_seconds_count", version=b) >= 20
        assert _sample(metrics, "mvke_shadow_dropped_total") is not None
        stepped = auto_promote(r, KEYS, lenient)
        assert (stepped["decision"], stepped["to_percent"]) == ("stepped", 50), stepped
        assert stepped["step"]["shadow_n"] >= 20
        # a policy that asks more overlap than any pair of versions can have: the next step rolls back
        strict = parse_policy({"promotion": {"min_step_seconds": 0, "min_answers": 1, "min_shadow_samples": 5,
                                             "min_shadow_jaccard": 1.01}})
        _wait(lambda: s.client.get("/models").json()["canary"]["percent"] == 50)
        before = read_live(r, KEYS, b).shadow_n
        _serve(s, users, b)
        _wait(lambda: read_live(r, KEYS, b).shadow_n >= before + 5)
        out = auto_promote(r, KEYS, strict)
        assert out["decision"] == "rolled back" and "shadow Jaccard@20" in out["reasons"][0]
        assert r.get(KEYS.active).decode() == a and r.get(KEYS.canary) is None
