"""`mvke pipeline`: each step skipped when its output exists.

The tiny checkpoint and bundle of tests/fixtures/model_fixtures.py are copied to where the
pipeline keeps them, so it finds them (training and exporting through the pipeline are run
end to end by tests/deploy/test_quickstart.py); then it publishes and loads the feature store
of a private redis-server, does nothing on a second run, and redoes only the Redis steps
after Redis lost everything.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mvke.pipeline import PipelineConfig, run_dirs, run_pipeline
from mvke.runtime.keys import Keys
from mvke.runtime.versions import active_version

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
STEPS = ["data", "train", "export", "publish", "features"]


@pytest.fixture
def trained_work(dataset_dir, checkpoint, bundle, tmp_path) -> PipelineConfig:
    """A pipeline config whose work directory already holds the fixtures' nomtl checkpoint and bundle."""
    data = dataset_dir("synthetic")
    cfg = PipelineConfig(data_source=str(data), model="nomtl", work=str(tmp_path / "work"), epochs=1)
    ckpt, bund = run_dirs(cfg, data)
    shutil.copytree(checkpoint("nomtl"), ckpt)
    shutil.copytree(bundle("nomtl"), bund)
    return cfg


def test_pipeline_skips_what_exists_and_redoes_what_redis_lost(trained_work, redis_server, redis_client):
    cfg = trained_work
    cfg.redis = redis_server.url
    first = run_pipeline(cfg)
    assert first.ran == ["publish", "features"] and first.skipped == ["data", "train", "export"]
    assert active_version(redis_client) == first.version
    assert first.version == json.loads(Path(first.bundle, "manifest.json").read_text())["version"]
    users = list(redis_client.scan_iter(match="mvke:user:*", count=1000))
    assert len(users) == 400

    again = run_pipeline(cfg)
    assert again.ran == [] and again.skipped == STEPS and again.version == first.version

    redis_client.flushdb()                        # Redis lost its data: only the Redis steps run again
    third = run_pipeline(cfg)
    assert third.ran == ["publish", "features"] and active_version(redis_client) == first.version
    assert redis_client.exists(Keys().user(users[0].decode().split(":", 2)[2]))


def test_pipeline_command_prints_its_summary_last(trained_work, tmp_path):
    """The command line: the JSON summary is stdout's last line (what the benches read); a dataset
    directory that is not one is refused with a message naming it."""
    out = subprocess.run([sys.executable, "-m", "mvke.cli", "pipeline", "--data-source", str(tmp_path / "nothing"),
                          "--work", trained_work.work], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "nothing" in out.stderr and "meta.json" in out.stderr
    out = subprocess.run([sys.executable, "-m", "mvke.cli", "pipeline", "--data-source", trained_work.data_source,
                          "--model", "nomtl", "--epochs", "1", "--work", trained_work.work],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["ran"] == [] and summary["skipped"] == ["data", "train", "export"]
    assert summary["model"] == "nomtl" and summary["test_auc"]
