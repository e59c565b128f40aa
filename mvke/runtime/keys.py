"""Every Redis key of the system, in one place (prefix `mvke` unless configured).

Models (written by `mvke publish`, read by the service and `mvke tag-all`); one version
lives under one hash tag, so a Redis Cluster keeps it in one slot and a MULTI over it
is legal:

    mvke:active                         alias: the active version id (flipped atomically)
    mvke:canary                         `<version>:<percent>`: a second published version served to that
                                        share of users (set, promoted and dropped atomically with the alias)
    mvke:versions                       sorted set: version id -> publish time (retention, listing);
                                        negated for a version rolled back from (never rolled back to)
    mvke:publish-lock                   publisher mutex (redis-py Lock: token + Lua release)
    mvke:{v<id>}:manifest               manifest JSON (written in the same MULTI as the files)
    mvke:{v<id>}:file:<name>            raw bytes of each bundle file (ONNX, float32 arrays, tags)

Feature store (written by `mvke features load`, read by the service):

    mvke:user:<user_id>                 hash: field -> raw value; multi-valued fields `|`-joined
    mvke:features-loaded:<dataset>      which dataset `mvke pipeline` loaded (so a rerun skips it)

Batch output (written by `mvke tag-all --to-redis`):

    mvke:usertags:v<id>:<user_id>       hash: task -> JSON [[tag, score], ...], best first
    mvke:usertags:v<id>                 hash: the job's summary, written when every part is done
    mvke:usertags:latest                the version of the last completed job

The batch keys are deliberately NOT under the version's hash tag: a billion user keys in one
slot would put every user on one cluster node, and the publisher's orphan collection
(`mvke:{v*}:*` keys of unknown versions) would delete tags computed from an unpublished bundle.
"""
from __future__ import annotations

import os

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def redis_url(url: str | None = None) -> str:
    """The Redis of a command: `url` if given, else $REDIS_URL, else DEFAULT_URL."""
    return url or os.environ.get("REDIS_URL") or DEFAULT_URL


def parse_canary(spec: str) -> tuple[str, float]:
    """`<version>:<percent>` (MVKE_CANARY, the `mvke:canary` key) -> (version, percent in (0, 100])."""
    version, sep, percent = spec.strip().rpartition(":")
    try:
        value = float(percent)
    except ValueError:
        value = float("nan")
    if not sep or not version or not 0 < value <= 100:
        raise ValueError(f"canary {spec!r}: expected <version>:<percent>, percent in (0, 100]")
    return version, value


def format_canary(version: str, percent: float) -> str:
    return f"{version}:{percent:g}"


class Keys:
    """Redis key layout (see module docstring)."""

    def __init__(self, prefix: str = "mvke"):
        self.prefix = prefix
        self.active = f"{prefix}:active"
        self.canary = f"{prefix}:canary"
        self.versions = f"{prefix}:versions"
        self.lock = f"{prefix}:publish-lock"
        self.user_tags_latest = f"{prefix}:usertags:latest"

    # ---- models ----------------------------------------------------------
    def version_prefix(self, version: str) -> str:
        return f"{self.prefix}:{{v{version}}}"

    def manifest(self, version: str) -> str:
        return f"{self.version_prefix(version)}:manifest"

    def file(self, version: str, name: str) -> str:
        return f"{self.version_prefix(version)}:file:{name}"

    def version_pattern(self) -> str:
        return f"{self.prefix}:{{v*}}:*"

    def version_of(self, key: str) -> str:
        """The version id of a key matching `version_pattern()`."""
        return key[len(self.prefix) + 3: key.index("}")]

    # ---- feature store ---------------------------------------------------
    def user(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}"

    def features_loaded(self, dataset: str) -> str:
        return f"{self.prefix}:features-loaded:{dataset}"

    # ---- batch output ----------------------------------------------------
    def user_tags(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:usertags:v{version}:{user_id}"

    def user_tags_summary(self, version: str) -> str:
        return f"{self.prefix}:usertags:v{version}"
