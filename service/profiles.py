"""GET /users/{user_id}/profile: the daily profile, the paper's serving mode (issue 23 §2.5).

`mvke tag-all --to-redis` writes every user's top tags of one version
(`mvke:usertags:v<id>:<user_id>`, one HSET of all tasks per user) and, only when every part is
done, the job's summary and the `{mvke:usertags}:latest` pointer in one MULTI
(batch/redis_out.py). This route answers from the version the pointer names with ONE Redis
read per request (HGETALL of the user's hash); the pointer and its summary (computed_at) are
read at most every MVKE_PROFILE_POLL_S. A reader therefore never sees a mix of two versions:
each answer is one key of one version, and a version is named by the pointer only once it is
complete. A user without a profile is a 404 naming why (no job completed yet, or the user is
not in the version's job), or, with `?fallback=live`, is scored live like POST /users/{id}/tags.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
from fastapi import FastAPI, Path, Query
from fastapi.responses import Response

from mvke.runtime.keys import Keys
from mvke.runtime.redis_client import REDIS_ERRORS, describe_error
from service.schemas import TagRequest
from service.state import render, validate_request
from service.tagger import ServiceError, unavailable


@dataclass(frozen=True)
class ProfileVersion:
    version: str
    computed_at: str | None      # the job's completed_at (UTC, ISO 8601)
    users: int | None            # users the job wrote
    read_at: float               # monotonic time of the read (reused for poll_s)


class ProfileStore:
    def __init__(self, redis, keys: Keys, poll_s: float):
        self.redis, self.keys, self.poll_s = redis, keys, poll_s
        self._latest: ProfileVersion | None = None

    async def latest(self) -> ProfileVersion | None:
        """The version `{mvke:usertags}:latest` names and its summary (None: no job completed yet)."""
        now = time.monotonic()
        if self._latest is not None and now - self._latest.read_at < self.poll_s:
            return self._latest
        version = await self.redis.get(self.keys.user_tags_latest)
        if version is None:
            self._latest = None
            return None
        computed_at, users = await self.redis.hmget(self.keys.user_tags_summary(version), ["completed_at", "users"])
        self._latest = ProfileVersion(version, computed_at, int(users) if users else None, now)
        return self._latest

    async def profile(self, user_id: str) -> tuple[ProfileVersion, dict | None] | None:
        """(the version, the user's tags per task or None); None when no job has completed."""
        latest = await self.latest()
        if latest is None:
            return None
        raw = await self.redis.hgetall(self.keys.user_tags(latest.version, user_id))
        return latest, ({task: orjson.loads(v) for task, v in raw.items()} if raw else None)


def age_s(computed_at: str | None) -> float | None:
    if not computed_at:
        return None
    t = datetime.strptime(computed_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return round(time.time() - t.timestamp(), 1)


def profile_doc(user_id: str, latest: ProfileVersion, tasks: dict) -> dict:
    return {"user_id": user_id, "model_version": latest.version, "source": "profile",
            "computed_at": latest.computed_at, "age_s": age_s(latest.computed_at),
            "tasks": {t: [{"tag": tag, "score": s} for tag, s in ranked] for t, ranked in tasks.items()}}


def missing_reason(user_id: str, latest: ProfileVersion | None, keys: Keys) -> str:
    if latest is None:
        return (f"no daily profiles yet: {keys.user_tags_latest} is not set (no `mvke tag-all --to-redis` "
                "job has completed); ask with ?fallback=live to score the user now")
    return (f"user {user_id!r} has no profile in version {latest.version} (computed {latest.computed_at}, "
            f"{latest.users if latest.users is not None else '?'} users): not in that job's users table; "
            "ask with ?fallback=live to score the user now")


def install(app: FastAPI, state, responses: dict, json_response) -> None:
    store = ProfileStore(state.redis, state.keys, state.settings.profile_poll_s)

    @app.get("/users/{user_id}/profile", responses=responses)
    async def user_profile(user_id: str = Path(min_length=1, max_length=128, examples=["u0000042"]),
                           fallback: str | None = Query(None, pattern="^live$", description=(
                               "`live`: a user without a profile is scored now (as POST /users/{id}/tags) "
                               "instead of a 404"))) -> Response:
        """The user's daily profile: the top tags per task `mvke tag-all --to-redis` computed for the
        version `{mvke:usertags}:latest` names, with that version, when it was computed and its age
        (one Redis read). 404 naming why when the user has none, unless `?fallback=live`."""
        try:
            got = await store.profile(user_id)
        except REDIS_ERRORS as e:
            raise unavailable(f"redis unavailable: {describe_error(e)}") from None
        latest, tasks = got if got is not None else (None, None)
        if tasks is not None:
            return json_response(profile_doc(user_id, latest, tasks))
        reason = missing_reason(user_id, latest, state.keys)
        if fallback != "live":
            raise ServiceError(404, reason, field="user_id")
        doc = render(await state.tag(validate_request(state, user_id, TagRequest())))
        return json_response({**doc, "source": "live", "profile_missing": reason.split(";")[0]})
