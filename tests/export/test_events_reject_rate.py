"""Issue 22 + 28: the reject-rate rule of the batch jobs on the event path. The stream consumer stops
(exit 2, log, metric) when its dead letters pass --max-reject-rate over its window; `mvke events
replay` fails naming the rate and the reasons. One rule: mvke/runtime/reject_rate.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from model_export.events_job import consumer_metrics
from mvke.runtime.event_stream import GROUP, StreamConsumer, publish_events
from mvke.runtime.events import EventRules, log_row_events
from mvke.runtime.keys import Keys
from mvke.runtime.reject_rate import RejectWindow, reject_rate_error

ROOT = Path(__file__).resolve().parents[2]
EVENTS = {"histories": [{"field": "clicked_tags", "on": ["click"]}],
          "counters": [{"field": "clicks_n", "on": ["click"]}]}
META = {"name": "reject-world", "fields": {"clicked_tags": "multi"}, "max_lens": {"clicked_tags": 5},
        "events": EVENTS}
RULES = EventRules.from_meta(META)
BAD_TYPE = "type: must be one of impression, click, conversion, got 'view'"


def _good(n: int, first: int = 0) -> list:
    return [e for i in range(first, first + n) for e in log_row_events(
        {"user_id": f"u{i % 7}", "timestamp": 100 + i, "tags": [f"t{i % 5}"], "click": 1, "conversion": 0}, i)]


def _bad_doc(i: int) -> dict:
    return {"event_id": f"bad{i}", "user_id": "u1", "ts": 1, "type": "view"}


def _fill(r, good: int, bad: int) -> None:
    """`good` rows (two events each: impression + click) and `bad` entries of an unknown type, on 2 partitions."""
    publish_events(r, Keys(), _good(good), partitions=2)
    for i in range(bad):
        r.xadd(Keys().events_stream(i % 2), {"e": json.dumps(_bad_doc(i))})


def test_the_window_judges_only_once_full_and_forgets_old_batches():
    w = RejectWindow(100)
    w.add(40, 10, ["a: x"])
    assert w.error(0.05, "features stream", "events", "stopped", "hint") is None     # 50 < 100: no verdict yet
    w.add(50, 0, [])
    w.add(10, 0, [])
    error = w.error(0.05, "features stream", "events", "stopped", "hint", "{mvke:events}:dead")
    assert error and "10 of 110 events rejected (9.1%, above --max-reject-rate 5%)" in error
    assert "a: x" in error and "{mvke:events}:dead" in error
    w.add(30, 0, [])           # the bad batch slides out: the last 90 items without it are not yet 100
    assert (w.items, w.rejected) == (140, 10)
    w.add(70, 0, [])           # now they are: the window is the last batches holding >= 100 items
    assert (w.items, w.rejected, w.rate) == (100, 0, 0.0) and w.error(0.05, "c", "events", "o", "h") is None
    # the jobs' own message is unchanged by the move (docs/results/bad_inputs.md quotes it)
    assert reject_rate_error(2, 2, 0.01, ["f: r"], "d", "tag-all").startswith(
        "tag-all: 2 of 4 users rejected (50.0%, above --max-reject-rate 1%): the job failed and wrote no success marker")


@pytest.mark.integration
def test_consumer_stops_above_the_rate_and_the_metric_says_so(redis_client):
    _fill(redis_client, good=100, bad=20)                  # 20 of 220 entries: 9%
    update, server = consumer_metrics(0)
    try:
        stats = StreamConsumer(redis_client, Keys(), RULES, partitions=2, batch=40, block_ms=10,
                               max_reject_rate=0.05, reject_window=100, on_batch=update).run(max_idle_s=0.3)
        body = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics").text
    finally:
        server.shutdown()
    assert "above --max-reject-rate 5%" in stats.error and BAD_TYPE in stats.error
    assert stats.read < 220                                 # it stopped at the first full window above the rate
    assert "mvke_events_reject_rate_exceeded 1.0" in body
    assert f"mvke_events_dead_letter_rate {stats.dead_rate}" in body and stats.dead_rate > 0.05
    # what it read is applied or dead-lettered, and acknowledged: nothing read is left pending
    assert stats.applied + stats.dead == stats.read
    assert redis_client.xlen(Keys().events_dead) == stats.dead
    # below the rate (a 20% threshold) the same stream is consumed to the end
    stats = StreamConsumer(redis_client, Keys(), RULES, partitions=2, batch=40, block_ms=10,
                           max_reject_rate=0.2, reject_window=100).run(max_idle_s=0.3)
    assert not stats.error and stats.read > 0
    assert sum(redis_client.xpending(Keys().events_stream(p), GROUP)["pending"] for p in range(2)) == 0


def _mvke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mvke.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.integration
def test_stream_command_exits_2_naming_rate_and_reasons(redis_server, redis_client, tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps(META))
    _fill(redis_client, good=100, bad=30)
    common = ["features", "stream", "--redis", redis_server.url, "--rules", str(tmp_path / "meta.json"),
              "--partitions", "2", "--batch", "50", "--block-ms", "10", "--max-idle-s", "0.5", "--reject-window", "100"]
    p = _mvke(*common)                                      # default 1%
    assert p.returncode == 2, p.stderr
    assert "error: features stream:" in p.stderr and "above --max-reject-rate 1%" in p.stderr and BAD_TYPE in p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["error"]


@pytest.mark.integration
def test_replay_fails_above_the_rate_and_sends_nothing(redis_server, redis_client, tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps(META))
    lines = [e.to_json() for e in _good(20)] + [json.dumps(_bad_doc(i)) for i in range(4)] + ["{not json"]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")               # 5 of 45 rejected: 11%
    common = ["events", "replay", str(path), "--to", "apply", "--rules", str(tmp_path / "meta.json"),
              "--redis", redis_server.url]
    p = _mvke(*common, "--max-reject-rate", "0.1")
    assert p.returncode == 2
    assert "events replay: 5 of 45 events rejected (11.1%, above --max-reject-rate 10%): nothing was sent" in p.stderr
    assert BAD_TYPE in p.stderr and "JSONDecodeError" in p.stderr
    assert not redis_client.keys("mvke:user:*")
    p = _mvke(*common, "--max-reject-rate", "0.2")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert (report["applied"], report["rejected_in_all"], report["error"]) == (40, 5, "")


def test_stream_command_refuses_users_per_call_below_one():
    """--users-per-call 0 is an argparse error naming the flag (exit 2), not a traceback from the applier."""
    p = _mvke("features", "stream", "--users-per-call", "0")
    assert p.returncode == 2 and "--users-per-call: must be >= 1, got 0" in p.stderr and "Traceback" not in p.stderr
