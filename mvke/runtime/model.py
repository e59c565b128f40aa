"""One model version in memory: ORT session + prepared tag side, built in one place.

Everything scoring needs from a version lives in one immutable `LoadedModel`; a
request (or a batch) holds a reference to it, so a hot swap never changes the
model under a request that already started. The service, batch tagging and the
export's parity gate all build it (or its tag sides) here.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from mvke.runtime.contract import ONNX_FILE, TAGS_FILE, Manifest, decode_array, gates_file, tag_emb_file
from mvke.runtime.features import FeatureSchema
from mvke.runtime.scoring import TaskTagSide

log = logging.getLogger("mvke.runtime")


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    schema: FeatureSchema
    session: ort.InferenceSession
    provider: str
    tags: list[str]
    sides: dict[str, TaskTagSide]                  # task -> tag side, in manifest order
    tag_index: dict[str, int] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.manifest.version

    def run_tower(self, cat_ids: np.ndarray, multi_ids: np.ndarray) -> np.ndarray:
        """[B, sum K_task, D] expert outputs of every task (graph names from the manifest)."""
        m = self.manifest
        cat_name, multi_name = m.onnx_inputs
        return self.session.run([m.onnx_output], {cat_name: cat_ids, multi_name: multi_ids})[0]


def tag_sides(manifest: Manifest, blobs: dict[str, bytes]) -> dict[str, TaskTagSide]:
    """task -> its tag side (gates and tag embeddings of the bundle, prepared for scoring)."""
    sides = {}
    for spec in manifest.tasks:
        g, e = gates_file(spec.name), tag_emb_file(spec.name)
        sides[spec.name] = TaskTagSide.build(spec, decode_array(blobs[g], manifest.files[g]),
                                             decode_array(blobs[e], manifest.files[e]))
    return sides


def make_session(onnx_bytes: bytes, provider: str = "auto", intra_threads: int = 1) -> tuple[ort.InferenceSession, str]:
    """CUDA when requested/available AND actually in use (onnxruntime-gpu lists CUDA even
    on a machine without a GPU, then silently falls back), else CPU."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    want_cuda = provider in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
    if want_cuda:
        try:
            sess = ort.InferenceSession(onnx_bytes, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if sess.get_providers()[0] == "CUDAExecutionProvider":
                return sess, "CUDAExecutionProvider"
            log.warning("CUDA provider listed but not usable; running on CPU")
        except Exception as e:  # a broken CUDA install must not stop a CPU service
            log.warning("CUDA session failed (%s); running on CPU", e)
    elif provider == "cuda":
        log.warning("MVKE_ORT_PROVIDER=cuda but this onnxruntime has no CUDA provider; running on CPU")
    return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"]), "CPUExecutionProvider"


def build_model(manifest: Manifest, blobs: dict[str, bytes], provider: str = "auto",
                intra_threads: int = 1) -> LoadedModel:
    session, used = make_session(blobs[ONNX_FILE], provider, intra_threads)
    tags = json.loads(blobs[TAGS_FILE])
    model = LoadedModel(manifest, FeatureSchema.from_dict(manifest.features), session, used, tags,
                        tag_sides(manifest, blobs), {t: i for i, t in enumerate(tags)})
    # Warm up: the first run of a session allocates; do it before taking traffic.
    cat = np.full((1, len(model.schema.cat_fields)), 1, dtype=np.int64)
    multi = np.zeros((1, len(model.schema.multi_fields), model.schema.multi_len), dtype=np.int64)
    model.run_tower(cat, multi)
    return model
