"""A large catalogue end to end: export with candidate indexes and the recall gate, the fused
tower + TopK graph against numpy, and the service answering approximately by default and exactly
on `"exact": true` (real export, real Redis, real HTTP)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss", reason="faiss-cpu is installed by the service extra")

from model_export.bundle import export_checkpoint  # noqa: E402
from mvke.runtime.contract import TOWER_TOPK_FILE, ann_index_file, read_bundle  # noqa: E402
from mvke.runtime.model import build_model  # noqa: E402
from mvke.runtime.encoded import EncodedBatch  # noqa: E402
from tests.service.test_service import LiveService, make_settings, publish_dataset  # noqa: E402

TAGS = 3000


@pytest.fixture(scope="module")
def large_bundle(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("large") / "bundle"
    manifest, _ = export_checkpoint(checkpoint("mvke-mt"), out, parity_users=32, ann_mode="on", synthetic_tags=TAGS)
    return out, manifest


def test_export_gates_and_ships_an_index_per_task(large_bundle):
    out, manifest = large_bundle
    assert manifest.num_tags == TAGS
    for task in manifest.task_names:
        entry = manifest.ann["tasks"][task]
        assert entry["status"] == "ann" and entry["recall_at_k"] >= 0.95, entry
        assert (out / ann_index_file(task)).exists() and ann_index_file(task) in manifest.files
    assert manifest.ann["gate"]["users"] == 1000 and TOWER_TOPK_FILE in manifest.files
    assert "max_abs_diff_fused_topk" in manifest.parity["random"]


def test_fused_graph_ranks_like_numpy_with_exclusions(large_bundle):
    manifest, blobs = read_bundle(large_bundle[0])
    model = build_model(manifest, blobs, "cpu", ann_mode="off")
    assert model.topk_session is not None and not model.approximate
    rng = np.random.default_rng(0)
    cat = np.stack([rng.integers(1, 5, len(model.schema.cat_fields)) for _ in range(6)])
    multi = np.zeros((6, len(model.schema.multi_fields), model.schema.multi_len), dtype=np.int64)
    ks = {t: 15 for t in manifest.task_names}
    plain = model.rank(EncodedBatch(cat, multi), ks, mode="numpy")
    exclude = [list(map(int, plain["interest"].tag_index[i, :4])) for i in range(6)]
    want = model.rank(EncodedBatch(cat, multi), ks, exclude, mode="numpy")
    got = model.rank(EncodedBatch(cat, multi), ks, exclude)
    assert model.rank_mode(EncodedBatch(cat, multi)) == "fused"
    for task in ks:
        np.testing.assert_array_equal(got[task].tag_index, want[task].tag_index)
        np.testing.assert_allclose(got[task].scores, want[task].scores, atol=1e-6)
        np.testing.assert_array_equal(got[task].kept, want[task].kept)


def test_service_is_approximate_by_default_and_exact_on_request(large_bundle, redis_client, redis_server,
                                                                dataset_dir):
    out, manifest = large_bundle
    publish_dataset(redis_client, out, dataset_dir("synthetic"), "mvke")
    users = sorted(k.decode().split(":")[-1] for k in redis_client.scan_iter("mvke:user:*", count=1000))[:30]
    approx_svc = make_settings(redis_server.url, ann="on", batching=False)
    exact_svc = make_settings(redis_server.url, ann="off", batching=False)
    hits, total = 0, 0
    with LiveService(approx_svc) as approx, LiveService(exact_svc) as exact:
        approx.wait_version(manifest.version)
        exact.wait_version(manifest.version)
        for uid in users:
            reference = exact.tag(uid, {"top_k": 20}).json()["tasks"]
            asked_exact = approx.tag(uid, {"top_k": 20, "exact": True}).json()["tasks"]
            served = approx.tag(uid, {"top_k": 20}).json()["tasks"]
            for task, ref in reference.items():
                assert [t["tag"] for t in asked_exact[task]] == [t["tag"] for t in ref]
                np.testing.assert_allclose([t["score"] for t in asked_exact[task]], [t["score"] for t in ref],
                                           atol=1e-5)
                want = {t["tag"] for t in ref}
                hits += len(want & {t["tag"] for t in served[task]})
                total += len(want)
        # candidate scoring and explanations read the factors on a side served through its index:
        # the same answers as the dense side
        some = [t["tag"] for t in reference["interest"][:3]] + [t["tag"] for t in served["intention"][-3:]]
        for uid in users[:5]:
            body = {"tags": some, "explain": True, "top_k": 4}
            want, got = exact.tag(uid, body).json(), approx.tag(uid, body).json()
            for task, ref in want["tasks"].items():
                assert [t["tag"] for t in got["tasks"][task]] == [t["tag"] for t in ref]
                np.testing.assert_allclose([t["score"] for t in got["tasks"][task]], [t["score"] for t in ref],
                                           atol=1e-5)
                np.testing.assert_allclose([t["explain"]["cosine"] for t in got["tasks"][task]],
                                           [t["explain"]["cosine"] for t in ref], atol=1e-5)
        bad = approx.tag(users[0], {"exact": [True]})
        assert bad.status_code == 422 and "exact" in json.dumps(bad.json())
    assert hits / total >= 0.95
