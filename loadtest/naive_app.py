"""The naive reference: what one writes first (no precompute, no ONNX, no batching).

Per request: HGETALL the user's features, encode them, repeat the user row for
every catalogue tag and call the PyTorch model's forward over all T tags
(user tower T times, tag tower T times), sigmoid, top-k, JSON. Used by
`loadtest.bench` (row d) to show what the precomputed tag side, ONNX and
batching buy. Configured by env: MVKE_NAIVE_CKPT (checkpoint dir), REDIS_URL.
"""
from __future__ import annotations

import os

import orjson
import redis.asyncio as aioredis
import torch
from fastapi import Body, FastAPI
from fastapi.responses import Response

from mvke.training.trainer import load_checkpoint

result = load_checkpoint(os.environ["MVKE_NAIVE_CKPT"])
model, schema, tags = result.model.eval(), result.schema, result.tags
all_tags = torch.arange(1, len(tags) + 1).unsqueeze(1)                   # [T, 1]
r = aioredis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), decode_responses=True)
app = FastAPI(title="naive MVKE reference")


@app.post("/users/{user_id}/tags")
async def tag_user(user_id: str, body: dict | None = Body(None)) -> Response:
    body = body or {}
    row = await r.hgetall(f"mvke:user:{user_id}")
    row.update(body.get("features") or {})
    if not row:
        return Response(orjson.dumps({"detail": "unknown user"}), 404, media_type="application/json")
    k = int(body.get("top_k") or 20)
    cat, multi = schema.encode([row]).ids()
    with torch.no_grad():
        T = len(tags)
        logits = model(torch.from_numpy(cat).expand(T, -1), torch.from_numpy(multi).expand(T, -1, -1), all_tags)
        probs = torch.sigmoid(logits)                                      # [T, n_tasks]
    out = {}
    for i, task in enumerate(model.tasks):
        s, idx = torch.topk(probs[:, i], k)
        out[task] = [{"tag": tags[j], "score": v} for j, v in zip(idx.tolist(), s.tolist())]
    return Response(orjson.dumps({"user_id": user_id, "tasks": out}), media_type="application/json")


@app.get("/readyz")
async def readyz() -> Response:
    return Response(b'{"ready":true}', media_type="application/json")
