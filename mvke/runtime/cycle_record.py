"""The daily cycle's record as published with a version: the one reader of it.

`mvke cycle` (model_export/cycle.py) puts the gate's whole record in the bundle's manifest
under `metrics.cycle` (day, training window, warm start, and `gate`: decision, reasons,
every check and figure, the policy). `mvke models` and `GET /models` show its summary.
The live figures of a serving version (`LiveFigures`, `{mvke}:v<id>:live`) are read here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mvke.runtime.contract import Manifest
from mvke.runtime.keys import Keys


def gate_summary(manifest: Manifest) -> dict[str, Any] | None:
    """{day, decision, reasons, active_version, window, warm_start} of a version the cycle published,
    None for a version published by hand (no record)."""
    cycle = (manifest.metrics or {}).get("cycle") or {}
    gate = cycle.get("gate")
    if not gate:
        return None
    return {"day": cycle.get("day"), "decision": gate.get("decision"), "reasons": gate.get("reasons", []),
            "compared_with": gate.get("active_version"), "window": cycle.get("window"),
            "warm_start": cycle.get("warm_start")}


@dataclass
class LiveFigures:
    """Counters of `{mvke}:v<id>:live` (keys.py): what a version did while it served. The service
    adds to them (HINCRBY / HINCRBYFLOAT); `mvke promote --auto` reads them per ramp step."""

    answers: int = 0              # users answered by this version
    errors: int = 0               # answers this version failed (5xx while it served the user)
    shadow_n: int = 0             # requests of the active version also scored by this canary off-path
    shadow_jaccard_sum: float = 0.0   # sum of Jaccard(top-20 active, top-20 canary) over shadow_n
    shadow_shift_sum: float = 0.0     # sum of |mean score canary - mean score active| over shadow_n
    shadow_seconds_sum: float = 0.0   # sum of the canary's encode + predict seconds over shadow_n

    FIELDS: ClassVar[tuple[str, ...]] = ("answers", "errors", "shadow_n", "shadow_jaccard_sum", "shadow_shift_sum",
                                         "shadow_seconds_sum")

    def minus(self, before: LiveFigures) -> LiveFigures:
        return LiveFigures(*(getattr(self, f) - getattr(before, f) for f in self.FIELDS))

    def to_dict(self) -> dict[str, float]:
        return {f: getattr(self, f) for f in self.FIELDS}

    @classmethod
    def from_hash(cls, raw: dict, prefix: str = "") -> LiveFigures:
        def get(name: str) -> float:
            v = raw.get(f"{prefix}{name}".encode(), raw.get(f"{prefix}{name}"))
            return float(v) if v is not None else 0.0
        return cls(int(get("answers")), int(get("errors")), int(get("shadow_n")), get("shadow_jaccard_sum"),
                   get("shadow_shift_sum"), get("shadow_seconds_sum"))

    def add(self, other: LiveFigures) -> None:
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def means(self) -> dict[str, float | None]:
        """Mean Jaccard@20, score shift and canary seconds per shadowed request (None before the first)."""
        n = self.shadow_n
        return {"jaccard_at_20": self.shadow_jaccard_sum / n if n else None,
                "score_shift": self.shadow_shift_sum / n if n else None,
                "canary_seconds": self.shadow_seconds_sum / n if n else None}


TopLists = dict[str, tuple[list[str], list[float]]]   # task -> (tag names, scores), best first


def compare_top(active: TopLists, canary: TopLists) -> tuple[float, float]:
    """One shadowed request: (mean over the shared tasks of the Jaccard of the two top lists, by tag name:
    versions number their tags differently; mean |mean canary score - mean active score|)."""
    jaccards, shifts = [], []
    for task in active.keys() & canary.keys():
        (a_tags, a_scores), (c_tags, c_scores) = active[task], canary[task]
        union = set(a_tags) | set(c_tags)
        jaccards.append(len(set(a_tags) & set(c_tags)) / len(union) if union else 1.0)
        if a_scores and c_scores:
            shifts.append(abs(sum(c_scores) / len(c_scores) - sum(a_scores) / len(a_scores)))
    return (sum(jaccards) / len(jaccards) if jaccards else 0.0), (sum(shifts) / len(shifts) if shifts else 0.0)


def read_live(r, keys: Keys, version: str) -> LiveFigures:
    return LiveFigures.from_hash(r.hgetall(keys.live(version)))


def add_live(pipe, keys: Keys, version: str, delta: LiveFigures) -> None:
    """Queue HINCRBY / HINCRBYFLOAT of a version's non-zero counters on a (sync or async) pipeline:
    every service process adds its own, so the hash is the sum over replicas and workers."""
    key = keys.live(version)
    for f in LiveFigures.FIELDS:
        v = getattr(delta, f)
        if v:
            (pipe.hincrby if isinstance(v, int) else pipe.hincrbyfloat)(key, f, v)
