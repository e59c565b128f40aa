"""POST /events: user events into the event streams (mvke/runtime/event_stream.py).

The route validates each event (`mvke.runtime.events.parse_event`, the rule the stream consumer
applies too), XADDs the valid ones to their user's partition stream in one pipeline and answers
202 with `accepted` / `duplicate` (an event id repeated within the request) / `rejected` counts
and each rejection's index, field and reason. It does not apply them: `mvke features stream`
consumers do, typically within tens of milliseconds (docs/SCALING.md). Why the stream and not a
Lua call per user here: an accepted event is durable in Redis (AOF) before the 202, whatever
happens to the service or a consumer; the request costs the service one pipelined XADD per event
instead of a script per user, so tag traffic keeps its CPU; and the apply work scales out with
consumers (and batches per user) independently of the service replicas. A duplicate across
requests is recognised where it is applied (the user's event-id set), not here.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from mvke.runtime.event_stream import publish_events_async
from mvke.runtime.events import EventError, parse_event
from mvke.runtime.redis_client import REDIS_ERRORS, describe_error
from service.tagger import ServiceError, unavailable

MAX_EVENTS_LIMIT = 10_000


class EventIn(BaseModel):
    """One event (documentation of the shape; each event is checked by `parse_event`, so a bad one
    is a rejection with its reason, not a failed request)."""
    event_id: str = Field(min_length=1, max_length=128, examples=["imp-000001"])
    user_id: str = Field(min_length=1, max_length=128, examples=["u0000042"])
    ts: int = Field(ge=0, description="Unix seconds of the event", examples=[1767225600])
    type: str = Field(pattern="^(impression|click|conversion)$", examples=["click"])
    tags: list[str] = Field(default_factory=list, description="the ad's tags", examples=[["t0012", "t0345"]])
    attrs: dict[str, list[str]] | None = Field(None, description="the ad's other value lists a rule may read")


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[dict[str, Any]] = Field(min_length=1, description="events (EventIn), at most MVKE_MAX_EVENTS_BATCH")


class Rejection(BaseModel):
    index: int
    event_id: str | None = None
    field: str
    reason: str


class EventsResponse(BaseModel):
    accepted: int
    duplicate: int
    rejected: int
    rejections: list[Rejection]


async def accept_events(state, body: EventsRequest) -> dict:
    limit = state.settings.max_events_batch
    if len(body.events) > limit:
        raise ServiceError(422, f"events: at most {limit} events per call, got {len(body.events)}", field="events")
    good, seen, rejections, duplicate = [], set(), [], 0
    for i, doc in enumerate(body.events):
        try:
            event = parse_event(doc)
        except EventError as e:
            eid = doc.get("event_id") if isinstance(doc, dict) and isinstance(doc.get("event_id"), str) else None
            rejections.append({"index": i, "event_id": eid, "field": f"events.{i}.{e.field}", "reason": e.reason})
            continue
        if event.event_id in seen:
            duplicate += 1
            continue
        seen.add(event.event_id)
        good.append(event)
    if good:
        try:
            await publish_events_async(state.redis, state.keys, good, state.settings.event_partitions,
                                       state.settings.event_stream_maxlen)
        except REDIS_ERRORS as e:
            raise unavailable(f"redis unavailable: {describe_error(e)}") from None
    return {"accepted": len(good), "duplicate": duplicate, "rejected": len(rejections), "rejections": rejections}


def install(app: FastAPI, state, responses: dict, json_response) -> None:
    @app.post("/events", status_code=202, response_model=EventsResponse, responses=responses)
    async def post_events(body: EventsRequest) -> Response:
        """User events (impressions, clicks, conversions) for the feature store: validated, then appended to
        the event streams that `mvke features stream` applies (202: accepted, not yet applied). A bad event
        is rejected with its index, field and reason; the others are accepted."""
        return json_response(await accept_events(state, body), 202)
