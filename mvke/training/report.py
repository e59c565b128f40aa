"""results.md of an experiment: tables from results.json (no numbers computed here that are not in it)."""
from __future__ import annotations

KEYS = ("ctr", "cvr")


def _pm(d: dict | None, digits: int = 4) -> str:
    if not d:
        return ""
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _auc(m: dict, key: str) -> str:
    return f"{m[f'{key}_auc_mean']:.4f} ± {m[f'{key}_auc_std']:.4f}"


def _paired(m: dict) -> str:
    p = m.get("paired_vs_mvke_mt")
    if not p:
        return ""
    parts = []
    for key in ("valid_mean_auc", "test_ctr_auc", "test_cvr_auc"):
        d = p[key]
        star = "*" if d["beyond_noise"] else ""
        parts.append(f"{100 * d['mean']:+.2f}{star}")
    return " / ".join(parts)


def _row(label: str, m: dict) -> str:
    return (f"| {label} | {_auc(m, 'ctr')} | {_auc(m, 'cvr')} | {_pm(m['gauc']['ctr'])} | {_pm(m['gauc']['cvr'])} "
            f"| {_pm(m['recall_at_20']['ctr'], 3)} | {_pm(m['recall_at_20']['cvr'], 3)} "
            f"| {_pm(m['ndcg_at_20']['ctr'], 3)} | {_pm(m['ndcg_at_20']['cvr'], 3)} | {m['params']:,} "
            f"| {'/'.join(str(e) for e in m['best_epoch_per_seed'])} | {_paired(m)} |")


HEADER = ["| model | CTR AUC | CVR AUC | CTR gAUC | CVR gAUC | CTR R@20 | CVR R@20 | CTR NDCG@20 | CVR NDCG@20 "
          "| params | best epoch per seed | mvke-mt − model: valid / test CTR / test CVR (points) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def render_markdown(res: dict) -> str:
    n = res["seeds"]
    lines = [f"# Offline results: {res['dataset']}", "",
             f"Selection on validation only (`\"selection\": \"{res['selection']}\"`): each model's configuration "
             "comes from its own Optuna study on validation AUC (or the defaults where the row says so), early "
             "stopping and the best epoch read the validation split (the last ~10% of each user's training "
             "events, by time), and the test day is scored once per run. "
             f"Mean ± std (sample std) over {n} seeds (0..{n - 1}); on synthetic data each seed also regenerates "
             "the data. CTR = interest task (click), CVR = intention task (conversion). gAUC: mean over test "
             "users of the AUC of their own impressions. R@20 / NDCG@20: each test user's top 20 tags over the "
             "whole catalogue (as the service ranks) against the tags of the ads the user clicked (CTR) or "
             "converted (CVR) on the test day. The last column is the paired per-seed difference mvke-mt − model "
             "in AUC points (x100): mean validation AUC / test CTR AUC / test CVR AUC; * = paired t-test p < 0.05 "
             "over the seeds.", "", *HEADER]
    for label, m in res["models"].items():
        lines.append(_row(label, m))
    ref = res.get("reference")
    if ref:
        of = "" if ref["seeds"] == res["seeds"] else f"; {ref['seeds']} of {res['seeds']} seeds"
        show = _pm if ref["seeds"] > 1 else (lambda d: f"{d['mean']:.4f}")   # no spread from one seed
        lines.append(f"| LightGBM reference (not tuned{of}) | {show(ref['ctr_auc'])} | {show(ref['cvr_auc'])} "
                     f"| {show(ref['ctr_gauc'])} | {show(ref['cvr_gauc'])} | | | | | | | |")
    if res.get("oracle"):
        o = res["oracle"]
        lines.append(f"| oracle (true probabilities) | {o['ctr_auc']:.4f} | {o['cvr_auc']:.4f} | {o['ctr_gauc']:.4f} "
                     f"| {o['cvr_gauc']:.4f} | | | | | | | |")
    lines.append("")
    if "mvke-mt" in res["models"]:
        m = res["models"]["mvke-mt"]
        lines += [f"MVKE-mt training speed: {m.get('samples_per_cpu_second', float('nan')):,.0f} samples per CPU-second (one torch "
                  f"thread; {m['samples_per_second']:,.0f} samples/s of wall time on the shared machine).", ""]
    lines += _controls_section(res)
    lines += _entropy_section(res)
    lines += _config_section(res)
    lines += _sweep_section(res)
    lines += _reproduce_section(res)
    return "\n".join(lines)


def _controls_section(res: dict) -> list[str]:
    if not res.get("controls"):
        return []
    lines = ["## Controls of the virtual kernels", "",
             "mvke-uniform-gate: every gate weight exactly 1/K; mvke-no-kernel-attention: every field weight "
             "exactly 1/F; mvke-plain-gate: the published code's gate, softmax of E_T . VK without a "
             "projection. Each tuned and seeded like the main models.", "", *HEADER]
    if "mvke-mt" in res["models"]:
        lines.append(_row("mvke-mt", res["models"]["mvke-mt"]))
    for label, m in res["controls"].items():
        lines.append(_row(label, m))
    return [*lines, ""]


def _sweep_section(res: dict) -> list[str]:
    if not res.get("sweep"):
        return []
    lines = ["## Number of experts (Fig. 7)", "",
             "MVKE-mt with its tuned configuration, one seed (0) per K. Task -> experts (1-based): interest the "
             "first round(0.6 K), intention the last round(0.8 K), each at most K - 1 (K = 5 is the paper's "
             "1-3 / 2-5). Descriptive only: nothing is chosen from it.", "",
             "| K | interest experts | intention experts | valid mean AUC | test CTR AUC | test CVR AUC | params |",
             "|---|---|---|---|---|---|---|"]
    for r in res["sweep"]:
        te = r["task_experts"]
        lines.append(f"| {r['experts']} | {te['interest'][0] + 1}-{te['interest'][-1] + 1} "
                     f"| {te['intention'][0] + 1}-{te['intention'][-1] + 1} | {r['valid_mean_auc']:.4f} "
                     f"| {r['ctr_auc']:.4f} | {r['cvr_auc']:.4f} | {r['params']:,} |")
    return [*lines, ""]


def _entropy_section(res: dict) -> list[str]:
    rows = {**res["models"], **res["controls"]}
    have = {k: m for k, m in rows.items() if "attention_entropy" in m or "gate_entropy" in m}
    if not have:
        return []
    lines = ["## What the virtual kernels do", "",
             "Normalised entropies (1 = uniform, 0 = one-hot), mean over seeds: field attention per expert (mean "
             "over 4,096 test users), gate over the task's experts (mean over all catalogue tags).", "",
             "| model | field attention entropy per expert | gate entropy CTR | gate entropy CVR |", "|---|---|---|---|"]
    for k, m in have.items():
        att = m.get("attention_entropy", {}).get("per_expert")
        g = m.get("gate_entropy", {})
        lines.append(f"| {k} | {', '.join(f'{x:.3f}' for x in att) if att else ''} "
                     f"| {g.get('ctr', float('nan')):.3f} | {g.get('cvr', float('nan')):.3f} |")
    att = res.get("attention")
    if att:
        lines += ["", "Top-3 fields per expert (mvke-mt, seed 0; mean attention weight; uniform = "
                  f"{1 / len(att['fields']):.4f}):", ""]
        for k, top in enumerate(att["top_fields"]):
            lines.append(f"* VKE-{k + 1} (entropy {att['entropy_per_expert'][k]:.3f}): "
                         + ", ".join(f"{n} {w:.3f}" for n, w in top))
    lines += ["", "Figures: gate_heatmap.png (Fig. 8, mvke-mt seed 0), attention_heatmap.png (mean field weight "
              "per expert, mvke-mt seed 0).", ""]
    return lines


def _config_section(res: dict) -> list[str]:
    lines = ["## Configurations", "", "| model | source | chosen (model / training) |", "|---|---|---|"]
    for label, cfg in res["configs"].items():
        if label not in res["models"] and label not in res["controls"]:
            continue
        chosen = ", ".join(f"{k}={v}" for k, v in {**cfg["model"], **cfg["train"]}.items()) or "defaults"
        lines.append(f"| {label} | {cfg['source']} | {chosen} |")
    return lines + [""]


def _reproduce_section(res: dict) -> list[str]:
    mach = res["machine"]
    load = ", ".join(f"{x:.1f}" for x in mach.get("loadavg_at_end", []))
    lines = ["## Reproduce", "", "```", res["data_command"], *res.get("tune_commands", []), res["command"], "```", ""]
    if res.get("cpu_hours"):
        h = res["cpu_hours"]
        lines += [f"CPU time (process CPU, not wall): tuning the models shown {h['tuning']} h (on the dataset "
                  f"named in the tune commands), the runs of this table {h['runs']} h.", ""]
    lines += [f"Machine: {mach['cpu_cores']} CPU cores ({mach['processor']}), no GPU, torch {mach['torch']} with "
              f"{mach['torch_threads']} intra-op thread per run, Python {mach['python']}; shared with other work "
              f"(load average at the end of the last call: {load}), so seconds are indicative.", ""]
    names = figure_names(res)
    if names:
        lines += ["Figures: " + ", ".join(f"[{n}]({n})" for n in names), ""]
    return lines


def figure_names(res: dict) -> list[str]:
    """The figures `write_results` draws for these results (a link only to a figure that is drawn)."""
    drawn = {"auc_bar.png": bool(res["models"] or res["controls"]), "expert_sweep.png": bool(res.get("sweep")),
             "gate_heatmap.png": bool(res.get("gates")), "attention_heatmap.png": bool(res.get("attention"))}
    return [name for name, on in drawn.items() if on]
