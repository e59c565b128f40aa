"""Evaluation protocol: the time-based validation split, selection blind to the test split,
reproducible Optuna studies, resumable experiments."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from mvke.data.split import SplitError, time_validation_mask
from mvke.training import experiment, tune
from mvke.training.trainer import TrainConfig, model_config_for, prepare, train_model

TINY_TRAIN = dict(batch_size=256, threads=1, progress=False)


# ---------------------------------------------------------------- the split
def _check_split(df: pd.DataFrame, mask: np.ndarray) -> None:
    # Groups (user, timestamp) are never cut.
    per_group = pd.DataFrame({"u": df["user_id"], "t": df["timestamp"], "v": mask}).groupby(["u", "t"])["v"].nunique()
    assert (per_group == 1).all()
    # Per user: no validation event before a training event.
    both = pd.DataFrame({"u": df["user_id"], "t": df["timestamp"], "v": mask})
    last_train = both[~both["v"]].groupby("u")["t"].max()
    first_valid = both[both["v"]].groupby("u")["t"].min()
    assert (first_valid >= last_train.reindex(first_valid.index)).all()
    # Every validation user keeps training events.
    assert set(first_valid.index) <= set(last_train.index)


def test_time_split_keeps_movielens_groups_and_order(ml100k_dir):
    df = pd.read_parquet(ml100k_dir / "train.parquet", columns=["user_id", "timestamp", "click"])
    mask = time_validation_mask(df, 0.1)
    _check_split(df, mask)
    # A positive and its sampled negatives (one group) land on one side: 1 positive per 4 negatives.
    valid = df[mask]
    assert valid["click"].mean() == pytest.approx(0.2, abs=0.01)
    assert 0.07 < mask.mean() < 0.13


def test_time_split_on_synthetic_days(tiny_synth_dir):
    df = pd.read_parquet(tiny_synth_dir / "train.parquet")
    mask = time_validation_mask(df, 0.1)
    _check_split(df, mask)
    assert 0.05 < mask.mean() < 0.15


def test_time_split_groups_by_hand():
    df = pd.DataFrame({"user_id": ["a"] * 10 + ["b"] * 3,
                       "timestamp": [1, 2, 3, 4, 5, 6, 7, 8, 9, 9] + [5, 6, 7]})
    mask = time_validation_mask(df, 0.25)
    # user a: 9 groups -> round(2.25) = 2 latest groups (t=8 and both rows of t=9); user b: round(0.75) = 1
    assert mask.tolist() == [False] * 7 + [True] * 3 + [False, False, True]


@pytest.mark.parametrize("df, fraction, message", [
    (pd.DataFrame({"user_id": ["a", "a"], "timestamp": [1, 2]}), 0.6, r"must be in \(0, 0.5\]"),
    (pd.DataFrame({"user_id": ["a", "a"], "timestamp": [1, 2]}), 0.0, r"must be in \(0, 0.5\]"),
    (pd.DataFrame({"user_id": ["a", "b"], "timestamp": [1, 2]}), 0.5, "leaves user 'a' with no training event"),
    (pd.DataFrame({"user_id": ["a", "a", "b"], "timestamp": [1, 2, 3]}), 0.1, "empty validation set"),
    (pd.DataFrame({"user_id": ["a"]}), 0.1, "column 'timestamp': missing column"),
    (pd.DataFrame({"user_id": ["a"], "timestamp": ["x"]}), 0.1, "expected numeric timestamps"),
])
def test_bad_split_fails_with_a_clear_message(df, fraction, message):
    with pytest.raises(SplitError, match=message):
        time_validation_mask(df, fraction)


# ---------------------------------------------------------------- selection never reads test
@pytest.fixture(scope="module")
def poisoned_pair(tmp_path_factory, dataset_dir):
    """The small synthetic dataset and a copy whose test labels are flipped and whose true
    probabilities are scrambled."""
    clean = dataset_dir("synthetic")
    bad = tmp_path_factory.mktemp("poisoned") / "data"
    shutil.copytree(clean, bad)
    test = pd.read_parquet(bad / "test.parquet")
    test["click"] = 1 - test["click"]
    test["conversion"] = test["click"] * (1 - test["conversion"])
    test["p_click"] = test["p_click"].sample(frac=1.0, random_state=0).to_numpy()
    test.to_parquet(bad / "test.parquet", index=False)
    return clean, bad


def test_poisoned_test_labels_change_no_choice(poisoned_pair, tmp_path, monkeypatch):
    """Tuning, early stopping and the configuration an experiment uses are identical when the
    test labels are garbage: no selection path reads the test split."""
    monkeypatch.setattr(tune, "EPOCH_RANGE", (1, 2))
    clean, bad = poisoned_pair
    studies = {name: tune.tune(d, "mmoe", 2, tmp_path / name, seed=3, progress=False)
               for name, d in (("clean", clean), ("bad", bad))}
    keys = ("params", "valid_mean_auc", "trial_values", "best_trial", "best_epoch")
    assert {k: studies["clean"][k] for k in keys} == {k: studies["bad"][k] for k in keys}

    runs = {}
    for name, d in (("clean", clean), ("bad", bad)):
        data = prepare(d)
        best = studies[name]
        cfg = model_config_for("mmoe", data, **best["model_overrides"])
        runs[name] = train_model(data, cfg, TrainConfig(**{**best["train_overrides"], **TINY_TRAIN, "seed": 1}))
    a, b = runs["clean"].metrics, runs["bad"].metrics
    assert a["best_epoch"] == b["best_epoch"] and a["history"] == b["history"]
    assert a["valid_auc"] == b["valid_auc"]
    assert a["test_auc"] != b["test_auc"]   # the poison is real: only the reported test numbers move
    assert experiment.resolve_config("mmoe", tmp_path / "clean")["model"] == \
        experiment.resolve_config("mmoe", tmp_path / "bad")["model"]


def test_tuning_never_scores_the_test_split(tiny_synth_data, monkeypatch):
    from mvke.training import trainer
    monkeypatch.setattr(trainer, "test_metrics", lambda *a, **k: pytest.fail("test split scored while tuning"))
    cfg = TrainConfig(epochs=1, score_test=False, **TINY_TRAIN)
    m = train_model(tiny_synth_data, model_config_for("nomtl", tiny_synth_data, embed_dim=8, out_dim=16), cfg).metrics
    assert "test_auc" not in m and "valid_auc" in m


# ---------------------------------------------------------------- Optuna
def test_optuna_study_is_reproducible_under_a_seed(dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "EPOCH_RANGE", (1, 1))
    data = prepare(dataset_dir("synthetic"))
    a = tune.tune(None, "hard-sharing", 2, tmp_path / "a", seed=11, progress=False, data=data)
    b = tune.tune(None, "hard-sharing", 2, tmp_path / "b", seed=11, progress=False, data=data)
    assert a["trial_values"] == b["trial_values"] and a["params"] == b["params"]
    assert (tmp_path / "a" / "hard-sharing" / "study.db").exists()
    # Resuming a finished study runs nothing more; asking for more trials adds exactly those.
    again = tune.tune(None, "hard-sharing", 2, tmp_path / "a", seed=11, progress=False, data=data)
    assert again["trial_values"] == a["trial_values"]
    more = tune.tune(None, "hard-sharing", 3, tmp_path / "a", seed=11, progress=False, data=data)
    assert more["trials"] == 3 and more["trial_values"][:2] == a["trial_values"]
    c = tune.tune(None, "hard-sharing", 1, tmp_path / "c", seed=12, progress=False, data=data)
    assert c["params"] != tune.tune(None, "hard-sharing", 1, tmp_path / "d", seed=11, progress=False, data=data)["params"]


# ---------------------------------------------------------------- experiments
def _write_config(configs, name: str, model: dict, train: dict) -> None:
    d = configs / name
    d.mkdir(parents=True)
    (d / "best.json").write_text(json.dumps({"model_overrides": model, "train_overrides": train, "trials": 1,
                                             "valid_mean_auc": 0.5}))


def test_experiment_resumes_and_reports_the_protocol(dataset_dir, tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    small = dict(embed_dim=8, out_dim=16, expert_hidden=[16], tower_hidden=[16], head_hidden=[8], attn_dim=8)
    _write_config(configs, "mvke-mt", small, {"epochs": 2, "batch_size": 512})
    _write_config(configs, "nomtl", {**small, "tower_hidden": [64, 64]}, {"epochs": 1, "batch_size": 512})
    data_dir = tmp_path / "data"
    shutil.copytree(dataset_dir("synthetic"), data_dir)
    out = tmp_path / "out"
    run = dict(seeds=2, models=["mvke-mt", "nomtl"], configs=configs, reference=False, progress=False)
    res = experiment.run_experiment(data_dir, out, **run)
    assert res["selection"] == "valid"
    assert set(res["models"]) == {"mvke-mt", "nomtl", "nomtl@matched"}   # nomtl is far from mvke-mt's size
    assert list(res["models"]) == ["mvke-mt", "nomtl", "nomtl@matched"]    # the table's order: mvke-mt first
    mt, nm = res["models"]["mvke-mt"], res["models"]["nomtl@matched"]
    assert abs(nm["params"] / mt["params"] - 1) < experiment.MATCH_TOLERANCE
    for m in res["models"].values():
        assert len(m["best_epoch_per_seed"]) == 2 and m["config"]["source"].startswith("tuned")
        for key in ("gauc", "recall_at_20", "ndcg_at_20"):
            assert set(m[key]) == {"ctr", "cvr"}
    assert "attention_entropy" in mt and "gate_entropy" in mt
    assert res["models"]["nomtl"]["paired_vs_mvke_mt"]["seeds"] == [0, 1]
    # Seed 1 regenerated the synthetic data (another generator seed).
    assert (tmp_path / "data-seeds" / "seed-1" / "meta.json").exists()
    assert mt["per_seed"][0]["ctr_auc"] != mt["per_seed"][1]["ctr_auc"]
    assert (out / "results.md").read_text().count("| mvke-mt |") >= 1

    # A second call finds every cell and trains nothing.
    monkeypatch.setattr(experiment, "run_cell", lambda *a, **k: pytest.fail("a finished cell was rerun"))
    again = experiment.run_experiment(data_dir, out, **run)
    assert again["models"]["mvke-mt"]["per_seed"] == mt["per_seed"]
    # --aggregate-only reports what is finished and trains nothing: with 3 seeds asked and 2 run, no model
    # has all its seeds; with 1 seed asked, every model is there from its seed-0 run.
    bare = experiment.run_experiment(data_dir, out, **run, aggregate_only=True, match_params=False)
    assert set(bare["models"]) == {"mvke-mt", "nomtl"} and "--no-matched" in bare["command"]
    none = experiment.run_experiment(data_dir, out, **{**run, "seeds": 3}, aggregate_only=True)
    assert none["models"] == {}
    first = experiment.run_experiment(data_dir, out, **{**run, "seeds": 1}, aggregate_only=True)
    assert set(first["models"]) == {"mvke-mt", "nomtl", "nomtl@matched"}
    assert first["models"]["mvke-mt"]["per_seed"] == mt["per_seed"][:1]
    # --max-epochs gives every model one epoch budget: mvke-mt's tuned budget was already 2 (its runs are
    # found), nomtl's was 1 (its runs were trained under another configuration, so none is reported).
    same = experiment.run_experiment(data_dir, out, **{**run, "seeds": 1}, aggregate_only=True, max_epochs=2)
    assert set(same["models"]) == {"mvke-mt"}
    # The LightGBM reference of seed 0 only (trained here for real): a reference, not a compared model, so
    # a 2-seed table reports it over the one seed it has and says so.
    monkeypatch.undo()
    experiment.run_experiment(data_dir, out, **{**run, "seeds": 1, "reference": True})
    ref = experiment.run_experiment(data_dir, out, **{**run, "reference": True}, aggregate_only=True)["reference"]
    assert ref["seeds"] == 1 and ref["seed_ids"] == [0] and 0.5 < ref["ctr_auc"]["mean"] <= 1
    line = next(x for x in (out / "results.md").read_text().splitlines() if x.startswith("| LightGBM"))
    assert line.startswith("| LightGBM reference (not tuned; 1 of 2 seeds) |") and "±" not in line
