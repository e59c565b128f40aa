"""A run stopped and continued from its state file (mvke/training/resume.py) is the same run as one
without a stop: the same weights bit for bit and the same metrics, whether it stopped inside an
epoch or between two; a state saved for another run is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mvke.runtime.system import cpu_model
from mvke.training.resume import RunCheckpoint
from mvke.training.trainer import EncodedData, TrainConfig, model_config_for, train_model

FAST = dict(batch_size=256, lr=1e-2, progress=False, threads=1, epochs=3, patience=5, seed=3)
TIMING_KEYS = {"train_seconds", "samples_per_second", "cpu_seconds", "samples_per_cpu_second"}


class Killed(Exception):
    """Stands for the process being killed after the state was written."""


class KilledAfter(RunCheckpoint):
    """Saves every step, then 'dies' at (epoch, step) or after an epoch's save."""

    def __init__(self, path, key, epoch: int, step: int | None):
        super().__init__(path, key, every_s=0.0)
        self.kill_epoch, self.kill_step = epoch, step

    def after_step(self, epoch, partial):
        super().after_step(epoch, partial)
        if epoch == self.kill_epoch and partial.steps == self.kill_step:
            raise Killed

    def after_epoch(self, epoch):
        super().after_epoch(epoch)
        if epoch == self.kill_epoch and self.kill_step is None:
            raise Killed


@pytest.fixture(scope="module")
def small(tiny_synth_data):
    d = tiny_synth_data
    return EncodedData(d.dataset, d.schema, d.train.subset(np.arange(3000)), d.valid, d.test)


@pytest.fixture(scope="module")
def uninterrupted(small, tiny_model_sizes):
    cfg = model_config_for("mvke-mt", small, **tiny_model_sizes)
    return train_model(small, cfg, TrainConfig(**FAST))


def _same_run(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING_KEYS}  # noqa: E731
    assert strip(a.metrics) == strip(b.metrics)


@pytest.mark.parametrize("epoch,step", [(2, 5), (1, None)], ids=["inside-an-epoch", "between-epochs"])
def test_a_stopped_run_continues_as_the_same_run(small, tiny_model_sizes, uninterrupted, tmp_path, epoch, step):
    cfg = model_config_for("mvke-mt", small, **tiny_model_sizes)
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):
        train_model(small, cfg, TrainConfig(**FAST), checkpoint=KilledAfter(path, "k", epoch, step))
    assert path.exists()
    saved = torch.load(path, weights_only=False)
    assert saved["epoch"] == epoch and (saved["partial"] or {}).get("steps") == step
    second = RunCheckpoint(path, "k")
    resumed = train_model(small, cfg, TrainConfig(**FAST), checkpoint=second)
    _same_run(resumed, uninterrupted)
    assert second.cpus == [cpu_model()]        # both processes on this machine: named once
    # CPU time counts both processes' share: at least what the first one had spent when it saved.
    assert resumed.metrics["cpu_seconds"] >= saved["cpu_seconds"] > 0


def test_a_state_of_another_run_is_refused(small, tiny_model_sizes, tmp_path):
    cfg = model_config_for("mvke-mt", small, **tiny_model_sizes)
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):
        train_model(small, cfg, TrainConfig(**FAST), checkpoint=KilledAfter(path, "seed 3", 1, None))
    with pytest.raises(RuntimeError, match="saved for another run"):
        train_model(small, cfg, TrainConfig(**FAST), checkpoint=RunCheckpoint(path, "seed 4"))


def test_a_state_from_before_cpus_were_recorded_says_so(small, tiny_model_sizes, tmp_path):
    cfg = model_config_for("mvke-mt", small, **tiny_model_sizes)
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):
        train_model(small, cfg, TrainConfig(**FAST), checkpoint=KilledAfter(path, "k", 1, None))
    state = torch.load(path, weights_only=False)
    del state["cpus"]
    torch.save(state, path)
    ck = RunCheckpoint(path, "k")
    train_model(small, cfg, TrainConfig(**FAST), checkpoint=ck)
    assert ck.cpus == ["not recorded", cpu_model()]
