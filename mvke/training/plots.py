"""Figures of the offline experiments (paper Fig. 6-8), written as PNGs with matplotlib's Agg backend.

Each function takes plain dicts/arrays (the content of `results.json`), so a
figure can be redrawn from a results file without retraining.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TASK_TITLES = {"ctr": "Interest tagging (CTR AUC)", "cvr": "Intention tagging (CVR AUC)"}


def _save(fig, out: str | Path) -> Path:
    """Lay out, write as PNG and free the figure (pyplot keeps every open figure otherwise)."""
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _zoomed_ylim(ax, lows: list[float], highs: list[float], pad: float = 0.25) -> None:
    lo, hi = min(lows), max(highs)
    span = max(hi - lo, 1e-3)
    ax.set_ylim(lo - pad * span, hi + pad * span)


def auc_bar(models: dict[str, dict], out: str | Path, dataset: str, oracle: dict | None = None,
            reference: dict | None = None) -> Path:
    """Fig. 6: test AUC per model and task, mean over seeds with +-1 std error bars.

    The y axis is zoomed to the models' range (differences are fractions of a
    point); the oracle AUC, far above, is given in the panel title instead, and the
    LightGBM reference is a dashed line (or in the title when it is off the scale).
    """
    names = list(models)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = ["#d62728" if n.startswith("mvke") else "#7f7f7f" for n in names]
    for ax, task in zip(axes, ("ctr", "cvr")):
        means = np.array([models[n][f"{task}_auc_mean"] for n in names])
        stds = np.array([models[n][f"{task}_auc_std"] for n in names])
        x = np.arange(len(names))
        ax.bar(x, means, yerr=stds, color=colors, capsize=4, edgecolor="black", linewidth=0.5)
        for xi, m, s in zip(x, means, stds):
            ax.text(xi, m + s, f"{m:.4f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, names, rotation=30, ha="right")
        _zoomed_ylim(ax, list(means - stds), list(means + stds), pad=0.6)
        title = TASK_TITLES[task]
        if oracle:
            title += f"\noracle (true probabilities): {oracle[f'{task}_auc']:.4f}"
        if reference:
            ref = reference[f"{task}_auc"]["mean"]
            lo, hi = ax.get_ylim()
            if lo <= ref <= hi:
                ax.axhline(ref, ls="--", lw=1, color="#1f77b4", label=f"LightGBM {ref:.4f}")
                ax.legend(fontsize=7, loc="lower right")
            else:
                title += f"; LightGBM: {ref:.4f}"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("test AUC")
        ax.grid(axis="y", alpha=0.3)
    n_seeds = max(m["seeds"] for m in models.values())
    fig.suptitle(f"Offline AUC on {dataset} (mean +- std over {n_seeds} seeds)")
    return _save(fig, out)


def expert_sweep(sweep: list[dict], out: str | Path, dataset: str,
                 baselines: dict[str, dict] | None = None) -> Path:
    """Fig. 7: MVKE-mt AUC against the number of experts; baselines as dashed lines."""
    ks = [r["experts"] for r in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, task in zip(axes, ("ctr", "cvr")):
        vals = [r[f"{task}_auc"] for r in sweep]
        ax.plot(ks, vals, "o-", color="#d62728", label="mvke-mt")
        lows, highs = list(vals), list(vals)
        for i, (name, m) in enumerate((baselines or {}).items()):
            v = m[f"{task}_auc_mean"]
            ax.axhline(v, ls="--", lw=1, color=plt.cm.tab10(i % 10), label=f"{name} (mean)")
            lows.append(v)
            highs.append(v)
        _zoomed_ylim(ax, lows, highs)
        ax.set_xticks(ks)
        ax.set_xlabel("number of virtual-kernel experts K")
        ax.set_ylabel("test AUC")
        ax.set_title(TASK_TITLES[task], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"MVKE-mt vs number of experts on {dataset} ({sweep[0].get('seeds', 1)} seed per K)")
    return _save(fig, out)


def gate_heatmap(gates: dict[str, dict], out: str | Path, experts: int, dataset: str) -> Path:
    """Fig. 8: gate weights of chosen tags over the experts, one panel per task.

    `gates[task] = {"experts": [0-based expert ids], "tags": [names], "weights": [[...]]}`;
    experts that do not serve a task are left blank, as in the paper's table.
    """
    tasks = list(gates)
    n_tags = max(len(g["tags"]) for g in gates.values())
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 + 1.1 * experts * len(tasks), 1.2 + 0.42 * n_tags))
    axes = np.atleast_1d(axes)
    for ax, task in zip(axes, tasks):
        g = gates[task]
        full = np.full((len(g["tags"]), experts), np.nan)
        full[:, g["experts"]] = np.asarray(g["weights"])
        ax.imshow(np.ma.masked_invalid(full), cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (r, c), v in np.ndenumerate(full):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else "black")
        ax.set_xticks(range(experts), [f"VKE-{k + 1}" for k in range(experts)], fontsize=8)
        ax.set_yticks(range(len(g["tags"])), g["tags"], fontsize=8)
        ax.set_title(f"{task} gate", fontsize=10)
    fig.suptitle(f"MVKE-mt gate weights per tag ({dataset})", fontsize=10)
    return _save(fig, out)


def attention_heatmap(attention: dict, out: str | Path, dataset: str) -> Path:
    """Mean attention weight of each expert (rows) over the fields (columns); uniform = 1/F."""
    w = np.asarray(attention["mean_weights"])                          # [K, F]
    names = attention["fields"]
    fig, ax = plt.subplots(figsize=(2.5 + 0.38 * len(names), 1.6 + 0.45 * len(w)))
    im = ax.imshow(w, cmap="Reds", aspect="auto", vmin=0)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(w)), [f"VKE-{k + 1} (H={h:.2f})" for k, h in
                                  enumerate(attention["entropy_per_expert"])], fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.02, label=f"mean weight (uniform {1 / len(names):.3f})")
    ax.set_title(f"MVKE-mt field attention per expert ({dataset}); H = normalised entropy", fontsize=10)
    return _save(fig, out)
