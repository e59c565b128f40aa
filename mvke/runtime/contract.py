"""The bundle contract: the files of an exported model and its manifest.

`model_export` writes bundles and publishes them; the service and batch tagging read
them (from a directory or from Redis, keys in mvke/runtime/keys.py). Both sides import
this module, so the format lives here only. numpy only: no reader imports torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_FILE = "manifest.json"
ONNX_FILE = "user_tower.onnx"
TAGS_FILE = "tags.json"
# The user tower with the scoring and TopK appended (model_export/scoring_graph.py): one ONNX call
# from feature ids to each task's top-k; the tag-side matrices are its inputs, not weights.
TOWER_TOPK_FILE = "tower_topk.onnx"
FORMAT_VERSION = 1
# The user tower's graph inputs and output (written into every manifest; readers feed these names).
ONNX_INPUTS = ("cat_ids", "multi_ids")      # [B, F_cat] int64, [B, F_multi, L] int64
ONNX_OUTPUT = "expert_values"               # [B, sum K_task, D] float32


def gates_file(task: str) -> str:
    return f"task_{task}_gates.f32"


def ann_index_file(task: str) -> str:
    """The task's candidate index (mvke/runtime/ann.py), present when the export's recall gate passed."""
    return f"task_{task}_candidates.faiss"


def tag_emb_file(task: str) -> str:
    return f"task_{task}_tag_emb.f32"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class TaskSpec:
    """One task's part of the model: which expert outputs it reads and how it scores.

    `slice` is [start, stop) along axis 1 of the ONNX output `expert_values`
    ([B, sum K_task, D]): this task's value-transformed expert outputs.
    """

    name: str
    experts: list[int]            # expert indices serving the task (0-based; [0] for K=1 baselines)
    slice: list[int]
    scale: float                  # score = sigmoid(scale * cos + bias)
    bias: float

    @property
    def k(self) -> int:
        return self.slice[1] - self.slice[0]


@dataclass
class FileEntry:
    sha256: str
    bytes: int
    shape: list[int] | None = None
    dtype: str | None = None


@dataclass
class Manifest:
    version: str
    model: str                       # registry name: mvke-mt, nomtl, ...
    tasks: list[TaskSpec]
    out_dim: int
    num_tags: int
    features: dict[str, Any]         # FeatureSchema.to_dict(): fields, kinds, vocabularies
    files: dict[str, FileEntry]
    opset: int
    onnx_inputs: list[str] = field(default_factory=lambda: list(ONNX_INPUTS))
    onnx_output: str = ONNX_OUTPUT
    created_at: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    # Candidate indexes for large catalogues: scheme, gate settings and per task its file, nprobe,
    # candidates, recall@k and status ("ann", or "exact" when the gate failed); {} = none built.
    ann: dict[str, Any] = field(default_factory=dict)
    # Which feature fields user events update (mvke/runtime/events.py, the dataset's meta.json `events`);
    # {} = none declared (`mvke features stream --rules` then names them).
    events: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        if not d["events"]:   # an unused optional section is not written: readers before it still read the bundle
            del d["events"]
        return json.dumps(d, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        d = json.loads(text)
        d["tasks"] = [TaskSpec(**t) for t in d["tasks"]]
        d["files"] = {k: FileEntry(**v) for k, v in d["files"].items()}
        return cls(**d)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model, "created_at": self.created_at,
                "tasks": [{"name": t.name, "experts": len(t.experts)} for t in self.tasks],
                "num_tags": self.num_tags, "out_dim": self.out_dim,
                "features": [f["name"] for f in self.features["fields"]],
                "metrics": {k: v for k, v in self.metrics.items() if k in ("test_auc", "dataset")}}


def content_version(file_hashes: dict[str, str], model: str) -> str:
    """Version id: a hash of every file's content (same bundle -> same version)."""
    h = hashlib.sha256(model.encode())
    for name in sorted(file_hashes):
        h.update(name.encode() + b"\0" + file_hashes[name].encode())
    return h.hexdigest()[:16]


def decode_array(data: bytes, entry: FileEntry) -> np.ndarray:
    """Raw little-endian float32 bytes -> array of the manifest's shape."""
    return np.frombuffer(data, dtype="<f4").reshape(entry.shape)


class BundleError(ValueError):
    """A bundle or published version that does not match its manifest."""


def verify_files(manifest: Manifest, blobs: dict[str, bytes]) -> None:
    """Every file present with the manifest's size and sha256, else BundleError."""
    for name, entry in manifest.files.items():
        data = blobs.get(name)
        if data is None:
            raise BundleError(f"{name}: missing")
        if len(data) != entry.bytes or sha256_bytes(data) != entry.sha256:
            raise BundleError(f"{name}: sha256 does not match the manifest")


def read_bundle(bundle_dir: str | Path, verify: bool = True) -> tuple[Manifest, dict[str, bytes]]:
    bundle_dir = Path(bundle_dir)
    mpath = bundle_dir / MANIFEST_FILE
    if not mpath.exists():
        raise BundleError(f"{mpath}: missing (not a bundle directory)")
    manifest = Manifest.from_json(mpath.read_text())
    blobs = {}
    for name in manifest.files:
        p = bundle_dir / name
        if not p.exists():
            raise BundleError(f"{p}: missing")
        blobs[name] = p.read_bytes()
    if verify:
        verify_files(manifest, blobs)
    return manifest, blobs
