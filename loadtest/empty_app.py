"""The HTTP ceiling: an empty FastAPI POST endpoint on the service's route.

Served by uvicorn with the same server settings as `mvke serve` (uvloop,
httptools, no access log); `loadtest.bench` measures it under the same load
generator as the real service, so the ratio service/empty says how much of the
HTTP budget the model work costs.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response

app = FastAPI(title="empty")
BODY = b'{"user_id":"","tasks":{}}'


@app.post("/users/{user_id}/tags")
async def tag_user(user_id: str) -> Response:
    return Response(BODY, media_type="application/json")


@app.get("/readyz")
async def readyz() -> Response:
    return Response(b'{"ready":true}', media_type="application/json")
