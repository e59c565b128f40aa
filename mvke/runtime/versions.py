"""Reading a published model version from Redis: the one reader of the service and batch tagging.

Synchronous (redis-py): batch tagging and the publisher's read-back call it
directly; the service calls the same functions in a worker thread
(`asyncio.to_thread`), so the event loop never waits on a model read.
Versions are immutable: a reader resolves the alias `{mvke}:active`, then reads that
version's manifest and files (files in one MULTI: a consistent snapshot) and checks
every sha256 against the manifest, so it never sees a mix of two versions.
"""
from __future__ import annotations

import redis

from mvke.runtime.contract import BundleError, Manifest, verify_files
from mvke.runtime.keys import Keys


def active_version(r: redis.Redis, keys: Keys | None = None) -> str | None:
    """The version `{mvke}:active` names, or None when nothing is published."""
    v = r.get((keys or Keys()).active)
    return v.decode() if isinstance(v, bytes) else v


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
