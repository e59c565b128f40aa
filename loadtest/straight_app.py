"""The straightforward reference: FastAPI + ONNX Runtime + redis-py, written the obvious way.

What a competent engineer writes first with the same bundle, without the service's
machinery (no batching, no fast path, no fused graph): per request, a FastAPI route
validates the body with pydantic, HGETALLs the user's features with redis.asyncio,
encodes them with the reference encoder, runs the ONNX user tower at batch 1, scores
all tags of each task with numpy (the two-GEMM form of paper section 4.3), takes the
top k with argpartition, and returns orjson. The bench (`loadtest.bench`, row
"straightforward") serves it beside the service so the c=1 latency and the c=32
throughput of the two are measured side by side in one run.

Env: REDIS_URL, MVKE_STRAIGHT_BUNDLE (a bundle directory, the version the service serves).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, Field

from mvke.runtime.features import FeatureSchema

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
bundle = Path(os.environ["MVKE_STRAIGHT_BUNDLE"])
manifest = json.loads((bundle / "manifest.json").read_text())
schema = FeatureSchema.from_dict(manifest["features"])
tags = json.loads((bundle / "tags.json").read_text())
so = ort.SessionOptions()
so.intra_op_num_threads = 1
session = ort.InferenceSession(str(bundle / "user_tower.onnx"), so, providers=["CPUExecutionProvider"])


def task_side(task: dict) -> tuple[np.ndarray, np.ndarray]:
    """W [K*D, T] (gate (x) unit tag embedding) and Q [K*K, T] (gate outer products)."""
    def array(name: str) -> np.ndarray:
        return np.fromfile(bundle / name, dtype="<f4").reshape(manifest["files"][name]["shape"])
    gates, emb = array(f"task_{task['name']}_gates.f32"), array(f"task_{task['name']}_tag_emb.f32")
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    T, K = gates.shape
    W = np.einsum("tk,td->kdt", gates, unit).reshape(-1, T)
    Q = np.einsum("tk,tl->klt", gates, gates).reshape(K * K, T)
    return np.ascontiguousarray(W), np.ascontiguousarray(Q)


sides = {t["name"]: (t, *task_side(t)) for t in manifest["tasks"]}
r = aioredis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), decode_responses=True)
app = FastAPI(title="straightforward MVKE endpoint")


class Body(BaseModel):
    top_k: int = Field(20, ge=1, le=200)


@app.post("/users/{user_id}/tags")
async def tag_user(user_id: str, body: Body | None = None) -> Response:
    k = (body or Body()).top_k
    row = await r.hgetall(f"mvke:user:{user_id}")
    if not row:
        return Response(orjson.dumps({"detail": "unknown user"}), 404, media_type="application/json")
    cat, multi = schema.encode_rows([row])
    values = session.run(None, {"cat_ids": cat, "multi_ids": multi})[0]            # [1, sum K, D]
    out = {}
    for name, (task, W, Q) in sides.items():
        v = values[:, task["slice"][0]:task["slice"][1]]                              # [1, K, D]
        num = v.reshape(1, -1) @ W
        norm = np.sqrt(np.maximum((v @ v.transpose(0, 2, 1)).reshape(1, -1) @ Q, 0.0))
        logits = task["scale"] * num[0] / np.maximum(norm[0], 1e-8) + task["bias"]
        top = np.argpartition(-logits, k)[:k]
        top = top[np.argsort(-logits[top])]
        probs = 1.0 / (1.0 + np.exp(-logits[top]))
        out[name] = [{"tag": tags[i], "score": float(p)} for i, p in zip(top.tolist(), probs.tolist())]
    return Response(orjson.dumps({"user_id": user_id, "model_version": manifest["version"], "tasks": out}),
                    media_type="application/json")


@app.get("/readyz")
async def readyz() -> Response:
    return Response(b'{"ready":true}', media_type="application/json")
