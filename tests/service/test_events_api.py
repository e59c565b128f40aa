"""POST /events (issue 22): API key, 202 counts with reasons, a strict envelope, 503 without Redis,
and a click on new tags changing the user's next answer once a stream consumer applied it.

Real redis-server (private), real ONNX Runtime, real HTTP; fixtures from test_service.py.
"""
from __future__ import annotations

import json
import time

import pytest

from mvke.localredis import LocalRedis
from mvke.runtime.event_stream import GROUP, StreamConsumer
from mvke.runtime.events import EventRules
from mvke.runtime.keys import Keys
from tests.service.test_service import (LiveService, make_settings, published, stored_row, svc_r,  # noqa: F401
                                        svc_redis, synth_user, user_ids)

KEY = "events-key"
AUTH = {"x-api-key": KEY}


def click(i: int, user: str, tags: list[str], ts: int = 1_800_000_000) -> dict:
    return {"event_id": f"click-{i}", "user_id": user, "ts": ts + i, "type": "click", "tags": tags}


@pytest.fixture(scope="module")
def events_svc(svc_redis, published):
    prefix = published("mvke-mt", "synthetic")
    with LiveService(make_settings(svc_redis.url, prefix, api_keys=KEY, event_partitions=2,
                                   max_events_batch=50)) as s:
        yield s, Keys(prefix)


def test_events_need_the_api_key(events_svc, synth_user):
    s, _ = events_svc
    body = {"events": [click(0, synth_user, ["t0001"])]}
    assert s.client.post("/events", json=body).status_code == 401
    assert s.client.post("/events", json=body, headers={"authorization": "Bearer wrong"}).status_code == 401


def test_counts_and_reasons(events_svc, svc_r, synth_user):
    s, keys = events_svc
    events = [click(1, synth_user, ["t0001"]), click(1, synth_user, ["t0001"]),        # repeated id
              {"event_id": "bad-1", "user_id": synth_user, "ts": "yesterday", "type": "click"},
              {"event_id": "bad-2", "user_id": synth_user, "ts": 5, "type": "view"},
              {"user_id": synth_user, "ts": 5, "type": "click"}]
    before = sum(svc_r.xlen(keys.events_stream(p)) for p in range(2))
    resp = s.client.post("/events", json={"events": events}, headers=AUTH)
    assert resp.status_code == 202, resp.text
    doc = resp.json()
    assert (doc["accepted"], doc["duplicate"], doc["rejected"]) == (1, 1, 3)
    assert [(r["index"], r["field"]) for r in doc["rejections"]] == [
        (2, "events.2.ts"), (3, "events.3.type"), (4, "events.4.event_id")]
    assert doc["rejections"][1]["event_id"] == "bad-2" and "click" in doc["rejections"][1]["reason"]
    assert sum(svc_r.xlen(keys.events_stream(p)) for p in range(2)) == before + 1


@pytest.mark.parametrize("body, field", [
    ({}, "events"), ({"events": []}, "events"), ({"events": "x"}, "events"), ({"events": [], "x": 1}, "events"),
    ({"events": [click(i, "u", ["t"]) for i in range(51)]}, "events"),
])
def test_bad_envelope_is_422_naming_the_field(events_svc, body, field):
    s, _ = events_svc
    resp = s.client.post("/events", json=body, headers=AUTH)
    assert resp.status_code == 422, resp.text
    assert resp.json()["field"] == field


def test_a_click_on_new_tags_changes_the_next_answer(events_svc, svc_r, dataset_dir, synth_user):
    """The user's clicked_tags grows by tags it never clicked; after the consumer applies the events
    the next POST /users/{id}/tags answers differently (and the history holds the new tags first)."""
    s, keys = events_svc
    meta = json.loads((dataset_dir("synthetic") / "meta.json").read_text())
    rules = EventRules.from_dict({"histories": [{"field": "clicked_tags", "on": ["click"]}]}, meta["max_lens"])
    had = stored_row(svc_r, synth_user, keys.prefix).get("clicked_tags") or []
    had = had.split("|") if isinstance(had, str) else list(had)
    # values the served model knows for clicked_tags (its vocabulary), none of them in the user's history
    from mvke.runtime.contract import Manifest
    manifest = Manifest.from_json(svc_r.get(keys.manifest(svc_r.get(keys.active).decode())))
    known = next(f["vocab"] for f in manifest.features["fields"] if f["name"] == "clicked_tags")
    vocab = [t for t in known if t not in had][:6]
    before = s.client.post(f"/users/{synth_user}/tags", json={"top_k": 10}, headers=AUTH).json()
    resp = s.client.post("/events", json={"events": [click(100 + i, synth_user, [t]) for i, t in enumerate(vocab)]},
                         headers=AUTH)
    assert resp.json()["accepted"] == len(vocab)
    stats = StreamConsumer(svc_r, keys, rules, partitions=2, block_ms=10).run(max_idle_s=0.2)
    assert stats.applied >= len(vocab) and stats.dead == 0
    history = svc_r.hget(keys.user(synth_user), "clicked_tags").decode().split("|")
    assert history[:len(vocab)] == vocab[::-1]          # newest first
    after = s.client.post(f"/users/{synth_user}/tags", json={"top_k": 10}, headers=AUTH).json()
    assert after["tasks"] != before["tasks"]
    for p in range(2):
        assert svc_r.xpending(keys.events_stream(p), GROUP)["pending"] == 0


def test_redis_down_is_503(published, synth_user):
    server = LocalRedis().start()
    try:
        with LiveService(make_settings(server.url, "nothing-here", event_partitions=2)) as s:
            server.stop()
            resp = s.client.post("/events", json={"events": [click(0, synth_user, ["t0001"])]})
            assert resp.status_code == 503, resp.text
            assert "redis" in resp.json()["detail"]
    finally:
        server.stop()


def test_feature_age_and_stale_in_answers_and_metrics(svc_redis, svc_r, published, synth_user):
    """Off by default; with MVKE_MAX_FEATURE_AGE_S the answer carries the age and `stale`, and an applied
    event makes the features young again. /metrics observes the age either way."""
    prefix = published("mvke-mt", "synthetic")
    keys = Keys(prefix)
    svc_r.hset(keys.user(synth_user), "_loaded_at", f"{time.time() - 7200:.6f}")    # loaded two hours ago
    svc_r.hdel(keys.user(synth_user), "_event_at")
    with LiveService(make_settings(svc_redis.url, prefix)) as plain:
        doc = plain.client.post(f"/users/{synth_user}/tags", json={"top_k": 1}).json()
        assert "feature_age_s" not in doc and "stale" not in doc
        metrics = plain.client.get("/metrics").text
        assert "mvke_feature_age_seconds_count 1.0" in metrics
        assert 'mvke_feature_age_seconds_bucket{le="3600.0"} 0.0' in metrics
    with LiveService(make_settings(svc_redis.url, prefix, max_feature_age_s=3600, event_partitions=2)) as s:
        doc = s.client.post(f"/users/{synth_user}/tags", json={"top_k": 1}).json()
        assert 7190 < doc["feature_age_s"] < 7300 and doc["stale"] is True
        assert list(doc)[-2:] == ["feature_age_s", "stale"]
        resp = s.client.post("/events", json={"events": [click(900, synth_user, ["t0001"])]})
        assert resp.status_code == 202
        rules = EventRules.from_dict({"counters": [{"field": "clicks_n", "on": ["click"]}]})
        assert StreamConsumer(svc_r, keys, rules, partitions=2, block_ms=10).run(max_idle_s=0.2).applied == 1
        doc = s.client.post(f"/users/{synth_user}/tags", json={"top_k": 1}).json()
        assert doc["feature_age_s"] < 60 and doc["stale"] is False
