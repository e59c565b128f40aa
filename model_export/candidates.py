"""Export step for large catalogues: one candidate index per task, kept only if it passes the gate.

For each task (mvke/runtime/ann.py has the scheme and its derivation): build the index over
the bundle's tag side, then the quality gate: recall@20 of the approximate ranking (index
candidates, exact rerank) against exact scoring of every tag, over `gate_users` users
(training users when the checkpoint's data is on disk, else random feature ids), with nprobe
doubled until recall >= `min_recall` (0.95) or `max_nprobe` is reached.

A task that fails the gate gets NO index: it is served exactly (its manifest entry says
`status: exact` with the recall reached), and the export goes on. Refusing the export would
block a model release over a speed feature, and a silently worse ranking is not acceptable
either; exact is always correct, and `mvke export` prints the fallback so whoever sized the
service for ANN throughput knows.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

import numpy as np

from mvke.runtime import ann
from mvke.runtime.contract import FileEntry, Manifest, ann_index_file, content_version, sha256_bytes
from mvke.runtime.model import ANN_MIN_TAGS, tag_sides
from mvke.runtime.system import container_cpus

log = logging.getLogger("mvke.export")


def wants_index(mode: str, num_tags: int, min_tags: int = ANN_MIN_TAGS) -> bool:
    """`mvke export --ann`: on (always), off (never), auto (from `min_tags` tags up)."""
    return mode == "on" or (mode == "auto" and num_tags >= min_tags)


def add_candidate_indexes(manifest: Manifest, blobs: dict[str, bytes], values: np.ndarray,
                          cfg: ann.AnnConfig = ann.AnnConfig(), min_tags: int = ANN_MIN_TAGS) -> dict:
    """Build, gate and add each task's index to the bundle (in place; the version is recomputed).

    values: the gate users' tower outputs [N, sum K, D]. Returns manifest.ann."""
    sides = tag_sides(manifest, blobs)
    info: dict = {"scheme": ann.SCHEME, "min_tags": min_tags, "config": asdict(cfg),
                  "gate": {"users": len(values), "k": cfg.gate_k, "min_recall": cfg.min_recall}, "tasks": {}}
    for spec in manifest.tasks:
        side = sides[spec.name]
        entry: dict = {"candidates": cfg.candidates}
        if side.scale <= 0:
            entry.update(status="exact", reason="score temperature <= 0: the cosine does not rank as the logit")
            info["tasks"][spec.name] = entry
            continue
        index, gate = build_and_gate(side, values[:, spec.slice[0]:spec.slice[1]], cfg, entry)
        if gate.passed:
            name = ann_index_file(spec.name)
            blobs[name] = index.to_bytes()
            manifest.files[name] = FileEntry(sha256_bytes(blobs[name]), len(blobs[name]))
            entry.update(status="ann", file=name)
        else:
            entry.update(status="exact", reason=f"recall@{cfg.gate_k} {gate.recall:.4f} < {cfg.min_recall} "
                                                f"at nprobe {gate.nprobe}")
            log.warning("task %s: candidate index failed the gate (%s); it is served exactly",
                        spec.name, entry["reason"])
        info["tasks"][spec.name] = entry
    manifest.ann = info
    manifest.version = content_version({k: v.sha256 for k, v in manifest.files.items()}, manifest.model)
    return info


FALLBACK_CLUSTERS = 8


def build_and_gate(side, values: np.ndarray, cfg: ann.AnnConfig, entry: dict) -> tuple[ann.CandidateIndex,
                                                                                       ann.GateReport]:
    """The index with cfg's gate clusters (default 1: the numerator alone, the fastest), then, if that
    fails the gate, with FALLBACK_CLUSTERS gate clusters (slower per query; robust where peaked gates
    make the denominator matter, tests/runtime/test_ann.py). Each attempt's figures go to `entry`."""
    schemes = [cfg.gate_clusters] + ([FALLBACK_CLUSTERS] if cfg.gate_clusters < FALLBACK_CLUSTERS else [])
    attempts = []
    for clusters in schemes:
        c = replace(cfg, gate_clusters=clusters)
        t0 = time.perf_counter()
        index = ann.build_task_index(side.gates, side.unit, c, threads=max(1, int(container_cpus())))  # offline: every CPU
        build_s = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        gate = ann.tune_nprobe(ann.TaskAnn(index, side.unit, side.gates, c.candidates), values, c)
        attempt = dict(build_seconds=build_s, gate_seconds=round(time.perf_counter() - t0, 2), nlist=index.nlist,
                       gate_clusters=len(index.indexes), nprobe=gate.nprobe, recall_at_k=round(gate.recall, 5),
                       tried={str(k): round(v, 5) for k, v in gate.tried.items()})
        attempts.append(attempt)
        if gate.passed:
            break
    entry.update(attempts[-1])
    if len(attempts) > 1:
        entry["schemes_tried"] = attempts
    return index, gate
