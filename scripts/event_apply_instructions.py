"""Instructions per event of the apply function, counted by valgrind (issue 22): a figure the box's noise
does not move (Redis CPU time per event moves 1.5-2x between runs of the same code on a shared box).

A private redis-server under `valgrind --tool=callgrind`, counting only inside `fcallCommand` (the
function calls, nothing of the network or the event loop): 2,000 users, whose histories are first
filled by 20,000 events, then the counters zeroed and 6,000 events applied in batches of 2,000 through
`EventApplier`. Same events as scripts/event_apply_micro.py (cap 30, distinct), fewer (valgrind runs
Redis ~50x slower).

    PYTHONPATH=. python scripts/event_apply_instructions.py [--variants real,general,nohist,floor,noop]
    # another checkout's shipped function (e.g. the one before a change), same events:
    PYTHONPATH=. python scripts/event_apply_instructions.py --code DIR --variants real
    # also each command's parsing and dispatch (what one call for several users saves besides the function)
    PYTHONPATH=. python scripts/event_apply_instructions.py --inside processInputBuffer --variants real,noop

Needs `valgrind` (apt) and `callgrind_control` (same package). ~40 s per variant.
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

USERS, FILL, MEASURED, BATCH = 2_000, 20_000, 6_000, 2_000


def _counted(out_dir: Path) -> int:
    """Instructions in the dump after the zeroing (callgrind writes `<file>.1` for the first dump)."""
    for line in (out_dir / "cg.out.1").read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out_dir / 'cg.out.1'}")


def instructions_per_event(library: str, rules, fill, measured, inside: str = "fcallCommand") -> float:
    """Instructions per measured event, counted inclusively inside the Redis function `inside`."""
    from loadtest.apply_floor import using_library
    from mvke.localredis import LocalRedis
    from mvke.runtime import event_apply
    from mvke.runtime.keys import Keys

    class CallgrindRedis(LocalRedis):
        """The private redis-server, run under callgrind (counting only inside `inside`, from the zeroing on)."""
        def server_args(self) -> list[str]:
            return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.dir}/cg.out", "--collect-atstart=no",
                    f"--toggle-collect={inside}", *super().server_args()]

    with tempfile.TemporaryDirectory() as tmp:
        server = CallgrindRedis(data_dir=tmp).start(timeout=60)     # valgrind starts Redis in seconds
        try:
            r = server.client()
            with using_library(library):
                applier = event_apply.EventApplier(r, Keys("instr"), rules)
            for i in range(0, len(fill), BATCH):
                applier.apply(fill[i:i + BATCH])
            subprocess.run(["callgrind_control", "-z", str(server.proc.pid)], cwd=tmp, check=True, capture_output=True)
            for i in range(0, len(measured), BATCH):
                assert not applier.apply(measured[i:i + BATCH]).failed
            subprocess.run(["callgrind_control", "-d", str(server.proc.pid)], cwd=tmp, check=True, capture_output=True)
            return _counted(Path(tmp)) / len(measured)
        finally:
            server.kill()      # SIGTERM under valgrind can leave it running for minutes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="real,general,nohist,floor,noop",
                   help="scripts/event_apply_micro.py's variants and loadtest/apply_floor.py's noop")
    p.add_argument("--code", type=Path, help="import the code of this checkout instead (its `real` only)")
    p.add_argument("--inside", default="fcallCommand",
                   help="count inside this Redis function (default fcallCommand: the function's work; "
                        "processInputBuffer: also each command's parsing and dispatch)")
    a = p.parse_args(argv)
    if not shutil.which("valgrind"):
        sys.exit("valgrind is not installed (apt install valgrind)")
    if a.code:
        sys.path[:0] = [str(a.code), str(a.code / "scripts")]
    from event_apply_micro import LIBRARIES, RULES

    from loadtest.apply_floor import VARIANTS
    from loadtest.events_bench import make_events
    from mvke.runtime.events import EventRules
    from mvke.runtime.system import cpu_model
    libraries = {**LIBRARIES, "noop": lambda: VARIANTS["noop"]}
    rules = EventRules.from_dict({**RULES, "histories": [{**h, "max_len": 30, "distinct": True}
                                                         for h in RULES["histories"]]})
    users = [f"u{i}" for i in range(USERS)]
    fill = make_events(users, FILL, "fill", 1, ts0=1_700_000_000)
    measured = make_events(users, MEASURED, "m", 2, ts0=1_700_003_000)
    got = {}
    for name in a.variants.split(","):
        got[name] = round(instructions_per_event(libraries[name](), rules, fill, measured, a.inside))
        print(f"{name}: {got[name]:,} instructions per event", file=sys.stderr, flush=True)
    print(json.dumps({"code": str(a.code or "this checkout"), "inside": a.inside, "cpu": cpu_model(),
                      "loadavg": [round(x, 2) for x in os.getloadavg()],   # counts do not depend on it
                      "instructions_per_event": got}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
