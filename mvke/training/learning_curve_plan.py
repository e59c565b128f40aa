"""Issue 27's learning curve: its protocol, plan and cells (the driver: mvke/training/learning_curve.py).

The protocol is stated once, in learning_curve.py's docstring and docs/results/learning_curve/results.md;
this module holds its rules as code: the batch/lr rule (`scaled_train`), the plan (`PLAN`), the choice of
the best baseline (`best_baseline`) and which cells belong to the curve (`expected_key`, `read_cells`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mvke.training.experiment import config_key
from mvke.training.resume import progress

BASE_USERS = 20_000
BATCH_CAP = 1024
MAX_EPOCHS = 10
MODELS = ("mvke-mt", "moe", "mmoe", "cgc", "nomtl")
BASELINES = ("moe", "mmoe", "cgc")        # the multi-task baselines `best_baseline` chooses from
BEST_BASELINE = "best-baseline"           # a plan's placeholder, resolved when the size starts
REPO = Path(__file__).resolve().parents[2]
TUNED = REPO / "docs/results/tuning-synthetic"
OUT = REPO / "docs/results/learning_curve"
EXISTING_20K = REPO / "docs/results/synthetic/cells"   # issue 10's runs: the 20k point
DATA_ROOT = Path(os.environ.get("MVKE_LC_DATA", "/work/data/lc"))


@dataclass(frozen=True)
class SizePlan:
    users: int
    models: tuple[str, ...]
    seeds: int

    @property
    def name(self) -> str:
        return size_name(self.users)


PLAN = (
    SizePlan(20_000, MODELS, 5),
    SizePlan(80_000, MODELS, 3),
    SizePlan(320_000, ("mvke-mt", BEST_BASELINE, "nomtl"), 1),
    SizePlan(1_280_000, ("mvke-mt", BEST_BASELINE, "nomtl"), 1),
)


def size_name(users: int) -> str:
    """20000 -> 'u20k', 1280000 -> 'u1280k'."""
    return f"u{users // 1000}k"


def scaled_batch(tuned_batch: int, users: int) -> int:
    return max(tuned_batch, min(BATCH_CAP, tuned_batch * users // BASE_USERS))


def scaled_train(train: dict, users: int) -> dict:
    """A tuned configuration's training settings at `users` users (the module's rule), epochs MAX_EPOCHS."""
    batch = scaled_batch(train["batch_size"], users)
    lr = train["lr"] * math.sqrt(batch / train["batch_size"])
    return {**train, "batch_size": batch, "lr": lr, "epochs": MAX_EPOCHS}


def tuned(model: str, tuned_dir: Path = TUNED) -> dict:
    return json.loads((tuned_dir / f"{model}.json").read_text())


def size_config(model: str, users: int, tuned_dir: Path = TUNED) -> dict:
    """The {"model", "train"} configuration `mvke experiment` builds for `model` at `users` (its cell key's input)."""
    t = tuned(model, tuned_dir)
    return {"model": t["model_overrides"], "train": scaled_train(t["train_overrides"], users)}


def expected_key(model: str, users: int, tuned_dir: Path = TUNED) -> str:
    """The cell key of a run made by this protocol: cells with another key are not this curve's."""
    return config_key(size_config(model, users, tuned_dir))


def write_configs(dest: Path, models, users: int, tuned_dir: Path = TUNED) -> Path:
    """`mvke experiment --configs` input for one size: <dest>/<model>/best.json, training settings scaled."""
    for m in models:
        t = tuned(m, tuned_dir)
        t["train_overrides"] = scaled_train(t["train_overrides"], users)
        t["scaling"] = f"learning_curve.scaled_train at {users} users (tuned batch/lr at {BASE_USERS})"
        (dest / m).mkdir(parents=True, exist_ok=True)
        (dest / m / "best.json").write_text(json.dumps(t, indent=1))
    return dest


def best_baseline(valid_auc: dict[str, dict[str, list[float]]], sizes: list[str]) -> str | None:
    """The multi-task baseline with the highest mean validation AUC (both tasks) at the largest of
    `sizes` where every baseline has a finished run; `valid_auc[size][model]`: one value per seed.
    Chosen on validation, never on the test day."""
    for size in reversed(sizes):
        runs = valid_auc.get(size, {})
        if all(runs.get(b) for b in BASELINES):
            return max(BASELINES, key=lambda b: sum(runs[b]) / len(runs[b]))
    return None


def resolve_models(plan: SizePlan, valid_auc: dict[str, dict[str, list[float]]]) -> list[str]:
    """The plan's models with BEST_BASELINE replaced by the smaller sizes' best baseline."""
    smaller = [p.name for p in PLAN if p.users < plan.users]
    best = best_baseline(valid_auc, smaller)
    if BEST_BASELINE in plan.models and best is None:
        raise RuntimeError(f"{plan.name}: no smaller size has finished runs of every baseline ({', '.join(BASELINES)})")
    return [best if m == BEST_BASELINE else m for m in plan.models]


# -- cells -----------------------------------------------------------------------------------
def cell_dirs(size: str, out: Path = OUT) -> list[Path]:
    """Where a size's cells are read from: issue 10's for 20k, this curve's copy for the rest."""
    return [EXISTING_20K] if size == size_name(BASE_USERS) else [out / "cells" / size]


def read_cells(size: str, users: int, models, seeds: int, out: Path = OUT) -> dict[str, list[dict]]:
    """{model: [cell per finished seed]}: only cells made by this protocol (their config key)."""
    found: dict[str, list[dict]] = {}
    for m in models:
        key = expected_key(m, users)
        for root in cell_dirs(size, out):
            paths = [root / m / f"seed-{s}.json" for s in range(seeds)]
            cells = [json.loads(p.read_text()) for p in paths if p.exists()]
            cells = [c for c in cells if c.get("config_key") == key]
            if cells:
                found[m] = cells
                break
    return found


def sync_cells(runs_dir: Path, size: str, out: Path = OUT) -> int:
    """Copy a run directory's finished cells (small JSON files) into the repository; returns how many are new."""
    src, dst, new = runs_dir / "cells", out / "cells" / size, 0
    for f in sorted(src.glob("*/seed-*.json")) if src.exists() else []:
        target = dst / f.parent.name / f.name
        if not target.exists() or target.read_bytes() != f.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            new += 1
    return new


def restore_cells(runs_dir: Path, users: int, out: Path = OUT) -> int:
    """The repository's finished cells of this protocol into a run directory that lacks them (a fresh
    machine), so that `mvke experiment` keeps them instead of training them again; returns how many."""
    size, copied = size_name(users), 0
    for f in sorted((out / "cells" / size).glob("*/seed-*.json")):
        target = runs_dir / "cells" / f.parent.name / f.name
        if target.exists() or json.loads(f.read_text()).get("config_key") != expected_key(f.parent.name, users):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        copied += 1
    return copied


def _state_progress(path: Path) -> tuple[tuple[int, int], str | None]:
    """((epochs done, steps into the next), key) of a run's state file; ((-1, 0), None) when it does not load."""
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return progress(state), state["key"]
    except Exception:  # noqa: BLE001 - a truncated or foreign file: the other copy wins
        return (-1, 0), None


def _finished(key: str | None, cells: list[Path]) -> bool:
    """A cell of the same configuration as the state (its key starts with the cell's key) is written."""
    for cell in cells:
        if key and cell.exists() and key.startswith(json.loads(cell.read_text()).get("config_key", "\0") + " "):
            return True
    return False


def sync_states(runs_dir: Path, size: str, out: Path = OUT) -> int:
    """Unfinished runs' state files (mvke/training/resume.py) between the run directory, which a machine
    takes with it, and the repository, which the next machine clones: the copy further on (epochs and
    steps, read from the files: a git checkout rewrites modification times) replaces the other, through a
    temporary file; a run whose cell of the same configuration is written has no state left anywhere.
    Returns how many files were copied."""
    here, kept, copied = runs_dir / "inflight", out / "inflight" / size, 0
    names = {p.relative_to(d) for d in (here, kept) if d.exists() for p in d.glob("*/seed-*.pt")}
    for name in sorted(names):
        a, b = here / name, kept / name
        (pa, ka), (pb, kb) = (_state_progress(a) if a.exists() else ((-2, 0), None),
                              _state_progress(b) if b.exists() else ((-2, 0), None))
        cell = name.parent / name.with_suffix(".json").name
        if _finished(ka or kb, [runs_dir / "cells" / cell, out / "cells" / size / cell]):
            a.unlink(missing_ok=True)
            b.unlink(missing_ok=True)
            continue
        if pa == pb:
            continue
        src, dst = (a, b) if pa > pb else (b, a)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)        # a copy cut short leaves the old state, never half a new one
        copied += 1
    return copied
