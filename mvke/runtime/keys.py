"""Every Redis key of the system, in one place (prefix `mvke` unless configured).

Models (written by `mvke publish`, read by the service and `mvke tag-all`). Every model key
of a prefix carries the hash tag `{mvke}`, so a Redis Cluster keeps all of them in ONE slot:
a version's files, the alias that activates it and the version list can be written by one
MULTI or one Lua script (publish, activate, rollback, trim and orphan collection are atomic
on a cluster as on a single node). The cost is that the models of a prefix live on one
master: a few MB per version, 3 versions kept, read once per service replica per publish.

    {mvke}:active                       alias: the active version id (flipped atomically)
    {mvke}:canary                       `<version>:<percent>`: a second published version served to that
                                        share of users (set, promoted and dropped atomically with the alias)
    {mvke}:versions                     sorted set: version id -> publish time (retention, listing);
                                        negated for a version rolled back from (never rolled back to)
    {mvke}:stored                       set: versions whose keys exist (written in the version's MULTI;
                                        orphan collection reads it instead of scanning the keyspace)
    {mvke}:publish-lock                 publisher mutex (redis-py Lock: token + Lua release)
    {mvke}:v<id>:manifest               manifest JSON (written in the same MULTI as the files)
    {mvke}:v<id>:file:<name>            raw bytes of each bundle file (ONNX, float32 arrays, tags)
    {mvke}:v<id>:live                   hash: live figures of the version while it serves (counters:
                                        answers, errors; shadow_n, shadow_jaccard_sum, shadow_shift_sum),
                                        read by `mvke promote --auto` (mvke/runtime/cycle_record.py)
    {mvke}:ramp                         hash: the canary's ramp step (version, percent, since, the
                                        live counters when the step began), written by `promote --auto`

Feature store (written by `mvke features load`, read by the service). No hash tag: a
cluster spreads the users over every slot and master.

    mvke:user:<user_id>                 hash: field -> raw value; multi-valued fields `|`-joined
    mvke:features-load:<token>          an unfinished `mvke features load` job (its markers stay valid
                                        while this key exists; deleted when the job completes)
    mvke:features-loaded:<dataset>      which dataset `mvke pipeline` loaded (so a rerun skips it)
    mvke:features-schema                JSON: the fields, kinds, fingerprint and sampled values the last
                                        successful `mvke features load` wrote (mvke/runtime/store_schema.py);
                                        `mvke publish` and the service compare a model's features with it

Events (`POST /events`, `mvke features stream`, mvke/runtime/events.py). A user's event state
lives in keys whose hash tag is the user key itself: `mvke:user:<id>` has no braces, so its
slot is the CRC of the whole name, and `{mvke:user:<id>}:...` hashes on exactly that name:
the same slot, so one Lua script may touch all three on a Redis Cluster.

    {mvke:user:<user_id>}:ev            hash: per history field `t:<field>` the order keys of its items
                                        (late events find their place) and `base` (the `_loaded_at` they
                                        were built on: a reload of the user's batch values resets them)
    {mvke:user:<user_id>}:seen          sorted set: the user's most recent applied event ids (order key as
                                        score; bounded: a duplicate is recognised within that horizon)
    {mvke:events:<p>}                   stream partition p of N (user id -> crc32 % N); entries `e` = event
                                        JSON; MAXLEN ~ bounded; consumer group `apply`
    {mvke:events}:dead                  dead letters: malformed or unappliable events with their reason

Batch output (written by `mvke tag-all --to-redis`):

    mvke:usertags:v<id>:<user_id>       hash: task -> JSON [[tag, score], ...], best first (spread)
    {mvke:usertags}:v<id>               hash: the job's summary, written when every part is done
    {mvke:usertags}:latest              the version of the last completed job

Audiences (written by `mvke tag-all --audiences`, read by the service's audience routes;
mvke/runtime/audience.py, batch/audiences.py). One hash tag per version: a cluster keeps each
version in one slot (its keys can be read in one pipeline from one node), versions spread.

    {mvke:audiences:v<id>}:meta         index JSON: tasks, tag catalogue, users, rule, sizes (written last)
    {mvke:audiences:v<id>}:task:<task>  hash: tag -> Roaring bitmap (portable serialisation) of user numbers
    {mvke:audiences:v<id>}:users        hash: chunk number -> JSON list of 1,024 user ids (the dictionary)
    {mvke:audiences}:latest             the version readers use (flipped after a complete, verified write)
    {mvke:audiences}:versions           sorted set: version -> publish time (retention: newest 3 kept)

The per-user batch keys are deliberately NOT under a hash tag (a billion keys in one slot
would put every user on one cluster node); the summary and the `latest` pointer share
their own tag, so the MULTI that writes them is legal on a cluster.

Layout version 2 (Redis Cluster support). Version 1 (`mvke:active`, `mvke:{v<id>}:...`)
is not read any more: publish once with this release before its services start (its
services then find `{mvke}:active`; services of the old release keep reading the old keys
until they are replaced).
"""
from __future__ import annotations

import argparse
import os

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "mvke"
PREFIX_ENV = "MVKE_KEY_PREFIX"   # also the service's setting (service/settings.py `key_prefix`)


def redis_url(url: str | None = None) -> str:
    """The Redis of a command: `url` if given, else $REDIS_URL, else DEFAULT_URL."""
    return url or os.environ.get("REDIS_URL") or DEFAULT_URL


def key_prefix(prefix: str | None = None) -> str:
    """The key prefix of a command: `prefix` if given, else $MVKE_KEY_PREFIX, else `mvke`.

    The service reads the same variable, so writers and reader agree when it is set once.
    """
    return prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX


def add_key_prefix_option(parser: argparse.ArgumentParser) -> None:
    """`--key-prefix`, the same on every command that reads or writes Redis keys."""
    parser.add_argument("--key-prefix", metavar="PREFIX",
                        help=f"prefix of every Redis key (default ${PREFIX_ENV}, else {DEFAULT_PREFIX}); "
                             f"the service must run with the same {PREFIX_ENV}")


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

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"key prefix must be non-empty and free of braces (hash tags), got {prefix!r}")
        self.prefix = prefix
        self.models = f"{{{prefix}}}"                       # the one hash tag of every model key
        self.active = f"{self.models}:active"
        self.canary = f"{self.models}:canary"
        self.versions = f"{self.models}:versions"
        self.stored = f"{self.models}:stored"
        self.lock = f"{self.models}:publish-lock"
        self.ramp = f"{self.models}:ramp"
        self.user_tags_latest = f"{{{prefix}:usertags}}:latest"
        self.audiences_latest = f"{{{prefix}:audiences}}:latest"
        self.audiences_versions = f"{{{prefix}:audiences}}:versions"
        self.features_schema = f"{prefix}:features-schema"

    # ---- models ----------------------------------------------------------
    def version_prefix(self, version: str) -> str:
        return f"{self.models}:v{version}"

    def manifest(self, version: str) -> str:
        return f"{self.version_prefix(version)}:manifest"

    def file(self, version: str, name: str) -> str:
        return f"{self.version_prefix(version)}:file:{name}"

    def live(self, version: str) -> str:
        return f"{self.version_prefix(version)}:live"

    def version_keys(self, version: str, file_names) -> list[str]:
        """Every key of one version: its manifest, its files (names from the manifest), its live figures."""
        return [self.manifest(version), *(self.file(version, n) for n in file_names), self.live(version)]

    # ---- feature store ---------------------------------------------------
    def user(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}"

    def features_job(self, token: str) -> str:
        return f"{self.prefix}:features-load:{token}"

    def features_loaded(self, dataset: str) -> str:
        return f"{self.prefix}:features-loaded:{dataset}"

    # ---- events ------------------------------------------------------------
    def user_events(self, user_id: str) -> str:
        """Per-user event state: the same slot as `user(user_id)` (its name is the hash tag)."""
        return self.user_event_keys(user_id)[1]

    def user_seen(self, user_id: str) -> str:
        return self.user_event_keys(user_id)[2]

    def user_event_keys(self, user_id: str) -> tuple[str, str, str]:
        """(user, user_events, user_seen): the keys of one user's event script, the user key built once."""
        user = self.user(user_id)
        return user, f"{{{user}}}:ev", f"{{{user}}}:seen"

    def events_stream(self, partition: int) -> str:
        return f"{{{self.prefix}:events:{partition}}}"

    @property
    def events_dead(self) -> str:
        return f"{{{self.prefix}:events}}:dead"

    # ---- batch output ----------------------------------------------------
    def user_tags(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:usertags:v{version}:{user_id}"

    def user_tags_summary(self, version: str) -> str:
        return f"{{{self.prefix}:usertags}}:v{version}"

    # ---- audiences -------------------------------------------------------
    def audience_prefix(self, version: str) -> str:
        return f"{{{self.prefix}:audiences:v{version}}}"     # one slot per version

    def audience_meta(self, version: str) -> str:
        return f"{self.audience_prefix(version)}:meta"

    def audience_task(self, version: str, task: str) -> str:
        return f"{self.audience_prefix(version)}:task:{task}"

    def audience_users(self, version: str) -> str:
        return f"{self.audience_prefix(version)}:users"

    def audience_keys(self, version: str, tasks) -> list[str]:
        """Every key of one audience version (tasks from its meta)."""
        return [self.audience_meta(version), self.audience_users(version),
                *(self.audience_task(version, t) for t in tasks)]
