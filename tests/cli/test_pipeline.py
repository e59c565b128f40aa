"""`mvke pipeline`: each step skipped when its output exists.

The tiny checkpoint and bundle of tests/fixtures/model_fixtures.py are copied to where the
pipeline keeps them, so it finds them (training and exporting through the pipeline are run
end to end by tests/deploy/test_quickstart.py); then it publishes and loads the feature store
of a private redis-server, does nothing on a second run, and redoes only the Redis steps
after Redis lost everything.
"""
from __future__ import annotations

import dataclasses
import json
import os
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
STEPS = ["data", "train", "export", "features", "publish"]


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
    assert first.ran == ["features", "publish"] and first.skipped == ["data", "train", "export"]
    assert active_version(redis_client) == first.version
    assert first.version == json.loads(Path(first.bundle, "manifest.json").read_text())["version"]
    users = list(redis_client.scan_iter(match="mvke:user:*", count=1000))
    assert len(users) == 400

    again = run_pipeline(cfg)
    assert again.ran == [] and again.skipped == STEPS and again.version == first.version

    redis_client.flushdb()                        # Redis lost its data: only the Redis steps run again
    third = run_pipeline(cfg)
    assert third.ran == ["features", "publish"] and active_version(redis_client) == first.version
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


def _flip_one_byte(path: Path) -> None:
    """Change one byte of a Parquet file (its footer's writer name: the file stays readable), same size
    and same modification time: only a content fingerprint sees it."""
    st = path.stat()
    raw = path.read_bytes()
    at = raw.rfind(b"parquet-cpp-arrow")
    assert at > 0
    path.write_bytes(raw[:at] + b"P" + raw[at + 1:])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_pipeline_cache_is_keyed_by_content(trained_work, tmp_path):
    """Issue 28 §2: one byte of the input data changed -> train and export run again (into new
    directories); unchanged inputs skip; --force STEP redoes that step."""
    data = tmp_path / "own-data"
    shutil.copytree(trained_work.data_source, data)
    cfg = PipelineConfig(data_source=str(data), model="nomtl", work=trained_work.work, epochs=1)
    ckpt, bund = run_dirs(cfg, data)
    shutil.copytree(Path(trained_work.work) / "ckpt" / run_dirs(trained_work, Path(trained_work.data_source))[0].name,
                    ckpt)
    shutil.copytree(run_dirs(trained_work, Path(trained_work.data_source))[1], bund)
    assert run_pipeline(cfg).ran == []

    _flip_one_byte(data / "train.parquet")
    changed = run_pipeline(cfg)
    assert changed.ran == ["train", "export"], changed
    assert Path(changed.checkpoint) != ckpt and Path(changed.checkpoint) == run_dirs(cfg, data)[0]
    assert (Path(changed.bundle) / "manifest.json").exists()

    again = run_pipeline(cfg)
    assert again.ran == [] and again.checkpoint == changed.checkpoint and again.version == changed.version

    (data / "_features_load").mkdir(exist_ok=True)    # job markers beside the data are not input
    (data / "_features_load" / "_SUCCESS.json").write_text("{}")
    assert run_pipeline(cfg).ran == []

    forced = run_pipeline(dataclasses.replace(cfg, force=("export",)))
    assert forced.ran == ["export"] and forced.version == changed.version   # the same checkpoint, the same bundle
