"""User events (impressions, clicks, conversions) and the declared rules that turn them into features.

An event is what the ad system logs: `event_id`, `user_id`, `ts` (Unix seconds), `type`
(impression | click | conversion), the ad's `tags`, and optionally more value lists of the
ad (`attrs`, e.g. {"category": ["c0012"]}) that a rule may read. Which feature fields an event
changes is data, not code: the `events` section of a dataset's meta.json (docs/OWN_DATA.md) or
of a bundle manifest (`Manifest.events`), read by `EventRules.from_dict`:

    "events": {
      "histories": [{"field": "clicked_tags", "on": ["click"], "from": "tags", "distinct": false}],
      "counters":  [{"field": "clicks_n", "on": ["click"]}],
      "buckets":   [{"field": "clicks_bucket", "count": "clicks_n", "edges": [0, 2, 5], "labels": "b{}"},
                    {"field": "avg_ctr_bucket", "rate": ["clicks_n", "impressions_n"], "edges": [0.1, 0.3]}],
      "max_lens":  {"clicked_tags": 20},
      "dedup_ids": 256
    }

* a history is a `multi` field, most recent first (as batch data lists it), capped to its
  `max_len` (meta.json's `max_lens`, or the rule's own); an event of a listed type puts the
  values of its `from` list in front, in their listed order (`"within_event": "reversed"`: the
  last listed first, as a log that appends an event's values reads backwards); `distinct` keeps
  one entry per value (its most recent). Items are ordered by the event's order key (`order_key`: time, then
  a hash of the event id), so a late event lands where it belongs.
* a counter counts the events of the listed types (all time);
* a bucket field is the label of a counter's value, or of a rate of two counters (unset while
  the denominator is 0), cut at `edges` the way the batch data cuts it: label i = number of
  edges strictly below the value (numpy's `searchsorted(edges, v)`, the synthetic data's rule).

Applying (mvke/runtime/event_apply.py, one Lua function per user, atomic) and the batch derivation
`fold_user` below follow these rules; tests hold them equal field by field.
"""
from __future__ import annotations

import bisect
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from mvke.runtime.encoded import MULTI_SEP

EVENT_TYPES = ("impression", "click", "conversion")
MAX_ID_LEN = 128
MAX_VALUES = 64                 # values per list of one event (an ad has 1-3 tags)
MAX_TS = 1 << 33                # Unix seconds below year 2242: ts * 1e6 + hash stays an exact double
LOADED_AT_FIELD = "_loaded_at"  # set by `mvke features load` (model_export/feature_writer.py)
EVENT_AT_FIELD = "_event_at"    # set by the event script: the applier's clock when it applied the last event
DEFAULT_DEDUP_IDS = 256
EVENT_FIELDS = frozenset({"event_id", "user_id", "ts", "type", "tags", "attrs"})


class EventError(ValueError):
    """A malformed event: `field` names the culprit (a 4xx at the edge, a dead letter in the stream)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(slots=True)     # not frozen: a frozen dataclass's __init__ costs 2.4 us against 1 (the consumer makes one per event)
class Event:
    event_id: str
    user_id: str
    ts: int
    type: str
    lists: dict[str, list[str]]          # "tags" and the ad's other value lists (attrs)
    # the order key (`order_key`), derived once here: sorted by and sent (a cached_property locks per get)
    order: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.order = order_key(self.ts, self.event_id)

    def to_json(self) -> str:
        """The stream entry / replay line (what `parse_event` reads back)."""
        doc: dict[str, Any] = {"event_id": self.event_id, "user_id": self.user_id, "ts": self.ts,
                               "type": self.type, "tags": self.lists.get("tags", [])}
        attrs = {k: v for k, v in self.lists.items() if k != "tags"}
        if attrs:
            doc["attrs"] = attrs
        return json.dumps(doc, separators=(",", ":"))


def order_key(ts: int, event_id: str) -> int:
    """Total order of events: time first, then a hash of the id (equal seconds are common).

    An exact integer below 2**53, so Lua (doubles) and Python compare it alike.
    """
    return ts * 1_000_000 + zlib.crc32(event_id.encode()) % 1_000_000


def _ident(doc: Mapping, name: str) -> str:
    v = doc.get(name)
    if not isinstance(v, str) or not v:
        raise EventError(name, "required: a non-empty string")
    if len(v) > MAX_ID_LEN:
        raise EventError(name, f"at most {MAX_ID_LEN} characters, got {len(v)}")
    if name == "user_id" and ("{" in v or "}" in v):
        # the user's event keys use the user key as their hash tag (mvke/runtime/keys.py)
        raise EventError(name, "must not contain '{' or '}'")
    return v


def _values(v: Any, name: str) -> list[str]:
    if not isinstance(v, list):
        raise EventError(name, f"expected a list of strings, got {type(v).__name__}")
    if len(v) > MAX_VALUES:
        raise EventError(name, f"at most {MAX_VALUES} values, got {len(v)}")
    try:      # all at once in C (the consumer checks every event): strings, non-empty, no separator
        if MULTI_SEP.join(v).count(MULTI_SEP) == len(v) - 1 and "" not in v:
            return v
    except TypeError:   # not all strings: the loop below names the first bad one
        pass
    for i, x in enumerate(v):
        if not isinstance(x, str) or not x or MULTI_SEP in x:
            raise EventError(f"{name}.{i}", f"expected a non-empty string without {MULTI_SEP!r}")
    return v


def parse_event(doc: Any) -> Event:
    """A JSON object -> Event, or EventError naming the field (the one rule for HTTP and stream)."""
    if type(doc) is not dict and not isinstance(doc, Mapping):    # the exact type first: an ABC check costs µs
        raise EventError("event", f"expected an object, got {type(doc).__name__}")
    event_id, user_id = _ident(doc, "event_id"), _ident(doc, "user_id")
    ts = doc.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise EventError("ts", "required: integer Unix seconds")
    if not 0 <= ts < MAX_TS:
        raise EventError("ts", f"must be in [0, {MAX_TS}), got {ts}")
    kind = doc.get("type")
    if kind not in EVENT_TYPES:
        raise EventError("type", f"must be one of {', '.join(EVENT_TYPES)}, got {kind!r}")
    lists = {"tags": _values(doc.get("tags", []), "tags")}
    attrs = doc.get("attrs") or {}
    if type(attrs) is not dict and not isinstance(attrs, Mapping):
        raise EventError("attrs", f"expected an object of lists, got {type(attrs).__name__}")
    for k, v in attrs.items():
        if k == "tags":
            raise EventError("attrs.tags", "tags go in the event's own `tags`")
        lists[str(k)] = _values(v, f"attrs.{k}")
    unknown = doc.keys() - EVENT_FIELDS
    if unknown:
        raise EventError(sorted(unknown)[0], "unknown field")
    return Event(event_id, user_id, ts, kind, lists)


# ---- rules -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HistoryRule:
    field: str
    on: tuple[str, ...]
    source: str = "tags"
    max_len: int = 1
    distinct: bool = False
    reversed_within: bool = False     # an event's values enter last-listed first (a log that appends them)


@dataclass(frozen=True)
class CounterRule:
    field: str
    on: tuple[str, ...]


@dataclass(frozen=True)
class BucketRule:
    field: str
    edges: tuple[float, ...]
    count: str | None = None                 # counter field, or
    rate: tuple[str, str] | None = None      # numerator and denominator counter fields
    labels: str = "b{}"

    def label(self, counters: Mapping[str, int]) -> str | None:
        """The bucket of the current counters (None: the rate's denominator is 0, field unset)."""
        if self.rate is not None:
            den = counters.get(self.rate[1], 0)
            if den == 0:
                return None
            value = counters.get(self.rate[0], 0) / den
        else:
            value = counters.get(self.count, 0)
        return self.labels.format(bisect.bisect_left(self.edges, value))


def _types(v: Any, where: str) -> tuple[str, ...]:
    v = [v] if isinstance(v, str) else list(v or [])
    bad = [t for t in v if t not in EVENT_TYPES]
    if not v or bad:
        raise ValueError(f"events.{where}.on: expected some of {EVENT_TYPES}, got {v}")
    return tuple(v)


@dataclass(frozen=True)
class EventRules:
    histories: tuple[HistoryRule, ...] = ()
    counters: tuple[CounterRule, ...] = ()
    buckets: tuple[BucketRule, ...] = ()
    dedup_ids: int = DEFAULT_DEDUP_IDS          # event ids remembered per user (the duplicate horizon)

    @classmethod
    def from_dict(cls, section: Mapping, max_lens: Mapping[str, int] | None = None) -> "EventRules":
        """meta.json's / the manifest's `events` section (module docstring); `max_lens` is meta.json's."""
        lens = {**(max_lens or {}), **section.get("max_lens", {})}
        hs = []
        for i, h in enumerate(section.get("histories", [])):
            name = h["field"]
            cap = int(h.get("max_len", lens.get(name, 1)))
            if cap < 1:
                raise ValueError(f"events.histories.{i}.max_len must be >= 1, got {cap}")
            within = h.get("within_event", "listed")
            if within not in ("listed", "reversed"):
                raise ValueError(f"events.histories.{i}.within_event must be listed or reversed, got {within!r}")
            hs.append(HistoryRule(name, _types(h.get("on"), f"histories.{i}"), h.get("from", "tags"), cap,
                                  bool(h.get("distinct", False)), within == "reversed"))
        cs = [CounterRule(c["field"], _types(c.get("on"), f"counters.{i}"))
              for i, c in enumerate(section.get("counters", []))]
        counter_names = {c.field for c in cs}
        bs = []
        for i, b in enumerate(section.get("buckets", [])):
            edges = tuple(float(x) for x in b["edges"])
            if list(edges) != sorted(edges):
                raise ValueError(f"events.buckets.{i}.edges must be ascending")
            rate = tuple(b["rate"]) if "rate" in b else None
            count = b.get("count")
            needs = list(rate) if rate else [count]
            if (rate is None) == (count is None) or any(n not in counter_names for n in needs):
                raise ValueError(f"events.buckets.{i}: give `count` or `rate` [num, den] naming counters "
                                 f"of events.counters ({sorted(counter_names)})")
            bs.append(BucketRule(b["field"], edges, count, rate, b.get("labels", "b{}")))
        return cls(tuple(hs), tuple(cs), tuple(bs), int(section.get("dedup_ids", DEFAULT_DEDUP_IDS)))

    @classmethod
    def from_meta(cls, meta: Mapping) -> "EventRules":
        if "events" not in meta:
            raise ValueError("no `events` section (which fields events update: docs/OWN_DATA.md)")
        return cls.from_dict(meta["events"], meta.get("max_lens"))

    @property
    def counter_fields(self) -> list[str]:
        """Hash fields the batch snapshot carries besides the model's (so events continue its counts)."""
        return [c.field for c in self.counters]

    def to_native(self) -> str:
        """The same rules as the compiled apply command reads them (native/mvke_apply.c): records split
        by \x1e, fields by \x1f; counters before buckets (a bucket names its counters). A name or label
        holding either separator cannot be written so: ValueError (the applier then runs the function)."""
        types = ",".join
        records = [f"k\x1f{self.dedup_ids}"]
        records += [f"h\x1f{h.field}\x1f{h.source}\x1f{h.max_len}\x1f{int(h.distinct)}\x1f{int(h.reversed_within)}"
                    f"\x1f{types(h.on)}" for h in self.histories]
        records += [f"c\x1f{c.field}\x1f{types(c.on)}" for c in self.counters]
        names = [x for h in self.histories for x in (h.field, h.source)] + [c.field for c in self.counters]
        for b in self.buckets:
            num, den = (b.rate[0], b.rate[1]) if b.rate else (b.count, "")
            labels = [b.labels.format(i) for i in range(len(b.edges) + 1)]
            names += [b.field, *labels]
            records.append("\x1f".join(["b", b.field, num, den, str(len(b.edges)), *map(repr, b.edges), *labels]))
        if any("\x1e" in x or "\x1f" in x for x in names):
            raise ValueError("a rule's name holds \\x1e or \\x1f: not expressible for MVKE.APPLY")
        return "\x1e".join(records)

    def to_lua(self) -> str:
        """The compact form the apply function decodes (mvke/runtime/event_apply.py)."""
        return json.dumps({
            "h": [{"f": h.field, "on": {t: 1 for t in h.on}, "src": h.source, "cap": h.max_len,
                   "d": int(h.distinct), "r": int(h.reversed_within)} for h in self.histories],
            "c": [{"f": c.field, "on": {t: 1 for t in c.on}} for c in self.counters],
            "b": [{"f": b.field, "n": b.rate[0] if b.rate else b.count, "d": b.rate[1] if b.rate else "",
                   "e": list(b.edges), "l": [b.labels.format(i) for i in range(len(b.edges) + 1)]}
                  for b in self.buckets],
            "k": self.dedup_ids}, separators=(",", ":"))


# ---- the batch derivation ----------------------------------------------------------------------
def _merge_history(base: list[str], events: list[Event], rule: HistoryRule) -> list[str]:
    """Newest first: the events' values by order key (descending), each event's in its listed order,
    then the base values (older than any event); one entry per value if distinct; capped."""
    out: list[str] = []
    for e in sorted(events, key=lambda e: e.order, reverse=True):
        if rule.source in e.lists and e.type in rule.on:
            own = e.lists[rule.source][::-1] if rule.reversed_within else e.lists[rule.source]
            own = list(dict.fromkeys(own)) if rule.distinct else own
            out += own
    out += base
    if rule.distinct:
        out = list(dict.fromkeys(out))
    return out[: rule.max_len]


def fold_user(base: Mapping[str, str] | None, events: Iterable[Event], rules: EventRules) -> dict[str, str]:
    """One user's feature-store values (field -> stored string) after `events`, from `base` (the
    previous snapshot's values, or None for a new user): what the event script leaves, computed in
    batch. Fields the rules do not name are kept as they are. Duplicate event ids count once."""
    out = dict(base or {})
    unique = list({e.event_id: e for e in events}.values())
    if not unique:
        return out
    for rule in rules.histories:
        old = out.get(rule.field)
        merged = _merge_history(old.split(MULTI_SEP) if old else [], unique, rule)
        if merged:
            out[rule.field] = MULTI_SEP.join(merged)
    counts: dict[str, int] = {}
    for c in rules.counters:
        n = sum(1 for e in unique if e.type in c.on)
        if c.field in out or n:
            counts[c.field] = int(out.get(c.field, 0)) + n
            out[c.field] = str(counts[c.field])
    for b in rules.buckets:
        label = b.label(counts)
        if label is None:
            out.pop(b.field, None)
        else:
            out[b.field] = label
    return out


# ---- age -----------------------------------------------------------------------------------------
def feature_age_s(stored: Mapping[str, Any] | None, now: float | None = None) -> float | None:
    """Seconds since a user's stored features were last brought up to date: the later of its batch
    load (`_loaded_at`) and its last applied event (`_event_at`); None when neither is recorded."""
    if not stored:
        return None
    stamps = []
    for name in (LOADED_AT_FIELD, EVENT_AT_FIELD):
        v = stored.get(name)
        if isinstance(v, bytes):
            v = v.decode()
        try:
            stamps.append(float(v))
        except (TypeError, ValueError):
            continue
    if not stamps:
        return None
    return max(0.0, (time.time() if now is None else now) - max(stamps))


@dataclass
class ApplyCounts:
    """What applying a batch did: `late` events were older than the user's duplicate horizon."""
    applied: int = 0
    duplicate: int = 0
    late: int = 0
    failed: list[tuple[Event, str]] = field(default_factory=list)

    def add(self, other: "ApplyCounts") -> None:
        self.applied += other.applied
        self.duplicate += other.duplicate
        self.late += other.late
        self.failed += other.failed


# ---- logs -> events ----------------------------------------------------------------------------------
def log_row_events(row: Mapping[str, Any], row_number: int) -> list[Event]:
    """One impression row of a log (docs/OWN_DATA.md: user_id, timestamp, tags, click, conversion;
    `event_id` optional) -> its impression event, plus a click and a conversion event when labelled.
    Without an `event_id` column the id is `<user>:<timestamp>:<row number>` (stable for a file, so
    replaying the same file twice is idempotent); the click and conversion ids add `:click`/`:conversion`."""
    user = str(row["user_id"])
    ts = int(row["timestamp"])
    base = str(row["event_id"]) if row.get("event_id") is not None else f"{user}:{ts}:{row_number}"
    tags = [str(t) for t in (row.get("tags") or [])]
    out = [Event(base, user, ts, "impression", {"tags": tags})]
    if row.get("click"):
        out.append(Event(f"{base}:click", user, ts, "click", {"tags": tags}))
    if row.get("conversion"):
        out.append(Event(f"{base}:conversion", user, ts, "conversion", {"tags": tags}))
    return out
