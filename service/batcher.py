"""Dynamic batching: coalesce concurrent requests into one model call.

Requests wait in a queue; one worker takes everything queued (up to
`max_batch_size`), optionally waits `max_wait_ms` for more, and runs the batch
through `Tagger.process`. With `max_wait_ms = 0` a lone request is served at
once and batches form only when requests arrive while the previous batch
runs: no added latency at low load, large batches under high load. The queue
is bounded: beyond `max_queue` requests are shed with a fast 503.

Idle bypass (MVKE_IDLE_BYPASS, with max_wait_ms = 0): a request that finds no
other request anywhere in the batcher (none queued, none in the model, none
whose answer is on its way back) runs its batch of one itself, in its own
task, instead of handing it to the worker and waiting to be handed the result
back (two event loop hops a lone request gains nothing from). While it runs it
counts as the batch in flight: requests arriving meanwhile queue up and the
worker takes them together when it ends, as before. After IDLE_STREAK such requests in a row (none
queued between, and none while another worker of the service had a request: BusyBoard), its model
call is `rank(idle=True)`: the fused graph on the idle session's threads (MVKE_ORT_IDLE_THREADS).
"None on its way back"
matters under load: when a batch's answers are delivered, the first caller to
come back with its next request would otherwise find the batcher idle and run
alone while the others queue behind it (measured: 27% fewer requests/s at
c=32 in process, scripts/c1_inprocess.py). It is bounded by the same request
timeout, kept by a watchdog that wakes every timeout/4 (a per-request timer,
`asyncio.timeout`, measured 10-25 us per request on the loaded 2-core box).

Hot-path notes: the queue is a plain deque plus one wake-up future (no
asyncio.Queue bookkeeping), and a request's timeout is one `call_later` timer
on the event loop rather than an `asyncio.wait_for` task per request.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque

from service.background import cancel_and_wait
from service.busy_board import BusyBoard
from service.metrics import ServiceMetrics
from service.settings import idle_bypass_runs
from service.tagger import ServiceError, TagJob, TagResult, Tagger, unavailable

log = logging.getLogger("mvke.service")

# A lone request's model call takes the idle threads (`LoadedModel.rank(idle=True)`) only when this
# many requests in a row found the batcher idle and no other worker busy (service/busy_board.py). At
# c=32 one of two workers often holds a single request while the other is busy; its second thread then
# took the busy worker's core (the idle threads' CPU at c=32: 0.04-0.46 s per 5 s and worker, none with
# the streak; c=1 reaches it at once).
IDLE_STREAK = 16


class DynamicBatcher:
    def __init__(self, tagger: Tagger, metrics: ServiceMetrics, max_batch_size: int, max_wait_ms: float,
                 max_queue: int, timeout_s: float, idle_bypass: bool = True, board: BusyBoard | None = None):
        self.tagger, self.metrics = tagger, metrics
        self.max_batch, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.max_queue, self.timeout = max_queue, timeout_s
        self.queue: deque[TagJob] = deque()
        self._wake: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._running = False   # a batch (the worker's or an inline one) is in the model
        self._inflight = 0      # submit() calls not yet returned (queued, in the model, or answered but not resumed)
        self._inline_ok = idle_bypass_runs(idle_bypass, max_wait_ms)
        self._alone = 0         # requests in a row that found the batcher idle (reset by one that queued)
        self._board = board     # the other workers' requests in flight (None: this process alone)
        self._inline_task: asyncio.Task | None = None   # the request running inline, and since when
        self._inline_since = 0.0
        self._inline_expired: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._shed_full = metrics.shed.labels("queue_full")
        self._shed_timeout = metrics.shed.labels("timeout")
        self._idle_calls = metrics.idle_calls

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batcher")
        if self._inline_ok:
            self._watchdog = asyncio.create_task(self._watch_inline(), name="batcher-watchdog")

    async def stop(self) -> None:
        await cancel_and_wait(self._watchdog)
        await cancel_and_wait(self._task)
        if self._board is not None:
            self._board.close()
            self._board = None
        for job in self.queue:  # nobody will serve these any more
            if job.future is not None and not job.future.done():
                job.future.set_result(unavailable("shutting down"))
        self.queue.clear()

    def _expire(self, job: TagJob) -> None:
        fut = job.future
        if fut is not None and not fut.done():
            self._shed_timeout.inc()
            fut.set_result(unavailable(f"timed out after {self.timeout:.1f}s in the model queue"))

    def _count_inflight(self, change: int) -> None:
        self._inflight += change
        if self._board is not None:
            self._board.set_inflight(self._inflight)

    async def submit(self, job: TagJob) -> TagResult:
        self._count_inflight(1)
        try:
            if self._inflight == 1 and not self.queue and not self._running and self._inline_ok:
                # lone only while no other worker of this service has a request either (BusyBoard)
                board = self._board
                self._alone = self._alone + 1 if board is None or board.others_idle() else 0
                return await self._inline(job)
            self._alone = 0
            return await self._queued(job)
        finally:
            self._count_inflight(-1)

    async def submit_many(self, jobs: list[TagJob]) -> list[TagResult | ServiceError]:
        """Requests that arrived together (the rows of one OIP request, the gRPC calls the gRPC thread
        hands over at once) -> per job its result or its error, not raised.

        They enter the queue in one step, so the worker takes them as one batch; submit() per job
        would run the first alone through the idle bypass and queue the rest behind it."""
        if len(jobs) == 1:
            try:
                return [await self.submit(jobs[0])]
            except ServiceError as e:
                return [e]
        if len(self.queue) + len(jobs) > self.max_queue:
            self._shed_full.inc(len(jobs))
            return [unavailable(f"overloaded: {len(self.queue)} requests queued")] * len(jobs)
        loop = asyncio.get_running_loop()
        all_done, left = loop.create_future(), [len(jobs)]

        def one_done(_: asyncio.Future) -> None:
            left[0] -= 1
            if not left[0] and not all_done.done():
                all_done.set_result(None)
        for job in jobs:
            job.future = loop.create_future()
            job.future.add_done_callback(one_done)
        self.queue.extend(jobs)
        self._count_inflight(len(jobs))
        self._wake_worker()
        timer = loop.call_later(self.timeout, lambda: [self._expire(job) for job in jobs])
        try:
            await all_done
        finally:
            timer.cancel()
            self._count_inflight(-len(jobs))
            for job in jobs:        # the caller went away: the worker skips what is still queued
                job.future.cancel()
        return [job.future.result() for job in jobs]

    async def _queued(self, job: TagJob) -> TagResult:
        queue = self.queue
        if len(queue) >= self.max_queue:
            self._shed_full.inc()
            raise unavailable(f"overloaded: {len(queue)} requests queued")
        loop = asyncio.get_running_loop()
        job.future = fut = loop.create_future()
        queue.append(job)
        self._wake_worker()
        timer = loop.call_later(self.timeout, self._expire, job)
        try:
            result = await fut
        finally:
            timer.cancel()
        if isinstance(result, ServiceError):
            raise result
        return result

    async def _inline(self, job: TagJob) -> TagResult:
        """The idle bypass: this request's batch of one, run in its own task."""
        self._running = True
        task = self._inline_task = asyncio.current_task()
        self._inline_since = asyncio.get_running_loop().time()
        try:
            idle = self._alone >= IDLE_STREAK
            if idle:
                self._idle_calls.inc()
            (result,) = await self._process([job], idle=idle)
        except asyncio.CancelledError:
            if self._inline_expired is not task:
                raise               # the caller went away
            task.uncancel()         # cancelled by the watchdog: a timeout, answered as such
            self._shed_timeout.inc()
            raise unavailable(f"timed out after {self.timeout:.1f}s in the model") from None
        finally:
            self._inline_task = self._inline_expired = None
            self._running = False
            if self.queue:  # requests that arrived meanwhile: the worker's turn
                self._wake_worker()
        if isinstance(result, ServiceError):
            raise result
        return result

    async def _watch_inline(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.timeout / 4)
            task = self._inline_task
            if task is not None and self._inline_expired is None and loop.time() - self._inline_since > self.timeout:
                self._inline_expired = task
                task.cancel()

    def _wake_worker(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _process(self, batch: list[TagJob], idle: bool = False) -> list:
        try:
            return await self.tagger.process(batch, idle)
        except Exception as e:  # never let one bad batch kill the worker
            log.exception("batch failed")
            return [ServiceError(500, f"internal error: {type(e).__name__}")] * len(batch)

    def _take(self, batch: list[TagJob]) -> None:
        queue, limit = self.queue, self.max_batch
        while queue and len(batch) < limit:
            job = queue.popleft()
            if not job.future.done():  # timed out or its caller went away
                batch.append(job)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue or self._running:   # nothing to do, or an inline batch is in the model
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
                continue
            self._running = True
            try:
                batch: list[TagJob] = []
                self._take(batch)
                if self.max_wait and len(batch) < self.max_batch:
                    await asyncio.sleep(self.max_wait)
                    self._take(batch)
                if not batch:
                    continue
                results = await self._process(batch)
            finally:
                self._running = False
            for job, res in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(res)
