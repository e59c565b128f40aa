"""Dynamic batching: coalesce concurrent requests into one model call.

Requests wait in a queue; one worker takes everything queued (up to
`max_batch_size`), optionally waits `max_wait_ms` for more, and runs the batch
through `Tagger.process`. With `max_wait_ms = 0` a lone request is served at
once and batches form only when requests arrive while the previous batch
runs: no added latency at low load, large batches under high load. The queue
is bounded: beyond `max_queue` requests are shed with a fast 503.

Hot-path notes: the queue is a plain deque plus one wake-up future (no
asyncio.Queue bookkeeping), and a request's timeout is one `call_later` timer
on the event loop rather than an `asyncio.wait_for` task per request.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque

from service.background import cancel_and_wait
from service.metrics import ServiceMetrics
from service.tagger import ServiceError, TagJob, TagResult, Tagger, unavailable

log = logging.getLogger("mvke.service")


class DynamicBatcher:
    def __init__(self, tagger: Tagger, metrics: ServiceMetrics, max_batch_size: int, max_wait_ms: float,
                 max_queue: int, timeout_s: float):
        self.tagger, self.metrics = tagger, metrics
        self.max_batch, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.max_queue, self.timeout = max_queue, timeout_s
        self.queue: deque[TagJob] = deque()
        self._wake: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._shed_full = metrics.shed.labels("queue_full")
        self._shed_timeout = metrics.shed.labels("timeout")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for job in self.queue:  # nobody will serve these any more
            if job.future is not None and not job.future.done():
                job.future.set_result(unavailable("shutting down"))
        self.queue.clear()

    def qsize(self) -> int:
        return len(self.queue)

    def _expire(self, job: TagJob) -> None:
        fut = job.future
        if fut is not None and not fut.done():
            self._shed_timeout.inc()
            fut.set_result(unavailable(f"timed out after {self.timeout:.1f}s in the model queue"))

    async def submit(self, job: TagJob) -> TagResult:
        queue = self.queue
        if len(queue) >= self.max_queue:
            self._shed_full.inc()
            raise unavailable(f"overloaded: {len(queue)} requests queued")
        loop = asyncio.get_running_loop()
        job.future = fut = loop.create_future()
        queue.append(job)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        timer = loop.call_later(self.timeout, self._expire, job)
        try:
            result = await fut
        finally:
            timer.cancel()
        if isinstance(result, ServiceError):
            raise result
        return result

    def _take(self, batch: list[TagJob]) -> None:
        queue, limit = self.queue, self.max_batch
        while queue and len(batch) < limit:
            job = queue.popleft()
            if not job.future.done():  # timed out or its caller went away
                batch.append(job)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
            batch: list[TagJob] = []
            self._take(batch)
            if self.max_wait and len(batch) < self.max_batch:
                await asyncio.sleep(self.max_wait)
                self._take(batch)
            if not batch:
                continue
            try:
                results = await self.tagger.process(batch)
            except Exception as e:  # never let one bad batch kill the worker
                log.exception("batch failed")
                results = [ServiceError(500, f"internal error: {type(e).__name__}")] * len(batch)
            for job, res in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(res)
