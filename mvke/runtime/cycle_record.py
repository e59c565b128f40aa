"""The daily cycle's record as published with a version: the one reader of it.

`mvke cycle` (model_export/cycle.py) puts the gate's whole record in the bundle's manifest
under `metrics.cycle` (day, training window, warm start, and `gate`: decision, reasons,
every check and figure, the policy). `mvke models` and `GET /models` show its summary.
"""
from __future__ import annotations

from typing import Any

from mvke.runtime.contract import Manifest


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
