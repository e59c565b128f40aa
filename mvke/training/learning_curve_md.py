"""results.md of the learning curve (docs/results/learning_curve/), from results.json's content."""
from __future__ import annotations

from mvke.training.learning_curve_plan import BATCH_CAP, MAX_EPOCHS

GOAL = {"ctr": 0.80, "cvr": 0.83}     # issue 27: the linear probe's level measured in docs/MODELS.md

PROTOCOL = """\
## Protocol (fixed before the runs; mvke/training/learning_curve.py)

* World: the default (facets) synthetic world, `mvke data synth --users N --seed 0`, at
  N = 20,000, 80,000, 320,000 and 1,280,000 users (~16 training-day impressions per user: 1.28M
  users is ~20M impressions, the paper's Offline-small size). Seed s of a size regenerates the world
  with generator seed s, as `mvke experiment` does. Worlds above 65,536 users are written and read in
  parts (the generator's blocks, bounded memory); `parts_data.prepare_parts` keeps each user's encoded
  fields once and gives the arrays of the in-memory `prepare` (tested equal): on the 80k world 963 MB
  peak RSS and 15 CPU-s, against 4.7 GB for `prepare` (the 80k runs' process started before
  `prepare_parts` existed and uses `prepare`; 320k and 1.28M would not fit the box's 23 GB without it).
* Models and configurations: mvke-mt, moe, mmoe, cgc, nomtl with their tuned configurations
  (docs/results/tuning-synthetic, 8-trial Optuna studies on the 20k tuning world), one budget of
  {epochs} epochs, early stopping on the time-based validation (patience 1), test day scored once per
  run, one torch thread. No @matched rows, no LightGBM.
* **Batch size and learning rate rule, the same for every model:** B(N) = min({cap}, B_tuned x N / 20,000),
  lr(N) = lr_tuned x sqrt(B(N) / B_tuned) (square-root rule for Adam-type optimisers). So 20k keeps
  the tuned 256 and every larger size trains at 1,024 with twice the tuned learning rate. Why a cap of
  1,024: samples per CPU-second on this 2-core AMD EPYC box (one thread, 20k world, 120k samples
  per measurement, two rounds, load average 5-8 from other work), mvke-mt / moe: batch 256 16.2k /
  10.9k, 1,024 19.9k / 13.1k, 4,096 14.2k / 11.9k.
* Plan: 5 models x 5 seeds at 20k, x 3 seeds at 80k; mvke-mt, the best baseline of the smaller
  sizes (moe, mmoe or cgc with the highest mean validation AUC at the largest smaller size where all
  three finished: chosen on validation, not test) and nomtl (the paper's online baseline) at 320k
  and 1.28M, 1 seed each (more if the budget allows).
* The 20k point reuses issue 10's runs (docs/results/synthetic/cells): same world, same tuned
  configurations, `--max-epochs 10`, same early stopping and test scoring; their cell keys equal the
  keys this protocol computes (`learning_curve.expected_key`), which is how the aggregation accepts
  a cell at all.
"""


PROBE = """\
The oracle: the AUC of the true test-day probabilities (mean over the seeds' worlds). The linear probe
(mvke/training/latent_probe.py; docs/MODELS.md's 0.798 / 0.834 came from a script not in the repository,
so this is a re-implementation of its description): ridge regression from the user's 26 raw fields
(one-hot, histories as length-normalised multi-hot) to the user's training-day latent state (click
and conversion facets, propensities), fitted on the world's first users (at most 65,536), evaluated
on the next ones (at most 16,384) by putting the estimate in place of the user's test-day state in the
true logits, tag vectors and intercepts exact. It is the level a model reaches that reads the user
linearly from the feature row and knows every tag; the issue's goal (0.80 / 0.83) is that level."""


def _auc(r: dict, key: str) -> str:
    a = r[f"{key}_auc"]
    return f"{a['mean']:.4f} ± {a['std']:.4f}" if r["seeds"] > 1 else f"{a['mean']:.4f}"


def _size_rows(s: dict) -> list[str]:
    rows = []
    imp = s.get("impressions", {}).get("train_day")
    for m, r in s["models"].items():
        planned = s["planned"]["seeds"] if m in s["planned"]["models"] or "best-baseline" in s["planned"]["models"] else 0
        seeds = f"{r['seeds']}" + (f" of {planned}" if r["seeds"] < planned else "")
        rows.append(f"| {s['users']:,} | {imp:,} | {m} | {_auc(r, 'ctr')} | {_auc(r, 'cvr')} | {seeds} | "
                    f"{'/'.join(map(str, r['best_epochs']))} | {r['batch_size']} / {r['lr']:.2e} | "
                    f"{r['cpu_seconds_per_run'] / 3600:.2f} |")
    if not s["models"]:
        rows.append(f"| {s['users']:,} | | (no finished run yet) | | | 0 of {s['planned']['seeds']} | | | |")
    return rows


def _ref(s: dict, name: str) -> str:
    r = s.get(name)
    return f"{r['ctr']:.4f} / {r['cvr']:.4f}" if r else "not measured"


def results_table(res: dict) -> list[str]:
    out = ["| users | training-day impressions | model | CTR AUC | CVR AUC | seeds | best epoch per seed | batch / lr | "
           "CPU h per run |", "|---|---|---|---|---|---|---|---|---|"]
    for s in res["sizes"]:
        out += _size_rows(s)
    out += ["", "| users | oracle CTR / CVR | linear probe CTR / CVR | CPU h, training loops of its runs | "
            "CPU h, its processes in cpu_ledger.json (data, training, scoring; those that ended) |",
            "|---|---|---|---|---|"]
    for s in res["sizes"]:
        proc = f"{s['cpu_seconds_processes'] / 3600:.2f}" if s["cpu_seconds_processes"] else \
            ("issue 10's runs (not rerun)" if s["users"] == 20_000 else "0")
        out.append(f"| {s['users']:,} | {_ref(s, 'oracle')} | {_ref(s, 'probe')} | "
                   f"{s.get('cpu_seconds_runs', 0) / 3600:.2f} | {proc} |")
    return out


def goal_lines(res: dict) -> list[str]:
    done = [s for s in res["sizes"] if "mvke-mt" in s["models"]]
    if not done:
        return ["No mvke-mt run has finished yet."]
    s = done[-1]
    r = s["models"]["mvke-mt"]
    got = {k: r[f"{k}_auc"]["mean"] for k in GOAL}
    met = all(got[k] >= GOAL[k] for k in GOAL)
    line = (f"Largest size with a finished mvke-mt run: {s['users']:,} users ({r['seeds']} seed(s)): "
            f"{got['ctr']:.4f} / {got['cvr']:.4f} against the goal {GOAL['ctr']:.2f} / {GOAL['cvr']:.2f}: "
            f"**{'reached' if met else 'not reached'}**.")
    if s.get("oracle"):
        line += (f" Where the rest sits: oracle minus mvke-mt {100 * (s['oracle']['ctr'] - got['ctr']):+.1f} / "
                 f"{100 * (s['oracle']['cvr'] - got['cvr']):+.1f} points")
        if s.get("probe"):
            line += (f", linear probe minus mvke-mt {100 * (s['probe']['ctr'] - got['ctr']):+.1f} / "
                     f"{100 * (s['probe']['cvr'] - got['cvr']):+.1f} (the oracle {s['oracle']['ctr']:.4f} / "
                     f"{s['oracle']['cvr']:.4f}, the probe {s['probe']['ctr']:.4f} / {s['probe']['cvr']:.4f})")
        line += "."
    return [line]


def inflight_lines(res: dict) -> list[str]:
    return [f"* in progress: {r['size']} {r['model']} seed {r['seed']}, {r['epochs_done']} epoch(s) done"
            + (f" and {r['steps_into_next']:,} steps of the next" if r["steps_into_next"] else "")
            + f", {r['cpu_hours']:.2f} CPU h so far" + (f" on {', '.join(r['cpus'])}" if r["cpus"] else "")
            + (f", best validation mean AUC {r['best_valid_mean_auc']:.4f} at epoch {r['best_epoch']}"
               if r["best_valid_mean_auc"] is not None else "")
            + f" (state: {r['file']}, continued by the next `scripts/learning_curve.sh`)"
            for r in res.get("inflight", [])]


def open_lines(res: dict) -> list[str]:
    out = inflight_lines(res)
    for s in res["sizes"]:
        want, planned = s["planned"]["seeds"], s["planned"]["models"]
        short = [f"{m} {s['models'][m]['seeds'] if m in s['models'] else 0}/{want}" for m in planned
                 if m != "best-baseline" and s["models"].get(m, {}).get("seeds", 0) < want]
        if "best-baseline" in planned and not any(m in s["models"] for m in ("moe", "mmoe", "cgc")):
            short.append(f"best baseline 0/{want}")
        if short:
            out.append(f"* {s['users']:,} users: {', '.join(short)} seeds finished")
    return out or ["* none: every planned run finished"]


def cpu_line(res: dict) -> str:
    parts = [f"{s['users']:,}: " + ", ".join(f"{cpu} ({n})" for cpu, n in s["cpus"].items())
             for s in res["sizes"] if s.get("cpus")]
    return "; ".join(parts) or "no runs yet"


def render(res: dict) -> str:
    p, loops = res["protocol"], res["cpu_hours"]
    lines = ["# Learning curve: the tuned models from 20k to 1.28M users (issue 27)", "",
             "Test AUC (mean ± sample std over seeds) of the tuned models as the default synthetic world grows; "
             "the figure: [auc_vs_users.png](auc_vs_users.png). CTR = interest task (click), CVR = intention "
             "(conversion). Rebuilt from the finished runs by one command (see Reproduce); runs still open are listed.",
             "", PROTOCOL.format(epochs=MAX_EPOCHS, cap=BATCH_CAP), "## Results", "", *results_table(res), "",
             "CPU h per run: the training loop's process CPU time (validation each epoch included; data loading and "
             "test scoring not). Where the runs trained (runs per CPU model; a run continued on another machine "
             "counts on each): " + cpu_line(res) + ". The 20k runs are issue 10's, on an Intel Xeon; the runs that "
             "do not record it trained on the 2-core AMD EPYC of the sessions before 2026-12-06 14:20 UTC.", "",
             PROBE, "",
             "## MVKE's lead over the best other model, per size", "",
             "Paired per-seed difference mvke-mt minus the model with the highest mean test AUC at that size "
             "(per task), in AUC points (x100), mean ± std over the common seeds.", ""]
    lines += [f"* {s['sentence']}" for s in res["sizes"]]
    lines += ["", "## Goal at the largest size (mvke-mt ≥ 0.80 / 0.83)", "", *goal_lines(res), "",
              "## Still open", "", *open_lines(res), "",
              "## Reproduce", "", "```",
              "setsid nohup bash scripts/learning_curve.sh >/dev/null 2>&1 &   # resumes: finished runs are kept,",
              "#   unfinished ones continue from their state under inflight/ (saved every epoch and every 10 min;",
              "#   `... learning_curve aggregate` copies the newest states here: commit them before the machine goes)",
              "LC_SEEDS=2 setsid nohup bash scripts/learning_curve.sh 320000 >/dev/null 2>&1 &   # a size's extra seeds",
              "PYTHONPATH=$PWD python -m mvke.training.latent_probe            # the linear probe per size",
              "PYTHONPATH=$PWD python -m mvke.training.learning_curve aggregate  # this page, results.json, the PNG",
              "```", "",
              f"Machine: {res['machine']['processor']}, {res['machine']['cores']} cores, no GPU, shared with other "
              "work (the background runs at nice 19: their wall time says little; the CPU times are process CPU). "
              f"CPU hours in training loops: {loops['finished_training_loops']:.2f} of the finished runs (the reused 20k "
              f"runs' {loops['reused_20k_training_loops']:.2f} included) and {loops['unfinished_training_loops']:.2f} of "
              f"the unfinished ones: {loops['finished_training_loops'] + loops['unfinished_training_loops']:.2f} in all, "
              "a lower bound of what the curve cost (data generation, loading and test scoring add to it). "
              f"cpu_ledger.json holds every data generation and experiment process that ended, with its load average: "
              f"{loops['this_curve_processes']:.2f} h (loops included; a process stopped with its machine is not "
              "there, its run's loop time is).", ""]
    return "\n".join(lines)
