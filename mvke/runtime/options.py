"""Command-line options shared by the stages' commands (argparse only: imported when `mvke` builds its parser)."""
from __future__ import annotations

import argparse

DEFAULT_MAX_REJECT_RATE = 0.01     # `--max-reject-rate` of the jobs, `mvke features stream` and `mvke events replay`
DEFAULT_REJECT_WINDOW = 10_000     # `mvke features stream --reject-window`: entries over which its rate is judged


def at_least_one(text: str) -> int:
    """argparse type of the stages' counts (--workers, --jobs, --users-per-call): an int >= 1, else exit 2
    naming the flag."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def share(text: str) -> float:
    """argparse type of a share: a float in [0, 1], else exit 2 naming the flag."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1] (0.01 = 1%), got {text}")
    return value


def add_max_reject_rate_option(parser: argparse.ArgumentParser, what: str, unit: str = "users",
                               scope: str = "a job that handles nobody always fails") -> None:
    """`--max-reject-rate`, the same on every stage that rejects items (the rule: mvke/runtime/reject_rate.py)."""
    parser.add_argument("--max-reject-rate", type=share, default=DEFAULT_MAX_REJECT_RATE, metavar="SHARE",
                        help=f"fail (exit 2, {what}) when more than this share of {unit} is rejected "
                             f"(default {DEFAULT_MAX_REJECT_RATE:g} = {100 * DEFAULT_MAX_REJECT_RATE:g}%%; "
                             f"{scope})")
