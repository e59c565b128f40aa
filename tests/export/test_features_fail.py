"""Issue 28 §3: a `mvke features load` that rejects every user, or more than --max-reject-rate
(default 1%), fails: exit 2, a message with the count and the reasons, no `_SUCCESS.json`, no
schema record. Below the threshold it succeeds and records the schema. Real redis-server."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvke.runtime.keys import Keys

pytestmark = pytest.mark.integration


def _dataset(root: Path, users: int, bad: int) -> Path:
    """`users` users, the first `bad` of them with a list item containing the separator `|` (rejected)."""
    root.mkdir()
    (root / "meta.json").write_text(json.dumps({"fields": {"gender": "cat", "history": "multi"}}))
    rows = [{"user_id": f"u{i}", "gender": "fm"[i % 2], "history": ["a|b"] if i < bad else ["a", "b"]}
            for i in range(users)]
    pq.write_table(pa.Table.from_pylist(rows), root / "users.parquet")
    return root


def _load(data: Path, url: str, *extra: str) -> int:
    from mvke.cli import main
    return main(["features", "load", "--data", str(data), "--redis", url, "--workers", "1", *extra])


def test_every_user_rejected_fails_without_success_marker(redis_server, redis_client, tmp_path, capsys):
    data = _dataset(tmp_path / "all-bad", 50, 50)
    assert _load(data, redis_server.url) == 2
    err = capsys.readouterr().err
    assert "50 of 50 users rejected" in err and "history" in err and "--max-reject-rate" in err
    assert not (data / "_features_load" / "_SUCCESS.json").exists()
    assert redis_client.get(Keys().features_schema) is None


def test_reject_rate_threshold(redis_server, redis_client, tmp_path, capsys):
    from model_export.features_job import FeatureLoadError, check_reject_rate
    check_reject_rate(99, 1, 0.01, [])                       # 1% is allowed
    with pytest.raises(FeatureLoadError, match="2 of 100 users rejected"):
        check_reject_rate(98, 2, 0.01, [{"field": "history", "reason": "expected a list, got str"}])
    with pytest.raises(FeatureLoadError, match="no users"):
        check_reject_rate(0, 0, 0.5, [])

    data = _dataset(tmp_path / "some-bad", 100, 3)
    assert _load(data, redis_server.url) == 2
    assert "3 of 100 users rejected (3.0%" in capsys.readouterr().err
    assert not (data / "_features_load" / "_SUCCESS.json").exists()
    assert redis_client.get(Keys().features_schema) is None
    assert _load(data, redis_server.url, "--max-reject-rate", "0.05") == 0
    assert (data / "_features_load" / "_SUCCESS.json").exists()
    assert json.loads(redis_client.get(Keys().features_schema))["fields"] == {"gender": "cat", "history": "multi"}
