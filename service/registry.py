"""Which model versions serve, and hot swapping to new ones.

A background task polls the alias `{mvke}:active`, the canary setting `{mvke}:canary`
(`<version>:<percent>`, written by `mvke publish --canary`; `MVKE_CANARY` overrides it)
and the list of published versions, in one round trip. When the active or canary
version changes, that version is read (one MULTI: a consistent snapshot), its sha256s
verified, its ONNX session built and warmed, and only then the reference swapped.
In-flight requests keep the model they started with; nothing is unloaded before its
successor is ready. A version that fails to load (a Redis timeout while its files are read,
a file missing, a bad checksum, an ONNX Runtime error) is tried again after
MVKE_MODEL_RETRY_S (1 s), the wait doubling per failure up to MVKE_MODEL_RETRY_MAX_S (60 s),
for as long as it stays the active or canary version: a passing failure heals by itself, a
broken bundle costs one attempt a minute, not one per poll; /readyz names the error.
Polling, reading and building use synchronous redis-py (the runtime's reader,
mvke/runtime/versions.py, the one batch tagging uses) in a worker thread, so the event
loop never waits on them.

Feature store check (issue 28): when a version is loaded, its manifest features are compared
with the schema the last `mvke features load` recorded (mvke/runtime/store_schema.py). A
mismatched ACTIVE version is still served (refusing it would leave nothing to answer with;
`mvke publish` refused it unless --force), and /readyz names the mismatch under
`schema_mismatch`, the log says it as an error. A mismatched CANARY is not loaded and not
served: its users stay on the active version, /readyz names it under `load_errors.canary`,
and it is tried again with the load backoff (reload the store or drop the canary).

Routing (`route`): a pinned `model_version` is served when it is loaded (404 when it is
not published, 409 when published but not loaded); otherwise a user whose id hashes
below the canary percentage gets the canary, everyone else the active version. The hash
(crc32 of the user id) is fixed, so a user stays on the canary while its share grows.
"""
from __future__ import annotations

import asyncio
import logging
import time
import zlib
from dataclasses import dataclass

from mvke.runtime.contract import BundleError
from mvke.runtime.keys import Keys, parse_canary
from mvke.runtime.redis_client import REDIS_ERRORS
from mvke.runtime.model import LoadedModel, build_model
from mvke.runtime.store_schema import StoreSchema, check_model, read_store_schema
from mvke.runtime.versions import read_version
from service.background import cancel_and_wait
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("mvke.service")

HASH_BUCKETS = 10_000   # canary shares in steps of 0.01%
CANARY_REFUSED = "not served as the canary"   # a canary the feature store does not match (its load error says so)


def user_bucket(user_id: str) -> int:
    """A user's fixed place in [0, HASH_BUCKETS): the canary serves buckets below percent * 100."""
    return zlib.crc32(user_id.encode("utf-8", "surrogatepass")) % HASH_BUCKETS


@dataclass(frozen=True)
class Canary:
    version: str
    percent: float
    source: str            # "redis" or "env"


class SchemaMismatch(ValueError):
    """A canary whose features the feature store does not match: not loaded, not served."""


class RoutingError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ModelRegistry:
    def __init__(self, settings: Settings, r, metrics: ServiceMetrics, bundle_redis=None):
        """`r`: a sync client of mvke.runtime.redis_client (one node or a cluster; model keys share one slot);
        `bundle_redis`: the client that reads a version's files (default `r`; the service's has a longer
        socket timeout: MVKE_MODEL_READ_TIMEOUT_S)."""
        self.settings, self.redis, self.metrics = settings, r, metrics
        self.bundle_redis = bundle_redis if bundle_redis is not None else r
        self.keys = Keys(settings.key_prefix)
        self.current: LoadedModel | None = None        # the active version
        self.canary: LoadedModel | None = None         # loaded canary version (None: no canary)
        self.canary_setting: Canary | None = None      # what Redis / MVKE_CANARY ask for
        self._canary_cut = 0                           # buckets below this go to the canary
        self.published: frozenset[str] = frozenset()
        self.last_error: str | None = "no model loaded yet"
        self._retry: dict[str, _Retry] = {}             # version -> its failed loads (backoff)
        self.schema_mismatch: dict[str, str] = {}       # loaded version -> why the feature store does not match it
        self.store: StoreSchema | None = None           # the feature store's schema, read when a version loads
        self._task: asyncio.Task | None = None
        self._env_canary = Canary(*parse_canary(settings.canary), "env") if settings.canary else None

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

    # ---- routing (hot path: no I/O) ----------------------------------------------------
    def route(self, user_id: str, pinned: str | None = None) -> LoadedModel | None:
        """The model that answers this user (None: nothing loaded). Raises RoutingError for a bad pin."""
        if pinned is None:
            canary = self.canary
            if canary is not None and user_bucket(user_id) < self._canary_cut:
                return canary
            return self.current
        for m in (self.current, self.canary):
            if m is not None and m.version == pinned:
                return m
        if pinned in self.published:
            loaded = [f"{m.version} ({role})" for m, role in ((self.current, "active"), (self.canary, "canary"))
                      if m is not None]
            raise RoutingError(409, f"model_version: {pinned} is published but not loaded by this service "
                                    f"(loaded: {', '.join(loaded) or 'none'}); activate it or make it the canary")
        raise RoutingError(404, f"model_version: {pinned} is not a published version (see GET /models)")

    def loaded(self) -> dict[str, LoadedModel]:
        return {m.version: m for m in (self.current, self.canary) if m is not None}

    # ---- polling -------------------------------------------------------------------------
    async def refresh(self) -> None:
        keys = self.keys
        try:
            active, canary_raw, versions = await asyncio.to_thread(self._pointers)
        except REDIS_ERRORS as e:
            self._pointers_error = f"redis unavailable: {e}"
            if self.current is None:
                self.last_error = self._pointers_error
            return
        self._pointers_error = None
        self.published = frozenset(_text(v) for v in versions)
        want_canary = self._env_canary or _redis_canary(canary_raw)
        wanted = {_text(active) if active is not None else None, want_canary.version if want_canary else None}
        for version in [v for v in self._retry if v not in wanted]:
            del self._retry[version]    # no longer asked for: asked again later, it is tried at once
        if active is None:
            if self.current is None:
                self.last_error = f"no model published ({keys.active} is not set)"
        else:
            version = self._wanted_active = _text(active)
            if self.current is None or self.current.version != version:
                model = await self._try_load(version, "active")
                if model is not None:
                    self._swap_active(model)
        await self._refresh_canary(want_canary)
        self._report_health()

    def _report_health(self) -> None:
        """The load and schema gauges (alert on them: docs/DEPLOY.md) from what this poll found."""
        failing, mismatched = self.load_errors(), self.schema_mismatches()
        for role in ("active", "canary"):
            refused = role in failing and CANARY_REFUSED in failing[role]
            self.metrics.load_failing.labels(role).set(int(role in failing and not refused))
            self.metrics.schema_mismatch.labels(role).set(int(role in mismatched or refused))

    async def _refresh_canary(self, want: Canary | None) -> None:
        self.canary_setting = want
        if want is None or (self.current is not None and want.version == self.current.version):
            self._set_canary(None, 0)
            return
        model = self.canary if self.canary is not None and self.canary.version == want.version else None
        if model is None:
            model = await self._try_load(want.version, "canary")
            if model is None:   # /readyz names the error (load_errors) until a retry succeeds
                self._set_canary(None, 0)
                return
        self._set_canary(model, round(want.percent * HASH_BUCKETS / 100))

    def _set_canary(self, model: LoadedModel | None, cut: int) -> None:
        old = self.canary
        self._canary_cut = cut        # set before the model so no user sees the canary at a stale share
        self.canary = model
        if model is not None and (old is None or old.version != model.version):
            log.info("canary loaded", extra={"version": model.version, "percent": cut * 100 / HASH_BUCKETS})
        self._publish_info()

    def _swap_active(self, model: LoadedModel) -> None:
        old = self.current
        self.current = model  # the swap: one reference assignment
        self.last_error = None
        self.metrics.model_swaps.inc()
        self._publish_info()
        log.info("model loaded", extra={"version": model.version, "model": model.manifest.model,
                                         "provider": model.provider, "previous": old.version if old else None})

    def _publish_info(self) -> None:
        self.metrics.set_models([(m, "active") for m in [self.current] if m is not None]
                                + [(m, "canary") for m in [self.canary] if m is not None])

    async def _try_load(self, version: str, role: str) -> LoadedModel | None:
        retry = self._retry.get(version)
        if retry is not None and time.monotonic() < retry.next_at:
            return None   # failed before: wait out its backoff (a broken bundle must not hot-loop)
        t0 = time.perf_counter()
        try:
            model = await self._load(version, role)
        except Exception as e:   # noqa: BLE001 - any failure to build a version is that version's, not the poller's
            # Redis failing to hand the files over (a timeout on a large bundle, a MULTI refused above
            # maxmemory, a file not written yet) passes; a bad checksum or an ONNX error does not until
            # the version is published again: both are retried with backoff while the version is wanted.
            s = self.settings
            attempts = 1 if retry is None else retry.attempts + 1
            delay = min(s.model_retry_s * 2 ** (attempts - 1), s.model_retry_max_s)
            error = f"cannot load {role} version {version}: {_describe(e)}"
            self._retry[version] = _Retry(attempts, time.monotonic() + delay, error)
            self._last_load_error = self._retry_message(version)
            if self.current is None or role == "active":
                self.last_error = self._last_load_error
            log.error(self._last_load_error)   # once per attempt: at most once per backoff interval
            return None
        self._retry.pop(version, None)
        log.info("version built", extra={"version": version, "role": role,
                                          "attempts": 1 + (retry.attempts if retry else 0),
                                          "load_seconds": round(time.perf_counter() - t0, 3)})
        return model

    _last_load_error: str | None = None
    _wanted_active: str | None = None
    _pointers_error: str | None = None

    def not_ready_reason(self) -> str:
        """Why nothing serves (for /readyz while no version is loaded): Redis not answering the poll, else the
        active version's load error with its next attempt, else what the last poll found."""
        return self._pointers_error or self.load_errors().get("active") or self.last_error or "no model loaded"

    def load_errors(self) -> dict[str, str]:
        """role -> why its wanted version is not loaded (the active alias or canary naming a version that
        failed to load and waits for its next attempt); empty when everything asked for is loaded."""
        out = {}
        for role, want, have in (("active", self._wanted_active, self.current),
                                 ("canary", self.canary_setting.version if self.canary_setting else None, self.canary)):
            message = self._retry_message(want) if want is not None else None
            if message is not None and (have is None or have.version != want):
                out[role] = message
        return out

    def _retry_message(self, version: str) -> str | None:
        retry = self._retry.get(version)
        if retry is None:
            return None
        return f"{retry.error} (attempt {retry.attempts}; next in {max(0.0, retry.next_at - time.monotonic()):.1f} s)"

    def _pointers(self) -> list:
        """(active, canary setting, published versions) in one round trip."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.active)
        pipe.get(keys.canary)
        pipe.zrange(keys.versions, 0, -1)
        return pipe.execute()

    async def _load(self, version: str, role: str = "active") -> LoadedModel:
        return await asyncio.to_thread(self._build, version, role)

    def _build(self, version: str, role: str = "active") -> LoadedModel:
        manifest, blobs = read_version(self.bundle_redis, self.keys, version)
        self.store = read_store_schema(self.redis, self.keys)
        mismatch = check_model(self.store, manifest.features)
        if mismatch and role == "canary":
            raise SchemaMismatch(f"{CANARY_REFUSED}: {mismatch}")
        s = self.settings
        model = build_model(manifest, blobs, s.ort_provider, s.ort_threads(), ann_mode=s.ann,
                            ann_min_tags=s.ann_min_tags, scoring=s.scoring, search_threads=s.blas_threads,
                            idle_threads=s.ort_idle_thread_count(), idle_spin_us=s.ort_idle_spin_us)
        if mismatch:
            log.error("serving version %s although %s", version, mismatch)
            self.schema_mismatch[version] = mismatch
        else:
            self.schema_mismatch.pop(version, None)
        return model

    @property
    def example_user(self) -> str | None:
        """A user of the feature store (recorded by the last `mvke features load`), for /docs and /ui examples."""
        return self.store.example_user or None if self.store is not None else None

    def schema_mismatches(self) -> dict[str, str]:
        """role -> why the feature store does not match the loaded version of that role (for /readyz)."""
        return {role: self.schema_mismatch[m.version] for m, role in ((self.current, "active"), (self.canary, "canary"))
                if m is not None and m.version in self.schema_mismatch}


@dataclass(frozen=True)
class _Retry:
    attempts: int       # failed loads in a row
    next_at: float      # time.monotonic() of the next attempt
    error: str


def _describe(e: Exception) -> str:
    """A load error for /readyz and the log: Redis and bundle errors say it themselves; others get their type."""
    if isinstance(e, (*REDIS_ERRORS, BundleError, ValueError, KeyError)):
        return str(e) or type(e).__name__
    return f"{type(e).__name__}: {e}"


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _redis_canary(raw: bytes | str | None) -> Canary | None:
    if raw is None:
        return None
    try:
        version, percent = parse_canary(_text(raw))
    except ValueError as e:
        log.error("ignoring the canary setting in Redis: %s", e)
        return None
    return Canary(version, percent, "redis")
