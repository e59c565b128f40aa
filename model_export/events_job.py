"""`mvke features stream` (the stream consumer) and `mvke events replay FILE` (a log as events).

The replay reads a Parquet log (one row per impression, docs/OWN_DATA.md; each row becomes an
impression event plus a click / conversion event when labelled: `mvke.runtime.events.log_row_events`)
or a JSON-lines file of events, and sends them in time order:

    --to http     POST /events of a running service, batches of --batch (API key: --api-key / $MVKE_API_KEY)
    --to stream   XADD to the partition streams directly (what the service does with POST /events)
    --to apply    apply them here, one Lua function per user (needs --rules; no consumer involved)

`--rate R` caps the events per second (default: as fast as the target takes them). Rows or lines
that are no valid event (parse_event's rule), events the service rejects and events that fail to
apply are rejected; more than `--max-reject-rate` of them fails the replay (mvke/runtime/reject_rate.py,
the batch jobs' rule): checked on the file before anything is sent, and on the totals at the end.

The consumer stops itself (exit 2) when its dead letters pass the same rate over its window; with
`--metrics-port` it serves its counts and that rate to Prometheus meanwhile.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mvke.runtime.event_apply import EventApplier
from mvke.runtime.event_stream import (
    DEFAULT_MAXLEN,
    ConsumerStats,
    StreamConsumer,
    default_partitions,
    publish_events,
)
from mvke.runtime.events import (
    ApplyCounts,
    Event,
    EventError,
    EventRules,
    log_row_events,
    parse_event,
)
from mvke.runtime.keys import Keys
from mvke.runtime.reject_rate import reject_rate_error
from mvke.runtime.system import freeze_startup_heap

REPLAY_BATCH = 500
REPLAY_HINT = "Fix the log (each reason names the field) or raise --max-reject-rate"


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


@dataclass
class EventLog:
    """A log read as events (time order) and its rejected rows / lines (`field: reason` each)."""
    events: list[Event]
    rejected: list[str] = field(default_factory=list)


def _checked(make: Callable[[], list[Event]], rejected: list[str]) -> list[Event]:
    """The events of one row / line, each through parse_event (the rule of POST /events); [] and a
    reason in `rejected` when it is no valid event."""
    try:
        return [parse_event(json.loads(e.to_json())) for e in make()]
    except EventError as e:
        rejected.append(str(e))
    except (KeyError, TypeError, ValueError) as e:
        rejected.append(f"row: {type(e).__name__}: {e}")
    return []


def read_log(path: str | Path) -> EventLog:
    """A Parquet log or a JSON-lines file of events -> its valid events sorted by time (order key)
    and the reasons of the rows / lines that are none."""
    p, rejected = Path(path), []
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        lines = [line for line in p.read_text().splitlines() if line.strip()]
        events = [e for line in lines for e in _checked(lambda line=line: [parse_event(json.loads(line))], rejected)]
    else:
        import pyarrow.parquet as pq
        rows = pq.read_table(p).to_pylist()
        events = [e for i, row in enumerate(rows) for e in _checked(lambda i=i, row=row: log_row_events(row, i),
                                                                    rejected)]
    events.sort(key=lambda e: e.order)
    return EventLog(events, rejected)


def read_events(path: str | Path) -> list[Event]:
    """`read_log`'s events; a rejected row or line raises (ValueError naming it)."""
    log = read_log(path)
    if log.rejected:
        raise ValueError(f"{path}: {len(log.rejected)} rows are no valid event, e.g. {log.rejected[0]}")
    return log.events


def replay_reject_error(done: int, rejected: list[str], max_rate: float, outcome: str) -> str | None:
    """Why the replay failed when more than max_rate of its events were rejected (the jobs' rule), else None."""
    return reject_rate_error(done, len(rejected), max_rate, rejected, None, "events replay", "events", outcome,
                             REPLAY_HINT)


def _batches(events: list[Event], size: int, rate: float | None) -> Iterator[list[Event]]:
    t0 = time.monotonic()
    for i in range(0, len(events), size):
        if rate:
            wait = t0 + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        yield events[i:i + size]


def _to_http(events: list[Event], url: str | None, api_key: str | None, rate: float | None, batch: int,
             rejected: list[str]) -> dict:
    import httpx
    headers = {"X-API-Key": api_key} if api_key else {}
    totals = {"accepted": 0, "duplicate": 0, "rejected": 0}
    with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
        for chunk in _batches(events, batch, rate):
            r = http.post("/events", content=json.dumps({"events": [json.loads(e.to_json()) for e in chunk]}),
                          headers={"content-type": "application/json"})
            if r.status_code != 202:
                raise RuntimeError(f"POST /events: {r.status_code} {r.text[:300]}")
            body = r.json()
            for k in totals:
                totals[k] += body[k]
            # "events.<i>.ts" -> "ts": the reason, not the index, is what repeats
            rejected += [f"{x['field'].split('.', 2)[-1]}: {x['reason']}" for x in body.get("rejections", [])]
    return totals


def _to_apply(events: list[Event], client: Any, keys: Keys, rules: EventRules | None, rate: float | None,
              batch: int, rejected: list[str]) -> dict:
    if rules is None:
        raise ValueError("--to apply needs the rules (--rules)")
    applier, counts = EventApplier(client, keys, rules), ApplyCounts()
    for chunk in _batches(events, batch, rate):
        counts.add(applier.apply(chunk))
    rejected += [reason for _, reason in counts.failed]
    return {"applied": counts.applied, "duplicate": counts.duplicate, "late": counts.late,
            "failed": len(counts.failed)}


def replay(events: list[Event], to: str, *, client: Any = None, keys: Keys | None = None,
           rules: EventRules | None = None, url: str | None = None, api_key: str | None = None,
           partitions: int | None = None, rate: float | None = None, batch: int = REPLAY_BATCH,
           rejected: list[str] | None = None, max_reject_rate: float | None = None) -> dict:
    """Send `events` to `to`; `rejected`: reasons of the log's rows already rejected (`read_log`), to
    which the target's rejections are added. With max_reject_rate: RuntimeError (after the report is
    complete) when more than that share of the log was rejected."""
    keys, rejected = keys or Keys(), list(rejected or [])
    report: dict[str, Any] = {"events": len(events), "to": to}
    t0 = time.perf_counter()
    if to == "http":
        report.update(_to_http(events, url, api_key, rate, batch, rejected))
    elif to == "stream":
        n = partitions or default_partitions()
        for chunk in _batches(events, batch, rate):
            publish_events(client, keys, chunk, n, DEFAULT_MAXLEN)
        report.update(accepted=len(events), partitions=n)
    elif to == "apply":
        report.update(_to_apply(events, client, keys, rules, rate, batch, rejected))
    else:
        raise ValueError(f"--to must be http, stream or apply, got {to!r}")
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["events_per_second"] = round(len(events) / report["seconds"]) if report["seconds"] else None
    report["rejected_in_all"] = len(rejected)
    if max_reject_rate is not None:
        done = len(events) - report.get("rejected", 0) - report.get("failed", 0)
        report["error"] = replay_reject_error(done, rejected, max_reject_rate, "the replay failed") or ""
    return report


def consumer_metrics(port: int) -> tuple[Callable[[ConsumerStats], None], Any]:
    """Serve the consumer's counts and its dead-letter rate on :port/metrics (Prometheus; 0: any free
    port); -> (the per-batch callback that updates them, the HTTP server)."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server
    registry = CollectorRegistry()
    entries = Gauge("mvke_events_consumer_entries", "stream entries this consumer handled, by outcome",
                    ["outcome"], registry=registry)
    rate = Gauge("mvke_events_dead_letter_rate", "dead letters / entries read over the reject window",
                 registry=registry)
    exceeded = Gauge("mvke_events_reject_rate_exceeded", "1 once the dead-letter rate passed --max-reject-rate "
                     "(the consumer stops)", registry=registry)
    server, _ = start_http_server(port, registry=registry)

    def update(stats: ConsumerStats) -> None:
        for outcome in ("read", "applied", "duplicate", "late", "dead", "claimed"):
            entries.labels(outcome).set(getattr(stats, outcome))
        rate.set(stats.dead_rate)
        exceeded.set(1 if stats.error else 0)
    return update, server


def run_consumer(client: Any, keys: Keys, rules: EventRules, metrics_port: int | None = None, **kw: Any) -> dict:
    """Run one consumer until SIGTERM / Ctrl-C / its limits; -> its summary (`error` set when it
    stopped itself: the dead-letter rate)."""
    max_idle_s, max_events = kw.pop("max_idle_s", None), kw.pop("max_events", None)
    if metrics_port is not None:
        kw["on_batch"], _ = consumer_metrics(metrics_port)
    consumer = StreamConsumer(client, keys, rules, **kw)
    freeze_startup_heap()
    t0 = time.perf_counter()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    try:
        stats = consumer.run(max_idle_s=max_idle_s, max_events=max_events)
    except KeyboardInterrupt:
        stats = consumer.stats
    seconds = time.perf_counter() - t0
    return {"consumer": consumer.name, **stats.summary(), "seconds": round(seconds, 3), "pid": os.getpid()}
