"""`mvke export`: checkpoint -> bundle directory (ONNX user tower, tag side, manifest).

The bundle is self-describing: `manifest.json` names every file with its
sha256, the feature schema with its vocabularies, the tasks and their
expert slices and score temperature. A parity gate compares the ONNX graph
and the bundle's scoring against the PyTorch model before anything is written
as final; a failing gate fails the export.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from mvke.models import TwoTowerTagger
from mvke.runtime.contract import (MANIFEST_FILE, ONNX_FILE, ONNX_INPUTS, ONNX_OUTPUT, TAGS_FILE, BundleError,
                                   FileEntry, Manifest, TaskSpec, content_version, gates_file, read_bundle,
                                   TOWER_TOPK_FILE, sha256_bytes, tag_emb_file)
from mvke.runtime import ann
from mvke.runtime.features import FeatureSchema, random_users  # noqa: F401  (random_users: re-exported for callers of the bundle)
from mvke.runtime.encoded import EncodedBatch
from mvke.runtime.model import ANN_MIN_TAGS, LoadedModel, build_model
from mvke.runtime.scoring import task_scores
from mvke.training.trainer import TrainResult, load_checkpoint
from model_export.candidates import add_candidate_indexes, wants_index
from model_export.scoring_graph import fuse_with_tower

OPSET = 18
ONNX_TOLERANCE = 1e-5
SCORE_TOLERANCE = 1e-4
FUSED_TOLERANCE = 1e-5
PARITY_CHUNK = 32


class ParityError(BundleError):
    """The exported bundle does not reproduce the PyTorch model."""


class UserTower(nn.Module):
    """The user side as one graph: every task's expert outputs concatenated on axis 1."""

    def __init__(self, model: TwoTowerTagger):
        super().__init__()
        self.model = model

    def forward(self, cat_ids: torch.Tensor, multi_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.model.user_vectors(cat_ids, multi_ids), 1)   # [B, sum K_t, D]


@contextlib.contextmanager
def _quiet_exporter():
    """Silence what torch's exporter prints on every export of this model and that needs no action:
    "torchvision is not installed. Skipping torchvision::nms" (it registers vision ops it cannot
    find), a FutureWarning from torch's own pytree code, and the UserWarning that the two inputs'
    batch axes share one name (they do, on purpose: one `Dim`). Errors still surface."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(model: TwoTowerTagger, schema: FeatureSchema) -> bytes:
    tower = UserTower(model).eval()
    cat = torch.ones(2, len(schema.cat_fields), dtype=torch.long)
    multi = torch.ones(2, len(schema.multi_fields), schema.multi_len, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            tower, (cat, multi), input_names=list(ONNX_INPUTS), output_names=[ONNX_OUTPUT],
            dynamic_shapes={name: {0: batch} for name in ONNX_INPUTS}, opset_version=OPSET,
            dynamo=True, optimize=True, verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    buf = io.BytesIO()
    onnx.save_model(proto, buf)  # weights inlined: one file to ship and hash
    return buf.getvalue()


def real_users(data_dir: str | None, schema: FeatureSchema, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Feature rows of real training users, when the checkpoint's data is still on disk."""
    from mvke.data.dataset import load_dataset
    if not data_dir or not Path(data_dir).exists():
        return None
    ds = load_dataset(data_dir)
    rows = ds.train if all(n_ in ds.train.columns for n_ in schema.names) else ds.users
    rows = rows.sample(min(n, len(rows)), random_state=0)
    return schema.encode(rows[schema.names].to_dict("records")).ids()


def tag_side_arrays(model: TwoTowerTagger) -> list[tuple[np.ndarray, np.ndarray]]:
    with torch.no_grad():
        return [(g.numpy().astype("<f4"), e.numpy().astype("<f4")) for e, g in model.all_tag_vectors()]


def check_parity(model: TwoTowerTagger, manifest: Manifest, blobs: dict[str, bytes],
                 users: list[tuple[str, np.ndarray, np.ndarray]], tags_per_user: int = 64,
                 seed: int = 0) -> dict:
    """ONNX vs PyTorch expert outputs (1e-5) and bundle scores vs model.forward (1e-4).

    The bundle is loaded exactly as the service and batch tagging load it (`build_model`).
    Raises ParityError naming the check, the user set and the worst difference.
    """
    loaded = build_model(manifest, blobs, "cpu")
    rng = np.random.default_rng(seed)
    report = {}
    for label, cat, multi in users:
        onnx_out = loaded.run_tower(cat, multi)
        with torch.no_grad():
            torch_out = UserTower(model)(torch.from_numpy(cat), torch.from_numpy(multi)).numpy()
        d_onnx = float(np.abs(onnx_out - torch_out).max())
        if not d_onnx <= ONNX_TOLERANCE:
            raise ParityError(f"parity: ONNX expert outputs differ from PyTorch by {d_onnx:.2e} "
                              f"(> {ONNX_TOLERANCE}) on {label} users")
        # Scores from the bundle for every tag, compared with the model's forward pass on sampled tags.
        n = len(cat)
        tag_ids = rng.integers(1, manifest.num_tags + 1, (n, tags_per_user))
        worst = 0.0
        with torch.no_grad():
            ct, mt = torch.from_numpy(cat), torch.from_numpy(multi)
            rep = lambda x: x.repeat_interleave(tags_per_user, 0)  # noqa: E731
            ref = torch.sigmoid(model(rep(ct), rep(mt), torch.from_numpy(tag_ids.reshape(-1, 1)))).numpy()
        for ti, side in enumerate(loaded.sides.values()):
            for lo in range(0, n, PARITY_CHUNK):   # [chunk, T] at a time: a million tags fit
                scores = task_scores(onnx_out[lo:lo + PARITY_CHUNK, side.slice[0]:side.slice[1]], side)  # [c, T]
                mine = np.take_along_axis(scores, tag_ids[lo:lo + PARITY_CHUNK] - 1, axis=1).reshape(-1)
                theirs = ref.reshape(n, tags_per_user, -1)[lo:lo + PARITY_CHUNK, :, ti].reshape(-1)
                worst = max(worst, float(np.abs(mine - theirs).max()))
        if not worst <= SCORE_TOLERANCE:
            raise ParityError(f"parity: bundle scores differ from the model's forward pass by {worst:.2e} "
                              f"(> {SCORE_TOLERANCE}) on {label} users")
        fused = check_fused(loaded, cat, multi) if loaded.topk_session is not None else None
        report[label] = {"users": n, "max_abs_diff_expert_values": d_onnx, "max_abs_diff_scores": worst}
        if fused is not None:
            report[label]["max_abs_diff_fused_topk"] = fused
    return report


def check_fused(loaded: LoadedModel, cat: np.ndarray, multi: np.ndarray, k: int = 20) -> float:
    """The predictor's two modes on the same users, `rank(mode="fused")` (tower + TopK in one ONNX graph)
    against `rank(mode="numpy")`: the same tags in the same order (ties aside) and probabilities within
    FUSED_TOLERANCE; ParityError otherwise."""
    worst = 0.0
    for lo in range(0, len(cat), PARITY_CHUNK):
        users = EncodedBatch(cat[lo:lo + PARITY_CHUNK], multi[lo:lo + PARITY_CHUNK])
        want = loaded.rank(users, k, mode="numpy")
        got = loaded.rank(EncodedBatch(users.cat_ids, users.multi_ids), k, mode="fused")
        for name, r in want.items():
            diff = float(np.abs(got[name].scores - r.scores).max())
            same = (got[name].tag_index == r.tag_index).mean()
            if diff > FUSED_TOLERANCE or same < 0.99:
                raise ParityError(f"parity: the fused tower + TopK graph differs from numpy scoring on task {name} "
                                  f"({same:.1%} same tags, scores {diff:.2e} apart)")
            worst = max(worst, diff)
    return worst


def build_bundle(result: TrainResult) -> tuple[Manifest, dict[str, bytes]]:
    model, schema = result.model.eval(), result.schema
    blobs: dict[str, bytes] = {ONNX_FILE: export_onnx(model, schema),
                               TAGS_FILE: json.dumps(result.tags).encode()}
    entries: dict[str, FileEntry] = {}
    scales, biases = model.task_scales()
    specs, start = [], 0
    for i, (task, (gates, emb)) in enumerate(zip(model.tasks, tag_side_arrays(model))):
        k = gates.shape[1]
        experts = list(model.cfg.task_experts.get(task, [0])) if k > 1 else [0]
        specs.append(TaskSpec(task, experts[:k] if len(experts) >= k else list(range(k)), [start, start + k],
                              scales[i], biases[i]))
        start += k
        for name, arr in ((gates_file(task), gates), (tag_emb_file(task), emb)):
            blobs[name] = np.ascontiguousarray(arr, dtype="<f4").tobytes()
            entries[name] = FileEntry(sha256_bytes(blobs[name]), len(blobs[name]), list(arr.shape), "float32")
    blobs[TOWER_TOPK_FILE] = fuse_with_tower(blobs[ONNX_FILE], [(t.name, t.slice[0], t.slice[1], t.scale, t.bias)
                                                                for t in specs], model.cfg.out_dim)
    for name in (ONNX_FILE, TAGS_FILE, TOWER_TOPK_FILE):
        entries[name] = FileEntry(sha256_bytes(blobs[name]), len(blobs[name]))
    version = content_version({k: v.sha256 for k, v in entries.items()}, model.cfg.name)
    from dataclasses import asdict
    manifest = Manifest(
        version=version, model=model.cfg.name, tasks=specs, out_dim=model.cfg.out_dim,
        num_tags=len(result.tags), features=schema.to_dict(), files=entries, opset=OPSET,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        metrics={k: result.metrics.get(k) for k in ("dataset", "test_auc", "oracle_test_auc", "params",
                                                     "train_seconds", "samples_per_second", "cycle")},
        model_config=asdict(model.cfg), events=_dataset_events(result.data_dir))
    return manifest, blobs


def _dataset_events(data_dir: str | None) -> dict:
    """The dataset's `events` section (which fields events update: mvke/runtime/events.py), carried in the
    manifest so `mvke features stream` applies the rules of the data the served model was trained on."""
    meta = Path(data_dir) / "meta.json" if data_dir else None
    if meta is None or not meta.exists():
        return {}
    return json.loads(meta.read_text()).get("events", {})


def write_bundle(manifest: Manifest, blobs: dict[str, bytes], out: str | Path) -> Path:
    """Write to a temporary sibling directory, then rename: a bundle is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for name, data in blobs.items():
        (tmp / name).write_bytes(data)
    (tmp / MANIFEST_FILE).write_text(manifest.to_json())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def export_checkpoint(ckpt_dir: str | Path, out: str | Path, parity_users: int = 256, ann_mode: str = "auto",
                      ann_min_tags: int = ANN_MIN_TAGS, synthetic_tags: int = 0) -> tuple[Manifest, dict]:
    """Checkpoint -> verified bundle. Returns the manifest and timing/size figures.

    ann_mode auto|on|off: build candidate indexes (model_export/candidates.py) for a catalogue of
    `ann_min_tags` tags or more (auto), always (on) or never (off).
    synthetic_tags: grow the catalogue to this many tags first (benchmarks only:
    model_export/synthetic_tags.py)."""
    t0 = time.perf_counter()
    result = load_checkpoint(ckpt_dir)
    if synthetic_tags:
        from model_export.synthetic_tags import grow_tag_catalogue
        result = grow_tag_catalogue(result, synthetic_tags)
    manifest, blobs = build_bundle(result)
    users = [("random", *random_users(result.schema, parity_users, np.random.default_rng(0)))]
    real = real_users(result.data_dir, result.schema, parity_users)
    if real is not None:
        users.append(("training-data", *real))
    manifest.parity = check_parity(result.model, manifest, blobs, users)
    figures: dict = {}
    if wants_index(ann_mode, manifest.num_tags, ann_min_tags):
        t1 = time.perf_counter()
        gate_users = ann.AnnConfig().gate_users
        cat, multi = real_users(result.data_dir, result.schema, gate_users) or \
            random_users(result.schema, gate_users, np.random.default_rng(2))
        tower = build_model(manifest, blobs, "cpu", scoring="numpy")
        values = np.concatenate([tower.run_tower(cat[lo:lo + 256], multi[lo:lo + 256]) for lo in range(0, len(cat), 256)])
        add_candidate_indexes(manifest, blobs, values, min_tags=ann_min_tags)
        figures["ann_seconds"] = time.perf_counter() - t1
    write_bundle(manifest, blobs, out)
    read_bundle(out)  # re-read and verify every checksum from disk
    figures.update(export_seconds=time.perf_counter() - t0,
                   bundle_bytes=sum(len(b) for b in blobs.values()) + len(manifest.to_json()))
    return manifest, figures


def verify_bundle_against_checkpoint(bundle_dir: str | Path, ckpt_dir: str | Path, n: int = 128) -> dict:
    """Re-run the parity gate on an existing bundle (e.g. after copying it around)."""
    manifest, blobs = read_bundle(bundle_dir, verify=False)
    result = load_checkpoint(ckpt_dir)
    users = [("random", *random_users(result.schema, n, np.random.default_rng(1)))]
    return check_parity(result.model, manifest, blobs, users)
