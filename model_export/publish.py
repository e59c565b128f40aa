"""Versioned, atomic publishing of bundles to Redis (`mvke publish`, `mvke models`).

A publish:
1. verifies the bundle's files against its manifest (refuses a mismatch);
2. takes the publisher lock (two publishers run one after the other);
3. removes orphans of earlier failed publishes (versions in `{mvke}:stored` that neither
   the version list nor the alias owns);
4. writes the whole version (manifest + every file + its `{mvke}:stored` entry) in ONE
   MULTI/EXEC: Redis applies all of it or none of it, so a dropped connection leaves
   nothing half-written;
5. reads it back and checks every sha256; on a mismatch deletes it and fails;
6. flips `{mvke}:active` with a Lua script that refuses a version whose manifest is
   missing and records the version in `{mvke}:versions`, then trims to the newest N
   (each removal one MULTI: list entry, stored entry and keys together).
Readers resolve the alias, then read one version's immutable keys: they never see a
manifest and arrays of different versions.

Feature store check (before step 2): the bundle's fields, kinds and vocabularies are compared
with the schema the last `mvke features load` recorded (mvke/runtime/store_schema.py); an
incompatible bundle is refused with the differing fields, unless `force` (the report then
carries the mismatch under `feature_store`). With no schema recorded, a warning.

Canary: `publish(..., canary_percent=P)` does steps 1-5 and then, instead of the alias
flip, sets `{mvke}:canary` to `<version>:<P>` with a Lua script (refusing a version without
a manifest or the active one). `promote` flips the alias to the canary and deletes the
canary key in one script; `rollback` with a canary set deletes it (and marks the version
rolled back from). Retention never trims the active version or the canary.

Every key a MULTI or a script touches here carries the hash tag `{mvke}`
(mvke/runtime/keys.py): on a Redis Cluster they share one slot, so each step is as
atomic there as on a single node. `r` may be a `redis.Redis` or a
`redis.cluster.RedisCluster` (mvke.runtime.redis_client.connect).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import redis

from mvke.runtime.contract import MANIFEST_FILE, BundleError, Manifest, read_bundle
from mvke.runtime.keys import Keys, format_canary, parse_canary
from mvke.runtime.redis_client import REDIS_ERRORS
from mvke.runtime.store_schema import compare, mismatch_message, read_store_schema
from mvke.runtime.versions import active_version, read_version

DEFAULT_KEEP = 3

# KEYS: active, versions, manifest of ARGV[1] ; ARGV: version, score ('' keeps the score)
_ACTIVATE = """
if redis.call('EXISTS', KEYS[3]) == 0 then
  return redis.error_reply('version ' .. ARGV[1] .. ' is not fully published')
end
local previous = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
return previous
"""

# KEYS: active, versions, manifest of the target ; ARGV: target, version rolled back from.
# One script: the alias moves back and the version left is marked (negated score) together.
_ROLLBACK = """
if redis.call('EXISTS', KEYS[3]) == 0 then
  return redis.error_reply('version ' .. ARGV[1] .. ' is not in Redis')
end
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return redis.error_reply('the active version changed meanwhile')
end
redis.call('SET', KEYS[1], ARGV[1])
local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]))
if score and score > 0 then
  redis.call('ZADD', KEYS[2], -score, ARGV[2])
end
return ARGV[2]
"""

# KEYS: active, versions, canary, version manifest ; ARGV: version, percent spec, score
_SET_CANARY = """
if redis.call('EXISTS', KEYS[4]) == 0 then
  return redis.error_reply('version ' .. ARGV[1] .. ' is not fully published')
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.error_reply('version ' .. ARGV[1] .. ' is the active version; a canary must be another one')
end
redis.call('SET', KEYS[3], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
return redis.call('GET', KEYS[1])
"""

# KEYS: active, canary ; ARGV: expected canary spec ('' = any). The canary becomes the active version.
_PROMOTE = """
local spec = redis.call('GET', KEYS[2])
if not spec then return redis.error_reply('no canary to promote') end
if ARGV[1] ~= '' and spec ~= ARGV[1] then return redis.error_reply('the canary changed meanwhile') end
local version = string.match(spec, '^(.*):[^:]*$')
local previous = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], version)
redis.call('DEL', KEYS[2])
return {version, previous or ''}
"""

# KEYS: versions, canary ; ARGV: canary spec read under the lock. Drops the canary, marks it rolled back from.
_DROP_CANARY = """
local spec = redis.call('GET', KEYS[2])
if spec ~= ARGV[1] then return redis.error_reply('the canary changed meanwhile') end
local version = string.match(spec, '^(.*):[^:]*$')
redis.call('DEL', KEYS[2])
local score = redis.call('ZSCORE', KEYS[1], version)
if score and tonumber(score) > 0 then redis.call('ZADD', KEYS[1], -tonumber(score), version) end
return version
"""


class PublishError(RuntimeError):
    pass


@contextmanager
def publisher_lock(r: redis.Redis, keys: Keys, ttl_s: float = 120.0, wait_s: float = 60.0) -> Iterator[None]:
    """The publishers' mutex: redis-py's Lock (random token; released by a Lua script only by its holder)."""
    lock = r.lock(keys.lock, timeout=ttl_s, sleep=0.05, blocking_timeout=wait_s)
    if not lock.acquire():
        raise PublishError(f"another publisher holds {keys.lock} (waited {wait_s:.0f}s)")
    try:
        yield
    finally:
        try:
            lock.release()
        except (*REDIS_ERRORS, redis.exceptions.LockError):
            pass  # expired, or Redis is gone: the TTL frees it


def _decode(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _delete_version(r, keys: Keys, version: str) -> int:
    """Drop a version: its keys (named by its manifest), its list and stored entries, in one MULTI."""
    raw = r.get(keys.manifest(version))
    names = list(Manifest.from_json(raw).files) if raw is not None else []
    pipe = r.pipeline(transaction=True)
    pipe.delete(*keys.version_keys(version, names))
    pipe.zrem(keys.versions, version)
    pipe.srem(keys.stored, version)
    return pipe.execute()[0]


def _known_versions(r, keys: Keys) -> set[str]:
    return {_decode(v) for v in r.zrange(keys.versions, 0, -1)}


def collect_orphans(r, keys: Keys) -> list[str]:
    """Delete versions that were written but never listed nor activated (leftovers of failed publishes).

    Only called under the publisher lock, so no publish is in flight. Reads `{mvke}:stored`,
    not the keyspace: no SCAN over a billion user keys.
    """
    known = _known_versions(r, keys)
    for pointer in (active_version(r, keys), canary_of(r, keys)):
        if pointer:
            known.add(pointer if isinstance(pointer, str) else pointer[0])
    orphans = sorted({_decode(v) for v in r.smembers(keys.stored)} - known)
    for v in orphans:
        _delete_version(r, keys, v)
    return orphans


def _trim(r, keys: Keys, keep: int) -> list[str]:
    versions = [_decode(v) for v in r.zrange(keys.versions, 0, -1)]  # oldest first (rolled back from: first)
    active = _decode(r.get(keys.active) or b"")
    canary = (canary_of(r, keys) or ("",))[0]
    removed = []
    for v in versions[: max(0, len(versions) - keep)]:
        if v in (active, canary):
            continue
        _delete_version(r, keys, v)
        removed.append(v)
    return removed


def feature_store_check(r, keys: Keys, manifest: Manifest, force: bool) -> dict:
    """Compare the bundle's features with the store's recorded schema; raise PublishError on a
    mismatch unless `force`. -> the report's `feature_store` entry."""
    store = read_store_schema(r, keys)
    if store is None:
        return {"checked": False, "warning": f"no feature schema recorded at {keys.features_schema}: the feature "
                                             "store was not loaded by `mvke features load` of this release; "
                                             "the bundle's fields were not checked against it"}
    problems = compare(store, manifest.features)
    entry = {"checked": True, "store_fingerprint": store.fingerprint, "compatible": not problems}
    if problems:
        message = mismatch_message(store, manifest.features, problems)
        if not force:
            raise PublishError(f"refused: {message}")
        entry.update(problems=problems, forced=True)
    return entry


def publish(bundle_dir: str | Path, r: redis.Redis, keep: int = DEFAULT_KEEP, keys: Keys | None = None,
            activate: bool = True, canary_percent: float | None = None, force: bool = False) -> dict:
    """Write, verify and activate a bundle; with `canary_percent`, make it the canary instead
    (served to that share of users beside the active version, which stays as it is).
    Refuses a bundle whose features the feature store does not match, unless `force`."""
    keys = keys or Keys()
    if canary_percent is not None:
        if not 0 < canary_percent <= 100:
            raise PublishError(f"canary percent must be in (0, 100], got {canary_percent:g}")
        activate = False
    t0 = time.perf_counter()
    manifest, blobs = read_bundle(bundle_dir, verify=True)   # refuses a bundle that does not match
    manifest_json = Path(bundle_dir, MANIFEST_FILE).read_text()
    v = manifest.version
    store_check = feature_store_check(r, keys, manifest, force)
    with publisher_lock(r, keys):
        orphans = collect_orphans(r, keys)
        already = r.exists(keys.manifest(v)) and v in _known_versions(r, keys)
        if not already:
            pipe = r.pipeline(transaction=True)
            for name, data in blobs.items():
                pipe.set(keys.file(v, name), data)
            pipe.set(keys.manifest(v), manifest_json)
            pipe.sadd(keys.stored, v)
            try:
                pipe.execute()
            except REDIS_ERRORS as e:
                _cleanup_after_failure(r, keys, v)
                raise PublishError(f"writing version {v} failed, nothing activated: {e}") from e
            try:
                read_version(r, keys, v, verify=True)
            except BundleError as e:
                _cleanup_after_failure(r, keys, v)
                raise PublishError(f"read-back of version {v} failed its checksums, deleted: {e}") from e
        previous = None
        if activate:
            previous = r.eval(_ACTIVATE, 3, keys.active, keys.versions, keys.manifest(v), v, repr(time.time()))
            previous = _decode(previous) if previous else None
        elif canary_percent is not None:
            try:
                previous = r.eval(_SET_CANARY, 4, keys.active, keys.versions, keys.canary, keys.manifest(v), v,
                                  format_canary(v, canary_percent), repr(time.time()))
            except redis.ResponseError as e:
                raise PublishError(str(e)) from e
            previous = _decode(previous) if previous else None
        else:
            r.zadd(keys.versions, {v: time.time()})
        removed = _trim(r, keys, keep)
    report = {"version": v, "previous": previous, "reused": bool(already), "removed": removed,
              "orphans_collected": orphans, "publish_seconds": time.perf_counter() - t0,
              "bytes": sum(len(b) for b in blobs.values()), "feature_store": store_check}
    warnings = [store_check["warning"]] if "warning" in store_check else []
    if store_check.get("forced"):
        warnings.append("published with --force although its features do not match the feature store: "
                        + "; ".join(store_check["problems"]))
    if warnings:
        report["warnings"] = warnings
    if canary_percent is not None:
        report.update(canary_percent=canary_percent, active=previous, previous=None)
    return report


def _cleanup_after_failure(r: redis.Redis, keys: Keys, version: str) -> None:
    """Best effort; if Redis is gone, the next publish collects the orphans."""
    try:
        # A refused MULTI wrote nothing (not in `stored`): no MULTI needed then, which matters
        # when Redis is out of memory (it refuses every MULTI until memory is freed).
        if r.sismember(keys.stored, version) and version not in _known_versions(r, keys):
            _delete_version(r, keys, version)
    except REDIS_ERRORS:
        pass


def canary_of(r: redis.Redis, keys: Keys) -> tuple[str, float] | None:
    raw = r.get(keys.canary)
    return parse_canary(_decode(raw)) if raw else None


def set_canary_percent(r: redis.Redis, percent: float, keys: Keys | None = None) -> dict:
    """Change the share of users the current canary serves (1% -> 10% -> 50% ...)."""
    keys = keys or Keys()
    with publisher_lock(r, keys):
        current = canary_of(r, keys)
        if current is None:
            raise PublishError("no canary: publish one with `mvke publish BUNDLE --canary PERCENT`")
        version = current[0]
        try:
            r.eval(_SET_CANARY, 4, keys.active, keys.versions, keys.canary, keys.manifest(version), version,
                   format_canary(version, percent), "")
        except redis.ResponseError as e:
            raise PublishError(str(e)) from e
    return {"canary": version, "percent": percent, "previous_percent": current[1]}


def promote(r: redis.Redis, keys: Keys | None = None) -> dict:
    """The canary becomes the active version (alias flip and canary removal in one script)."""
    keys = keys or Keys()
    with publisher_lock(r, keys):
        try:
            version, previous = r.eval(_PROMOTE, 2, keys.active, keys.canary, "")
        except redis.ResponseError as e:
            raise PublishError(str(e)) from e
    return {"active": _decode(version), "previous": _decode(previous) or None}


def rollback(r: redis.Redis, keys: Keys | None = None) -> dict:
    """With a canary: drop it (the active version keeps serving everyone; the canary is marked
    rolled back from). Without one: re-activate the newest version published before the active one.

    The version rolled back from is marked in `{mvke}:versions` by negating its score
    (-publish time): a rollback never re-activates a marked version (a second rollback
    goes further back instead of toggling to the bad one), and marked versions sort
    first, so retention drops them first. Publishing a marked version again unmarks it.
    """
    keys = keys or Keys()
    with publisher_lock(r, keys):
        spec = r.get(keys.canary)
        if spec:
            try:
                dropped = r.eval(_DROP_CANARY, 2, keys.versions, keys.canary, spec)
            except redis.ResponseError as e:
                raise PublishError(str(e)) from e
            return {"active": active_version(r, keys), "canary_dropped": _decode(dropped)}
        scores = {_decode(v): s for v, s in r.zrange(keys.versions, 0, -1, withscores=True)}
        active = _decode(r.get(keys.active) or b"")
        if active not in scores:
            raise PublishError("no active version to roll back from")
        candidates = sorted((s, v) for v, s in scores.items() if s >= 0 and s < scores[active])
        if not candidates:
            raise PublishError(f"{active} is the oldest kept version not rolled back from: nothing to roll back to")
        target = candidates[-1][1]
        # one script: the alias moves back and the version left is marked, together
        r.eval(_ROLLBACK, 3, keys.active, keys.versions, keys.manifest(target), target, active)
    return {"active": target, "previous": active}


__all__ = ["publish", "rollback", "promote", "set_canary_percent", "canary_of",
           "collect_orphans", "publisher_lock", "PublishError", "DEFAULT_KEEP"]
