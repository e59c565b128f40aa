"""Batch tagging (`mvke tag-all`, batch/): equality with the service, counts, rejects, resumption, Redis.

One local Ray is started per test session (`ray_session`) and shared; the tiny
bundle and dataset come from tests/fixtures/model_fixtures.py.
"""
from __future__ import annotations

import dataclasses

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray")
pytest.importorskip("onnxruntime")

from batch.tag_all import OUTPUT_SCHEMA, STOP_AFTER_ENV, STOP_EXIT_CODE, TagAllConfig, run  # noqa: E402
from mvke.runtime.contract import read_bundle  # noqa: E402
from mvke.runtime.features import FeatureSchema  # noqa: E402
from tests.runtime.test_features import bad_rows  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
K = 5
TIE = 1e-5          # scores this close may swap places between batch sizes (BLAS/ORT blocking)
GOOD_ROW_GROUP = 64
PART_ROWS = 150     # 400 users in row groups of 64: parts of 128 rows (+ the rejects file: one part)

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (start-up costs seconds)."""
    import ray

    from batch.tag_all import _init_ray
    owned = _init_ray(TagAllConfig(users="", out="", workers=2))
    yield
    if owned:
        ray.shutdown()


def _own_tiny_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dataset + 1-epoch checkpoint + bundle, when tests/fixtures/model_fixtures.py has none."""
    from model_export.bundle import export_checkpoint
    from mvke.data.synthetic import SynthConfig, generate
    from mvke.training.trainer import TrainConfig, model_config_for, prepare, save_checkpoint, train_model
    root = tmp_path_factory.mktemp("batch-tiny")
    d = generate(SynthConfig(users=400, tags=60, ads=300, categories=12, segments=4, seed=0), root / "data",
                 progress=False)
    data = prepare(d)
    cfg = TrainConfig(epochs=1, batch_size=512, seed=0)
    model_cfg = model_config_for("mvke-mt", data, embed_dim=8, tag_dim=8, out_dim=16, expert_hidden=[32], attn_dim=8)
    ckpt = save_checkpoint(train_model(data, model_cfg, cfg), root / "ckpt", cfg, d)
    export_checkpoint(ckpt, root / "bundle")
    return root / "bundle", d


@pytest.fixture(scope="session")
def tiny(request, tmp_path_factory):
    """(bundle dir, dataset dir, manifest, blobs, schema): the shared fixtures' tiny mvke-mt bundle."""
    try:
        bundle, dataset_dir = request.getfixturevalue("bundle"), request.getfixturevalue("dataset_dir")
        b, d = bundle("mvke-mt", "synthetic"), dataset_dir("synthetic")
    except pytest.FixtureLookupError:
        b, d = _own_tiny_bundle(tmp_path_factory)
    manifest, blobs = read_bundle(b)
    return b, d, manifest, blobs, FeatureSchema.from_dict(manifest.features)


@pytest.fixture(scope="session")
def users_dir(tiny, tmp_path_factory):
    """Input directory: the dataset's users (row groups of 64) + a file of bad rows."""
    _, d, *_ = tiny
    users = pq.read_table(d / "users.parquet")
    out = tmp_path_factory.mktemp("users")
    pq.write_table(users, out / "a_users.parquet", row_group_size=GOOD_ROW_GROUP)
    bad, expected = bad_rows(users)
    pq.write_table(bad, out / "b_bad.parquet")
    return out, users, expected


@pytest.fixture(scope="session")
def job(ray_session, tiny, users_dir, tmp_path_factory):
    """One complete run, shared by the read-only checks."""
    b, *_ = tiny
    out = tmp_path_factory.mktemp("tagall") / "out"
    cfg = TagAllConfig(users=str(users_dir[0]), out=str(out), bundle=str(b), top_k=K, part_rows=PART_ROWS,
                       batch_size=48, workers=2, progress=False)
    return cfg, run(cfg), out


def _read_tags(out: Path) -> pa.Table:
    return pq.read_table(out / "tags")


def _by_user(table: pa.Table) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """(user, task) -> [(tag, score)] in rank order."""
    out: dict[tuple[str, str], list] = {}
    d = table.sort_by([("user_id", "ascending"), ("task", "ascending"), ("rank", "ascending")]).to_pydict()
    for u, t, tag, s in zip(d["user_id"], d["task"], d["tag"], d["score"]):
        out.setdefault((u, t), []).append((tag, s))
    return out


def _assert_same_ranking(batch: list[tuple[str, float]], service: list[tuple[str, float]], who: str) -> None:
    assert len(batch) == len(service), who
    for i, ((bt, bs), (st, ss)) in enumerate(zip(batch, service)):
        assert abs(bs - ss) <= TIE, f"{who} rank {i + 1}: score {bs} vs service {ss}"
        if bt != st:   # only a tie may swap two tags
            other = dict(service)
            assert bt in other and abs(other[bt] - bs) <= TIE, f"{who} rank {i + 1}: {bt} vs service {st}"


def _service_answer(manifest, blobs, rows: list[dict], k: int) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """The service's own Tagger.compute, one request per user with the row as request features."""
    from types import SimpleNamespace

    from mvke.runtime.keys import Keys
    from mvke.runtime.model import Query, build_model
    from service.metrics import ServiceMetrics
    from service.settings import Settings
    from service.tagger import Tagger, TagJob
    model = build_model(manifest, blobs, "cpu", 1)
    tagger = Tagger(SimpleNamespace(current=model), None, ServiceMetrics(), Keys(), Settings())
    out = {}
    for row in rows:
        features = {n: row[n] for n in model.schema.names}
        job = TagJob(row["user_id"], features, Query(tuple(model.manifest.task_names), k))
        job.row, job.source = features, "request"
        (result,) = tagger.compute(model, [job])
        for task, ranked in result.tasks.items():
            out[(row["user_id"], task)] = ranked
    return out


# ---------------------------------------------------------------- the job


def test_batch_output_equals_service_answer(job, tiny, users_dir):
    """Every good user's top K per task == the service's scoring code on the same manifest."""
    _, summary, out = job
    _, _, manifest, blobs, _ = tiny
    _, users, _ = users_dir
    got = _by_user(_read_tags(out))
    want = _service_answer(manifest, blobs, users.to_pylist(), K)
    assert summary["model_version"] == manifest.version
    assert set(want) <= set(got)
    for key, ranked in want.items():
        _assert_same_ranking(got[key], ranked, f"{key}")


def test_row_counts_and_rejects(job, tiny, users_dir):
    _, summary, out = job
    _, _, manifest, *_ = tiny
    _, users, expected = users_dir
    tasks = manifest.task_names
    n_in = users.num_rows + 5
    rejected = len(expected)
    table = _read_tags(out)
    assert table.schema.remove_metadata().equals(OUTPUT_SCHEMA)     # plain strings, not dictionaries
    assert summary["input_rows"] == n_in and summary["rejected"] == rejected
    assert summary["users"] == n_in - rejected
    assert table.num_rows == (n_in - rejected) * len(tasks) * K == summary["rows"]
    # every tagged user exactly K ranked rows per task
    d = table.group_by(["user_id", "task"]).aggregate([("rank", "count"), ("rank", "min"), ("rank", "max")])
    assert d.num_rows == (n_in - rejected) * len(tasks)
    assert set(d.column("rank_count").to_pylist()) == {K}
    assert set(d.column("rank_min").to_pylist()) == {1} and set(d.column("rank_max").to_pylist()) == {K}
    assert "fine0" in set(table.column("user_id").to_pylist())
    # the rejects file: one row per bad row, the field named
    rej = pq.read_table(out / "rejects").to_pylist()
    assert {r["user_id"]: r["field"] for r in rej} == expected
    assert all(r["reason"] for r in rej)
    assert not set(table.column("user_id").to_pylist()) & {k for k in expected if k}
    assert json.loads((out / "_SUCCESS.json").read_text())["users"] == summary["users"]


def test_batch_output_equals_the_running_service(job, tiny, users_dir, redis_server, monkeypatch):
    """The real app (FastAPI + registry + feature store on a private redis-server) gives the same tags."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from model_export.feature_store import load_rows
    from model_export.publish import publish
    from service.app import create_app
    b, d, manifest, *_ = tiny
    _, users, _ = users_dir
    r = redis_server.client()
    r.flushdb()
    publish(b, r)
    sample = users.slice(0, 25).to_pylist()
    kinds = {f["name"]: f["kind"] for f in manifest.features["fields"]}
    load_rows(sample, kinds, r, progress=False)
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("MVKE_BATCHING", "false")
    got = _by_user(_read_tags(job[2]))
    with TestClient(create_app()) as client:
        for row in sample:
            resp = client.post(f"/users/{row['user_id']}/tags", json={"top_k": K})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["model_version"] == manifest.version
            for task, ranked in body["tasks"].items():
                _assert_same_ranking(got[(row["user_id"], task)], [(x["tag"], x["score"]) for x in ranked],
                                     f"{row['user_id']}/{task}")
    r.flushdb()
    r.close()


def test_finished_job_rerun_is_a_no_op_and_other_arguments_are_refused(job):
    cfg, summary, out = job
    again = run(cfg)                                   # nothing pending: no Ray work at all
    assert again["parts_this_run"] == 0 and again["rows"] == summary["rows"]
    from filelock import FileLock
    with FileLock(out / "_lock", timeout=0):           # a driver still running on this output: refused
        with pytest.raises(ValueError, match="another tag-all job"):
            run(cfg)
    from dataclasses import replace
    with pytest.raises(ValueError, match="top_k"):
        run(replace(cfg, top_k=K + 1))


def test_output_inside_the_input_directory_is_not_read_back(ray_session, tiny, users_dir, tmp_path):
    import shutil
    b, *_ = tiny
    users = tmp_path / "users"
    users.mkdir()
    shutil.copy(users_dir[0] / "b_bad.parquet", users / "b_bad.parquet")
    cfg = TagAllConfig(users=str(users), out=str(users / "tagged"), bundle=str(b), top_k=K, workers=1,
                       progress=False, max_reject_rate=1.0)     # 4 of 5 rejected: allowed here
    first = run(cfg)
    again = run(cfg)       # tagged/tags/*.parquet are not users: same input, nothing to do
    assert (first["users"], first["rejected"], again["parts_this_run"]) == (1, 4, 0)


def test_a_job_that_rejects_too_many_users_fails(ray_session, tiny, users_dir, tmp_path, capsys):
    """Issue 28 §3: 4 of 5 users rejected (above --max-reject-rate 1%): exit 2 naming the count and a
    reason, no _SUCCESS.json; a rerun that allows it succeeds without redoing the parts."""
    from mvke.cli import main
    b, *_ = tiny
    out = tmp_path / "out"
    argv = ["tag-all", "--bundle", str(b), "--users", str(users_dir[0] / "b_bad.parquet"), "--out", str(out),
            "--workers", "1", "--no-progress", "--top-k", str(K)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "4 of 5 users rejected (80.0%" in err and "--max-reject-rate" in err and "rejects" in err
    assert not (out / "_SUCCESS.json").exists()
    assert main([*argv, "--max-reject-rate", "0.9"]) == 0
    assert json.loads(capsys.readouterr().out)["parts_this_run"] == 0 and (out / "_SUCCESS.json").exists()


def test_killed_job_restarts_without_duplicates(ray_session, tiny, users_dir, job, tmp_path):
    """Stop the job (in a subprocess) after 2 of 26 parts, rerun: every user exactly K rows per task."""
    from batch.parts import list_inputs, plan_parts
    b, *_ = tiny
    users_path = users_dir[0]
    out = tmp_path / "out"
    small = 20                  # row groups of 64 -> 4 parts each: 6 x 4 + 1 (16 rows) + 1 (the bad rows) parts
    n_parts = len(plan_parts(list_inputs(users_path), small))
    assert n_parts == 26
    args = [sys.executable, "-m", "mvke.cli", "tag-all", "--bundle", str(b), "--users", str(users_path), "--out", str(out),
            "--top-k", str(K), "--part-rows", str(small), "--batch-size", "16", "--workers", "1",
            "--no-progress"]
    env = {**os.environ, STOP_AFTER_ENV: "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == STOP_EXIT_CODE, proc.stderr[-3000:]
    done = list((out / "_parts").glob("*.done"))
    assert 2 <= len(done) < n_parts and not (out / "_SUCCESS.json").exists()
    # the killed driver's lock file stays behind; the OS released its lock, so the rerun takes it
    assert (out / "_lock").exists()

    cfg = TagAllConfig(users=str(users_path), out=str(out), bundle=str(b), top_k=K, part_rows=small,
                       batch_size=16, workers=2, progress=False)
    summary = run(cfg)
    assert summary["resumed"] and summary["parts"] == n_parts and summary["parts_this_run"] == n_parts - len(done)
    table = _read_tags(out)
    counts = table.group_by(["user_id", "task"]).aggregate([("rank", "count")])
    assert set(counts.column("rank_count").to_pylist()) == {K}
    assert table.num_rows == summary["rows"] == job[1]["rows"]
    assert not list(out.rglob(".*tmp*"))
    from filelock import FileLock
    with FileLock(out / "_lock", timeout=0):     # released by the finished driver
        pass
    # the same users as the uninterrupted job, and the same rejects
    assert _by_user(table).keys() == _by_user(_read_tags(job[2])).keys()
    assert pq.read_table(out / "rejects").num_rows == 4


def test_to_redis_with_the_model_from_redis(ray_session, tiny, users_dir, redis_client, tmp_path):
    """Model = the active version in Redis; tags per user under mvke:usertags:v<version>:<user_id>."""
    from batch.redis_out import read_user_tags
    from mvke.runtime.keys import Keys
    from model_export.publish import publish
    b, _, manifest, *_ = tiny
    _, users, expected = users_dir
    publish(b, redis_client)
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    cfg = TagAllConfig(users=str(users_dir[0]), out=str(tmp_path / "out"), redis_url=url, to_redis=True,
                       top_k=K, part_rows=PART_ROWS, batch_size=48, workers=2, progress=False)
    summary = run(cfg)
    v = manifest.version
    assert summary["model_version"] == v
    got = _by_user(_read_tags(tmp_path / "out"))
    keys = Keys()
    user_keys = list(redis_client.scan_iter(match=f"mvke:usertags:v{v}:*", count=1000))
    assert len(user_keys) == summary["users"]
    for uid in [u for u, _ in got][:: 2 * len(manifest.task_names)]:
        stored = read_user_tags(redis_client, v, uid)
        assert set(stored) == set(manifest.task_names)
        for task, ranked in stored.items():
            want = got[(uid, task)]
            assert [t for t, _ in ranked] == [t for t, _ in want]
            np.testing.assert_allclose([s for _, s in ranked], [s for _, s in want], atol=1e-6)
    for bad in expected:
        if bad:
            assert read_user_tags(redis_client, v, bad) is None
    meta = {k.decode(): x.decode() for k, x in redis_client.hgetall(keys.user_tags_summary(v)).items()}
    assert int(meta["users"]) == summary["users"] and int(meta["top_k"]) == K
    assert redis_client.get(keys.user_tags_latest).decode() == v
    # the scheduler's refresh: nothing to do while the latest profiles are the active version's ...
    again = dataclasses.replace(cfg, out=str(tmp_path / "profiles" / "{version}"), if_new_version=True)
    assert "skipped" in run(again) and not (tmp_path / "profiles").exists()
    redis_client.set(keys.user_tags_latest, "an-older-version")     # ... and a whole job when they are not
    assert run(again)["users"] == summary["users"]
    assert (tmp_path / "profiles" / v / "_SUCCESS.json").exists()
    assert redis_client.get(keys.user_tags_latest).decode() == v


def test_a_corrupt_model_in_redis_is_refused(tiny, users_dir, redis_client, tmp_path):
    from mvke.runtime.contract import ONNX_FILE, BundleError
    from mvke.runtime.keys import Keys
    from model_export.publish import publish
    b, _, manifest, *_ = tiny
    publish(b, redis_client)
    redis_client.set(Keys().file(manifest.version, ONNX_FILE), b"not a model")
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    cfg = TagAllConfig(users=str(users_dir[0]), out=str(tmp_path / "out"), redis_url=url, top_k=K, progress=False)
    with pytest.raises(BundleError, match="sha256"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_cli_registers_tag_all():
    from mvke.cli import build_parser
    a = build_parser().parse_args(["tag-all", "--bundle", "b", "--users", "u", "--out", "o", "--top-k", "7",
                                   "--to-redis", "--redis", "redis://x:1/0", "--batch-size", "128",
                                   "--address", "ray://head:10001"])
    assert (a.top_k, a.to_redis, a.batch_size, a.address) == (7, True, 128, "ray://head:10001")
