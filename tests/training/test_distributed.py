"""mvke/training/distributed.py: streamed parts, the same schema and rows as one file, Ray Train DDP."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mvke.training.distributed import (DataPart, DistributedConfig, encode_part, find_parts, scan_parts,
                                       validation_mask)


def split_into_parts(src: Path, out: Path, parts: int) -> Path:
    """The same dataset as `train.parquet/part-*.parquet` etc., users split by id range."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "meta.json", out / "meta.json")
    users = pq.read_table(src / "users.parquet")
    ids = sorted(users.column("user_id").to_pylist())
    bounds = [ids[int(len(ids) * k / parts)] for k in range(1, parts)]
    for name in ("train", "test", "users"):
        table = pq.read_table(src / f"{name}.parquet")
        uid = np.array(table.column("user_id").to_pylist())
        which = np.searchsorted(bounds, uid, side="right")
        (out / f"{name}.parquet").mkdir()
        for k in range(parts):
            pq.write_table(table.filter(which == k), out / f"{name}.parquet" / f"part-{k:05d}.parquet")
    return out


@pytest.fixture(scope="module")
def parted(dataset_dir, tmp_path_factory) -> tuple[Path, Path]:
    src = dataset_dir("synthetic")
    return src, split_into_parts(src, tmp_path_factory.mktemp("parted"), 3)


def test_find_parts_pairs_files_by_name(parted):
    single, multi = parted
    assert [Path(p.train).name for p in find_parts(single)] == ["train.parquet"]
    parts = find_parts(multi)
    assert len(parts) == 3 and all(Path(p.train).name == Path(p.users).name == Path(p.test).name for p in parts)
    (Path(parts[1].users)).rename(Path(parts[1].users).with_suffix(".moved"))
    try:
        with pytest.raises(FileNotFoundError, match="paired by file name"):
            find_parts(multi)
    finally:
        Path(parts[1].users).with_suffix(".moved").rename(parts[1].users)


def _rows(df) -> list[tuple]:
    return sorted(zip(df["user_id"], df["timestamp"], map(tuple, df["tags"]), df["click"]))


def test_validation_split_is_the_trainers_time_split(parted):
    """Part by part, the rows the trainer's time_validation_mask picks on the whole table (mvke/data/split.py)."""
    import pandas as pd

    from mvke.data.split import time_validation_mask
    single, multi = parted
    whole = pq.read_table(single / "train.parquet").to_pandas()
    expect = whole[time_validation_mask(whole, 0.1)]
    got = []
    for p in find_parts(multi):
        rows = pq.read_table(p.train).to_pandas()
        got.append(rows[validation_mask(rows, 0.1, p.train)])
    assert len(expect) > 0 and _rows(pd.concat(got)) == _rows(expect)
    # Ties: a user's rows at one timestamp are never cut; one timestamp -> no validation row, and no error.
    df = pd.DataFrame({"user_id": ["a"] * 10 + ["b"] * 2, "timestamp": list(range(9)) + [8, 5, 5]})
    assert validation_mask(df, 0.1).tolist() == [False] * 8 + [True, True] + [False, False]
    assert not validation_mask(df[df["user_id"] == "b"], 0.1).any()


def test_no_validation_row_in_any_part_is_an_error(tmp_path):
    from mvke.data.split import SplitError
    from mvke.data.synthetic import SynthConfig, generate
    d = generate(SynthConfig(users=20, tags=30, ads=40, categories=10, train_impressions_per_user=0.0, seed=1),
                 tmp_path, progress=False)
    meta = json.loads((d / "meta.json").read_text())
    with pytest.raises(SplitError, match="empty validation set"):
        scan_parts(find_parts(d), meta, 0.1)


def test_synth_parts_stream_like_one_file(tmp_path):
    """`mvke data synth`'s part layout: find_parts pairs its files, and the parts' encoded rows are the one file's."""
    from mvke.data.synthetic import USER_BLOCK, SynthConfig, generate
    cfg = SynthConfig(users=USER_BLOCK + 200, tags=30, ads=40, categories=10, seed=1)
    parted = generate(cfg, tmp_path / "parted", progress=False, part_users=USER_BLOCK)
    single = generate(cfg, tmp_path / "single", progress=False, part_users=0)
    parts = find_parts(parted)
    assert [Path(p.train).name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]
    assert all(Path(p.users).parent.name == "users.parquet" and Path(p.test).parent.name == "test.parquet"
               for p in parts)
    meta = json.loads((single / "meta.json").read_text())
    schema = scan_parts(find_parts(single), meta, 0.1).schema
    assert scan_parts(parts, meta, 0.1).schema.to_dict() == schema.to_dict()
    for split in ("train", "valid", "test"):
        def encoded(ps):
            e = [encode_part(p, meta, schema, 0.1, split) for p in ps]
            return {k: np.concatenate([x[k] for x in e]) for k in e[0]}
        a, b = encoded(parts), encoded(find_parts(single))
        for k in a:
            assert np.array_equal(a[k], b[k]), (split, k)


def test_parts_give_the_schema_and_rows_of_the_whole(parted):
    single, multi = parted
    meta = json.loads((single / "meta.json").read_text())
    whole = scan_parts(find_parts(single), meta, 0.1).schema
    assert scan_parts(find_parts(multi), meta, 0.1).schema.to_dict() == whole.to_dict()

    def rows(parts: list[DataPart], split: str) -> set[tuple]:
        out = set()
        for p in parts:
            enc = encode_part(p, meta, whole, 0.1, split)
            for i in range(len(enc["labels"])):
                out.add((enc["cat_ids"][i].tobytes(), enc["multi_ids"][i].tobytes(), enc["tag_ids"][i].tobytes(),
                         enc["labels"][i].tobytes()))
        return out
    for split in ("train", "valid", "test"):
        assert rows(find_parts(multi), split) == rows(find_parts(single), split), split


def test_train_workers_must_be_positive(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "mvke.cli", "train", "--data", str(tmp_path), "--out",
                          str(tmp_path / "ck"), "--workers", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--workers: must be >= 1, got 0" in out.stderr


@pytest.mark.integration
def test_two_ray_train_workers_write_a_checkpoint_export_reads(parted, tmp_path, tiny_model_sizes):
    """2 DDP workers (gloo) on the parted data; the checkpoint has the 1-worker format."""
    pytest.importorskip("ray.train.torch")
    from mvke.training.distributed import train_distributed
    from mvke.training.trainer import TrainConfig, load_checkpoint, save_checkpoint
    _, multi = parted
    cfg = TrainConfig(epochs=1, batch_size=256, threads=2, progress=False)
    result = train_distributed(multi, "mvke-mt", cfg, DistributedConfig(workers=2, storage=str(tmp_path / "ray")),
                               **tiny_model_sizes)
    m = result.metrics
    assert m["workers"] == 2 and m["samples"] > 0 and m["samples_per_second"] > 0
    assert set(m["test_auc"]) == {"interest", "intention"} and all(0 <= v <= 1 for v in m["test_auc"].values())
    ckpt = save_checkpoint(result, tmp_path / "ckpt", cfg, multi)
    back = load_checkpoint(ckpt)
    for k, v in result.model.state_dict().items():
        assert np.array_equal(back.model.state_dict()[k].numpy(), v.numpy()), k
    assert back.schema.to_dict() == result.schema.to_dict()


def test_test_auc_streamed_stops_at_max_rows(parted, tiny_model_sizes):
    from mvke.data.dataset import TASKS
    from mvke.models import ModelConfig, build_torch_model
    from mvke.training.distributed import test_auc_streamed
    _, multi = parted
    meta = json.loads((multi / "meta.json").read_text())
    parts = find_parts(multi)
    schema = scan_parts(parts, meta, 0.1).schema
    model = build_torch_model(ModelConfig(name="mvke-mt", tasks=list(TASKS), num_ids=schema.num_ids,
                                    num_cat_fields=len(schema.cat_fields), num_multi_fields=len(schema.multi_fields),
                                    num_tags=len(meta["tags"]), **tiny_model_sizes)).eval()
    first = pq.read_metadata(parts[0].test).num_rows
    assert test_auc_streamed(model, parts, meta, schema, max_rows=1)["n_test"] == first
    assert test_auc_streamed(model, parts, meta, schema)["n_test"] == sum(pq.read_metadata(p.test).num_rows
                                                                          for p in parts) > first


@pytest.mark.integration
def test_stream_trains_one_ray_worker_on_synth_parts(tmp_path):
    """`mvke train --workers 1 --stream` on the part layout `mvke data synth` writes: Ray Train, a checkpoint."""
    pytest.importorskip("ray.train.torch")
    import subprocess
    import sys

    from mvke.data.synthetic import USER_BLOCK, SynthConfig, generate
    data = generate(SynthConfig(users=USER_BLOCK + 100, tags=30, ads=40, categories=10, seed=1), tmp_path / "d",
                    progress=False, part_users=USER_BLOCK)
    out = subprocess.run([sys.executable, "-m", "mvke.cli", "train", "--data", str(data), "--out", str(tmp_path / "ck"),
                          "--model", "mvke-mt", "--workers", "1", "--stream", "--max-steps", "5", "--max-eval-rows",
                          "2000", "--epochs", "1", "--batch-size", "256"],
                         capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ck").is_dir() and '"test_auc"' in out.stdout


# ---------------------------------------------------------------- --workers on tune and experiment
def _study_with(values_per_trial: list[dict[int, float]]):
    import optuna
    from mvke.training import tune
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=tune.PRUNE_STARTUP_TRIALS, n_warmup_steps=tune.PRUNE_WARMUP_EPOCHS))
    for values in values_per_trial:
        study.add_trial(optuna.trial.create_trial(value=max(values.values()), intermediate_values=values))
    return study


def test_median_thresholds_prune_where_optunas_median_pruner_does():
    """The workers' stop rule (best so far < threshold of the epoch) agrees with MedianPruner on a live trial."""
    from mvke.training import tune
    history = [{1: 0.60, 2: 0.62, 3: 0.64, 4: 0.65}, {1: 0.61, 2: 0.66, 3: 0.70, 4: 0.71},
               {1: 0.55, 2: 0.58, 3: 0.60}, {1: 0.62, 2: 0.64, 3: 0.69, 4: 0.70}]
    assert tune.median_thresholds(_study_with(history[:tune.PRUNE_STARTUP_TRIALS - 1])) == {}
    study = _study_with(history)
    thresholds = tune.median_thresholds(study)
    assert thresholds == {3: pytest.approx(np.median([0.64, 0.70, 0.60, 0.69])), 4: pytest.approx(0.70)}
    for run in ([0.60, 0.62, 0.63, 0.64], [0.60, 0.62, 0.67, 0.72], [0.7, 0.5, 0.5, 0.5]):
        thresholds = tune.median_thresholds(study)   # the driver's hand-over at the start of each trial
        trial, best = study.ask(), float("-inf")
        for epoch, value in enumerate(run, 1):
            trial.report(value, epoch)
            best = max(best, value)
            ours = epoch in thresholds and best < thresholds[epoch]
            assert trial.should_prune() == ours, (run, epoch)
            if ours:
                break
        study.tell(trial, state=optuna_state("PRUNED" if ours else "COMPLETE"), values=None if ours else best)


def optuna_state(name: str):
    import optuna
    return getattr(optuna.trial.TrialState, name)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the tests below (each training joins it instead of starting its own)."""
    pytest.importorskip("ray.train.torch")
    from mvke.training.distributed import ray_session
    with ray_session(DistributedConfig(workers=2)):
        yield


@pytest.mark.integration
def test_vocabulary_scan_in_ray_tasks_equals_the_serial_scan(parted, local_ray):
    from mvke.training.distributed import scan_parts
    _, multi = parted
    meta = json.loads((multi / "meta.json").read_text())
    serial = scan_parts(find_parts(multi), meta, 0.1)
    tasks = scan_parts(find_parts(multi), meta, 0.1, ray_tasks=True, parts_per_task=1)
    assert tasks.schema.to_dict() == serial.schema.to_dict()
    assert (tasks.train_rows, tasks.valid_rows) == (serial.train_rows, serial.valid_rows) and serial.valid_rows > 0


@pytest.mark.integration
def test_workers_follow_the_trainers_schedule_and_the_prune_thresholds(parted, tmp_path, tiny_model_sizes, local_ray):
    """Cosine ends at ~0 after the planned epochs (the schedule counts each worker's steps); a threshold no AUC
    reaches stops every worker after that epoch (here the last: the schedule still ran in full)."""
    from mvke.training.distributed import train_distributed
    from mvke.training.trainer import TrainConfig
    _, multi = parted
    cfg = TrainConfig(epochs=2, batch_size=256, lr=3e-3, lr_schedule="cosine", threads=2, progress=False)
    m = train_distributed(multi, "mvke-mt", cfg, DistributedConfig(workers=2, score_test=False, prune_below={2: 1.01},
                                                                  storage=str(tmp_path / "a")), **tiny_model_sizes).metrics
    assert len(m["history"]) == 2 and m["pruned_at_epoch"] == 2
    assert m["final_lr"] < 0.01 * cfg.lr and m["cpu_seconds"] > 0
    assert m["n_train"] + m["n_valid"] == sum(pq.read_metadata(p.train).num_rows for p in find_parts(multi))


@pytest.mark.integration
def test_tune_and_experiment_on_two_workers(dataset_dir, tmp_path, monkeypatch, local_ray):
    """`mvke tune --workers 2`: trials on Ray Train with the pruner's record; `mvke experiment --workers 2`:
    the 1-worker metrics (gAUC, Recall@20, diagnostics), cells kept apart from 1-worker cells."""
    from mvke.training import experiment, tune
    monkeypatch.setattr(tune, "EPOCH_RANGE", (1, 1))
    data = dataset_dir("synthetic")
    best = tune.tune(data, "mvke-mt", 1, tmp_path / "studies", seed=5, progress=False, workers=2)
    assert best["trials"] == 1 and best["model_params"] > 0 and best["cpu_seconds"] > 0
    import optuna
    study = optuna.load_study(study_name="mvke-mt", storage=f"sqlite:///{tmp_path / 'studies' / 'mvke-mt' / 'study.db'}")
    assert all(t.user_attrs["workers"] == 2 and t.intermediate_values for t in study.trials)

    res = experiment.run_experiment(data, tmp_path / "out", seeds=1, models=["mvke-mt"], configs=tmp_path / "studies",
                                    reference=False, progress=False, workers=2)
    mt = res["models"]["mvke-mt"]
    assert set(mt["gauc"]) == set(mt["recall_at_20"]) == {"ctr", "cvr"} and "gate_entropy" in mt
    assert "--workers 2" in res["command"]
    cell = json.loads((tmp_path / "out" / "cells" / "mvke-mt" / "seed-0.json").read_text())
    assert cell["workers"] == 2 and cell["config_key"].endswith("-w2")
    # The same cells are not a 1-worker result.
    one = experiment.run_experiment(data, tmp_path / "out", seeds=1, models=["mvke-mt"], configs=tmp_path / "studies",
                                    reference=False, progress=False, aggregate_only=True)
    assert one["models"] == {}


# ---------------------------------------------------------------- one loop: the same step on both paths
@pytest.fixture(scope="module")
def even_rows(tmp_path_factory) -> Path:
    """A tiny synthetic dataset whose training split has an even number of rows: 2 workers' equal shards
    (Ray Train's default split drops the odd row) then hold every row between them."""
    from mvke.data.synthetic import SynthConfig, generate
    from tests.conftest import TINY_SYNTH
    return generate(SynthConfig(**{**TINY_SYNTH, "users": 400}), tmp_path_factory.mktemp("even"), progress=False)


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])
def test_one_step_is_the_same_in_one_process_and_on_ray_workers(even_rows, tmp_path, tiny_model_sizes, local_ray,
                                                                workers):
    """One optimiser step with the whole training split as the batch (so row order and sharding do not
    matter): `mvke train` in one process and on Ray Train workers (DDP averaging the shards' gradients)
    reach the same loss and the same parameters.

    AdamW's first step moves each weight by lr * g / (|g| + eps), about ±lr whatever |g|: where the gradient
    is zero up to float rounding (the kernels' key bias: softmax ignores a shift), the summation order picks
    the sign. Those weights are compared to the step's size, the others to float tolerance."""
    import torch

    from mvke.models import build_torch_model
    from mvke.training.distributed import train_distributed
    from mvke.training.trainer import BATCH_KEYS, TrainConfig, batch_loss, model_config_for, prepare, train_model
    data = prepare(even_rows)
    n = len(data.train)
    assert n % 2 == 0, f"{n} training rows: 2 equal shards would drop one"
    cfg = TrainConfig(epochs=1, batch_size=2 * n, lr=1e-2, threads=1, progress=False, score_test=False)
    model_cfg = model_config_for("mvke-mt", data, **tiny_model_sizes)
    single = train_model(data, model_cfg, cfg)
    ray = train_distributed(even_rows, "mvke-mt", cfg, DistributedConfig(workers=workers, score_test=False,
                                                                         storage=str(tmp_path / "ray")),
                            **tiny_model_sizes)
    assert ray.metrics["steps"] == 1 and ray.metrics["samples"] == n   # one step per worker, every row once
    if workers == 1:   # with 2 workers the reported loss is rank 0's half of the batch
        assert ray.metrics["history"][0]["train_loss"] == pytest.approx(single.metrics["history"][0]["train_loss"],
                                                                        rel=1e-6)
    torch.manual_seed(cfg.seed)
    start = build_torch_model(model_cfg)
    batch_loss(start, tuple(torch.from_numpy(getattr(data.train, k)) for k in BATCH_KEYS)).backward()
    compared = 0
    for name, p in start.named_parameters():
        after, other = single.model.state_dict()[name].numpy(), ray.model.state_dict()[name].numpy()
        signal = p.grad.abs().numpy() > 1e-5
        np.testing.assert_allclose(other[signal], after[signal], rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(other, after, rtol=0, atol=2 * cfg.lr, err_msg=name)
        compared += int(signal.sum())
        assert not signal.any() or not np.array_equal(after[signal], p.detach().numpy()[signal]), name  # it moved
    assert compared > 0.5 * sum(p.numel() for p in start.parameters())
