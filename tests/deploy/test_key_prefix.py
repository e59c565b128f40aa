"""The key prefix end to end: `MVKE_KEY_PREFIX` set once (or `--key-prefix`) is followed by
`mvke publish`, `mvke features load`, `mvke models`, `mvke publish --rollback`, `mvke pipeline`
and `mvke tag-all`, so a service started with the same `MVKE_KEY_PREFIX` finds the model and
the users, and nothing is written under the default `mvke:`. Real redis-server, real service."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mvke.cli import main as mvke_main
from mvke.pipeline import PipelineConfig, run_dirs, run_pipeline
from mvke.runtime.keys import Keys
from mvke.runtime.versions import active_version
from tests.export.test_publish import make_variant
from tests.service.test_service import LiveService, make_settings

pytestmark = pytest.mark.integration


def _prefixes(r) -> set[str]:
    """The prefixes of every key (model keys carry theirs as a hash tag: `{acme}:active`)."""
    return {k.decode().split(":", 1)[0].strip("{}") for k in r.scan_iter(count=1000)}


def test_prefix_from_the_environment_reaches_every_command_and_the_service(
        redis_server, redis_client, bundle, dataset_dir, tmp_path, monkeypatch, capsys):
    url, data = redis_server.url, dataset_dir("synthetic")
    first, second = bundle("mvke-mt"), make_variant(bundle("mvke-mt"), tmp_path / "v1", 1)
    monkeypatch.setenv("MVKE_KEY_PREFIX", "acme")
    for argv in (["publish", str(first), "--redis", url], ["publish", str(second), "--redis", url],
                 ["features", "load", "--data", str(data), "--redis", url]):
        assert mvke_main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    acme = Keys("acme")
    v1, v2 = (json.loads((b / "manifest.json").read_text())["version"] for b in (first, second))
    assert _prefixes(redis_client) == {"acme"}
    assert active_version(redis_client, acme) == v2

    assert mvke_main(["models", "--redis", url]) == 0
    listing = capsys.readouterr().out
    assert v1 in listing and v2 in listing and f"active: {v2}" in listing and acme.active in listing
    assert mvke_main(["publish", "--rollback", "--redis", url]) == 0
    assert active_version(redis_client, acme) == v1

    settings = make_settings(url, "acme")
    with LiveService(settings) as svc:
        svc.wait_version(v1)
        r = svc.tag("u0000001", {"top_k": 2})
        assert r.status_code == 200, r.text
        assert r.json()["feature_source"] == "store" and r.json()["model_version"] == v1

    # --key-prefix wins over the environment.
    assert mvke_main(["publish", str(first), "--redis", url, "--key-prefix", "other"]) == 0
    assert active_version(redis_client, Keys("other")) == v1 and _prefixes(redis_client) == {"acme", "other"}


def test_pipeline_and_tag_all_follow_the_prefix(redis_server, redis_client, dataset_dir, checkpoint, bundle,
                                                tmp_path, monkeypatch):
    data = dataset_dir("synthetic")
    cfg = PipelineConfig(data_source=str(data), model="nomtl", work=str(tmp_path / "work"), epochs=1,
                         redis=redis_server.url, key_prefix="acme")
    ckpt, bund = run_dirs(cfg, data)
    shutil.copytree(checkpoint("nomtl"), ckpt)
    shutil.copytree(bundle("nomtl"), bund)
    result = run_pipeline(cfg)
    assert result.ran == ["features", "publish"]
    assert active_version(redis_client, Keys("acme")) == result.version
    assert _prefixes(redis_client) == {"acme"}
    assert run_pipeline(cfg).ran == []          # the skip checks read the prefixed keys too

    # tag-all: the job's configuration carries the environment's prefix (the Ray job itself is tested
    # in tests/batch with an explicit prefix).
    import batch.tag_all
    seen = {}
    monkeypatch.setattr(batch.tag_all, "run", lambda cfg: seen.setdefault("cfg", cfg) and {})
    monkeypatch.setenv("MVKE_KEY_PREFIX", "acme")
    assert mvke_main(["tag-all", "--redis", redis_server.url, "--users", str(Path(data) / "users.parquet"),
                      "--out", str(tmp_path / "tags"), "--to-redis"]) == 0
    assert seen["cfg"].key_prefix == "acme"
