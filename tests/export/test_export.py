"""Export stage: bundle contents, manifest, dynamic-batch ONNX graph and the parity gate.

Real checkpoints and real exports (tests/fixtures/model_fixtures.py), no mocks.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mvke.runtime.contract import (MANIFEST_FILE, ONNX_FILE, TAGS_FILE, TOWER_TOPK_FILE, Manifest, content_version, decode_array,
                                   gates_file, read_bundle, sha256_bytes, tag_emb_file)

MODELS = ["mvke-mt", "nomtl"]
EXPECTED_EXPERTS = {
    "mvke-mt": {"interest": [0, 1, 2], "intention": [1, 2, 3, 4]},   # the paper's default split
    "nomtl": {"interest": [0], "intention": [0]},                     # one user vector per task
}


@pytest.mark.parametrize("model", MODELS)
def test_bundle_manifest_lists_every_file(model, bundle, checkpoint):
    out = bundle(model)
    manifest = Manifest.from_json((out / MANIFEST_FILE).read_text())
    ckpt_schema = json.loads((checkpoint(model) / "schema.json").read_text())

    # Every file on disk is in the manifest with its size and sha256, and nothing else is there.
    tasks = ["interest", "intention"]
    expected = {ONNX_FILE, TAGS_FILE, TOWER_TOPK_FILE} | {gates_file(t) for t in tasks} | {tag_emb_file(t) for t in tasks}
    assert set(manifest.files) == expected
    assert {p.name for p in out.iterdir()} == expected | {MANIFEST_FILE}
    for name, entry in manifest.files.items():
        data = (out / name).read_bytes()
        assert entry.bytes == len(data), name
        assert entry.sha256 == sha256_bytes(data), name
    assert manifest.version == content_version({k: v.sha256 for k, v in manifest.files.items()}, model)
    assert manifest.model == model

    # Feature schema (with vocabularies) and tag catalogue are the checkpoint's.
    assert manifest.features == ckpt_schema["features"]
    assert json.loads((out / TAGS_FILE).read_text()) == ckpt_schema["tags"]
    assert manifest.num_tags == len(ckpt_schema["tags"])

    # Tasks: contiguous slices of the ONNX output, experts per task, tag-side shapes.
    assert manifest.task_names == tasks
    start = 0
    for spec in manifest.tasks:
        assert spec.slice == [start, start + spec.k]
        assert spec.experts == EXPECTED_EXPERTS[model][spec.name]
        assert spec.k == len(spec.experts)
        assert spec.scale > 0 and np.isfinite(spec.bias)
        start += spec.k
        g, e = manifest.files[gates_file(spec.name)], manifest.files[tag_emb_file(spec.name)]
        assert (g.shape, g.dtype) == ([manifest.num_tags, spec.k], "float32")
        assert (e.shape, e.dtype) == ([manifest.num_tags, manifest.out_dim], "float32")
        gates = decode_array((out / gates_file(spec.name)).read_bytes(), g)
        np.testing.assert_allclose(gates.sum(1), 1.0, atol=1e-5)     # softmax over the task's kernels
    assert manifest.model_config["name"] == model and manifest.out_dim == 16
    assert manifest.onnx_inputs == ["cat_ids", "multi_ids"] and manifest.onnx_output == "expert_values"

    # The parity gate ran on random and real users and passed.
    assert set(manifest.parity) == {"random", "training-data"}
    for report in manifest.parity.values():
        assert report["users"] > 0
        assert report["max_abs_diff_expert_values"] <= 1e-5
        assert report["max_abs_diff_scores"] <= 1e-4
    read_bundle(out)   # the contract's own verification agrees


@pytest.mark.parametrize("model", MODELS)
def test_onnx_output_shape_for_dynamic_batch(model, bundle):
    import onnxruntime as ort

    from mvke.runtime.features import FeatureSchema
    from model_export.bundle import random_users
    manifest, blobs = read_bundle(bundle(model))
    schema = FeatureSchema.from_dict(manifest.features)
    sess = ort.InferenceSession(blobs[ONNX_FILE], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == manifest.onnx_inputs
    assert [o.name for o in sess.get_outputs()] == [manifest.onnx_output]
    total_k = sum(t.k for t in manifest.tasks)
    cat, multi = random_users(schema, 37, np.random.default_rng(5))
    outs = {}
    for b in (1, 37):
        (out,) = sess.run(None, {"cat_ids": cat[:b], "multi_ids": multi[:b]})
        assert out.shape == (b, total_k, manifest.out_dim) and out.dtype == np.float32
        assert np.isfinite(out).all()
        outs[b] = out
    # A user's row does not depend on the rest of the batch.
    np.testing.assert_allclose(outs[1][0], outs[37][0], atol=1e-6)


def test_idle_session_ranks_byte_for_byte_like_the_batch_session(bundle):
    """`rank(idle=True)` (a request alone on its worker: the fused graph on 2 threads) gives the
    one-thread session's tags and probabilities bit for bit, with and without exclusions; without
    idle threads there is no second session and idle=True takes the one there is."""
    from model_export.bundle import random_users
    from mvke.runtime.encoded import EncodedBatch
    from mvke.runtime.model import build_model
    manifest, blobs = read_bundle(bundle("mvke-mt"))
    model = build_model(manifest, blobs, "cpu", 1, idle_threads=2)
    assert model.topk_idle is not None and model.topk_idle is not model.topk_session
    assert model.topk_idle.get_session_options().intra_op_num_threads == 2
    cat, multi = random_users(model.schema, 40, np.random.default_rng(7))
    for i in range(40):
        user = EncodedBatch(cat[i:i + 1], multi[i:i + 1])
        exclude = [[i % 7, 11]] if i % 2 else None
        batch = model.rank(user, 20, exclude)
        idle = model.rank(user, 20, exclude, idle=True)
        for task, want in batch.items():
            got = idle[task]
            assert got.tag_index.tobytes() == want.tag_index.tobytes() and got.scores.tobytes() == want.scores.tobytes()
            assert (got.kept is None) == (want.kept is None)
    assert build_model(manifest, blobs, "cpu", 1, idle_threads=1).topk_idle is None


def _corrupt_onnx(data: bytes) -> tuple[bytes, str]:
    """Change the largest float initializer of the graph (x1.5 + 0.01) and re-serialize."""
    import onnx
    from onnx import numpy_helper
    proto = onnx.load_model_from_string(data)
    floats = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(target)
    target.CopyFrom(numpy_helper.from_array((arr * 1.5 + 0.01).astype(np.float32), target.name))
    onnx.checker.check_model(proto)
    return proto.SerializeToString(), target.name


@pytest.mark.parametrize("model", MODELS)
def test_parity_gate_rejects_corrupted_onnx(model, bundle, checkpoint, tmp_path):
    from model_export.bundle import ParityError, check_parity, random_users, verify_bundle_against_checkpoint
    from mvke.training.trainer import load_checkpoint
    good, ckpt = bundle(model), checkpoint(model)
    assert set(verify_bundle_against_checkpoint(good, ckpt, n=32)) == {"random"}

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    corrupted, changed = _corrupt_onnx((bad / ONNX_FILE).read_bytes())
    (bad / ONNX_FILE).write_bytes(corrupted)
    with pytest.raises(ParityError, match="ONNX expert outputs differ"):
        verify_bundle_against_checkpoint(bad, ckpt, n=32)

    # The same check on in-memory blobs, as the export runs it.
    manifest, blobs = read_bundle(good)
    result = load_checkpoint(ckpt)
    users = [("random", *random_users(result.schema, 32, np.random.default_rng(0)))]
    check_parity(result.model, manifest, blobs, users)
    with pytest.raises(ParityError):
        check_parity(result.model, manifest, {**blobs, ONNX_FILE: corrupted}, users)


def test_parity_gate_rejects_corrupted_tag_side(bundle, checkpoint):
    """Tag-side arrays off by one tag id (a classic bug) fail the score check (1e-4)."""
    from model_export.bundle import ParityError, check_parity, random_users
    from mvke.training.trainer import load_checkpoint
    manifest, blobs = read_bundle(bundle("mvke-mt"))
    result = load_checkpoint(checkpoint("mvke-mt"))
    users = [("random", *random_users(result.schema, 32, np.random.default_rng(0)))]
    shifted = dict(blobs)
    for name in (gates_file("intention"), tag_emb_file("intention")):
        arr = decode_array(blobs[name], manifest.files[name])
        shifted[name] = np.roll(arr, 1, axis=0).astype("<f4").tobytes()
    with pytest.raises(ParityError, match="bundle scores differ"):
        check_parity(result.model, manifest, shifted, users)


def test_export_is_deterministic_in_content(bundle, checkpoint, tmp_path):
    """Re-exporting a checkpoint gives the same version id (content hash), so a republish is a no-op."""
    from model_export.bundle import export_checkpoint
    first = Manifest.from_json((bundle("nomtl") / MANIFEST_FILE).read_text())
    again, figures = export_checkpoint(checkpoint("nomtl"), tmp_path / "again", parity_users=32)
    assert again.version == first.version
    assert {k: v.sha256 for k, v in again.files.items()} == {k: v.sha256 for k, v in first.files.items()}
    assert figures["bundle_bytes"] > sum(f.bytes for f in first.files.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary directory left
