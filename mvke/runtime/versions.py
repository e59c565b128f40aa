"""Reading a published model version from Redis: the one reader of the service and batch tagging.

Synchronous (redis-py): batch tagging and the publisher's read-back call it
directly; the service calls the same functions in a worker thread
(`asyncio.to_thread`), so the event loop never waits on a model read.
Versions are immutable: a reader resolves the alias `{mvke}:active`, then reads that
version's manifest and files (files in one MULTI: a consistent snapshot) and checks
every sha256 against the manifest, so it never sees a mix of two versions.
"""
from __future__ import annotations

from dataclasses import dataclass

import redis

from mvke.runtime.contract import BundleError, Manifest, verify_files
from mvke.runtime.cycle_record import gate_summary
from mvke.runtime.keys import Keys, parse_canary


def active_version(r: redis.Redis, keys: Keys | None = None) -> str | None:
    """The version `{mvke}:active` names, or None when nothing is published."""
    return _text(r.get((keys or Keys()).active))


def read_version(r: redis.Redis, keys: Keys, version: str, verify: bool = True) -> tuple[Manifest, dict[str, bytes]]:
    """One version's manifest and files. BundleError if it is not (or no longer) in Redis or fails a checksum."""
    raw = r.get(keys.manifest(version))
    if raw is None:
        raise BundleError(f"version {version} is not in Redis")
    manifest = Manifest.from_json(raw)
    names = list(manifest.files)
    pipe = r.pipeline(transaction=True)
    for name in names:
        pipe.get(keys.file(version, name))
    blobs = {n: b for n, b in zip(names, pipe.execute()) if b is not None}
    if verify:
        verify_files(manifest, blobs)
    return manifest, blobs


@dataclass(frozen=True)
class PublishedVersion:
    """One published version as `mvke models` and `GET /models` list it."""

    version: str
    model: str
    created_at: str
    published_at: float
    bytes: int
    active: bool
    rolled_back: bool = False             # rolled back from: a rollback never re-activates it
    canary_percent: float | None = None   # the canary, serving this share of users
    gate: dict | None = None              # `mvke cycle`'s gate summary (cycle_record.gate_summary); None: by hand


def published_versions(r: redis.Redis, keys: Keys | None = None) -> list[PublishedVersion]:
    """Every published version whose manifest is still in Redis, newest first: the one reader of the
    version list (active, canary, publish times and manifests in two round trips)."""
    keys = keys or Keys()
    pipe = r.pipeline(transaction=False)
    pipe.get(keys.active)
    pipe.get(keys.canary)
    pipe.zrange(keys.versions, 0, -1, withscores=True)
    active, canary_raw, scored = pipe.execute()
    active, canary = _text(active), (parse_canary(_text(canary_raw)) if canary_raw else None)
    names = [_text(v) for v, _ in scored]
    manifests = r.mget([keys.manifest(v) for v in names]) if names else []
    out = []
    for name, (_, score), raw in zip(names, scored, manifests):
        if raw is None:
            continue
        m = Manifest.from_json(raw)
        out.append(PublishedVersion(name, m.model, m.created_at, abs(score), sum(f.bytes for f in m.files.values()),
                                    name == active, score < 0, canary[1] if canary and canary[0] == name else None,
                                    gate_summary(m)))
    out.sort(key=lambda v: v.published_at, reverse=True)
    return out


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v
