"""The reject-rate rule (issue 28): work that rejected more than `max_rate` of its items has failed.

One rule for every stage that reads items it may reject:
* the jobs over users (`mvke features load`, `mvke tag-all`) and `mvke events replay` apply it to
  their whole input once (`reject_rate_error`);
* the stream consumer (`mvke features stream`) never ends by itself, so it applies it to a window:
  the last `size` entries it read (`RejectWindow`), once that many were read.
Torch- and pyarrow-free: the service's and the consumer's imports stay light.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

from mvke.runtime.options import DEFAULT_MAX_REJECT_RATE  # noqa: F401  (the default, beside its rule)

JOB_OUTCOME = "the job failed and wrote no success marker"
JOB_HINT = "Fix the data (`mvke data split` checks it up front) or raise --max-reject-rate"
MAX_REASONS = 5          # distinct reasons a message names


def reject_rate_error(done: int, rejected: int, max_rate: float, reasons: list[str], where: Path | str | None = None,
                      command: str = "the job", unit: str = "users", outcome: str = JOB_OUTCOME,
                      hint: str = JOB_HINT) -> str | None:
    """None when the work may succeed, else why it failed: more than `max_rate` of its `unit` rejected,
    or none handled. `where`: where every rejected item is (a directory, a dead-letter stream)."""
    total = done + rejected
    if total and done and rejected <= max_rate * total:
        return None
    if not total:
        return f"{command}: no {unit} in the input: nothing done (is it the right input?)"
    reasons = sorted(set(reasons))
    return (f"{command}: {rejected} of {total} {unit} rejected ({100 * rejected / total:.1f}%, above "
            f"--max-reject-rate {100 * max_rate:g}%): {outcome}; {done} {unit} done. "
            f"Reasons: {'; '.join(reasons[:MAX_REASONS]) or '?'}" + (f"; every bad row: {where}" if where else "")
            + f". {hint}")


class RejectWindow:
    """Done / rejected counts (and reasons) of the last batches holding at least `size` items: the
    rate of a stream that never ends. A verdict (`error`) only once `size` items were seen, so a
    handful of bad entries on a quiet stream is not a 100% rate."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"the reject-rate window must be >= 1 items, got {size}")
        self.size = size
        self._batches: deque[tuple[int, int, frozenset[str]]] = deque()
        self.done = self.rejected = 0

    def add(self, done: int, rejected: int, reasons: list[str]) -> None:
        if not done and not rejected:
            return
        self._batches.append((done, rejected, frozenset(reasons[:50])))
        self.done, self.rejected = self.done + done, self.rejected + rejected
        while self._batches and self.items - sum(self._batches[0][:2]) >= self.size:
            d, r, _ = self._batches.popleft()          # the window still holds >= size items without it
            self.done, self.rejected = self.done - d, self.rejected - r

    @property
    def items(self) -> int:
        return self.done + self.rejected

    @property
    def rate(self) -> float:
        return self.rejected / self.items if self.items else 0.0

    def reasons(self) -> list[str]:
        return sorted({x for _, _, rs in self._batches for x in rs})

    def error(self, max_rate: float, command: str, unit: str, outcome: str, hint: str,
              where: str | None = None) -> str | None:
        """`reject_rate_error` over the window, once it is full."""
        if self.items < self.size:
            return None
        return reject_rate_error(self.done, self.rejected, max_rate, self.reasons(), where, command, unit,
                                 f"{outcome} (the last {self.items} {unit} read)", hint)
