"""Issue 27's learning curve: the batch/lr rule, the baseline choice, the aggregation on partial
results, and the bounded-memory data path the large sizes train on."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mvke.training import learning_curve_plan as lc
from mvke.training import learning_curve_md, learning_curve_report as report


def test_rule_keeps_20k_and_scales_batch_and_lr_by_the_square_root_up_to_the_cap():
    tuned = {"lr": 4e-4, "batch_size": 256, "epochs": 3, "weight_decay": 0.01}
    assert lc.scaled_train(tuned, 20_000) == {**tuned, "epochs": lc.MAX_EPOCHS}
    at80k = lc.scaled_train(tuned, 80_000)
    assert (at80k["batch_size"], at80k["lr"]) == (1024, pytest.approx(8e-4))
    assert lc.scaled_train(tuned, 1_280_000)["batch_size"] == lc.BATCH_CAP
    # a configuration tuned at the cap or above keeps its own batch and learning rate
    assert lc.scaled_train({**tuned, "batch_size": 2048}, 1_280_000)["lr"] == pytest.approx(4e-4)


def test_best_baseline_is_chosen_on_validation_at_the_largest_complete_size():
    valid = {"u20k": {"moe": [0.70], "mmoe": [0.71], "cgc": [0.72]},
             "u80k": {"moe": [0.75, 0.77], "mmoe": [0.74], "cgc": [0.73]}}
    assert lc.best_baseline(valid, ["u20k", "u80k"]) == "moe"
    del valid["u80k"]["cgc"]                       # 80k incomplete: the 20k choice
    assert lc.best_baseline(valid, ["u20k", "u80k"]) == "cgc"
    assert lc.best_baseline({}, ["u20k"]) is None
    plan = lc.SizePlan(320_000, ("mvke-mt", lc.BEST_BASELINE, "nomtl"), 1)
    assert lc.resolve_models(plan, valid) == ["mvke-mt", "cgc", "nomtl"]


def test_issue10_cells_are_accepted_as_the_20k_point():
    """They were made with the tuned configurations and 10 epochs: their keys are the protocol's."""
    cells = lc.read_cells("u20k", 20_000, lc.MODELS, 5)
    assert {m: len(c) for m, c in cells.items()} == {m: 5 for m in lc.MODELS}
    assert lc.read_cells("u20k", 80_000, lc.MODELS, 5) == {}      # another batch/lr: another key


def _cell(model: str, seed: int, ctr: float, cvr: float) -> dict:
    cfg = lc.size_config(model, 80_000)
    return {"config_key": lc.expected_key(model, 80_000), "config": cfg, "seed": seed, "best_epoch": 2,
            "test_auc": {"interest": ctr, "intention": cvr}, "best_valid_mean_auc": (ctr + cvr) / 2,
            "cpu_seconds": 360.0, "samples_per_cpu_second": 2e4, "n_train": 1000, "n_valid": 100, "n_test": 500,
            "oracle_test_auc": {"interest": 0.88, "intention": 0.92}}


def test_aggregation_reports_partial_results_with_their_seed_counts(tmp_path):
    for model, seed, ctr, cvr in [("mvke-mt", 0, 0.780, 0.800), ("mvke-mt", 1, 0.790, 0.805),
                                  ("cgc", 0, 0.775, 0.790), ("moe", 1, 0.770, 0.810)]:
        path = tmp_path / "cells" / "u80k" / model / f"seed-{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_cell(model, seed, ctr, cvr)))
    res = report.build(tmp_path)
    assert res["selection"] == "valid"
    s80 = next(s for s in res["sizes"] if s["size"] == "u80k")
    assert s80["models"]["mvke-mt"]["seeds"] == 2 and s80["models"]["cgc"]["seeds"] == 1
    # CVR: moe has the higher mean; the pair is over their one common seed
    assert s80["lead"]["cvr"]["baseline"] == "moe" and s80["lead"]["cvr"]["seeds"] == [1]
    assert s80["lead"]["cvr"]["points"]["mean"] == pytest.approx(-0.5)
    assert "one seed" in s80["sentence"]
    md = learning_curve_md.render(res)
    assert "| 80,000 | 1,100 | cgc | 0.7750 | 0.7900 | 1 of 3 |" in md
    assert "320,000 users: mvke-mt 0/1" in md
    assert "in progress" not in md and res["inflight"] == []
    assert "80,000: not recorded in the cell (4)" in md     # cells from before runs recorded their CPU
    # four finished 80k runs of 360 CPU s each beside the reused 20k runs, nothing unfinished: the lower bound
    hours = res["cpu_hours"]
    assert hours["finished_training_loops"] == pytest.approx(hours["reused_20k_training_loops"] + 0.4, abs=2e-3)
    assert f"{hours['finished_training_loops']:.2f} of the finished runs" in md and "0.00 of the unfinished ones" in md


def test_aggregation_lists_runs_in_progress_from_their_states(tmp_path):
    import torch
    state = {"epoch": 3, "partial": {"steps": 500}, "cpu_seconds": 5400.0, "cpus": ["Some CPU"],
             "stopping": {"best": 0.8123, "best_epoch": 2, "best_state": None, "history": [{}, {}]}}
    path = tmp_path / "inflight" / "u1280k" / "mvke-mt" / "seed-0.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    res = report.build(tmp_path)
    assert res["inflight"] == [{"size": "u1280k", "model": "mvke-mt", "seed": 0, "file": "inflight/u1280k/mvke-mt/seed-0.pt",
                                "epochs_done": 2, "steps_into_next": 500, "cpu_hours": 1.5, "cpus": ["Some CPU"],
                                "best_epoch": 2, "best_valid_mean_auc": 0.8123}]
    assert ("* in progress: u1280k mvke-mt seed 0, 2 epoch(s) done and 500 steps of the next, 1.50 CPU h so far on Some CPU, "
            "best validation mean AUC 0.8123 at epoch 2") in learning_curve_md.render(res)
    assert res["cpu_hours"]["unfinished_training_loops"] == 1.5 and "1.50 of the unfinished ones" in learning_curve_md.render(res)


def test_prepare_parts_gives_the_arrays_of_prepare(tmp_path):
    """The large sizes' data path: parts, each user's fields once (Gathered), the same splits and rows."""
    from mvke.data.dataset import Gathered
    from mvke.data.synthetic import SynthConfig, generate
    from mvke.training.parts_data import prepare_parts
    from mvke.training.trainer import prepare
    d = generate(SynthConfig(users=5000, tags=50, categories=10, ads=200), tmp_path / "d", progress=False,
                 part_users=4096)
    full, parts = prepare(d), prepare_parts(d)
    assert (d / "train.parquet").is_dir() and parts.schema.to_dict() == full.schema.to_dict()
    assert isinstance(parts.train.multi_ids, Gathered)
    for name in ("train", "valid", "test"):
        a, b = getattr(full, name), getattr(parts, name)
        for f in ("cat_ids", "multi_ids", "tag_ids", "labels", "true_probs", "user_ids"):
            assert np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))), (name, f)
    rows = np.array([5, 0, 17])
    assert np.array_equal(parts.train.subset(rows).multi_ids[:], full.train.multi_ids[rows])


def test_run_states_travel_between_the_run_directory_and_the_repository(tmp_path):
    import os
    import torch
    from mvke.training.learning_curve_plan import restore_cells, sync_states

    def state(path, epoch, steps=0, key="K seed 0 data"):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "epoch": epoch, "partial": {"steps": steps} if steps else None}, path)

    def epoch_of(path):
        return torch.load(path, weights_only=False)["epoch"]

    runs, out = tmp_path / "runs", tmp_path / "repo"
    here, kept = runs / "inflight" / "mvke-mt" / "seed-0.pt", out / "inflight" / "u1280k" / "mvke-mt" / "seed-0.pt"
    state(kept, 3)                                      # a fresh machine: only the repository has it
    assert sync_states(runs, "u1280k", out) == 1 and epoch_of(here) == 3
    assert sync_states(runs, "u1280k", out) == 0       # as far on both sides: nothing to do
    state(here, 5, steps=100)                           # the run went on here
    state(kept, 3)                                      # ... and a checkout rewrote the older copy (newer mtime)
    os.utime(kept, (here.stat().st_mtime + 60,) * 2)
    assert sync_states(runs, "u1280k", out) == 1 and epoch_of(kept) == 5 and epoch_of(here) == 5
    kept.write_bytes(b"cut short")                      # a broken copy never wins
    assert sync_states(runs, "u1280k", out) == 1 and epoch_of(kept) == 5
    other = runs / "cells" / "mvke-mt" / "seed-0.json"  # a cell of another configuration: the run goes on
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({"config_key": "OLD"}))
    sync_states(runs, "u1280k", out)
    assert here.exists() and kept.exists()
    other.write_text(json.dumps({"config_key": "K"}))   # the run finished: no state left anywhere
    sync_states(runs, "u1280k", out)
    assert not here.exists() and not kept.exists()
    # a fresh machine keeps the repository's finished cells of this protocol instead of training them again
    key = lc.expected_key("moe", 1_280_000)
    cell = out / "cells" / "u1280k" / "moe" / "seed-0.json"
    cell.parent.mkdir(parents=True)
    cell.write_text(json.dumps({"config_key": key}))
    stale = out / "cells" / "u1280k" / "nomtl" / "seed-0.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"config_key": "another protocol"}))
    fresh = tmp_path / "fresh"
    assert restore_cells(fresh, 1_280_000, out) == 1
    assert (fresh / "cells" / "moe" / "seed-0.json").exists() and not (fresh / "cells" / "nomtl").exists()

def test_run_takes_more_seeds_than_the_plan_where_asked(tmp_path, monkeypatch):
    """`run --seeds N` runs the asked sizes with N seeds (the plan's models kept); without it, the plan's."""
    from mvke.training import learning_curve as driver
    ran = []
    monkeypatch.setattr(driver, "run_size", lambda plan, log: ran.append(plan))
    driver.main(["run", "--sizes", "320000", "--seeds", "2", "--log", str(tmp_path / "log")])
    driver.main(["run", "--sizes", "320000", "--log", str(tmp_path / "log")])
    planned = next(p for p in lc.PLAN if p.users == 320_000)
    assert [(p.users, p.models, p.seeds) for p in ran] == [(320_000, planned.models, 2),
                                                          (320_000, planned.models, planned.seeds)]
