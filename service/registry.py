"""Which model version serves, and hot swapping to a new one.

A background task polls the alias `mvke:active`. When it names another
version, that version is read (one MULTI: a consistent snapshot), its sha256s
verified, its ONNX session built and warmed in a worker thread, and only then
the reference swapped. In-flight requests keep the model they started with;
nothing is unloaded before its successor is ready.
"""
from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from model_export.contract import BundleError, Keys, Manifest, verify_files
from service.background import cancel_and_wait
from service.metrics import ServiceMetrics
from service.model_loader import LoadedModel, build_model
from service.settings import Settings

log = logging.getLogger("mvke.service")


class ModelRegistry:
    def __init__(self, settings: Settings, redis: aioredis.Redis, metrics: ServiceMetrics):
        self.settings, self.redis, self.metrics = settings, redis, metrics
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
            active = await self.redis.get(self.keys.active)
        except RedisError as e:
            if self.current is None:
                self.last_error = f"redis unavailable: {e}"
            return
        if active is None:
            if self.current is None:
                self.last_error = "no model published (mvke:active is not set)"
            return
        version = active.decode() if isinstance(active, bytes) else active
        if self.current is not None and self.current.version == version:
            return
        if version == self._failed_version:
            return  # do not rebuild a broken version every poll; a new publish clears this
        t0 = time.perf_counter()
        try:
            model = await self._load(version)
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

    async def _load(self, version: str) -> LoadedModel:
        raw = await self.redis.get(self.keys.manifest(version))
        if raw is None:
            raise BundleError(f"manifest of {version} missing")
        manifest = Manifest.from_json(raw)
        names = list(manifest.files)
        async with self.redis.pipeline(transaction=True) as pipe:
            for name in names:
                pipe.get(self.keys.file(version, name))
            values = await pipe.execute()
        blobs = {n: v for n, v in zip(names, values) if v is not None}
        verify_files(manifest, blobs)
        s = self.settings
        return await asyncio.to_thread(build_model, manifest, blobs, s.ort_provider, s.ort_threads())
