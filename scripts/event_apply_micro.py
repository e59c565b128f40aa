"""Redis CPU per event of the apply function and of variants with one part taken out (issue 22).

A private redis-server, nothing beside it: 20,000 users whose histories are first filled (200,000
events), then 60,000 events in batches of 5,000 through `EventApplier`; Redis's own CPU time
(INFO cpu) per event, each variant twice, interleaved. Variants (text edits of the real library):

* real        the function `mvke features stream` ships
* general     real without its fast path (every history change through the general insert on tables)
* lazy        the history values read only when an event touches them (checked: same hashes)
* parse_only  histories read and parsed into tables but not inserted into or written back
* nohist      no history work at all (counters, ids, buckets, `_event_at` as real)
* floor       loadtest/apply_floor.py's lower bound (ids, counters, `_event_at`, TTL)

    PYTHONPATH=. python scripts/event_apply_micro.py [--cap 30]
"""
from __future__ import annotations

import argparse
import json
import os
import time

from loadtest.apply_floor import VARIANTS, using_library
from loadtest.events_bench import RULES, make_events, redis_cpu
from mvke.localredis import LocalRedis
from mvke.runtime import event_apply
from mvke.runtime.events import EventRules
from mvke.runtime.keys import Keys
from mvke.runtime.system import cpu_model

REAL = event_apply.APPLY_LIBRARY


def _edit(src: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        assert old in src, f"the library changed: {old[:60]!r} not found"
        src = src.replace(old, new)
    return src


def lazy_library() -> str:
    return _edit(REAL, [
        ("local R, NH, WANT, AUXWANT ", "local R, NH, WANT, HWANT, AUXWANT "),
        ("  WANT, AUXWANT = {'_loaded_at'}, {'base'}\n"
         "  for _, h in ipairs(R.h) do WANT[#WANT + 1] = h.f; AUXWANT[#AUXWANT + 1] = 't:' .. h.f end",
         "  WANT, HWANT, AUXWANT = {'_loaded_at'}, {}, {'base'}\n"
         "  for _, h in ipairs(R.h) do HWANT[#HWANT + 1] = h.f; AUXWANT[#AUXWANT + 1] = 't:' .. h.f end"),
        ("stored[c.f] = got[NH + 1 + i]", "stored[c.f] = got[1 + i]"),
        ("local auxgot, fresh, state = nil, false, {}", "local auxgot, histgot, fresh, state = nil, nil, false, {}"),
        ("drop them\n    end\n    local v = got[i + 1] or ''",
         "drop them\n      histgot = redis.call('HMGET', user, unpack(HWANT))\n    end\n    local v = histgot[i] or ''"),
    ])


LIBRARIES = {
    "real": lambda: REAL,
    "general": lambda: _edit(REAL, [("if (st.text and prepend(st, own, key, ks, h.cap, distinct)) or insert(",
                                      "if insert(")]),
    "lazy": lazy_library,
    "parse_only": lambda: _edit(REAL, [(
        "          if (st.text and prepend(st, own, key, ks, h.cap, distinct)) or insert(parsed(i), own, key, ks, h.cap, distinct) then",
        "          parsed(i)\n          if false then")]),
    "nohist": lambda: _edit(REAL, [("        if h.on[typ] and vals and vals ~= '' then", "        if false then")]),
    "floor": lambda: VARIANTS["floor"],
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cap", type=int, default=30, help="history length (distinct values), default 30")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    rules = EventRules.from_dict({**RULES, "histories": [{**h, "max_len": a.cap, "distinct": True}
                                                         for h in RULES["histories"]]})
    users = [f"u{i}" for i in range(20_000)]
    fill = make_events(users, 200_000, "fill", 1, ts0=1_700_000_000)
    measured = make_events(users, 60_000, "m", 2, ts0=1_700_003_000)
    server = LocalRedis().start()
    us: dict[str, list[float]] = {}
    try:
        r = server.client()
        reference = None
        for rnd in range(a.rounds):
            for name, library in LIBRARIES.items():
                keys = Keys(f"micro-{name}-{rnd}")
                with using_library(library()):
                    applier = event_apply.EventApplier(r, keys, rules)
                for i in range(0, len(fill), 5_000):
                    applier.apply(fill[i:i + 5_000])
                before = redis_cpu(r)
                for i in range(0, len(measured), 5_000):
                    counts = applier.apply(measured[i:i + 5_000])
                    assert not counts.failed, counts.failed[:1]
                us.setdefault(name, []).append(round((redis_cpu(r) - before) / len(measured) * 1e6, 2))
                if name in ("real", "general", "lazy"):       # they must write what real writes
                    state = [{k: v for k, v in r.hgetall(keys.user(u)).items() if k != b"_event_at"}
                             for u in users[:500]]
                    assert reference is None or state == reference, f"{name} wrote other values"
                    reference = state
                r.delete(*r.keys(f"micro-{name}-{rnd}*"))
    finally:
        server.stop()
    print(json.dumps({"cpu": cpu_model(), "loadavg": os.getloadavg(), "cap": a.cap,
                      "redis_cpu_us_per_event": us}, indent=1))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.0f} s")
