"""Load one published model version into memory: ORT session + prepared tag side.

Everything a request needs from a version lives in one immutable `LoadedModel`;
a request (or batch) holds a reference to it, so a hot swap never changes the
model under a request that already started.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from model_export.contract import ONNX_FILE, TAGS_FILE, Manifest, decode_array, gates_file, tag_emb_file
from model_export.scoring import TaskTagSide
from mvke.features import FeatureSchema
from service.encoding import StoreRowEncoder

log = logging.getLogger("mvke.service")


@dataclass
class LoadedModel:
    manifest: Manifest
    schema: FeatureSchema
    session: ort.InferenceSession
    provider: str
    tags: list[str]
    sides: dict[str, TaskTagSide]
    tag_index: dict[str, int] = field(default_factory=dict)
    encoder: StoreRowEncoder | None = None

    def __post_init__(self) -> None:
        if self.encoder is None:
            self.encoder = StoreRowEncoder(self.schema)

    @property
    def version(self) -> str:
        return self.manifest.version

    def run_tower(self, cat_ids: np.ndarray, multi_ids: np.ndarray) -> np.ndarray:
        """[B, sum K_task, D] expert outputs of every task."""
        return self.session.run(None, {"cat_ids": cat_ids, "multi_ids": multi_ids})[0]


_BLAS_SET = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
             "openblas_set_num_threads64_")


def limit_blas_threads(n: int) -> list[str]:
    """Cap the BLAS behind numpy (the scoring GEMMs) to `n` threads in this process -> libraries capped.

    OpenBLAS starts one busy-waiting thread per core. Next to an event loop, ONNX Runtime and other
    worker processes on a small machine those threads only contend: on 2 busy cores a [64 x 96] @
    [96 x 1,780] product took 55 ms with the default threads and 3 ms with one. (threadpoolctl does
    the same; this avoids the dependency.)
    """
    import ctypes
    done = []
    try:
        paths = {line.split()[-1] for line in open("/proc/self/maps")
                 if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return done
    for path in sorted(p for p in paths if "openblas" in p.lower()):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _BLAS_SET:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done.append(f"{path.rsplit('/', 1)[-1]}:{name}")
                break
    return done


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
    import json
    session, used = make_session(blobs[ONNX_FILE], provider, intra_threads)
    sides = {}
    for spec in manifest.tasks:
        g, e = gates_file(spec.name), tag_emb_file(spec.name)
        sides[spec.name] = TaskTagSide.build(spec, decode_array(blobs[g], manifest.files[g]),
                                             decode_array(blobs[e], manifest.files[e]))
    tags = json.loads(blobs[TAGS_FILE])
    model = LoadedModel(manifest, FeatureSchema.from_dict(manifest.features), session, used, tags, sides,
                        {t: i for i, t in enumerate(tags)})
    # Warm up: the first run of a session allocates; do it before taking traffic.
    cat = np.full((1, len(model.schema.cat_fields)), 1, dtype=np.int64)
    multi = np.zeros((1, len(model.schema.multi_fields), model.schema.multi_len), dtype=np.int64)
    model.run_tower(cat, multi)
    return model
