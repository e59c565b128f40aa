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

from mvke.runtime import ann
from mvke.runtime.contract import (ONNX_FILE, TAGS_FILE, TOWER_TOPK_FILE, Manifest, ann_index_file, decode_array,
                                   gates_file, tag_emb_file)
from mvke.runtime.features import FeatureSchema
from mvke.runtime.scoring import Ranked, TaskTagSide

ANN_MIN_TAGS = 50_000     # MVKE_ANN=auto serves a catalogue this large through its candidate index

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
    # tower + scoring + TopK in one graph (contract.TOWER_TOPK_FILE) and the tag-side feeds it reads
    topk_session: ort.InferenceSession | None = None
    topk_feeds: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.manifest.version

    def run_tower(self, cat_ids: np.ndarray, multi_ids: np.ndarray) -> np.ndarray:
        """[B, sum K_task, D] expert outputs of every task (graph names from the manifest)."""
        m = self.manifest
        cat_name, multi_name = m.onnx_inputs
        return self.session.run([m.onnx_output], {cat_name: cat_ids, multi_name: multi_ids})[0]

    @property
    def scoring(self) -> str:
        """"onnx": tower + scoring + TopK in one ONNX call; "numpy": tower in ONNX, scoring in numpy."""
        return "onnx" if self.topk_session is not None else "numpy"

    @property
    def approximate(self) -> bool:
        """True when some task is served through its candidate index."""
        return any(side.ann is not None for side in self.sides.values())

    def rank_fused(self, cat_ids: np.ndarray, multi_ids: np.ndarray, k: dict[str, int],
                   exclude: list[list[int]] | None = None) -> dict[str, Ranked]:
        """`rank(run_tower(...), sides, k, exclude)` in one ONNX call (every task is scored; the asked
        ones are returned). Excluded tags are dropped from a top (k + excluded) and the rest keeps
        its order, so the answer equals the numpy ranker's (kept=False pads when too few are left)."""
        T = self.manifest.num_tags
        n_ex = max((len(e) for e in exclude), default=0) if exclude else 0
        fetch = max(k.values())
        want = np.array([min(T, fetch + n_ex)], dtype=np.int64)
        outs = self._run_topk(cat_ids, multi_ids, want)
        ranked = {}
        for name in k:
            idx, prob = outs[f"top_idx_{name}"], outs[f"top_prob_{name}"]
            kk = min(k[name], T)
            if not n_ex:
                ranked[name] = Ranked(idx[:, :kk], prob[:, :kk], None)
                continue
            ranked[name] = _drop_excluded(idx, prob, exclude, kk)
        return ranked

    def _run_topk(self, cat_ids: np.ndarray, multi_ids: np.ndarray, top_k: np.ndarray) -> dict[str, np.ndarray]:
        m = self.manifest
        names = [o.name for o in self.topk_session.get_outputs()]
        cat_name, multi_name = m.onnx_inputs
        if self.provider != "CUDAExecutionProvider":
            feeds = {cat_name: cat_ids, multi_name: multi_ids, "top_k": top_k, **self.topk_feeds}
            return dict(zip(names, self.topk_session.run(names, feeds)))
        # CUDA: the tag-side matrices stay on the device (bound once at load); only ids go up
        # and the top k come back.
        binding = self.topk_session.io_binding()
        binding.bind_cpu_input(cat_name, cat_ids)
        binding.bind_cpu_input(multi_name, multi_ids)
        binding.bind_cpu_input("top_k", top_k)
        for name, value in self.topk_feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        self.topk_session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))


def _drop_excluded(idx: np.ndarray, prob: np.ndarray, exclude: list[list[int]], k: int) -> Ranked:
    B = len(idx)
    out_i = np.zeros((B, k), dtype=idx.dtype)
    out_p = np.zeros((B, k), dtype=prob.dtype)
    kept = np.zeros((B, k), dtype=bool)
    for row in range(B):
        ex = exclude[row] if row < len(exclude) else None
        keep = ~np.isin(idx[row], ex) if ex else np.ones(idx.shape[1], dtype=bool)
        ii, pp = idx[row][keep][:k], prob[row][keep][:k]
        out_i[row, :len(ii)], out_p[row, :len(pp)], kept[row, :len(ii)] = ii, pp, True
    return Ranked(out_i, out_p, kept)

def tag_sides(manifest: Manifest, blobs: dict[str, bytes], approximate: bool = False) -> dict[str, TaskTagSide]:
    """task -> its tag side (gates and tag embeddings of the bundle, prepared for scoring).
    approximate: tasks with a candidate index in the bundle are served through it (factors only,
    no dense W, Q); the others stay dense."""
    sides = {}
    for spec in manifest.tasks:
        g, e = gates_file(spec.name), tag_emb_file(spec.name)
        index_name = ann_index_file(spec.name)
        use_index = approximate and index_name in blobs
        side = TaskTagSide.build(spec, decode_array(blobs[g], manifest.files[g]),
                                 decode_array(blobs[e], manifest.files[e]), dense=not use_index)
        if use_index:
            info = manifest.ann["tasks"][spec.name]
            side.ann = ann.TaskAnn(ann.index_from_bytes(blobs[index_name], info["nprobe"]), side.unit, side.gates,
                                   info["candidates"])
        sides[spec.name] = side
    return sides


def serve_approximately(manifest: Manifest, blobs: dict[str, bytes], mode: str, min_tags: int) -> bool:
    """MVKE_ANN: `off` never, `on` whenever the bundle has an index, `auto` from `min_tags` tags up."""
    has_index = any(ann_index_file(t.name) in blobs for t in manifest.tasks)
    if mode == "on" and not has_index:
        log.warning("MVKE_ANN=on but version %s has no candidate index; scoring exactly", manifest.version)
    return has_index and (mode == "on" or (mode == "auto" and manifest.num_tags >= min_tags))


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
                intra_threads: int = 1, ann_mode: str = "off", ann_min_tags: int = ANN_MIN_TAGS,
                scoring: str = "auto") -> LoadedModel:
    """The version ready to serve. ann_mode: auto|on|off (candidate indexes, see `serve_approximately`);
    scoring: auto|onnx|numpy (auto: the fused tower + TopK graph when the bundle has one and every
    task is dense; measured faster than numpy on the CPU, and the only way the GPU does the scoring)."""
    session, used = make_session(blobs[ONNX_FILE], provider, intra_threads)
    tags = json.loads(blobs[TAGS_FILE])
    sides = tag_sides(manifest, blobs, serve_approximately(manifest, blobs, ann_mode, ann_min_tags))
    topk_session, feeds = None, {}
    dense = all(side.W is not None for side in sides.values())
    if scoring != "numpy" and TOWER_TOPK_FILE in blobs and dense:
        topk_session, topk_used = make_session(blobs[TOWER_TOPK_FILE],
                                               "cuda" if used == "CUDAExecutionProvider" else "cpu", intra_threads)
        feeds = {}
        for side in sides.values():
            for name, arr in ((f"tag_w_{side.name}", side.W), (f"tag_q_{side.name}", side.Q)):
                feeds[name] = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0) if topk_used == "CUDAExecutionProvider" \
                    else arr
    elif scoring == "onnx":
        log.warning("MVKE_SCORING=onnx but version %s has no dense %s; scoring in numpy",
                    manifest.version, TOWER_TOPK_FILE)
    model = LoadedModel(manifest, FeatureSchema.from_dict(manifest.features), session, used, tags, sides,
                        {t: i for i, t in enumerate(tags)}, topk_session, feeds)
    # Warm up: the first run of a session allocates; do it before taking traffic.
    cat = np.full((1, len(model.schema.cat_fields)), 1, dtype=np.int64)
    multi = np.zeros((1, len(model.schema.multi_fields), model.schema.multi_len), dtype=np.int64)
    model.run_tower(cat, multi)
    if topk_session is not None:
        model.rank_fused(cat, multi, {t.name: 1 for t in manifest.tasks})
    return model
