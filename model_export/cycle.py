"""`mvke cycle --day D`: one day of the loop a scheduler calls (docs/OPERATIONS.md).

train a candidate on the last W days before D (from scratch or warm-started from the
active version's checkpoint) -> gate it against the active model on day D's rows
(mvke/training/gate.py, a YAML policy) -> export -> publish as canary at the ramp's first
step (or active, when nothing is published yet). A rejected candidate is never exported
nor published; the active model keeps serving.

State: HOME/day=D/state.json records each finished step and its outputs, written by
rename, so a rerun of a finished day does nothing new (it prints the recorded decision
and exits with the same code) and a crashed run resumes at the first unfinished step.
HOME/day=D/lock is held (flock) for the whole run: a second run of the same day exits
with EXIT_BUSY, or with `wait` blocks until the first finishes (and then finds it done).

    HOME/day=D/state.json    steps done, decision, exit code
    HOME/day=D/candidate/    the candidate's checkpoint (metrics.json carries the gate record)
    HOME/day=D/gate.json     the gate's record (every figure, check and the policy)
    HOME/day=D/bundle/       the exported bundle (passed candidates only)
    HOME/models/<version>/   the checkpoint of every published version: the next day's gate
                             compares against the active version's, warm start starts from it
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_export.bundle import export_checkpoint
from model_export.publish import canary_of, publish
from mvke.data.dataset import RawDataset, build_schema
from mvke.data.days import DaysLayout, grow_schema, grow_tags, id_map, parse_day, view
from mvke.data.split import time_validation_mask
from mvke.runtime.keys import Keys
from mvke.runtime.versions import active_version
from mvke.training.gate import Scored, decide, load_policy, score
from mvke.training.trainer import (
    EncodedData,
    TrainConfig,
    TrainResult,
    load_checkpoint,
    model_config_for,
    save_checkpoint,
    train_model,
)

EXIT_OK, EXIT_REJECTED, EXIT_BUSY = 0, 1, 3
STATE_FILE, LOCK_FILE, GATE_FILE = "state.json", "lock", "gate.json"


class CycleBusy(RuntimeError):
    """Another run of the same day holds its lock."""


@dataclass
class CycleConfig:
    data: Path                      # a days directory (mvke/data/days.py)
    day: str                        # YYYY-MM-DD: the gated day; training uses the days before it
    home: Path                      # state, checkpoints, bundles
    window: int = 3
    warm_start: bool = False
    model: str = "mvke-mt"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)      # TrainConfig fields (epochs, threads...)
    policy: Path | None = None
    redis_url: str | None = None
    key_prefix: str | None = None
    wait: bool = False              # a busy day: wait for the lock instead of exiting
    shuffle_labels: bool = False    # testing the gate only: train on labels shuffled across rows
    keep: int = 3                   # versions kept in Redis

    def __post_init__(self) -> None:
        parse_day(self.day)
        if self.window < 1:
            raise ValueError(f"window must be >= 1 day, got {self.window}")
        self.data, self.home = Path(self.data), Path(self.home)


@dataclass
class CycleResult:
    day: str
    decision: str                   # published-canary | activated | rejected
    exit_code: int
    reasons: list[str]
    state: dict
    noop: bool = False              # a rerun of a finished day


# ------------------------------------------------------------------ state and lock
def day_dir(cfg: CycleConfig) -> Path:
    return cfg.home / f"day={cfg.day}"


def read_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"steps": {}}


def write_json(path: Path, doc: dict) -> None:
    """Write by rename: a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


@contextmanager
def day_lock(path: Path, wait: bool) -> Iterator[None]:
    """flock on HOME/day=D/lock: released by the kernel when the process dies (no stale locks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            raise CycleBusy(f"another run of this day holds {path} ({f.read().strip() or 'pid unknown'}); "
                            "rerun with --wait to wait for it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------ training
def _warm_state(active: TrainResult, model, schema, tags: list[str]) -> dict:
    """The new model's initial weights: the active's, with the rows of the user-feature, tag and
    tag-category embeddings moved to their ids in the grown vocabularies (new ids keep the fresh
    init); every other weight is the active's as it is (same architecture)."""
    fmap = id_map(active.schema, schema)                                        # old feature id -> new
    tmap = np.array([0] + [tags.index(t) + 1 for t in active.tags])             # old tag id -> new
    new_groups = _group_names(tags)
    gmap = np.array([0] + [new_groups.index(g) + 1 for g in _group_names(active.tags)])
    moved = {"embedding.table.weight": fmap, "tag_tower.table.weight": tmap, "tag_tower.group.weight": gmap}
    new_state, old_state = model.state_dict(), active.model.state_dict()
    for name, new in new_state.items():
        old = old_state[name]
        rows = next((m for suffix, m in moved.items() if name.endswith(suffix)), None)
        if rows is None:
            if old.shape != new.shape:
                raise ValueError(f"warm start: {name} has shape {tuple(old.shape)} in the active model and "
                                 f"{tuple(new.shape)} in the candidate; train from scratch")
            new_state[name] = old.clone()
            continue
        grown = new.clone()
        grown[torch.from_numpy(rows)] = old                                     # [N_new, d] <- [N_old, d]
        new_state[name] = grown
    return new_state


def _group_names(tags: list[str]) -> list[str]:
    return sorted({t.rsplit("/", 1)[0] for t in tags if "/" in t})


def _shuffled(split, rng: np.random.Generator):
    split.labels = split.labels[rng.permutation(len(split.labels))]
    return split


def train_candidate(cfg: CycleConfig, layout: DaysLayout, active: TrainResult | None, out: Path) -> dict:
    """Train on the window and save the checkpoint to `out` (by rename). Returns the step's record."""
    days = layout.window(cfg.day, cfg.window)
    if not days:
        raise ValueError(f"no day with a log before {cfg.day} in {cfg.data} (days: {', '.join(layout.days())})")
    v = view(layout, days)
    rows = v.rows
    tags = layout.tags_in(days)
    fit_mask = ~time_validation_mask(rows, TrainConfig().valid_fraction, f"{cfg.data} days {days[0]}..{days[-1]}")
    fit = RawDataset(layout.root, {**layout.meta, "tags": tags}, rows[fit_mask], rows.iloc[:0], v.dataset(tags).users)
    schema = build_schema(fit)
    warm = cfg.warm_start and active is not None
    if warm:
        tags = grow_tags(active.tags, tags)
        schema = grow_schema(active.schema, schema)
    split = v.encode(schema, tags)
    if cfg.shuffle_labels:
        split = _shuffled(split, np.random.default_rng(0))
    idx_fit, idx_valid = np.flatnonzero(fit_mask), np.flatnonzero(~fit_mask)
    data = EncodedData(v.dataset(tags), schema, split.subset(idx_fit), split.subset(idx_valid), split.subset(idx_fit[:0]))
    overrides = dict(cfg.model_overrides)
    if warm:   # the architecture is the active's (its sizes), on the grown vocabularies
        keep = {k: val for k, val in asdict(active.model.cfg).items()
                if k not in ("num_ids", "num_tags", "tag_groups", "name", "tasks", "num_cat_fields", "num_multi_fields")}
        overrides = {**keep, **overrides}
    model_cfg = model_config_for(active.model.cfg.name if warm else cfg.model, data, **overrides)
    train_cfg = TrainConfig(**{"progress": False, **cfg.train, "score_test": False})
    initial = None
    if warm:
        from mvke.models import build_torch_model
        initial = _warm_state(active, build_torch_model(model_cfg), schema, tags)
    result = train_model(data, model_cfg, train_cfg, initial_state=initial)
    result.metrics["cycle"] = {"day": cfg.day, "window": days, "warm_start": warm, "shuffled_labels": cfg.shuffle_labels}
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(result, tmp, train_cfg, "")   # no single dataset directory: parity uses random users
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"window": days, "warm_start": warm, "rows": len(split), "tags": len(tags), "num_ids": schema.num_ids,
            "train_seconds": result.metrics["train_seconds"], "cpu_seconds": result.metrics["cpu_seconds"],
            "best_valid_auc": result.metrics["valid_auc"]}


# ------------------------------------------------------------------ gate
def _categories(rows) -> np.ndarray:
    """Each row's slice: the category (name before '/') of the ad's first tag."""
    return np.array([(next(iter(t)).rsplit("/", 1)[0] if len(t) else "") for t in rows["tags"]], dtype=object)


def _scored(model: TrainResult, v, cats: np.ndarray) -> Scored:
    return score(model.model, v.encode(model.schema, model.tags), cats)


def gate(cfg: CycleConfig, layout: DaysLayout, candidate: TrainResult, active: TrainResult | None,
         active_version_id: str | None) -> dict:
    v = view(layout, [cfg.day])
    cats = _categories(v.rows)
    record = decide(_scored(candidate, v, cats), None if active is None else _scored(active, v, cats),
                    load_policy(cfg.policy))
    record.update(day=cfg.day, active_version=active_version_id,
                  active_compared=active is not None,
                  policy_file=str(cfg.policy) if cfg.policy else "(defaults)")
    if active is None and active_version_id:
        record["note"] = (f"active version {active_version_id} has no checkpoint in {cfg.home / 'models'}: "
                          "absolute thresholds only")
    return record


# ------------------------------------------------------------------ the day
def _redis(cfg: CycleConfig):
    from mvke.runtime.keys import key_prefix
    from mvke.runtime.redis_client import connect
    return connect(cfg.redis_url, socket_timeout=30, socket_connect_timeout=10), Keys(key_prefix(cfg.key_prefix))


def _active(cfg: CycleConfig, r, keys: Keys) -> tuple[str | None, TrainResult | None]:
    version = active_version(r, keys)
    ckpt = cfg.home / "models" / str(version)
    return version, (load_checkpoint(ckpt) if version and ckpt.exists() else None)


def run_cycle(cfg: CycleConfig, say=lambda m: print(m, file=sys.stderr)) -> CycleResult:
    """One day: the steps not yet done (module docstring). Raises CycleBusy when the day is locked."""
    d = day_dir(cfg)
    with day_lock(d / LOCK_FILE, cfg.wait):
        state_path = d / STATE_FILE
        state = read_state(state_path)
        if state.get("status") == "done":
            say(f"day {cfg.day}: already done ({state['decision']}); nothing to do")
            return CycleResult(cfg.day, state["decision"], state["exit_code"], state.get("reasons", []), state, True)
        state.update(day=cfg.day, status="running", config={k: str(v) for k, v in asdict(cfg).items()})
        steps = state["steps"]
        layout = DaysLayout(cfg.data)
        if cfg.day not in layout.days():   # before any training: the gate needs the day's rows
            raise ValueError(f"no log for day {cfg.day} in {cfg.data / 'logs'} (days: {', '.join(layout.days()) or 'none'})")
        r, keys = _redis(cfg)
        torch.set_num_threads(int(cfg.train.get("threads", 2)))
        active_id, active = _active(cfg, r, keys) if "active" not in steps else (
            steps["active"]["version"], _load_or_none(cfg, steps["active"]["version"]))
        steps.setdefault("active", {"version": active_id, "checkpoint": active is not None})
        cand_dir = d / "candidate"

        def step(name: str, fn) -> dict:
            if name in steps:
                say(f"day {cfg.day}: {name} done before, skipped")
                return steps[name]
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            out.update(wall_seconds=round(time.perf_counter() - t0, 3), cpu_seconds_step=round(time.process_time() - c0, 3))
            steps[name] = out
            write_json(state_path, state)
            say(f"day {cfg.day}: {name} done in {out['wall_seconds']:.1f} s")
            return out

        if active is None and cfg.warm_start:
            say(f"day {cfg.day}: --warm-start without an active checkpoint: training from scratch")
        step("train", lambda: train_candidate(cfg, layout, active, cand_dir))
        candidate = load_checkpoint(cand_dir)

        def do_gate() -> dict:
            record = gate(cfg, layout, candidate, active, active_id)
            write_json(d / GATE_FILE, record)
            metrics = json.loads((cand_dir / "metrics.json").read_text())
            metrics["cycle"] = {**metrics.get("cycle", {}), "gate": record}
            write_json(cand_dir / "metrics.json", metrics)
            return {"decision": record["decision"], "reasons": record["reasons"], "record": str(d / GATE_FILE)}
        g = step("gate", do_gate)
        if g["decision"] == "rejected":
            return _finish(state, state_path, "rejected", EXIT_REJECTED, g["reasons"], say)

        def do_export() -> dict:
            manifest, fig = export_checkpoint(cand_dir, d / "bundle", ann_mode="off")
            models = cfg.home / "models" / manifest.version
            if not models.exists():
                tmp = models.with_name(f".{models.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(cand_dir, tmp)
                tmp.rename(models)
            return {"version": manifest.version, "bundle": str(d / "bundle"), "export_seconds": fig["export_seconds"]}
        e = step("export", do_export)

        def do_publish() -> dict:
            policy = load_policy(cfg.policy)
            current = active_version(r, keys)
            if current is None:   # nothing serves yet: a canary needs an active version beside it
                rep = publish(d / "bundle", r, keep=cfg.keep, keys=keys)
                return {"version": e["version"], "as": "active", "report": rep}
            if current == e["version"]:
                return {"version": e["version"], "as": "active (unchanged: same content)", "report": {}}
            replaced = canary_of(r, keys)   # a canary still ramping gives way to the newer, gated candidate
            rep = publish(d / "bundle", r, keep=cfg.keep, keys=keys, canary_percent=policy.ramp[0])
            return {"version": e["version"], "as": f"canary {policy.ramp[0]:g}%", "report": rep,
                    "replaced_canary": None if replaced is None else f"{replaced[0]}:{replaced[1]:g}"}
        p = step("publish", do_publish)
        decision = "activated" if p["as"].startswith("active") else "published-canary"
        return _finish(state, state_path, decision, EXIT_OK, [], say)


def _load_or_none(cfg: CycleConfig, version: str | None) -> TrainResult | None:
    ckpt = cfg.home / "models" / str(version)
    return load_checkpoint(ckpt) if version and ckpt.exists() else None


def _finish(state: dict, path: Path, decision: str, code: int, reasons: list[str], say) -> CycleResult:
    state.update(status="done", decision=decision, exit_code=code, reasons=reasons,
                 finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json(path, state)
    say(f"day {state['day']}: {decision}" + "".join(f"\n  - {r}" for r in reasons))
    return CycleResult(state["day"], decision, code, reasons, state)


__all__ = ["EXIT_BUSY", "EXIT_OK", "EXIT_REJECTED", "CycleBusy", "CycleConfig", "CycleResult", "day_lock", "run_cycle"]
