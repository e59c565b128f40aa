"""`mvke features stream` (the stream consumer) and `mvke events replay FILE` (a log as events).

The replay reads a Parquet log (one row per impression, docs/OWN_DATA.md; each row becomes an
impression event plus a click / conversion event when labelled: `mvke.runtime.events.log_row_events`)
or a JSON-lines file of events, and sends them in time order:

    --to http     POST /events of a running service, batches of --batch (API key: --api-key / $MVKE_API_KEY)
    --to stream   XADD to the partition streams directly (what the service does with POST /events)
    --to apply    apply them here, one Lua script per user (needs --rules; no consumer involved)

`--rate R` caps the events per second (default: as fast as the target takes them).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from mvke.runtime.event_apply import EventApplier
from mvke.runtime.event_stream import (
    DEFAULT_MAXLEN,
    StreamConsumer,
    default_partitions,
    publish_events,
)
from mvke.runtime.events import (
    ApplyCounts,
    Event,
    EventRules,
    log_row_events,
    parse_event,
)
from mvke.runtime.keys import Keys

REPLAY_BATCH = 500


def read_rules(path: str | Path | None, client: Any = None, keys: Keys | None = None) -> EventRules:
    """The `events` section of a meta.json (or a dataset directory holding one); without a path,
    that of the active version's manifest."""
    if path:
        p = Path(path)
        p = p / "meta.json" if p.is_dir() else p
        return EventRules.from_meta(json.loads(p.read_text()))
    if client is None:
        raise ValueError("--rules: give the meta.json (or dataset directory) whose `events` section to apply")
    from mvke.runtime.contract import Manifest
    from mvke.runtime.versions import active_version
    keys = keys or Keys()
    version = active_version(client, keys)
    raw = client.get(keys.manifest(version)) if version else None
    manifest = Manifest.from_json(raw) if raw else None
    if manifest is None or not manifest.events:
        raise ValueError("--rules: the active version's manifest has no `events` section; give a meta.json")
    return EventRules.from_dict(manifest.events, {f["name"]: f["max_len"] for f in manifest.features["fields"]})


def read_events(path: str | Path) -> list[Event]:
    """A Parquet log or a JSON-lines file of events -> events sorted by time (order key)."""
    p = Path(path)
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        events = [parse_event(json.loads(line)) for line in p.read_text().splitlines() if line.strip()]
    else:
        import pyarrow.parquet as pq
        rows = pq.read_table(p).to_pylist()
        events = [e for i, row in enumerate(rows) for e in log_row_events(row, i)]
    events.sort(key=lambda e: e.order)
    return events


def _batches(events: list[Event], size: int, rate: float | None) -> Iterator[list[Event]]:
    t0 = time.monotonic()
    for i in range(0, len(events), size):
        if rate:
            wait = t0 + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        yield events[i:i + size]


def replay(events: list[Event], to: str, *, client: Any = None, keys: Keys | None = None,
           rules: EventRules | None = None, url: str | None = None, api_key: str | None = None,
           partitions: int | None = None, rate: float | None = None, batch: int = REPLAY_BATCH) -> dict:
    keys = keys or Keys()
    report: dict[str, Any] = {"events": len(events), "to": to}
    t0 = time.perf_counter()
    if to == "http":
        import httpx
        headers = {"X-API-Key": api_key} if api_key else {}
        totals = {"accepted": 0, "duplicate": 0, "rejected": 0}
        with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
            for chunk in _batches(events, batch, rate):
                r = http.post("/events", content=json.dumps({"events": [json.loads(e.to_json()) for e in chunk]}),
                              headers={"content-type": "application/json"})
                if r.status_code != 202:
                    raise RuntimeError(f"POST /events: {r.status_code} {r.text[:300]}")
                for k in totals:
                    totals[k] += r.json()[k]
        report.update(totals)
    elif to == "stream":
        n = partitions or default_partitions()
        for chunk in _batches(events, batch, rate):
            publish_events(client, keys, chunk, n, DEFAULT_MAXLEN)
        report.update(accepted=len(events), partitions=n)
    elif to == "apply":
        if rules is None:
            raise ValueError("--to apply needs the rules (--rules)")
        applier, counts = EventApplier(client, keys, rules), ApplyCounts()
        for chunk in _batches(events, batch, rate):
            counts.add(applier.apply(chunk))
        report.update(applied=counts.applied, duplicate=counts.duplicate, late=counts.late,
                      failed=len(counts.failed))
    else:
        raise ValueError(f"--to must be http, stream or apply, got {to!r}")
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["events_per_second"] = round(len(events) / report["seconds"]) if report["seconds"] else None
    return report


def run_consumer(client: Any, keys: Keys, rules: EventRules, **kw: Any) -> dict:
    max_idle_s, max_events = kw.pop("max_idle_s", None), kw.pop("max_events", None)
    consumer = StreamConsumer(client, keys, rules, **kw)
    t0 = time.perf_counter()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    try:
        stats = consumer.run(max_idle_s=max_idle_s, max_events=max_events)
    except KeyboardInterrupt:
        stats = consumer.stats
    seconds = time.perf_counter() - t0
    return {"consumer": consumer.name, **stats.summary(), "seconds": round(seconds, 3), "pid": os.getpid()}
