"""`mvke tag-all --audiences`: the index a real run builds equals a brute-force count over its Parquet output.

The tiny model and users of tests/batch/test_batch.py (bad rows included: rejected users are in no
audience); the index is published to a private redis-server and queried over HTTP by the service.
"""
from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("ray")
pytest.importorskip("onnxruntime")
pytest.importorskip("pyroaring")

from batch.audiences import read_files  # noqa: E402
from batch.tag_all import TagAllConfig, run  # noqa: E402
from mvke.runtime.keys import Keys  # noqa: E402
from tests.batch.test_batch import K, PART_ROWS, ray_session, tiny, users_dir  # noqa: E402,F401
from tests.runtime.test_audience import brute, random_expression  # noqa: E402
from tests.service.test_audiences import brute_sets  # noqa: E402
from tests.service.test_service import LiveService, make_settings  # noqa: E402

pytestmark = pytest.mark.integration


def _cfg(users_dir, tiny, out, **kw) -> TagAllConfig:
    return TagAllConfig(users=str(users_dir[0]), out=str(out), bundle=str(tiny[0]), top_k=K, part_rows=PART_ROWS,
                        batch_size=48, workers=2, progress=False, audiences=True, **kw)


def test_index_of_a_run_equals_brute_force_over_its_parquet(ray_session, tiny, users_dir, redis_server, tmp_path):
    _, _, manifest, *_ = tiny
    out = tmp_path / "out"
    summary = run(_cfg(users_dir, tiny, out, redis_url=redis_server.url, key_prefix="ta"))
    aud = summary["audiences"]
    files = sorted((out / "tags").glob("part-*.parquet"))
    sets = brute_sets(files, K)
    everyone = set().union(*sets.values())
    assert aud["users"] == summary["users"] == len(everyone)
    assert aud["rule"]["top_k"] == K and aud["rule"]["min_score"] is None
    assert json.loads((out / "_job.json").read_text())["audiences"] == aud["rule"]   # the rule is in the job spec
    # beside the Parquet output: every (task, tag) bitmap names exactly the users of the rows
    index = read_files(out / "audiences")
    ids = index.user_ids.to_pylist()
    assert index.meta.tags == manifest_tags(tiny) and index.meta.rule.top_k == K
    for task in manifest.task_names:
        for tag, bm in zip(index.meta.tags, index.bitmaps[task]):
            assert {ids[n] for n in bm} == sets.get((task, tag), set()), (task, tag)
    # in Redis, through the service: random expressions
    assert redis_server.client().get(Keys("ta").audiences_latest).decode() == aud["version"]
    rng = random.Random(5)
    carried = sorted(sets)
    leaves = carried[:6] + [(t, g) for t in manifest.task_names for g in rng.sample(index.meta.tags, 3)]
    with LiveService(make_settings(redis_server.url, "ta", audience_poll_s=0.05)) as s:
        for _ in range(40):
            text, tree = random_expression(rng, leaves, 3)
            doc = s.client.post("/audiences:estimate", json={"expression": text}).json()
            assert doc["size"] == len(brute(tree, sets, everyone)), text
    # a rerun of the finished job republishes nothing (content-addressed) and builds the same index
    again = run(_cfg(users_dir, tiny, out, redis_url=redis_server.url, key_prefix="ta"))["audiences"]
    assert again["version"] == aud["version"] and again["redis"]["written"] is False


def manifest_tags(tiny) -> list[str]:
    return json.loads(tiny[3]["tags.json"])


def test_rule_top_k_and_min_score(ray_session, tiny, users_dir, tmp_path):
    out = tmp_path / "out"
    summary = run(_cfg(users_dir, tiny, out, audience_top_k=2, audience_min_score=0.3))
    assert summary["audiences"]["rule"] == {"top_k": 2, "min_score": 0.3, "text": "rank <= 2 and score >= 0.3"}
    assert summary["audiences"]["redis"] is None          # no --redis: the files only
    sets = brute_sets(sorted((out / "tags").glob("part-*.parquet")), 2, 0.3)
    index = read_files(out / "audiences")
    ids = index.user_ids.to_pylist()
    for task, bms in index.bitmaps.items():
        for tag, bm in zip(index.meta.tags, bms):
            assert {ids[n] for n in bm} == sets.get((task, tag), set())
    with pytest.raises(ValueError, match="audience-top-k"):
        run(_cfg(users_dir, tiny, tmp_path / "o2", audience_top_k=K + 1))
