"""Dynamic batching: coalesce concurrent requests into one model call.

Requests wait in a queue; one worker takes everything queued (up to
`max_batch_size`), optionally waits `max_wait_ms` for more, and runs the batch
through `Tagger.process`. With `max_wait_ms = 0` a lone request is served at
once and batches form only when requests arrive while the previous batch
runs: no added latency at low load, large batches under high load. The queue
is bounded: beyond `max_queue` requests are shed with a fast 503.
"""
from __future__ import annotations

import asyncio
import logging

from service.metrics import ServiceMetrics
from service.tagger import ServiceError, TagJob, TagResult, Tagger, unavailable

log = logging.getLogger("mvke.service")


class DynamicBatcher:
    def __init__(self, tagger: Tagger, metrics: ServiceMetrics, max_batch_size: int, max_wait_ms: float,
                 max_queue: int, timeout_s: float):
        self.tagger, self.metrics = tagger, metrics
        self.max_batch, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.max_queue, self.timeout = max_queue, timeout_s
        self.queue: asyncio.Queue[TagJob] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, job: TagJob) -> TagResult:
        if self.queue.qsize() >= self.max_queue:
            self.metrics.shed.labels("queue_full").inc()
            raise unavailable(f"overloaded: {self.queue.qsize()} requests queued")
        job.future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(job)
        try:
            result = await asyncio.wait_for(asyncio.shield(job.future), self.timeout)
        except asyncio.TimeoutError:
            self.metrics.shed.labels("timeout").inc()
            raise unavailable(f"timed out after {self.timeout:.1f}s in the model queue")
        if isinstance(result, ServiceError):
            raise result
        return result

    def _drain(self, batch: list[TagJob]) -> None:
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            self._drain(batch)
            if self.max_wait and len(batch) < self.max_batch:
                await asyncio.sleep(self.max_wait)
                self._drain(batch)
            batch = [j for j in batch if not j.future.done()]  # timed-out callers are gone
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
