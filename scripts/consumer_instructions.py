"""Instructions per event of the event consumer's own process (issue 22), counted by valgrind: the
Python side of the event path (XREADGROUP reply, JSON, `parse_event`, grouping, packing the FCALLs,
their replies, XACK), a figure the box's noise does not move.

A private redis-server (native); the bench's events (loadtest/events_bench.py, 100,000 users, 8
partitions) are published by this process, then one `StreamConsumer` (batch 500) drains them in a
child process under `valgrind --tool=callgrind`, its heap frozen before the loop as `mvke features
stream` does (`freeze_startup_heap`). Counted for two stream lengths; their
difference per event removes start-up and imports.

    PYTHONPATH=. python scripts/consumer_instructions.py [--code DIR] [--events 2000,22000]

Needs `valgrind` (apt). ~1 min per stream length.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PARTITIONS, USERS = 8, 100_000

# the child: drain the streams with one consumer (the code under PYTHONPATH), print what it read
_CONSUME = """
import sys
import redis
from loadtest.events_bench import RULES, PARTITIONS
from mvke.runtime.event_stream import StreamConsumer
from mvke.runtime.events import EventRules
from mvke.runtime.keys import Keys
try:                         # what `mvke features stream` does before its loop, where the checkout has it
    from mvke.runtime.system import freeze_startup_heap
except ImportError:
    freeze_startup_heap = lambda: None
consumer = StreamConsumer(redis.Redis.from_url(sys.argv[1]), Keys(), EventRules.from_dict(RULES), PARTITIONS,
                          name="counted", batch=500, block_ms=10)
freeze_startup_heap()
print(consumer.run(max_idle_s=0.05).read)
"""


def _publish(url: str, n: int, seed: int) -> None:
    import redis

    from loadtest.events_bench import make_events
    from mvke.runtime.event_stream import ensure_groups, publish_events
    from mvke.runtime.keys import Keys
    r = redis.Redis.from_url(url)
    r.flushall()
    ensure_groups(r, Keys(), PARTITIONS)
    events = make_events([str(u) for u in range(USERS)], n, f"run{seed}", seed=seed)
    for i in range(0, n, 20_000):
        publish_events(r, Keys(), events[i:i + 20_000], PARTITIONS, maxlen=n * 4)


def counted(url: str, n: int, code: Path) -> int:
    """Instructions of a consumer process that drains n events."""
    _publish(url, n, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                               "-c", _CONSUME, url], cwd=code, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(code)})
        if done.returncode != 0 or int(done.stdout.split()[-1]) != n:
            raise RuntimeError(f"the consumer failed or read other than {n}: {done.stdout[-300:]} {done.stderr[-600:]}")
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError("no totals in the callgrind output")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1],
                   help="the checkout whose consumer is counted (default this one)")
    p.add_argument("--events", default="2000,22000", help="the two stream lengths (default 2000,22000)")
    a = p.parse_args(argv)
    if not shutil.which("valgrind"):
        sys.exit("valgrind is not installed (apt install valgrind)")
    from mvke.localredis import LocalRedis
    from mvke.runtime.system import cpu_model
    small, large = (int(x) for x in a.events.split(","))
    server = LocalRedis().start()
    try:
        totals = {n: counted(server.url, n, a.code.resolve()) for n in (small, large)}
    finally:
        server.stop()
    per_event = (totals[large] - totals[small]) / (large - small)
    print(json.dumps({"code": str(a.code), "cpu": cpu_model(), "instructions": totals,
                      "instructions_per_event": round(per_event)}, indent=1))


if __name__ == "__main__":
    main()
