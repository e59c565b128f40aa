"""The quick demo of `bash scripts/run.sh`: README states its size, and its learning rate reaches training."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

import mvke.pipeline as pipeline
from mvke.pipeline import PipelineConfig, run_dirs

ROOT = Path(__file__).resolve().parents[2]


def quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "scripts" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # its dataclasses look their module up while it is executed
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_readme_states_the_quick_demos_size():
    quick = quickstart().SIZES["quick"]
    said = re.search(r"synthetic logs \(([\d,]+) users, ([\d,]+) tags\) -> MVKE-mt \((\d+) epochs?, "
                     r"learning rate ([\d.e-]+)\)", (ROOT / "README.md").read_text())
    assert said, "README's main-job paragraph names the quick demo's users, tags, epochs and learning rate"
    users, tags, epochs, lr = said.groups()
    assert (int(users.replace(",", "")), int(tags.replace(",", "")), int(epochs), float(lr)) == \
        (quick.users, quick.tags, quick.epochs, quick.lr)


def test_demo_learning_rate_from_the_environment(monkeypatch):
    qs = quickstart()
    monkeypatch.setenv("MVKE_DEMO_LR", "0.004")
    assert qs.DemoSize.from_env()[1].lr == 0.004
    monkeypatch.delenv("MVKE_DEMO_LR")
    assert qs.DemoSize.from_env()[1].lr == qs.SIZES["quick"].lr


def test_pipeline_passes_its_learning_rate_to_training_and_keeps_the_run_apart(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    default, tuned = PipelineConfig(str(data), work=str(tmp_path)), PipelineConfig(str(data), work=str(tmp_path), lr=0.004,
                                                                                    threads=1)
    assert run_dirs(default, data) != run_dirs(tuned, data)       # a checkpoint of another lr is never reused
    calls = []

    def command(argv, log=None):
        calls.append(argv)
        raise RuntimeError("stop after the first step")
    monkeypatch.setattr(pipeline, "_command", command)
    for cfg in (tuned, default):
        with pytest.raises(RuntimeError, match="stop after"):
            pipeline.run_pipeline(cfg)
    tuned_train, default_train = calls
    assert tuned_train[0] == default_train[0] == "train"
    assert tuned_train[tuned_train.index("--lr") + 1] == "0.004" and "--lr" not in default_train
    assert tuned_train[tuned_train.index("--threads") + 1] == "1" and "--threads" not in default_train
