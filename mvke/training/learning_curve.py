"""Issue 27's learning curve: the tuned models on the default (facets) world at 20k .. 1.28M users.

The protocol, fixed before any run (docs/results/learning_curve/results.md says the same):

* data: `mvke data synth --users N --seed 0` (the default world); seed s of a size regenerates the
  world with generator seed s, as `mvke experiment` does (`experiment.seed_data_dir`). Blocks of
  users are seeded by (seed, block), so the worlds are nested: the 80k world's first users are the
  20k world's;
* configurations: the tuned ones of docs/results/tuning-synthetic (8-trial Optuna studies on the
  20k tuning world), one budget of 10 epochs for every model, early stopping on the time-based
  validation (patience 1), the test day scored once per run; no @matched rows, no LightGBM;
* batch size and learning rate (`scaled_train`): B(N) = min(BATCH_CAP, B_tuned * N / 20k),
  lr(N) = lr_tuned * sqrt(B(N) / B_tuned) (the square-root rule for Adam-type optimisers). The cap
  is the fastest batch measured on the 2-core box (samples per CPU-second of mvke-mt / moe at
  256, 1024, 4096: 16.2k / 10.9k, 19.9k / 13.1k, 14.2k / 11.9k), so 20k keeps the tuned 256 (its
  runs are issue 10's, reused as they are) and every larger size trains at 1024 with lr x 2;
* plan (`PLAN`): 5 models x 5 seeds at 20k (issue 10's cells), x 3 seeds at 80k; mvke-mt, the best
  baseline of the smaller sizes (`best_baseline`: on validation AUC) and nomtl at 320k and
  1.28M, 1 seed.

`python -m mvke.training.learning_curve run` works through the plan, one `mvke experiment` process
at a time (resumable: finished runs are cells), and after each call copies the finished cells into
docs/results/learning_curve/cells and re-aggregates; `... aggregate` only does the last two steps.
The aggregation (mvke/training/learning_curve_report.py) works on whatever cells exist.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from mvke.training.learning_curve_plan import (BEST_BASELINE, DATA_ROOT, MAX_EPOCHS, OUT, PLAN, REPO, SizePlan,
                                               resolve_models, restore_cells, sync_cells, sync_states,
                                               write_configs)
from mvke.training.learning_curve_report import aggregate, valid_aucs


# -- the driver ---------------------------------------------------------------------------------
def _mvke(*args: str) -> list[str]:
    return [sys.executable, "-m", "mvke.cli", *args]


def _ledger_add(entry: dict, out: Path = OUT) -> None:
    """CPU time of every process the driver ran (data generation and training, scoring included)."""
    path = out / "cpu_ledger.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([*rows, entry], indent=1))


def run_logged(cmd: list[str], size: str, step: str, log) -> None:
    """One child process (stdout/stderr to the log), its CPU seconds and wall time into the ledger."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0, start = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"[{start}] {size} {step}: {' '.join(cmd)}", file=log, flush=True)
    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                        env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    _ledger_add({"size": size, "step": step, "started": start, "cpu_seconds": round(cpu, 1),
                 "wall_seconds": round(time.perf_counter() - t0, 1), "returncode": rc,
                 "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]})
    if rc != 0:
        raise RuntimeError(f"{size} {step}: exit status {rc} (log: {log.name})")


def run_size(plan: SizePlan, log, data_root: Path = DATA_ROOT) -> None:
    """Generate the size's seed-0 world (parts, resumable), write its configs, run `mvke experiment`."""
    models = list(plan.models)
    if BEST_BASELINE in models:
        models = resolve_models(plan, valid_aucs())
    world = data_root / plan.name / "world"
    if not (world / "meta.json").exists():
        run_logged(_mvke("data", "synth", "--out", str(world), "--users", str(plan.users), "--seed", "0",
                         *(["--resume"] if plan.users > 65_536 else [])), plan.name, "data seed 0", log)
    configs = write_configs(data_root / plan.name / "configs", models, plan.users)
    runs = data_root / plan.name / "runs"
    restore_cells(runs, plan.users)  # finished runs of an earlier machine are kept, not trained again
    sync_states(runs, plan.name)     # an unfinished run of an earlier machine continues here
    run_logged(_mvke("experiment", "--data", str(world), "--out", str(runs), "--seeds", str(plan.seeds),
                     "--models", ",".join(models), "--configs", str(configs), "--max-epochs", str(MAX_EPOCHS),
                     "--no-reference", "--no-matched", "--threads", "1"), plan.name, f"experiment {models}", log)
    sync_cells(runs, plan.name)
    sync_states(runs, plan.name)
    try:     # the cells are what matters: a report that fails is rewritten by `aggregate` later
        aggregate()
    except Exception as e:  # noqa: BLE001
        print(f"aggregation failed: {e!r}", file=log, flush=True)


def sync_all(data_root: Path = DATA_ROOT) -> None:
    for plan in PLAN[1:]:
        runs = data_root / plan.name / "runs"
        if runs.exists():
            sync_cells(runs, plan.name)
            sync_states(runs, plan.name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mvke.training.learning_curve", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["run", "aggregate"],
                   help="run: work through the plan (resumable), then aggregate; aggregate: copy finished cells "
                        "from the run directories and write results.json/md and the PNG")
    p.add_argument("--sizes", default=",".join(str(s.users) for s in PLAN[1:]),
                   help="users of the sizes to run, in order (default: every size after 20k)")
    p.add_argument("--seeds", type=int, default=0,
                   help="run: seeds per size instead of the plan's (more seeds where the budget allows; the "
                        "finished seeds are kept)")
    p.add_argument("--log", default=str(DATA_ROOT / "driver.log"), help="progress log of `run`")
    a = p.parse_args(argv)
    if a.action == "aggregate":
        sync_all()
        aggregate()
        return
    wanted = {int(s) for s in a.sizes.split(",")}
    with open(a.log, "a") as log:
        for plan in PLAN:
            if plan.users in wanted:
                run_size(dataclasses.replace(plan, seeds=a.seeds) if a.seeds else plan, log)


if __name__ == "__main__":
    main()
