"""Versioned, atomic publishing of bundles to Redis (`mvke publish`, `mvke models`).

A publish:
1. verifies the bundle's files against its manifest (refuses a mismatch);
2. takes the publisher lock (two publishers run one after the other);
3. removes orphans of earlier failed publishes (version keys no version list knows);
4. writes the whole version (manifest + every file) in ONE MULTI/EXEC: Redis
   applies all of it or none of it, so a dropped connection leaves nothing half-written;
5. reads it back and checks every sha256; on a mismatch deletes it and fails;
6. flips `mvke:active` with a Lua script that refuses a version whose manifest
   is missing, records the version in `mvke:versions`, and trims to the newest N.
Readers resolve the alias, then read one version's immutable keys: they never
see a manifest and arrays of different versions.

Canary: `publish(..., canary_percent=P)` does steps 1-5 and then, instead of the alias
flip, sets `mvke:canary` to `<version>:<P>` with a Lua script (refusing a version without
a manifest or the active one). `promote` flips the alias to the canary and deletes the
canary key in one script; `rollback` with a canary set deletes it (and marks the version
rolled back from). Retention never trims the active version or the canary.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import redis

from mvke.runtime.contract import MANIFEST_FILE, BundleError, Manifest, read_bundle
from mvke.runtime.keys import Keys, format_canary, parse_canary
from mvke.runtime.versions import active_version, read_version

DEFAULT_KEEP = 3

# KEYS: active, versions, new manifest ; ARGV: version, score, keep, version key prefix root
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


@dataclass
class VersionInfo:
    version: str
    model: str
    created_at: str
    published_at: float
    bytes: int
    active: bool
    rolled_back: bool = False     # rolled back from: a rollback never re-activates it
    canary_percent: float | None = None   # the canary, serving this share of users


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
        except redis.RedisError:
            pass  # expired, or Redis is gone: the TTL frees it


def _version_keys(r: redis.Redis, keys: Keys, version: str) -> list[str]:
    return [k.decode() if isinstance(k, bytes) else k
            for k in r.scan_iter(match=f"{keys.version_prefix(version)}:*", count=500)]


def _delete_version(r: redis.Redis, keys: Keys, version: str) -> int:
    found = _version_keys(r, keys, version)
    return r.delete(*found) if found else 0


def _known_versions(r: redis.Redis, keys: Keys) -> set[str]:
    return {v.decode() for v in r.zrange(keys.versions, 0, -1)}


def collect_orphans(r: redis.Redis, keys: Keys) -> list[str]:
    """Delete version keys that no version list entry owns (leftovers of failed publishes).

    Only called under the publisher lock, so no publish is in flight.
    """
    known = _known_versions(r, keys)
    for pointer in (active_version(r, keys), canary_of(r, keys)):
        if pointer:
            known.add(pointer if isinstance(pointer, str) else pointer[0])
    orphans = set()
    for k in r.scan_iter(match=keys.version_pattern(), count=500):
        version = keys.version_of(k.decode())
        if version not in known:
            orphans.add(version)
    for v in orphans:
        _delete_version(r, keys, v)
    return sorted(orphans)


def _trim(r: redis.Redis, keys: Keys, keep: int) -> list[str]:
    versions = [v.decode() for v in r.zrange(keys.versions, 0, -1)]  # oldest first
    active = (r.get(keys.active) or b"").decode()
    canary = (canary_of(r, keys) or ("",))[0]
    removed = []
    for v in versions[: max(0, len(versions) - keep)]:
        if v in (active, canary):
            continue
        r.zrem(keys.versions, v)
        _delete_version(r, keys, v)
        removed.append(v)
    return removed


def publish(bundle_dir: str | Path, r: redis.Redis, keep: int = DEFAULT_KEEP, keys: Keys | None = None,
            activate: bool = True, canary_percent: float | None = None) -> dict:
    """Write, verify and activate a bundle; with `canary_percent`, make it the canary instead
    (served to that share of users beside the active version, which stays as it is)."""
    keys = keys or Keys()
    if canary_percent is not None:
        if not 0 < canary_percent <= 100:
            raise PublishError(f"canary percent must be in (0, 100], got {canary_percent:g}")
        activate = False
    t0 = time.perf_counter()
    manifest, blobs = read_bundle(bundle_dir, verify=True)   # refuses a bundle that does not match
    manifest_json = Path(bundle_dir, MANIFEST_FILE).read_text()
    v = manifest.version
    with publisher_lock(r, keys):
        orphans = collect_orphans(r, keys)
        already = r.exists(keys.manifest(v)) and v in _known_versions(r, keys)
        if not already:
            pipe = r.pipeline(transaction=True)
            for name, data in blobs.items():
                pipe.set(keys.file(v, name), data)
            pipe.set(keys.manifest(v), manifest_json)
            try:
                pipe.execute()
            except redis.RedisError as e:
                _cleanup_after_failure(r, keys, v)
                raise PublishError(f"writing version {v} failed, nothing activated: {e}") from e
            try:
                read_version(r, keys, v, verify=True)
            except BundleError as e:
                _cleanup_after_failure(r, keys, v)
                raise PublishError(f"read-back of version {v} failed its checksums, deleted: {e}") from e
        previous = None
        if activate:
            previous = r.eval(_ACTIVATE, 3, keys.active, keys.versions, keys.manifest(v), v, repr(time.time()), keep, "")
            previous = previous.decode() if previous else None
        elif canary_percent is not None:
            try:
                previous = r.eval(_SET_CANARY, 4, keys.active, keys.versions, keys.canary, keys.manifest(v), v,
                                  format_canary(v, canary_percent), repr(time.time()))
            except redis.ResponseError as e:
                raise PublishError(str(e)) from e
            previous = previous.decode() if previous else None
        else:
            r.zadd(keys.versions, {v: time.time()})
        removed = _trim(r, keys, keep)
    report = {"version": v, "previous": previous, "reused": bool(already), "removed": removed,
              "orphans_collected": orphans, "publish_seconds": time.perf_counter() - t0,
              "bytes": sum(len(b) for b in blobs.values())}
    if canary_percent is not None:
        report.update(canary_percent=canary_percent, active=previous, previous=None)
    return report


def _cleanup_after_failure(r: redis.Redis, keys: Keys, version: str) -> None:
    """Best effort; if Redis is gone, the next publish collects the orphans."""
    try:
        if version not in _known_versions(r, keys):
            _delete_version(r, keys, version)
    except redis.RedisError:
        pass


def canary_of(r: redis.Redis, keys: Keys) -> tuple[str, float] | None:
    raw = r.get(keys.canary)
    return parse_canary(raw.decode()) if raw else None


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
    return {"active": version.decode(), "previous": previous.decode() or None}


def rollback(r: redis.Redis, keys: Keys | None = None) -> dict:
    """With a canary: drop it (the active version keeps serving everyone; the canary is marked
    rolled back from). Without one: re-activate the newest version published before the active one.

    The version rolled back from is marked in `mvke:versions` by negating its score
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
            return {"active": active_version(r, keys), "canary_dropped": dropped.decode()}
        scores = {v.decode(): s for v, s in r.zrange(keys.versions, 0, -1, withscores=True)}
        active = (r.get(keys.active) or b"").decode()
        if active not in scores:
            raise PublishError("no active version to roll back from")
        candidates = sorted((s, v) for v, s in scores.items() if s >= 0 and s < scores[active])
        if not candidates:
            raise PublishError(f"{active} is the oldest kept version not rolled back from: nothing to roll back to")
        target = candidates[-1][1]
        r.eval(_ACTIVATE, 3, keys.active, keys.versions, keys.manifest(target), target, "", 0, "")
        r.zadd(keys.versions, {active: -abs(scores[active])})
    return {"active": target, "previous": active}


def list_versions(r: redis.Redis, keys: Keys | None = None) -> list[VersionInfo]:
    keys = keys or Keys()
    active = (r.get(keys.active) or b"").decode()
    canary = canary_of(r, keys)
    out = []
    for v, score in r.zrange(keys.versions, 0, -1, withscores=True):
        v = v.decode()
        raw = r.get(keys.manifest(v))
        if raw is None:
            continue
        m = Manifest.from_json(raw)
        out.append(VersionInfo(v, m.model, m.created_at, abs(score), sum(f.bytes for f in m.files.values()),
                               v == active, score < 0, canary[1] if canary and canary[0] == v else None))
    return out


__all__ = ["publish", "rollback", "promote", "set_canary_percent", "canary_of", "list_versions",
           "collect_orphans", "publisher_lock", "PublishError", "VersionInfo", "DEFAULT_KEEP"]
