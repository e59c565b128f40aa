"""Which model version serves, and hot swapping to a new one.

A background task polls the alias `mvke:active`. When it names another
version, that version is read (one MULTI: a consistent snapshot), its sha256s
verified, its ONNX session built and warmed, and only then the reference
swapped. In-flight requests keep the model they started with; nothing is
unloaded before its successor is ready. Reading and building use the runtime's
synchronous reader (mvke/runtime/versions.py, the one batch tagging uses) in a
worker thread, so the event loop never waits on them.
"""
from __future__ import annotations

import asyncio
import logging
import time

import redis
from redis.exceptions import RedisError

from mvke.runtime.contract import BundleError
from mvke.runtime.keys import Keys
from mvke.runtime.model import LoadedModel, build_model
from mvke.runtime.versions import active_version, read_version
from service.background import cancel_and_wait
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("mvke.service")


class ModelRegistry:
    def __init__(self, settings: Settings, r: redis.Redis, metrics: ServiceMetrics):
        self.settings, self.redis, self.metrics = settings, r, metrics
        self.keys = Keys(settings.key_prefix)
        self.current: LoadedModel | None = None
        self.last_error: str | None = "no model loaded yet"
        self._failed_version: str | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._poll(), name="model-poller")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            try:
                await self.refresh()
            except Exception:  # the poller must survive anything
                log.exception("model refresh failed")

    async def refresh(self) -> None:
        try:
            version = await asyncio.to_thread(active_version, self.redis, self.keys)
        except RedisError as e:
            if self.current is None:
                self.last_error = f"redis unavailable: {e}"
            return
        if version is None:
            if self.current is None:
                self.last_error = "no model published (mvke:active is not set)"
            return
        if self.current is not None and self.current.version == version:
            return
        if version == self._failed_version:
            return  # do not rebuild a broken version every poll; a new publish clears this
        t0 = time.perf_counter()
        try:
            model = await asyncio.to_thread(self._load, version)
        except (RedisError, BundleError, ValueError, KeyError) as e:
            self._failed_version = version
            self.last_error = f"cannot load version {version}: {e}"
            log.error(self.last_error)
            return
        old = self.current
        self.current = model  # the swap: one reference assignment
        self._failed_version = None
        self.last_error = None
        self.metrics.set_model(model.version, model.manifest.model, model.provider)
        self.metrics.model_swaps.inc()
        log.info("model loaded", extra={"version": version, "model": model.manifest.model,
                                         "provider": model.provider, "previous": old.version if old else None,
                                         "load_seconds": round(time.perf_counter() - t0, 3)})

    def _load(self, version: str) -> LoadedModel:
        manifest, blobs = read_version(self.redis, self.keys, version)
        return build_model(manifest, blobs, self.settings.ort_provider, self.settings.ort_threads())
