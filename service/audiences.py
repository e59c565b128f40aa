"""Audience routes: who carries a tag, and how many users a boolean combination of tags reaches.

    GET  /audiences                    the current index: version, users, rule, tags and sizes per task
    GET  /tags/{tag}/audience          ?task=&limit=&cursor=  -> {size, users, cursor}: one page of a tag's users
    POST /audiences:estimate           {"expression": ...}    -> {size, sample}: exact size + evenly spread sample

The index is `mvke tag-all --audiences`' (batch/audiences.py; format and grammar in
mvke/runtime/audience.py). **Read per query from Redis, not loaded in process.** Why: a query
needs only its terms' bitmaps (a 3-tag expression at 10M users: p99 6.5 ms of this process' CPU
and 0.34 ms of Redis', 52.8 ms wall p99 on 2 shared cores at load ~21: docs/results/audiences.md),
while the whole index is
hundreds of MB at 10M users x 1,780 tags x 2 tasks, and would be held once per worker process and
reloaded by each on every switch. Reading per query also makes the switch atomic without any
swap logic: each query resolves `{mvke:audiences}:latest` (reused for MVKE_AUDIENCE_POLL_S, 0.5 s)
once and reads every key from that one immutable version (a page's cursor pins its version, so
paging returns every user once across a switch). Cached, since a version never changes once
written: the small meta (catalogue, sizes, rule) per version, and the deserialised bitmaps of the
most recently used tags within MVKE_AUDIENCE_CACHE_MB (256): popular tags have the largest
bitmaps and are asked for most, so they stay; rare tags are small and cheap to read.

Redis down: 503 with the reason and Retry-After; the next query after Redis is back answers
(no state to repair: nothing is held but immutable metas).
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from fastapi import FastAPI, Path, Query
from fastapi.responses import Response
from pyroaring import BitMap

from mvke.runtime.audience import (USER_CHUNK, AudienceMeta, ExpressionError, Term, chunks_of, decode_user_chunk,
                                   evaluate, parse, sample_ranks, terms, unparse)
from mvke.runtime.redis_client import REDIS_ERRORS, connect_async
from service.schemas import (MAX_AUDIENCE_PAGE, AudienceEstimateRequest, AudienceEstimateResponse, AudienceInfo,
                             AudiencePage)
from service.tagger import ServiceError, unavailable

CURSOR_PATTERN = r"^[0-9a-f]{16}:[0-9]{1,10}$"   # <index version>:<last user number returned>
META_CACHE = 4        # versions whose meta is kept (latest + a few that cursors may still pin)
NO_INDEX = "no audience index published (run `mvke tag-all --audiences --redis URL`)"


class VersionGone(Exception):
    """The version's keys were deleted (retired) after its meta was cached."""


class BitmapCache:
    """Deserialised bitmaps by (version, task, tag), least recently used out first, within a byte budget.
    Versions are immutable, so an entry is never stale; the popular tags (the large bitmaps) stay."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.items: OrderedDict[tuple[str, str, str], tuple[BitMap, int]] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> BitMap | None:
        hit = self.items.get(key)
        if hit is None:
            return None
        self.items.move_to_end(key)
        return hit[0]

    def put(self, key: tuple[str, str, str], bm: BitMap, nbytes: int) -> None:
        if nbytes > self.budget or key in self.items:
            return
        self.items[key] = (bm, nbytes)
        self.used += nbytes
        while self.used > self.budget:
            _, (_, n) = self.items.popitem(last=False)
            self.used -= n


class AudienceStore:
    """Reads one audience version per query (see module docstring). Its own client: bitmaps are bytes, the
    tag routes' client decodes replies to str."""

    def __init__(self, state):
        s = state.settings
        self.keys = state.keys
        self.redis = connect_async(state.redis_target, pool_size=s.redis_pool_size, pool_wait_s=s.redis_pool_wait_s,
                                   decode_responses=False, socket_timeout=s.redis_timeout_s,
                                   socket_connect_timeout=s.redis_timeout_s)
        self.metas: OrderedDict[str, AudienceMeta] = OrderedDict()
        self.poll_s = s.audience_poll_s
        self._latest: tuple[str, float] | None = None    # (version, when read): reused for poll_s
        self.cache = BitmapCache(s.audience_cache_mb << 20)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def _call(self, coro):
        try:
            return await coro
        except (*REDIS_ERRORS, asyncio.TimeoutError, OSError) as e:
            raise unavailable(f"redis unavailable: {type(e).__name__}") from None

    async def meta(self, version: str | None = None) -> AudienceMeta | None:
        """The version's meta (the latest one when None); None when that version is not in Redis."""
        if version is None:
            version = await self.latest_version()
        meta = self.metas.get(version)
        if meta is None:
            raw = await self._call(self.redis.get(self.keys.audience_meta(version)))
            if raw is None:
                return None
            meta = AudienceMeta.from_json(raw)
            self.metas[version] = meta
            while len(self.metas) > META_CACHE:
                self.metas.popitem(last=False)
        else:
            self.metas.move_to_end(version)
        return meta

    async def latest_version(self) -> str:
        """`{mvke:audiences}:latest`, read at most every poll_s (a switch is seen within poll_s; each query
        still reads one version only)."""
        now = time.monotonic()
        if self._latest is not None and now - self._latest[1] < self.poll_s:
            return self._latest[0]
        raw = await self._call(self.redis.get(self.keys.audiences_latest))
        if raw is None:
            self._latest = None
            raise unavailable(NO_INDEX)
        self._latest = (raw.decode(), now)
        return self._latest[0]

    async def latest(self) -> AudienceMeta:
        meta = await self.meta()
        if meta is None:   # the pointer names a version being retired: only between two publishes' steps
            raise unavailable("audience index: the latest version is not in Redis")
        return meta

    async def bitmaps(self, meta: AudienceMeta, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], BitMap]:
        """(task, tag) -> bitmap, every task's fields in one round trip; a tag nobody carries has no field."""
        out = {(t, g): BitMap() for t, g in wanted}
        by_task: dict[str, list[str]] = {}
        for t, g in sorted({(t, g) for t, g in wanted if meta.sizes[t][meta.tag_index(g)] > 0}):
            hit = self.cache.get((meta.version, t, g))
            if hit is not None:
                out[(t, g)] = hit
            else:
                by_task.setdefault(t, []).append(g)
        pipe = self.redis.pipeline(transaction=False)
        for t, tags in by_task.items():
            pipe.hmget(self.keys.audience_task(meta.version, t), tags)
        replies = await self._call(pipe.execute()) if by_task else []
        for (t, tags), raws in zip(by_task.items(), replies):
            for g, raw in zip(tags, raws):
                if raw is None:   # meta says someone carries it: the version was retired under us
                    raise self._gone(meta)
                out[(t, g)] = bm = BitMap.deserialize(raw)
                self.cache.put((meta.version, t, g), bm, len(raw))
        return out

    def _gone(self, meta: AudienceMeta) -> VersionGone:
        self.metas.pop(meta.version, None)
        if self._latest is not None and self._latest[0] == meta.version:
            self._latest = None
        return VersionGone(meta.version)

    async def user_ids(self, meta: AudienceMeta, numbers: list[int]) -> list[str]:
        """User numbers -> ids from the dictionary chunks that hold them (one HMGET)."""
        if not numbers:
            return []
        chunks = chunks_of(numbers)
        raws = await self._call(self.redis.hmget(self.keys.audience_users(meta.version), [str(c) for c in chunks]))
        if any(r is None for r in raws):
            raise self._gone(meta)
        ids = {c: decode_user_chunk(r) for c, r in zip(chunks, raws)}
        return [ids[n // USER_CHUNK][n % USER_CHUNK] for n in numbers]


# ---- validation against the version that answers --------------------------------------------------
def _check_term(meta: AudienceMeta, term: Term) -> None:
    if term.task not in meta.tasks:
        raise ServiceError(422, f"expression: unknown task {term.task!r} at position {term.position} "
                                f"(tasks: {', '.join(meta.tasks)})", field="expression",
                           errors=[_issue(f"unknown task {term.task!r}", term.task, term.position)])
    if meta.tag_index(term.tag) is None:
        raise ServiceError(422, f"expression: unknown tag {term.tag!r} at position {term.position} "
                                f"(not in the catalogue of version {meta.version})", field="expression",
                           errors=[_issue(f"unknown tag {term.tag!r}", term.tag, term.position)])


def _issue(msg: str, token: str, position: int) -> dict:
    return {"loc": ["body", "expression"], "type": "value_error", "msg": msg,
            "ctx": {"token": token, "position": position}}


def _parse(text: str):
    try:
        return parse(text)
    except ExpressionError as e:
        raise ServiceError(422, f"expression: {e}", field="expression",
                           errors=[_issue(e.reason, e.token, e.position)]) from None


def _task(meta: AudienceMeta, task: str | None) -> str:
    if task is None:
        if len(meta.tasks) == 1:
            return meta.tasks[0]
        raise _query_error(422, "task", f"required (one of {', '.join(meta.tasks)})")
    if task not in meta.tasks:
        raise _query_error(422, "task", f"unknown task {task!r} (tasks: {', '.join(meta.tasks)})")
    return task


def _parse_cursor(cursor: str) -> tuple[str, int]:
    version, sep, last = cursor.partition(":")
    if not sep or not version or not last.isdigit():
        raise _query_error(422, "cursor", f"not a cursor this service gave out: {cursor[:80]!r}")
    return version, int(last)


# ---- the queries --------------------------------------------------------------------------------------
async def estimate(store: AudienceStore, req: AudienceEstimateRequest) -> dict:
    try:
        return await _estimate(store, req)
    except VersionGone as e:
        raise unavailable(f"audience version {e} was just retired; ask again") from None


async def _estimate(store: AudienceStore, req: AudienceEstimateRequest) -> dict:
    node = _parse(req.expression)
    meta = await store.latest()
    found = terms(node)
    for t in found:
        _check_term(meta, t)
    got = await store.bitmaps(meta, [(t.task, t.tag) for t in found])
    result = evaluate(node, lambda t: got[(t.task, t.tag)], meta.users)
    size = len(result)
    sample = await store.user_ids(meta, [result[i] for i in sample_ranks(size, req.sample)])
    return {"size": size, "sample": sample, "expression": unparse(node), "version": meta.version,
            "users": meta.users}


async def audience_page(store: AudienceStore, tag: str, task: str | None, limit: int, cursor: str | None) -> dict:
    try:
        return await _page(store, tag, task, limit, cursor)
    except VersionGone as e:
        if cursor is None:   # the latest version was replaced and retired between two reads: rare, ask again
            raise unavailable(f"audience version {e} was just retired; ask again") from None
        raise _retired(str(e)) from None


def _retired(version: str) -> ServiceError:
    # 404 as for a model_version that is not published: the version the cursor names is not (any more) there
    return _query_error(404, "cursor", f"audience version {version} is not in Redis (retired); start again "
                                       "without a cursor")


def _query_error(status: int, param: str, msg: str) -> ServiceError:
    return ServiceError(status, f"query.{param}: {msg}", field=f"query.{param}",
                        errors=[{"loc": ["query", param], "type": "value_error", "msg": msg}])


async def _page(store: AudienceStore, tag: str, task: str | None, limit: int, cursor: str | None) -> dict:
    after = None
    if cursor is not None:
        version, after = _parse_cursor(cursor)
        meta = await store.meta(version)
        if meta is None:
            raise _retired(version)
    else:
        meta = await store.latest()
    task = _task(meta, task)
    i = meta.tag_index(tag)
    if i is None:
        raise ServiceError(404, f"tag: unknown tag {tag!r} (not in the catalogue of version {meta.version})",
                           field="tag")
    bm = (await store.bitmaps(meta, [(task, tag)]))[(task, tag)]
    start = 0 if after is None else bm.rank(after)      # members <= the last one returned
    numbers = list(bm[start:start + limit]) if start < len(bm) else []
    users = await store.user_ids(meta, numbers)
    more = start + len(numbers) < len(bm)
    return {"tag": tag, "task": task, "size": len(bm), "users": users,
            "cursor": f"{meta.version}:{numbers[-1]}" if more and numbers else None, "version": meta.version}


async def info(store: AudienceStore) -> dict:
    meta = await store.latest()
    return {"version": meta.version, "model_version": meta.model_version, "users": meta.users,
            "rule": meta.rule.to_dict(), "built_at": meta.built_at,
            "tasks": {t: {"tags": meta.tags, "sizes": meta.sizes[t]} for t in meta.tasks}}


def install(app: FastAPI, state, errors, json_response) -> AudienceStore:
    """Register the audience routes on `app` (service/app.py's one call); the store is closed by the lifespan."""
    store = AudienceStore(state)

    @app.get("/audiences", response_model=AudienceInfo, responses=errors(401, 503))
    async def audiences_info() -> Response:
        """The audience index in use: version, users, the membership rule, every task's tags and audience sizes."""
        return json_response(await info(store))

    @app.get("/tags/{tag:path}/audience", response_model=AudiencePage, responses=errors(401, 404, 422, 503))
    async def tag_audience(tag: str = Path(min_length=1, max_length=256, examples=["cat07/tag0123"],
                                           description="a catalogue tag (404 when unknown; size 0 when nobody has it)"),
                           task: str | None = Query(None, description="the task (required when the index has "
                                                                      "several)", examples=["interest"]),
                           limit: int = Query(100, ge=1, le=MAX_AUDIENCE_PAGE, description="users per page"),
                           cursor: str | None = Query(None, max_length=64, pattern=CURSOR_PATTERN,
                                                      description="the previous page's cursor")) -> Response:
        """The users carrying a tag for a task, one page at a time: exact size, ids, and the next page's cursor."""
        return json_response(await audience_page(store, tag, task, limit, cursor))

    @app.post("/audiences:estimate", response_model=AudienceEstimateResponse, responses=errors(401, 413, 415, 422, 503))
    async def audiences_estimate(body: AudienceEstimateRequest) -> Response:
        """Exact size and a sample of the users a boolean expression over tags selects (AND, OR, NOT, parentheses).
        A bad expression is a 422 naming the token and its position; an unknown task or tag a 422 naming it."""
        return json_response(await estimate(store, body))

    return store
