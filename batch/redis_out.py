"""Per-user top tags in Redis (`mvke tag-all --to-redis`); the keys are in mvke/runtime/keys.py.

Values (prefix `mvke` by default, `--key-prefix` to change it):

    mvke:usertags:v<version>:<user_id>   hash: one field per task (e.g. `interest`, `intention`),
                                         value = JSON list of [tag, score] pairs, best first,
                                         scores rounded to 6 decimals
    {mvke:usertags}:v<version>           hash: the job's summary (model, tasks, top_k, users,
                                         rejected, completed_at), written when every part is done
    {mvke:usertags}:latest               the version of the last completed job (a plain string)

Example: `HGET mvke:usertags:v3a9f83c7f0b52b4d:u0000042 interest` ->
`[["cat07/tag0123",0.912345],["cat07/tag0456",0.883021],...]`.
Old versions are not deleted by publishing: set `--redis-ttl` or delete
`mvke:usertags:v<old>:*` when a version retires.

Writes are pipelined (one round trip per batch of users and Redis Cluster master, no MULTI) and
idempotent (HSET of every task field), so a redone part rewrites the same values.
"""
from __future__ import annotations

import json
import time

import numpy as np

from mvke.runtime.keys import Keys
from mvke.runtime.redis_client import connect


class UserTagWriter:
    def __init__(self, url: str, version: str, tasks: list[str], tags: list[str], prefix: str = "mvke",
                 ttl_s: int | None = None, cluster: bool | None = None):
        # a Redis Cluster pipeline sends each node its users' commands (one round trip per node)
        self.r = connect(url, cluster, socket_timeout=60, socket_connect_timeout=10)
        self.keys = Keys(prefix)
        self.version, self.tasks, self.ttl_s = version, tasks, ttl_s
        # '["<tag>",' per tag, JSON-escaped once
        self.tag_open = [f"[{json.dumps(t)}," for t in tags]

    def write(self, user_ids: list[str], ranked: list[tuple[np.ndarray, np.ndarray]]) -> int:
        """ranked: per task, (tag indices [B, k], scores [B, k]) aligned with user_ids."""
        pipe = self.r.pipeline(transaction=False)
        opens = self.tag_open
        per_task = [(idx.tolist(), np.round(sc.astype(np.float64), 6).tolist()) for idx, sc in ranked]
        for b, uid in enumerate(user_ids):
            fields = {}
            for task, (idx, sc) in zip(self.tasks, per_task):
                fields[task] = "[" + ",".join(f"{opens[i]}{s!r}]" for i, s in zip(idx[b], sc[b])) + "]"
            key = self.keys.user_tags(self.version, uid)
            pipe.hset(key, mapping=fields)
            if self.ttl_s:
                pipe.expire(key, self.ttl_s)
        pipe.execute()
        return len(user_ids)

    def close(self) -> None:
        self.r.close()


def write_job_summary(url: str, version: str, summary: dict, prefix: str = "mvke", ttl_s: int | None = None,
                      cluster: bool | None = None) -> None:
    """The version's summary hash and the `latest` pointer, in one MULTI (once every part is done;
    both keys share the hash tag `{mvke:usertags}`, so the MULTI is legal on a cluster)."""
    keys = Keys(prefix)
    doc = {k: v if isinstance(v, (str, int, float)) else json.dumps(v) for k, v in summary.items()}
    doc["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    r = connect(url, cluster, socket_timeout=60, socket_connect_timeout=10)
    try:
        pipe = r.pipeline(transaction=True)
        pipe.hset(keys.user_tags_summary(version), mapping=doc)
        if ttl_s:
            pipe.expire(keys.user_tags_summary(version), ttl_s)
        pipe.set(keys.user_tags_latest, version)
        pipe.execute()
    finally:
        r.close()


def read_user_tags(r, version: str, user_id: str, prefix: str = "mvke") -> dict[str, list] | None:
    raw = r.hgetall(Keys(prefix).user_tags(version, user_id))
    if not raw:
        return None
    return {k.decode(): json.loads(v) for k, v in raw.items()}
