"""The learning curve's tables and figure (docs/results/learning_curve/): results.json, results.md, PNG.

Works on whatever cells exist: a size or model with fewer seeds than planned is shown with its
count; a size without runs is listed as open. `python -m mvke.training.learning_curve aggregate`
runs it (after copying the finished cells from the run directories).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from mvke.training.experiment import _ms
from mvke.training.learning_curve_plan import (BASE_USERS, BATCH_CAP, MAX_EPOCHS, MODELS, OUT, PLAN, TUNED, SizePlan,
                                          read_cells, scaled_train)
from mvke.training.resume import progress

TASKS = {"interest": "ctr", "intention": "cvr"}
PROBE_FILE = "probe.json"       # written by mvke/training/latent_probe.py, one entry per size


def model_row(cells: list[dict]) -> dict:
    """Mean ± std over seeds of one model at one size, its CPU time and training settings."""
    row: dict = {"seeds": len(cells), "seed_ids": [c["seed"] for c in cells]}
    for task, key in TASKS.items():
        row[f"{key}_auc"] = _ms([c["test_auc"][task] for c in cells])
    row["valid_mean_auc"] = _ms([c["best_valid_mean_auc"] for c in cells])
    row["best_epochs"] = [c["best_epoch"] for c in cells]
    row["cpu_seconds_per_run"] = float(np.mean([c["cpu_seconds"] for c in cells]))
    row["samples_per_cpu_second"] = float(np.mean([c["samples_per_cpu_second"] for c in cells]))
    row["batch_size"], row["lr"] = cells[0]["config"]["train"]["batch_size"], cells[0]["config"]["train"]["lr"]
    row["per_seed"] = {c["seed"]: {k: c["test_auc"][t] for t, k in TASKS.items()} for c in cells}
    return row


def lead(rows: dict[str, dict]) -> dict | None:
    """mvke-mt minus the strongest other model per task (highest mean test AUC, reported as it is), paired
    over the seeds both have; None without mvke-mt or a competitor."""
    mt = rows.get("mvke-mt")
    others = {m: r for m, r in rows.items() if m != "mvke-mt"}
    if not mt or not others:
        return None
    out: dict = {"competitors": sorted(others)}
    for key in TASKS.values():
        best = max(others, key=lambda m: others[m][f"{key}_auc"]["mean"])
        seeds = sorted(set(mt["per_seed"]) & set(others[best]["per_seed"]))
        diffs = [100 * (mt["per_seed"][s][key] - others[best]["per_seed"][s][key]) for s in seeds]
        out[key] = {"baseline": best, "seeds": seeds, "points": _ms(diffs) if diffs else None}
    return out


def lead_sentence(size: str, users: int, lead_now: dict | None, lead_before: dict | None) -> str:
    """One sentence on MVKE's lead at a size, with its spread and the lead at the size before."""
    if lead_now is None:
        return f"{users:,} users: no paired runs of mvke-mt and a baseline yet."
    parts = []
    for key, name in (("ctr", "CTR"), ("cvr", "CVR")):
        d = lead_now[key]
        if d["points"] is None:
            parts.append(f"{name}: no common seed with {d['baseline']}")
            continue
        n = len(d["seeds"])
        spread = f" ± {d['points']['std']:.2f}" if n > 1 else ""
        note = f"{n} paired seeds" if n > 1 else "1 seed, no spread"
        if lead_before and lead_before[key]["points"]:
            note += f"; {lead_before[key]['points']['mean']:+.2f} at the size before"
        parts.append(f"{name} {d['points']['mean']:+.2f}{spread} points over {d['baseline']} ({note})")
    among = "" if len(lead_now["competitors"]) >= len(MODELS) - 1 else \
        f" (finished so far beside mvke-mt: {', '.join(lead_now['competitors'])})"
    return f"{users:,} users{among}: mvke-mt minus the best other model: {', '.join(parts)}: {_verdict(lead_now)}."


def _verdict(lead_now: dict) -> str:
    """'ahead', 'behind' or 'inside the seed spread' per task, from the paired mean and its std."""
    words = []
    for key, name in (("ctr", "CTR"), ("cvr", "CVR")):
        p = lead_now[key]["points"]
        if p is None:
            continue
        side = "ahead" if p["mean"] > 0 else "behind"
        if len(lead_now[key]["seeds"]) < 2:
            words.append(f"{name} {side} on one seed (not yet a measured lead)")
        elif abs(p["mean"]) <= p["std"]:
            words.append(f"{name} inside the seed spread")
        else:
            words.append(f"{name} {side} by more than the seed spread")
    return ", ".join(words)


def size_entry(plan: SizePlan, out: Path = OUT) -> dict:
    cells = read_cells(plan.name, plan.users, MODELS, max(plan.seeds, 5), out)
    entry: dict = {"users": plan.users, "size": plan.name, "planned": {"models": list(plan.models), "seeds": plan.seeds},
                   "train_settings": {m: {k: v for k, v in scaled_train(json.loads((TUNED / f"{m}.json").read_text())
                                                                      ["train_overrides"], plan.users).items()
                                          if k in ("batch_size", "lr")} for m in MODELS},
                   "models": {m: model_row(cs) for m, cs in cells.items()}}
    if cells:
        first = next(iter(cells.values()))[0]
        entry["impressions"] = {"train_day": first["n_train"] + first["n_valid"], "train": first["n_train"],
                                "valid": first["n_valid"], "test": first["n_test"]}
        by_seed = {c["seed"]: c for cs in cells.values() for c in cs}
        entry["oracle"] = {k: float(np.mean([c["oracle_test_auc"][t] for c in by_seed.values()]))
                           for t, k in TASKS.items()}
        entry["cpu_seconds_runs"] = float(sum(c["cpu_seconds"] for cs in cells.values() for c in cs))
        entry["cpus"] = run_cpus(cells)
    return entry


CPU_NOT_RECORDED = "not recorded in the cell"


def inflight_runs(out: Path = OUT) -> list[dict]:
    """The unfinished runs whose state the repository carries (mvke/training/resume.py): how far each is."""
    import torch
    runs = []
    for f in sorted((out / "inflight").glob("*/*/seed-*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        stop, (epochs_done, steps_into_next) = state["stopping"], progress(state)
        runs.append({"size": f.parent.parent.name, "model": f.parent.name, "seed": int(f.stem.split("-")[1]),
                     "file": str(f.relative_to(out)), "epochs_done": epochs_done,
                     "steps_into_next": steps_into_next,
                     "cpu_hours": round(state["cpu_seconds"] / 3600, 3), "cpus": state.get("cpus") or [],
                     "best_epoch": stop["best_epoch"],
                     "best_valid_mean_auc": None if not stop["history"] else round(float(stop["best"]), 5)})
    return runs


def run_cpus(cells: dict[str, list[dict]]) -> dict[str, int]:
    """{CPU model: runs that trained (partly) on it}; cells written before runs recorded it count apart."""
    count: dict[str, int] = {}
    for cs in cells.values():
        for c in cs:
            for cpu in dict.fromkeys(c.get("cpus") or [CPU_NOT_RECORDED]):
                count[cpu] = count.get(cpu, 0) + 1
    return count


def build(out: Path = OUT) -> dict:
    """results.json's content from the cells, the probe file and the CPU ledger present."""
    probe = json.loads((out / PROBE_FILE).read_text()) if (out / PROBE_FILE).exists() else {}
    ledger = json.loads((out / "cpu_ledger.json").read_text()) if (out / "cpu_ledger.json").exists() else []
    sizes, before = [], None
    for plan in PLAN:
        e = size_entry(plan, out)
        e["probe"] = probe.get(plan.name)
        e["lead"] = lead(e["models"])
        e["sentence"] = lead_sentence(plan.name, plan.users, e["lead"], before)
        e["cpu_seconds_processes"] = float(sum(r["cpu_seconds"] for r in ledger if r["size"] == plan.name))
        before = e["lead"] or before
        sizes.append(e)
    reused = sizes[0].get("cpu_seconds_runs", 0.0)
    inflight = inflight_runs(out)
    # every choice read validation only: each run's best epoch (early stopping), the baseline run at the
    # large sizes (best_baseline); the test day is scored once per run (experiment.py's "selection" too)
    return {"selection": "valid", "protocol": protocol(), "sizes": sizes, "ledger_entries": len(ledger),
            "inflight": inflight,
            # the loops are recorded per run (cells and states); the ledger only holds processes that ended
            "cpu_hours": {"this_curve_processes": round(sum(r["cpu_seconds"] for r in ledger) / 3600, 3),
                          "reused_20k_training_loops": round(reused / 3600, 3),
                          "finished_training_loops": round(sum(e.get("cpu_seconds_runs", 0.0) for e in sizes) / 3600, 3),
                          "unfinished_training_loops": round(sum(r["cpu_hours"] for r in inflight), 3)},
            "machine": {"processor": _cpu_name(), "cores": __import__("os").cpu_count(),
                        "python": platform.python_version()}}


def valid_aucs(out: Path = OUT) -> dict[str, dict[str, list[float]]]:
    """{size: {model: [best validation mean AUC per seed]}} (learning_curve.best_baseline's input)."""
    return {p.name: {m: [c["best_valid_mean_auc"] for c in cs]
                     for m, cs in read_cells(p.name, p.users, MODELS, max(p.seeds, 5), out).items()} for p in PLAN}


def protocol() -> dict:
    return {"world": "facets (default), `mvke data synth --users N --seed 0`; seed s regenerates with generator seed s",
            "configs": "docs/results/tuning-synthetic (tuned on the 20k tuning world)",
            "epochs": f"at most {MAX_EPOCHS}, early stopping on the time-based validation (patience 1), test scored once",
            "batch_rule": f"B(N) = min({BATCH_CAP}, B_tuned * N / {BASE_USERS:,}); lr(N) = lr_tuned * sqrt(B(N) / B_tuned)",
            "plan": [{"users": p.users, "models": list(p.models), "seeds": p.seeds} for p in PLAN]}


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def aggregate(out: Path = OUT) -> dict:
    from mvke.training import learning_curve_md
    res = build(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(learning_curve_md.render(res))
    plot(res, out / "auc_vs_users.png")
    return res


COLORS = {"mvke-mt": "#d62728", "moe": "#1f77b4", "mmoe": "#ff7f0e", "cgc": "#2ca02c", "nomtl": "#9467bd"}


def plot(res: dict, path: Path) -> Path:
    """AUC vs users per model (both tasks), mean ± std over seeds; hollow markers: fewer seeds than planned;
    the oracle and the linear probe as black lines. Models are nudged apart along x so their bars do not hide."""
    from mvke.training.plots import TASK_TITLES, _save, plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    sizes = [s for s in res["sizes"] if s["models"] or s.get("probe")]
    for ax, key in zip(axes, ("ctr", "cvr")):
        for i, m in enumerate(MODELS):
            pts = [(s["users"] * 1.04 ** (i - 2), s["models"][m], s["planned"]["seeds"]) for s in sizes
                   if m in s["models"]]
            if not pts:
                continue
            y = [r[f"{key}_auc"]["mean"] for _, r, _ in pts]
            ax.errorbar([u for u, _, _ in pts], y, yerr=[r[f"{key}_auc"]["std"] for _, r, _ in pts], color=COLORS[m],
                        label=m, lw=2 if m == "mvke-mt" else 1, capsize=3)
            for (u, r, planned), yy in zip(pts, y):
                ax.plot(u, yy, "o", color=COLORS[m], mfc=COLORS[m] if r["seeds"] >= planned else "white")
        for ref, style, label in (("oracle", "--x", "oracle (true probabilities)"), ("probe", ":s", "linear probe")):
            pts = [(s["users"], s[ref][key]) for s in sizes if s.get(ref)]
            if pts:
                ax.plot(*zip(*pts), style, color="black", lw=1, ms=4, label=label)
        ax.set_xscale("log")
        ax.set_xticks([p.users for p in PLAN], [f"{p.users / 1000:g}k" for p in PLAN])
        ax.set_xlim(PLAN[0].users / 1.5, PLAN[-1].users * 1.5)
        ax.set_xlabel("users (~16 training-day impressions each)")
        ax.set_ylabel("test AUC")
        ax.set_title(TASK_TITLES[key], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Learning curve, default synthetic world: mean ± std over seeds (hollow: fewer seeds than planned)",
                 fontsize=10)
    return _save(fig, path)
