"""`mvke promote --auto`: one look at the canary's ramp step, then hold, step, promote or roll back.

Called on a schedule (every 15 minutes: deploy/k8s/cronjob-cycle.yaml) or after `mvke cycle`.
Per ramp step of the canary (the policy's `ramp`, default 1 -> 10 -> 50 -> 100%) it reads
the canary's live figures (`{mvke}:v<id>:live`, mvke/runtime/cycle_record.py) since the step
began (`{mvke}:ramp` holds the counters at that moment) and applies the policy's `promotion`
rules (mvke/training/gate.py):

* an error rate above `max_error_rate`, or (with at least `min_shadow_samples` shadowed
  requests) a mean top-20 Jaccard below `min_shadow_jaccard` or a mean score shift above
  `max_shadow_shift`: roll back (the canary is dropped, the active version serves everyone);
* otherwise, once the step has lasted `min_step_seconds` and the canary answered `min_answers`
  users in it: the next step, and after the last below 100% `mvke promote`;
* otherwise hold.

The decision and its figures are returned (and printed by the command) and the ramp state is
kept in Redis, so any host may run the next look.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from model_export.publish import canary_of, promote, rollback, set_canary_percent
from mvke.runtime.cycle_record import LiveFigures, read_live
from mvke.runtime.keys import Keys
from mvke.training.gate import Policy

ROLLED_BACK = "rolled back"


@dataclass
class StepChecks:
    failed: list[str]      # reasons to roll back
    waiting: list[str]     # reasons to hold


def _judge(step: LiveFigures, seconds: float, rules) -> StepChecks:
    failed, waiting = [], []
    if step.answers and step.errors / step.answers > rules.max_error_rate:
        failed.append(f"error rate {step.errors / step.answers:.4f} > {rules.max_error_rate} "
                      f"({step.errors} of {step.answers} answers)")
    if step.shadow_n >= rules.min_shadow_samples:
        jaccard, shift = step.shadow_jaccard_sum / step.shadow_n, step.shadow_shift_sum / step.shadow_n
        if jaccard < rules.min_shadow_jaccard:
            failed.append(f"shadow Jaccard@20 {jaccard:.3f} < {rules.min_shadow_jaccard} ({step.shadow_n} requests)")
        if shift > rules.max_shadow_shift:
            failed.append(f"shadow score shift {shift:.4f} > {rules.max_shadow_shift} ({step.shadow_n} requests)")
    if seconds < rules.min_step_seconds:
        waiting.append(f"step lasted {seconds:.0f} s of {rules.min_step_seconds:g}")
    if step.answers < rules.min_answers:
        waiting.append(f"{step.answers} answers of {rules.min_answers}")
    return StepChecks(failed, waiting)


def _start_step(r, keys: Keys, version: str, percent: float, live: LiveFigures, now: float) -> None:
    r.hset(keys.ramp, mapping={"version": version, "percent": repr(percent), "since": repr(now),
                               **{f"at_{k}": repr(v) for k, v in live.to_dict().items()}})


def auto_promote(r, keys: Keys, policy: Policy, now: float | None = None) -> dict:
    """One look (module docstring). Returns {decision: none|started|hold|stepped|promoted|rolled back, ...}."""
    now = time.time() if now is None else now
    canary = canary_of(r, keys)
    if canary is None:
        return {"decision": "none", "reason": "no canary"}
    version, percent = canary
    live = read_live(r, keys, version)
    raw = r.hgetall(keys.ramp)
    state = {k.decode(): v.decode() for k, v in raw.items()}
    if state.get("version") != version or float(state.get("percent", -1)) != percent:
        _start_step(r, keys, version, percent, live, now)   # a new canary, or stepped by hand
        return {"decision": "started", "version": version, "percent": percent}
    step = live.minus(LiveFigures.from_hash(raw, "at_"))
    seconds = now - float(state["since"])
    checks = _judge(step, seconds, policy.promotion)
    out = {"version": version, "percent": percent, "step": step.to_dict(), "step_seconds": round(seconds, 1)}
    if checks.failed:
        rollback(r, keys)
        r.delete(keys.ramp)
        return {**out, "decision": ROLLED_BACK, "reasons": checks.failed}
    if checks.waiting:
        return {**out, "decision": "hold", "reasons": checks.waiting}
    later = [p for p in policy.ramp if p > percent]
    if not later or later[0] >= 100:
        rep = promote(r, keys)
        r.delete(keys.ramp)
        return {**out, "decision": "promoted", "active": rep["active"], "previous": rep["previous"]}
    set_canary_percent(r, later[0], keys)
    _start_step(r, keys, version, later[0], live, now)
    return {**out, "decision": "stepped", "to_percent": later[0]}


__all__ = ["ROLLED_BACK", "auto_promote"]
