"""Shared pytest fixtures (each stage's tests add their own section)."""
from __future__ import annotations

from pathlib import Path

import pytest

# --- data / model fixtures ---
# Tiny datasets built once per session under tmp_path_factory: a synthetic one
# sized so that a small model learns it in a couple of seconds, and
# MovieLens-100K from the recbole wheel (about 5 s to build).

# An "easy" synthetic world: no test-day drift, no history noise, strong
# affinities, so 2 epochs of a tiny model reach a test AUC well above 0.6.
TINY_SYNTH = dict(users=1000, tags=50, categories=10, ads=200, drift=0.0, history_noise=0.0,
                  affinity_scale=2.5, seed=1)
# Model sizes small enough for 2-core CI (every registered model accepts them).
TINY_MODEL = dict(embed_dim=8, tag_dim=16, out_dim=16, expert_hidden=[32], attn_dim=8)


@pytest.fixture(scope="session")
def tiny_synth_dir(tmp_path_factory) -> Path:
    from mvke.data.synthetic import SynthConfig, generate
    return generate(SynthConfig(**TINY_SYNTH), tmp_path_factory.mktemp("tiny_synth"), progress=False)


@pytest.fixture(scope="session")
def tiny_synth_data(tiny_synth_dir):
    """EncodedData (schema on the training split, train/valid/test arrays)."""
    from mvke.training.trainer import prepare
    return prepare(tiny_synth_dir)


@pytest.fixture(scope="session")
def ml100k_source() -> Path:
    from mvke.data.movielens import recbole_ml100k_dir
    src = recbole_ml100k_dir()
    if not (src / "ml-100k.inter").exists():
        pytest.skip("recbole's ml-100k example files are not installed")
    return src


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory, ml100k_source) -> Path:
    from mvke.data.movielens import build
    return build(tmp_path_factory.mktemp("ml100k"), source=ml100k_source)


@pytest.fixture(scope="session")
def tiny_model_sizes() -> dict:
    """ModelConfig overrides for tiny, fast models."""
    return dict(TINY_MODEL)


# --- a served tiny model ---
@pytest.fixture(scope="session")
def served(bundle, dataset_dir):
    """(Server, LocalRedis): `mvke serve` (a subprocess, 1 worker) of the tiny mvke-mt bundle with the
    synthetic users in the feature store of a private redis-server. Read-only for the tests that share it."""
    from loadtest.harness import Server
    from model_export.feature_store import load_dataset_users
    from model_export.publish import publish
    from mvke.localredis import LocalRedis
    server = LocalRedis().start()
    r = server.client()
    publish(bundle("mvke-mt"), r)
    assert load_dataset_users(dataset_dir("synthetic"), r, progress=False).loaded > 0
    r.close()
    try:
        with Server.service(server.url, workers=1, env={"MVKE_MODEL_POLL_S": "5"}) as service:
            yield service, server
    finally:
        server.stop()
