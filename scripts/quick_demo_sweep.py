"""Choose the quick demo's size, epochs and learning rate on validation AUC (issue 27 section 3).

Each configuration: the synthetic dataset `mvke pipeline` would build for it (`mvke data synth
--users U --tags T --seed 0`, cached under --work), then mvke-mt trained as `mvke train` trains it
(defaults but for the learning rate; early stopping off so that every epoch is scored) with the
test split never read. Per epoch it records the validation AUC per task, so a run of E epochs
also answers "what would 1..E epochs give". The CPU seconds of each run are recorded because the
machine this runs on is shared (wall time measures the neighbours).

    python scripts/quick_demo_sweep.py --out docs/results/first_run/quick_sweep.json \
        --grid 5000:2e-3 5000:1e-2 10000:5e-3 10000:1e-2 --epochs 3

The final configuration's test AUC is scored once, by the demo itself (`bash scripts/run.sh`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mvke.training.trainer import TrainConfig, epoch_valid_auc, model_config_for, prepare, train_model


def dataset(work: Path, users: int, tags: int) -> Path:
    """The dataset `mvke pipeline --users U --tags T --seed 0` builds (same command, same seed)."""
    d = work / f"synth-{users}u-s0-t{tags}"
    if not (d / "meta.json").exists():
        subprocess.run([sys.executable, "-m", "mvke.cli", "data", "synth", "--out", str(d), "--users", str(users),
                        "--tags", str(tags), "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    return d


def run(work: Path, users: int, tags: int, lr: float, epochs: int, threads: int) -> dict:
    data = prepare(dataset(work, users, tags))
    cfg = TrainConfig(epochs=epochs, lr=lr, patience=epochs, threads=threads, progress=False, score_test=False)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    m = train_model(data, model_config_for("mvke-mt", data), cfg).metrics
    per_epoch = [{"epoch": row["epoch"], **{k: round(v, 4) for k, v in epoch_valid_auc(row).items()}}
                 for row in m["history"]]
    return {"users": users, "tags": tags, "lr": lr, "batch_size": cfg.batch_size, "n_train": m["n_train"],
            "valid_auc_per_epoch": per_epoch, "cpu_seconds": round(time.process_time() - cpu0, 1),
            "wall_seconds": round(time.perf_counter() - wall0, 1), "samples_per_cpu_second":
            round(m["samples_per_cpu_second"]), "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", nargs="+", required=True, metavar="USERS:LR", help="configurations, e.g. 10000:1e-2")
    p.add_argument("--tags", type=int, default=300, help="tags in the catalogue (default 300, the quick demo's)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run, each scored on validation (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as `mvke train`)")
    p.add_argument("--work", default="/tmp/mvke-quick-sweep", help="where the datasets are cached")
    p.add_argument("--out", required=True, help="JSON file; runs already in it are kept and skipped")
    a = p.parse_args(argv)
    out = Path(a.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    for spec in a.grid:
        users, lr = int(spec.split(":")[0]), float(spec.split(":")[1])
        if any(r["users"] == users and r["lr"] == lr and r["tags"] == a.tags and len(r["valid_auc_per_epoch"])
               >= a.epochs for r in runs):
            continue
        runs.append(run(Path(a.work), users, a.tags, lr, a.epochs, a.threads))
        print(json.dumps(runs[-1]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        out.write_text(json.dumps({"selection": "valid", "model": "mvke-mt", "cpu": cpu, "cores": os.cpu_count(),
                                   "command": "python scripts/quick_demo_sweep.py " + " ".join(argv or sys.argv[1:]),
                                   "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
