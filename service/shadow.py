"""Live figures per version and the canary's shadow (issue 23 §2.4), off the request's critical path.

Every answer counts for the version that gave it: `answers`, and `errors` for a 5xx. While a
canary is loaded, a sampled share (MVKE_SHADOW_SHARE) of the users the ACTIVE version answered
is also scored by the canary, later, in a background task: both versions rank the user's row
(the same stored + request values) at k = 20 with a plain query, whatever the request asked
(top_k, exclude_tags, min_score would bias the comparison), and the Jaccard of the two top-20
lists (by tag name), the score shift and the canary's seconds are recorded.

The request never waits for any of it: sampling puts the row on a bounded queue
(MVKE_SHADOW_QUEUE; a full queue drops the sample and counts it in mvke_shadow_dropped_total),
the comparison runs in a worker thread (ONNX Runtime and numpy release the GIL) and a failure
of it is logged and counted, never answered. The counters are summed in memory and added to
Redis every MVKE_LIVE_FLUSH_S (`{mvke}:v<id>:live`, mvke/runtime/cycle_record.py) by one
pipeline of HINCRBY / HINCRBYFLOAT, so the hot path makes no Redis write; a failed flush keeps
the counters for the next one. `mvke promote --auto` (model_export/ramp.py) reads them.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict

from mvke.runtime.cycle_record import LiveFigures, TopLists, add_live, compare_top
from mvke.runtime.keys import Keys
from mvke.runtime.model import LoadedModel, Query
from mvke.runtime.redis_client import REDIS_ERRORS
from service.background import cancel_and_wait
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("mvke.service")
SHADOW_K = 20      # the lists compared (the policy's min_shadow_jaccard is about top 20)


class LiveRecorder:
    def __init__(self, redis, keys: Keys, metrics: ServiceMetrics, settings: Settings):
        """`redis`: the service's asyncio client."""
        self.redis, self.keys, self.metrics = redis, keys, metrics
        self.share, self.flush_s = settings.shadow_share, settings.live_flush_s
        self.pending: dict[str, LiveFigures] = defaultdict(LiveFigures)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=settings.shadow_queue)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._shadow_loop()), asyncio.create_task(self._flush_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks = []
        await self.flush()

    # ---- on the request path: counting and sampling only -------------------------------------
    def count(self, version: str, answers: int, errors: int) -> None:
        live = self.pending[version]
        live.answers += answers
        live.errors += errors
        if errors:
            self.metrics.version_errors.labels(version).inc(errors)

    def offer(self, active: LoadedModel, canary: LoadedModel | None, rows: list[dict]) -> None:
        """Sample the active version's answered rows for the canary's shadow (no canary: nothing)."""
        if canary is None or canary is active or not self.share:
            return
        for row in rows:
            if random.random() < self.share:
                try:
                    self.queue.put_nowait((active, canary, row))
                except asyncio.QueueFull:
                    self.metrics.shadow_dropped.inc()

    # ---- background -----------------------------------------------------------------------------
    async def _shadow_loop(self) -> None:
        while True:
            active, canary, row = await self.queue.get()
            try:
                jaccard, shift, seconds = await asyncio.to_thread(shadow_one, active, canary, row)
            except Exception as e:   # noqa: BLE001 (a shadow failure is recorded, never answered)
                self.metrics.shadow_failed.labels(canary.version).inc()
                log.warning("shadow scoring failed", extra={"version": canary.version, "error": repr(e)})
                continue
            live = self.pending[canary.version]
            live.shadow_n += 1
            live.shadow_jaccard_sum += jaccard
            live.shadow_shift_sum += shift
            live.shadow_seconds_sum += seconds
            m = self.metrics
            m.shadow_jaccard.labels(canary.version).observe(jaccard)
            m.shadow_shift.labels(canary.version).observe(shift)
            m.shadow_seconds.labels(canary.version).observe(seconds)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush(self) -> None:
        """Add the counters gathered since the last flush to Redis (kept for the next one on failure)."""
        if not self.pending:
            return
        taken, self.pending = self.pending, defaultdict(LiveFigures)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for version, delta in taken.items():
                    add_live(pipe, self.keys, version, delta)
                await pipe.execute()
        except REDIS_ERRORS as e:
            for version, delta in taken.items():
                self.pending[version].add(delta)
            log.warning("live figures not written (kept for the next flush)", extra={"error": repr(e)})


def top_lists(model: LoadedModel, row: dict) -> tuple[TopLists, float]:
    """The model's top SHADOW_K per task for one raw row, by tag name, and the seconds it took."""
    t0 = time.perf_counter()
    users = model.encode([row])
    if users.errors:
        raise ValueError(f"row not encodable by {model.version}: {users.errors}")
    (answer,) = model.predict(users, [Query(tuple(model.sides), SHADOW_K)])
    seconds = time.perf_counter() - t0
    tags = model.tags
    return {t: ([tags[i] for i in idx], scores) for t, (idx, scores) in answer.tasks.items()}, seconds


def shadow_one(active: LoadedModel, canary: LoadedModel, row: dict) -> tuple[float, float, float]:
    """(Jaccard@20, score shift, canary seconds) of one row (mvke/runtime/cycle_record.compare_top)."""
    mine, _ = top_lists(active, row)
    theirs, seconds = top_lists(canary, row)
    jaccard, shift = compare_top(mine, theirs)
    return jaccard, shift, seconds
