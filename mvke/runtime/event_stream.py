"""The event stream: N partition streams, producers (`POST /events`, `mvke events replay`) and the
consumer of `mvke features stream`.

    producer --XADD MAXLEN ~ L--> {mvke:events:<crc32(user_id) % N>}  --XREADGROUP (group `apply`)-->
    consumers (any number, each reads every partition; the group gives each entry to one of them)
      -> parse (a malformed entry goes to {mvke:events}:dead with its reason) -> EventApplier (one Lua
         function call per user, or per N with --users-per-call: idempotent by event id) -> XACK
    more than `max_reject_rate` dead letters among the last `reject_window` entries read stops the
    consumer with the reason (mvke/runtime/reject_rate.py: the rule of the batch jobs);
    a consumer killed between apply and XACK leaves its entries pending: the next consumer to start
    takes them with XAUTOCLAIM once they have been idle `claim_idle_ms`, applies them again (the
    duplicates change nothing) and acknowledges them; kill -9 loses nothing.

Each partition has its own hash tag, so a Redis Cluster spreads them over its masters; consumers
on a cluster read the partitions one command each (a multi-key XREADGROUP needs one slot).
The length bound (MAXLEN ~) trims the oldest entries, read or not: size it above the longest lag
the consumers may have (docs/SCALING.md).
"""
from __future__ import annotations

import logging
import os
import socket
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

from mvke.runtime.event_apply import APPLY_AUTO, AUX_TTL_S, USERS_PER_CALL, EventApplier, loads, send_raw
from mvke.runtime.events import Event, EventError, EventRules, parse_event
from mvke.runtime.keys import Keys
from mvke.runtime.redis_client import is_cluster
from mvke.runtime.options import DEFAULT_REJECT_WINDOW
from mvke.runtime.reject_rate import DEFAULT_MAX_REJECT_RATE, RejectWindow

log = logging.getLogger("mvke.events")

GROUP = "apply"
DEFAULT_PARTITIONS = 8
DEFAULT_MAXLEN = 1_000_000          # entries per partition (approximate trimming)
DEAD_MAXLEN = 100_000
ENTRY_FIELD = "e"
PARTITIONS_ENV = "MVKE_EVENT_PARTITIONS"   # producers and consumers must agree (service setting too)
STREAM_OUTCOME = "the consumer stopped"
STREAM_HINT = ("The dead letters carry each entry and its reason (XRANGE on the dead-letter stream): fix the "
               "producer that sends them, or raise --max-reject-rate")
PAUSE_BEFORE_ACK_ENV = "MVKE_EVENTS_PAUSE_BEFORE_ACK_S"   # testing hook: a window to kill -9 a consumer in


def default_partitions() -> int:
    return int(os.environ.get(PARTITIONS_ENV) or DEFAULT_PARTITIONS)


def partition_of(user_id: str, partitions: int) -> int:
    return zlib.crc32(user_id.encode()) % partitions


def by_partition(events: Iterable[Event], partitions: int) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = defaultdict(list)
    for e in events:
        out[partition_of(e.user_id, partitions)].append(e)
    return out


def publish_events(client: Any, keys: Keys, events: list[Event], partitions: int,
                   maxlen: int = DEFAULT_MAXLEN) -> int:
    """XADD each event to its user's partition (one pipeline); -> events written."""
    pipe = client.pipeline(transaction=False)
    for p, evs in by_partition(events, partitions).items():
        for e in evs:
            pipe.xadd(keys.events_stream(p), {ENTRY_FIELD: e.to_json()}, maxlen=maxlen, approximate=True)
    pipe.execute()
    return len(events)


async def publish_events_async(client: Any, keys: Keys, events: list[Event], partitions: int,
                               maxlen: int = DEFAULT_MAXLEN) -> int:
    """`publish_events` with an asyncio client (the service)."""
    pipe = client.pipeline(transaction=False)
    for p, evs in by_partition(events, partitions).items():
        for e in evs:
            pipe.xadd(keys.events_stream(p), {ENTRY_FIELD: e.to_json()}, maxlen=maxlen, approximate=True)
    await pipe.execute()
    return len(events)


def ensure_groups(client: Any, keys: Keys, partitions: int) -> None:
    """The consumer group on every partition (created with the stream; from its first entry)."""
    for p in range(partitions):
        try:
            client.xgroup_create(keys.events_stream(p), GROUP, id="0", mkstream=True)
        except Exception as e:   # BUSYGROUP: it exists
            if "BUSYGROUP" not in str(e):
                raise


@dataclass
class ConsumerStats:
    read: int = 0              # stream entries taken (new, own pending and claimed)
    claimed: int = 0           # of those, taken from another (dead) consumer with XAUTOCLAIM
    applied: int = 0
    duplicate: int = 0
    late: int = 0
    dead: int = 0              # malformed or unappliable: written to the dead-letter stream
    trimmed: int = 0           # pending entries the length bound removed before they were applied
    batches: int = 0
    dead_rate: float = 0.0     # dead letters / entries over the reject window
    error: str = ""            # why the consumer stopped itself (the dead-letter rate), else empty

    def summary(self) -> dict:
        return asdict(self)


RATE_CATCH_UP_S = 1.0   # --max-rate: how far behind its pace a consumer may catch up
# --max-rate: a read takes at most this long's worth of entries (shorter reads cost Redis more per event:
# 50 ms reads at 20,000/s left the service 2-4 points less of its QPS than 200 ms ones) ...
PACE_READ_S = 0.25
PACE_SLICE_S = 0.05     # ... and a sleep is at most this long, so that stop() is honoured within it
_NO_EVENT = object()     # an entry without the ENTRY_FIELD field (a dead letter)
_ENTRY_KEY = ENTRY_FIELD.encode()


def _event_text(fields: list | dict | None) -> Any:
    """A stream entry's event text from its fields (a raw reply's [name, value, ...] or redis-py's
    dict): None when the entry was trimmed while pending, _NO_EVENT when it has no ENTRY_FIELD.
    No dict per entry on the raw path: the producers write one field."""
    if fields is None:
        return None
    if type(fields) is list:
        if len(fields) == 2 and fields[0] == _ENTRY_KEY:
            return fields[1]
        fields = dict(zip(fields[::2], fields[1::2]))
    return fields.get(_ENTRY_KEY, fields.get(ENTRY_FIELD, _NO_EVENT))


def _text(v: Any) -> str:
    """Text of a raw reply value; bytes that are not UTF-8 (a bad event) are kept, escaped."""
    return v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)


class StreamConsumer:
    """One consumer of the group: `run()` until `stop()` or `max_idle_s` without entries."""

    def __init__(self, client: Any, keys: Keys, rules: EventRules, partitions: int | None = None,
                 name: str | None = None, batch: int = 500, block_ms: int = 100, claim_idle_ms: int = 30_000,
                 claim_every_s: float = 5.0, state_ttl_s: int = AUX_TTL_S,
                 max_reject_rate: float = DEFAULT_MAX_REJECT_RATE, reject_window: int = DEFAULT_REJECT_WINDOW,
                 on_batch: Callable[[ConsumerStats], None] | None = None, max_rate: float = 0.0,
                 users_per_call: int = USERS_PER_CALL, apply: str = APPLY_AUTO):
        self.client, self.keys = client, keys
        self.partitions = partitions or default_partitions()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.batch, self.block_ms = batch, block_ms
        self.claim_idle_ms, self.claim_every_s = claim_idle_ms, claim_every_s
        self.applier = EventApplier(client, keys, rules, state_ttl_s, users_per_call, apply)
        self.cluster = is_cluster(client)
        self.streams = [keys.events_stream(p) for p in range(self.partitions)]
        self.stats = ConsumerStats()
        self.max_reject_rate, self.window, self.on_batch = max_reject_rate, RejectWindow(reject_window), on_batch
        self._stop = False
        self._pause = float(os.environ.get(PAUSE_BEFORE_ACK_ENV) or 0)
        # max_rate > 0: entries per second at most (the event path yields the box to serving; a backlog
        # waits in the stream, bounded by its MAXLEN). The time at which the entries taken so far are paid for:
        self.max_rate, self._paid_until = max_rate, 0.0

    def stop(self) -> None:
        self._stop = True

    # ---- reading ----
    def _read(self, last_id: str) -> list[tuple[str, str, Any]]:
        """-> [(stream, entry id, event text (`_event_text`))] from every partition ('>' new, '0' this
        consumer's pending)."""
        block = self.block_ms if last_id == ">" else None
        count = self.batch
        if self.max_rate > 0:   # paced: reads of at most ~PACE_READ_S worth of entries, no long bursts
            count = max(1, min(count, int(self.max_rate * PACE_READ_S / len(self.streams))))
        if not self.cluster:   # one command, its raw reply (redis-py's parsing costs more than the read)
            wait = ("BLOCK", block) if block is not None else ()
            reply = send_raw(self.client, [("XREADGROUP", "GROUP", GROUP, self.name, "COUNT", count, *wait,
                                            "STREAMS", *self.streams, *[last_id] * len(self.streams))])[0]
            if isinstance(reply, Exception):
                raise reply
            streams = reply.items() if isinstance(reply, dict) else (reply or [])    # RESP3: a map; RESP2: pairs
            out = []
            for s, entries in streams:
                name = _text(s)      # once per partition, not per entry
                out += [(name, i, _event_text(f)) for i, f in entries]
            return out
        out = []
        for s in self.streams:   # one slot per command on a cluster
            for _, entries in self.client.xreadgroup(GROUP, self.name, {s: last_id}, count=count) or []:
                out += [(s, _text(i), _event_text(f)) for i, f in entries]
        if not out and last_id == ">":
            time.sleep(self.block_ms / 1000)
        return out

    def _claim(self) -> list[tuple[str, str, Any]]:
        """Entries another consumer took and left unacknowledged for claim_idle_ms (it died)."""
        out = []
        for s in self.streams:
            start = "0-0"
            while True:
                reply = self.client.xautoclaim(s, GROUP, self.name, self.claim_idle_ms, start_id=start,
                                               count=self.batch)
                start, entries = _text(reply[0]), reply[1]
                out += [(s, _text(i), _event_text(f)) for i, f in entries if f is not None]
                if start == "0-0" or not entries:
                    break
        self.stats.claimed += len(out)
        return out

    # ---- one batch ----
    def handle(self, entries: list[tuple[str, str, Any]]) -> None:
        """Parse, apply, dead-letter, acknowledge (in that order: an entry is acked only once applied)."""
        if not entries:
            return
        self.stats.read += len(entries)
        events, dead = self._parse(entries)
        counts = self.applier.apply(events)
        dead += [("", "", e.to_json(), reason) for e, reason in counts.failed]
        self._dead_letters(dead)
        if self._pause:
            print(f"applied {len(events)} events, pausing before XACK", flush=True)
            time.sleep(self._pause)
        self._ack(entries)
        self.stats.applied += counts.applied
        self.stats.duplicate += counts.duplicate
        self.stats.late += counts.late
        self.stats.dead += len(dead)
        self.stats.batches += 1
        self._judge(counts.applied + counts.duplicate + counts.late, [d[3] for d in dead])

    def _judge(self, done: int, reasons: list[str]) -> None:
        """The dead-letter rate over the window; above max_reject_rate: log it, record why, stop."""
        self.window.add(done, len(reasons), reasons)
        self.stats.dead_rate = round(self.window.rate, 6)
        error = self.window.error(self.max_reject_rate, "features stream", "events", STREAM_OUTCOME, STREAM_HINT,
                                  self.keys.events_dead)
        if error and not self.stats.error:
            log.error(error)
            self.stats.error = error
            self._stop = True
        if self.on_batch is not None:
            self.on_batch(self.stats)

    def _parse(self, entries: list[tuple[str, str, Any]]) -> tuple[list[Event], list[tuple[str, str, str, str]]]:
        """-> (events, dead letters (stream, entry id, raw text, reason)); trimmed entries are counted."""
        events, dead = [], []
        for stream, entry_id, raw in entries:
            if raw is None:     # trimmed (MAXLEN) while pending: nothing left to apply
                self.stats.trimmed += 1
                continue
            try:
                doc = loads(raw) if raw is not _NO_EVENT else None
                if doc is None:
                    raise EventError("event", f"stream entry has no `{ENTRY_FIELD}` field")
                events.append(parse_event(doc))
            except (ValueError, EventError) as e:
                reason = str(e) if isinstance(e, EventError) else f"event: not JSON ({e})"
                dead.append((stream, entry_id, _text(raw) if raw is not _NO_EVENT else "", reason))
        return events, dead

    def _dead_letters(self, dead: list[tuple[str, str, str, str]]) -> None:
        if not dead:
            return
        pipe = self.client.pipeline(transaction=False)
        for stream, entry_id, raw, reason in dead:
            pipe.xadd(self.keys.events_dead, {"event": raw, "reason": reason, "stream": stream,
                                              "entry": entry_id, "consumer": self.name},
                      maxlen=DEAD_MAXLEN, approximate=True)
        pipe.execute()

    def _ack(self, entries: list[tuple[str, str, Any]]) -> None:
        acks: dict[str, list[str]] = defaultdict(list)
        for stream, entry_id, _ in entries:
            acks[stream].append(entry_id)
        if self.cluster:
            pipe = self.client.pipeline(transaction=False)
            for stream, ids in acks.items():
                pipe.xack(stream, GROUP, *ids)
            pipe.execute()
        else:
            send_raw(self.client, [("XACK", stream, GROUP, *ids) for stream, ids in acks.items()])

    def _keep_rate(self, taken: int, read_at: float) -> None:
        """Sleep as long as the entries taken so far are ahead of max_rate; `read_at`: when this batch was
        read (its handling counts toward its time: a consumer slower than max_rate never sleeps)."""
        if self.max_rate <= 0:
            return
        # a slow patch (the box busy) or a quiet one may be made up within RATE_CATCH_UP_S, not more:
        # a long stall does not turn into a long burst
        start = max(self._paid_until, read_at - RATE_CATCH_UP_S) if self._paid_until else read_at
        self._paid_until = start + taken / self.max_rate
        while not self._stop and (wait := self._paid_until - time.monotonic()) > 0:
            time.sleep(min(wait, PACE_SLICE_S))     # in slices: a stop() is honoured within one

    def run(self, max_idle_s: float | None = None, max_events: int | None = None) -> ConsumerStats:
        """Own pending entries first (a restart under the same name), then new ones; every
        claim_every_s the entries of dead consumers. Stops on `stop()`, after max_idle_s without
        entries, or once max_events entries were read."""
        ensure_groups(self.client, self.keys, self.partitions)
        while not self._stop and (entries := self._read("0")):
            self.handle(entries)
        self.handle(self._claim())
        last_claim, last_seen = time.monotonic(), time.monotonic()
        while not self._stop:
            if max_events is not None and self.stats.read >= max_events:
                break
            entries = self._read(">")
            now = time.monotonic()
            if now - last_claim >= self.claim_every_s:
                entries += self._claim()
                last_claim = now
            if entries:
                self.handle(entries)
                last_seen = now
                self._keep_rate(len(entries), now)
            elif max_idle_s is not None and now - last_seen >= max_idle_s:
                break
        return self.stats
