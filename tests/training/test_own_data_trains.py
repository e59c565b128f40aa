"""The own-data example (docs/OWN_DATA.md) is complete: cut by `mvke data split --by-time`, it is
a dataset the trainer prepares (vocabularies, validation rows) and trains on, test scored once."""
from __future__ import annotations

import math
from pathlib import Path

from mvke.data.log_split import split_by_time
from tests.fixtures.model_fixtures import TINY_MODEL, TINY_TRAIN

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "own-data"


def test_the_own_data_example_trains(tmp_path):
    from mvke.training.trainer import TrainConfig, model_config_for, prepare, train_model
    split_by_time(EXAMPLE / "log.parquet", tmp_path / "mine")
    data = prepare(tmp_path / "mine")
    assert len(data.train) and len(data.valid) and len(data.test)
    result = train_model(data, model_config_for("mvke-mt", data, **TINY_MODEL), TrainConfig(**TINY_TRAIN))
    auc = result.metrics["test_auc"]
    assert set(auc) == {"interest", "intention"} and all(math.isfinite(v) for v in auc.values()), auc
