"""`mvke cycle --day D`: the daily loop's one command (model_export/cycle.py, docs/OPERATIONS.md)."""
from __future__ import annotations

import argparse
import json
import sys

EXTRA = "cycle"   # trains (train extra) and exports (export extra): pyproject's cycle extra holds both


def _cycle(a: argparse.Namespace) -> None:
    if a.print_policy:
        from mvke.training.gate import DEFAULT_POLICY
        print(DEFAULT_POLICY, end="")
        return
    if not (a.day and a.data and a.home):
        raise ValueError("cycle needs --day, --data and --home (or --print-policy)")
    from model_export.cycle import EXIT_BUSY, CycleBusy, CycleConfig, run_cycle
    train = {"epochs": a.epochs, "threads": a.threads}
    cfg = CycleConfig(a.data, a.day, a.home, window=a.window, warm_start=a.warm_start, model=a.model, train=train,
                      policy=a.policy, redis_url=a.redis, key_prefix=a.key_prefix, wait=a.wait,
                      shuffle_labels=a.inject_shuffled_labels, keep=a.keep)
    try:
        result = run_cycle(cfg)
    except CycleBusy as e:
        print(f"error: day {a.day}: {e}", file=sys.stderr)
        sys.exit(EXIT_BUSY)
    print(json.dumps({"day": result.day, "decision": result.decision, "noop": result.noop,
                      "reasons": result.reasons, "steps": {k: {kk: vv for kk, vv in v.items() if kk != "report"}
                                                          for k, v in result.state["steps"].items()}}, indent=1))
    if result.exit_code:
        sys.exit(result.exit_code)


def register(sub) -> None:
    from mvke.runtime.keys import add_key_prefix_option
    from mvke.runtime.redis_client import REDIS_URL_HELP
    c = sub.add_parser(
        "cycle", help="one day of the loop: train, gate vs the active model, publish as canary",
        description="Train a candidate on the --window days before --day, gate it against the active model on "
                    "--day's rows (the --policy file: AUC, gAUC, Recall@20, calibration, coverage, slices, PSI), "
                    "and publish a passed one as canary at the ramp's first step. Idempotent: a rerun of a "
                    "finished day does nothing new; a crashed run resumes. Exit codes: 0 published, 1 rejected "
                    "(reasons on stderr; nothing published), 3 another run of the day holds its lock. "
                    "docs/OPERATIONS.md.")
    c.add_argument("--day", metavar="YYYY-MM-DD", help="the day gated (training uses the days before it)")
    c.add_argument("--data", metavar="DIR",
                   help="days directory (logs/day=*/, snapshots/day=*/: `mvke data synth --days`, `data split --daily`)")
    c.add_argument("--home", metavar="DIR", help="cycle state: per-day state, checkpoints, bundles")
    c.add_argument("--window", type=int, default=3, metavar="W", help="training days before --day (default 3)")
    c.add_argument("--warm-start", action="store_true",
                   help="start from the active version's checkpoint (vocabularies grow; known ids keep their embeddings)")
    c.add_argument("--model", default="mvke-mt", help="model of a from-scratch candidate (default mvke-mt)")
    c.add_argument("--epochs", type=int, default=3, help="training epochs (default 3, early stopping on validation)")
    c.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    c.add_argument("--policy", metavar="FILE", help="gate policy YAML (default: the documented defaults, which "
                                                   "--print-policy prints)")
    c.add_argument("--print-policy", action="store_true", help="print the default policy (YAML, commented) and exit")
    c.add_argument("--redis", metavar="URL", help=REDIS_URL_HELP)
    add_key_prefix_option(c)
    c.add_argument("--keep", type=int, default=3, metavar="N", help="versions kept in Redis (default 3)")
    c.add_argument("--wait", action="store_true",
                   help="if another run of the day holds the lock, wait for it (default: exit 3 at once)")
    c.add_argument("--inject-shuffled-labels", action="store_true",
                   help="drills only: train the candidate on labels shuffled across rows (the gate must reject it)")
    c.set_defaults(func=_cycle, extra=EXTRA)
