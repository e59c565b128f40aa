"""Training: metrics, seeded reproducibility, learning on a tiny dataset, CLI and checkpoints."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from mvke.cli import main
from mvke.data.dataset import TASKS
from mvke.training import trainer
from mvke.training.cli import parse_task_experts as _parse_task_experts
from mvke.training.metrics import auc, gauc, normalised_entropy, ranking_metrics
from mvke.training.trainer import (CHECKPOINT_FILES, EncodedData, TrainConfig, evaluate, load_checkpoint,
                                   model_config_for, predict, prepare, train_model)

FAST = dict(batch_size=256, lr=1e-2, progress=False, threads=1)
TIMING_KEYS = {"train_seconds", "samples_per_second", "cpu_seconds", "samples_per_cpu_second"}


def _brute_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The test oracle: the share of (positive, negative) pairs ranked right, ties half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg)))


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    labels = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
    labels[:2] = [0, 1]
    # Few distinct scores -> many ties; half the seeds add an informative signal.
    scores = rng.integers(0, int(rng.integers(2, 12)), n).astype(float) + (seed % 2) * labels * rng.random(n)
    assert np.unique(scores).size < n
    assert auc(labels, scores) == pytest.approx(_brute_auc(labels, scores), abs=1e-12)
    assert auc(labels.astype(bool), scores.astype(np.float32)) == pytest.approx(_brute_auc(labels, scores))


def test_auc_edge_cases():
    assert auc(np.array([0, 0, 1, 1]), [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc(np.array([1, 1, 0, 0]), [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc(np.array([0, 1, 0, 1]), [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(auc(np.array([1, 1, 1]), [0.1, 0.2, 0.3]))
    assert np.isnan(auc(np.array([0, 0]), [0.1, 0.2]))


def test_gauc_is_the_mean_of_per_user_aucs():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 600).astype(str)
    labels = (rng.random(600) < 0.3).astype(int)
    scores = rng.integers(0, 5, 600) + labels * rng.random(600)    # ties and signal
    per_user = [_brute_auc(labels[users == u], scores[users == u]) for u in np.unique(users)
                if 0 < labels[users == u].sum() < (users == u).sum()]
    assert gauc(users, labels, scores) == pytest.approx(np.mean(per_user), abs=1e-12)
    assert np.isnan(gauc(np.array(["a", "a", "b"]), np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3])))


def test_ranking_metrics_on_a_worked_example():
    top = np.array([[5, 3, 9], [1, 2, 4], [7, 8, 6]])
    relevant = [{3, 4}, {9}, set()]                   # the third user has nothing relevant: left out
    got = ranking_metrics(top, relevant, k=3)
    d = 1 / np.log2(np.arange(2, 5))
    assert got["users"] == 2
    assert got["recall_at_3"] == pytest.approx((1 / 2 + 0) / 2)
    assert got["ndcg_at_3"] == pytest.approx((d[1] / (d[0] + d[1]) + 0) / 2)


def test_normalised_entropy_bounds():
    assert normalised_entropy(np.full((2, 4), 0.25)) == pytest.approx([1.0, 1.0])
    assert normalised_entropy(np.array([[1.0, 0, 0]]))[0] == pytest.approx(0.0, abs=1e-9)


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_seeded_training_is_reproducible(tiny_synth_data, tiny_model_sizes):
    d = tiny_synth_data
    data = EncodedData(d.dataset, d.schema, d.train.subset(np.arange(4000)), d.valid, d.test)  # less work
    cfg = model_config_for("mvke-mt", data, **tiny_model_sizes)
    runs = [train_model(data, cfg, TrainConfig(epochs=2, seed=s, **FAST)) for s in (0, 0, 1)]
    assert _without_timing(runs[0].metrics) == _without_timing(runs[1].metrics)
    _assert_same_weights(runs[0].model, runs[1].model)
    # Another seed is another run (the seed is actually used).
    assert runs[0].metrics["test_auc"] != runs[2].metrics["test_auc"]
    w0, w2 = runs[0].model.experts.kernels, runs[2].model.experts.kernels
    assert not torch.equal(w0, w2)


@pytest.fixture(scope="module")
def trained(tiny_synth_data, tiny_model_sizes):
    cfg = model_config_for("mvke-mt", tiny_synth_data, **tiny_model_sizes)
    return train_model(tiny_synth_data, cfg, TrainConfig(epochs=2, seed=0, **FAST))


def test_tiny_dataset_trains_above_chance(trained, tiny_synth_data):
    m = trained.metrics
    assert set(m["test_auc"]) == set(TASKS)
    for task in TASKS:
        assert m["test_auc"][task] > 0.6, m["test_auc"]
        assert m["test_auc"][task] < m["oracle_test_auc"][task], "beating the true probabilities is a leak"
        assert 0.6 < m["oracle_test_auc"][task] <= 1.0
    # The reported numbers are what the returned (best) model scores.
    assert evaluate(trained.model, tiny_synth_data.test) == m["test_auc"]
    assert evaluate(trained.model, tiny_synth_data.valid) == m["valid_auc"]
    assert len(m["history"]) == 2 and m["history"][-1]["train_loss"] < m["history"][0]["train_loss"] + 0.05
    assert m["best_epoch"] in (1, 2)
    for task in TASKS:
        assert 0.5 < m["test_gauc"][task] < 1.0
        r = m["test_ranking"][task]
        assert r["users"] > 0 and 0 < r["recall_at_20"] <= 1 and 0 < r["ndcg_at_20"] <= 1
    assert m["n_train"] == len(tiny_synth_data.train) and m["n_test"] == len(tiny_synth_data.test)


def test_fit_stops_early_keeps_the_best_weights_and_honours_max_steps(tiny_synth_data, tiny_model_sizes):
    """The one loop (`trainer.fit`, also each Ray Train worker's): patience 1 stops after two epochs without
    a better mean validation AUC, the best epoch's weights are kept, max_steps and on_epoch end it early."""
    from mvke.models import build_torch_model
    from mvke.training.trainer import batches, fit, make_optimizer
    data = tiny_synth_data
    train = data.train.subset(np.arange(1000))     # a few small steps per epoch: the rule, not the learning
    snapshots = []

    def run(**kw):
        aucs = iter([0.60, 0.70, 0.65, 0.64, 0.99])
        snapshots.clear()
        torch.manual_seed(0)
        model = build_torch_model(model_config_for("mvke-mt", data, **tiny_model_sizes))
        opt, sched = make_optimizer(model, TrainConfig(lr=1e-2), 1)
        rng = np.random.default_rng(0)

        def validate():
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            value = next(aucs)
            return {"interest": value, "intention": value}
        return fit(model, opt, sched, 5, 1, lambda _: batches(train, 256, rng), validate, **kw)

    r = run()
    assert len(snapshots) == 4
    assert [row["epoch"] for row in r.stopping.history] == [1, 2, 3, 4]      # epoch 5 never ran
    assert r.stopping.best_epoch == 2 and r.stopping.metrics()["valid_auc"] == {"interest": 0.7, "intention": 0.7}
    assert all(torch.equal(v, snapshots[1][k]) for k, v in r.stopping.best_state.items())
    steps_per_epoch = -(-len(train) // 256)
    assert r.steps == 4 * steps_per_epoch and r.samples == 4 * len(train)
    short = run(max_steps=steps_per_epoch + 3)
    assert short.steps == steps_per_epoch + 3 and len(short.stopping.history) == 2
    pruned = run(on_epoch=lambda epoch, value, best: epoch == 1)
    assert len(pruned.stopping.history) == 1


def test_training_survives_a_task_without_positives(tiny_synth_dir, tmp_path, tiny_model_sizes):
    """No conversion at all: the intention AUC is undefined (nan), training still completes."""
    import shutil
    import pandas as pd
    d = tmp_path / "no_conv"
    shutil.copytree(tiny_synth_dir, d)
    for split in ("train", "test"):
        df = pd.read_parquet(d / f"{split}.parquet")
        df["conversion"] = 0
        df.to_parquet(d / f"{split}.parquet", index=False)
    data = prepare(d)
    result = train_model(data, model_config_for("mvke-mt", data, **tiny_model_sizes),
                         TrainConfig(epochs=1, seed=0, **FAST))
    assert np.isnan(result.metrics["test_auc"]["intention"])
    assert 0.5 < result.metrics["test_auc"]["interest"] <= 1.0


def test_cli_task_experts_are_one_based_inclusive():
    assert _parse_task_experts("interest=1-3,intention=2-5") == {"interest": [0, 1, 2], "intention": [1, 2, 3, 4]}
    assert _parse_task_experts("interest=1,intention=1-2") == {"interest": [0], "intention": [0, 1]}


def test_cli_synth_train_and_checkpoint_round_trip(tmp_path, monkeypatch, capsys):
    data_dir, ckpt = tmp_path / "data", tmp_path / "ckpt"
    assert main(["data", "synth", "--out", str(data_dir), "--users", "300", "--tags", "50", "--seed", "5"]) == 0
    assert (data_dir / "meta.json").exists()
    assert json.loads((data_dir / "meta.json").read_text())["generator"]["users"] == 300

    # One quiet thread on the shared CI cores (the CLI has no flag for it).
    monkeypatch.setattr(trainer, "TrainConfig", functools.partial(TrainConfig, threads=1, progress=False))
    saved = {}
    real_save = trainer.save_checkpoint

    def capture(result, *args, **kwargs):  # keep the in-memory model the CLI trained
        saved["result"] = result
        return real_save(result, *args, **kwargs)
    monkeypatch.setattr(trainer, "save_checkpoint", capture)
    assert main(["train", "--data", str(data_dir), "--model", "mvke-mt", "--out", str(ckpt), "--epochs", "1",
                 "--batch-size", "512", "--task-experts", "interest=1-3,intention=2-5"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("\n{") + 1:])
    assert printed["model"] == "mvke-mt" and set(printed["test_auc"]) == set(TASKS) == set(printed["valid_auc"])

    assert sorted(p.name for p in ckpt.iterdir()) == sorted(CHECKPOINT_FILES)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"]["name"] == "mvke-mt" and config["train"]["epochs"] == 1
    assert config["model"]["task_experts"] == {"interest": [0, 1, 2], "intention": [1, 2, 3, 4]}
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert metrics["test_auc"] == printed["test_auc"]

    loaded = load_checkpoint(ckpt)
    trained = saved["result"]
    _assert_same_weights(trained.model, loaded.model)
    assert loaded.schema.to_dict() == trained.schema.to_dict() and loaded.tags == trained.tags
    data = prepare(data_dir)
    np.testing.assert_array_equal(predict(loaded.model, data.test), predict(trained.model, data.test))
    assert evaluate(loaded.model, data.test) == metrics["test_auc"]


def test_load_checkpoint_names_a_missing_file(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json: checkpoint file missing"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------- the virtual kernels learn
def test_field_attention_is_not_uniform_after_a_few_hundred_steps(tmp_path, tiny_model_sizes):
    """On a facets world, the default experts attend to different fields after 300 steps, and their
    attention moved during training; the published form (residual + LayerNorm, kernels N(0, 0.01),
    ReLU'd projections) stays exactly uniform (the bug this design fixes)."""
    from mvke.data.synthetic import SynthConfig, generate
    from mvke.training.attention_probe import DESIGNS, probe
    data = prepare(generate(SynthConfig(users=1500, tags=60, categories=10, ads=300, seed=2), tmp_path, progress=False))
    after = probe(data, {**tiny_model_sizes, **DESIGNS["values (default)"]}, steps=300, batch_size=64)
    first, last = after["log"][0]["attention"], after["log"][-1]["attention"]
    assert max(last) < 0.99 and np.mean(last) < 0.98, last
    assert np.abs(np.subtract(first, last)).max() > 1e-3, (first, last)      # training moved it
    before = probe(data, {**tiny_model_sizes, **DESIGNS[next(iter(DESIGNS))]}, steps=300, batch_size=64)
    assert min(before["log"][-1]["attention"]) > 0.999, before["log"]
