"""Locust scenario for the tag service: POST /users/{id}/tags with a realistic mix.

Configured by environment variables (loadtest/run.py sets them from its flags):

    MVKE_LT_REDIS_URL     feature store to SCAN for `mvke:user:*` ids (default $REDIS_URL)
    MVKE_LT_USERS_FILE    or a file with one user id per line (takes precedence)
    MVKE_LT_KEY_PREFIX    key prefix (default mvke)
    MVKE_LT_ZIPF          user skew: 0 = uniform, s > 0 = Zipf with exponent s (default 0)
    MVKE_LT_TOPK_MIX      top_k values and weights, e.g. "5:0.2,20:0.6,50:0.2" (default)
    MVKE_LT_NEW_SHARE     share of requests for users not in the store, sending their raw
                          features in the body (copied from stored users; default 0.05)
    MVKE_LT_SEED          random seed (default 0)

FastHttpUser (geventhttpclient) is used: several times cheaper per request
than HttpUser. Even so one locust process tops out at a few thousand
requests/s on one core, below what the service can serve on this 2-core
machine (and it takes a core from it): use `--processes` in loadtest/run.py
for more, and loadtest/bench.py (a raw-socket client) for ceiling numbers.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from locust import FastHttpUser, events, task

from loadtest.harness import UserSampler, parse_mix, sample_features, scan_user_ids

CFG = {
    "redis_url": os.environ.get("MVKE_LT_REDIS_URL") or os.environ.get("REDIS_URL", ""),
    "users_file": os.environ.get("MVKE_LT_USERS_FILE", ""),
    "prefix": os.environ.get("MVKE_LT_KEY_PREFIX", "mvke"),
    "zipf": float(os.environ.get("MVKE_LT_ZIPF", "0")),
    "topk_mix": os.environ.get("MVKE_LT_TOPK_MIX", "5:0.2,20:0.6,50:0.2"),
    "new_share": float(os.environ.get("MVKE_LT_NEW_SHARE", "0.05")),
    "seed": int(os.environ.get("MVKE_LT_SEED", "0")),
}
DATA: dict = {}


def load_population() -> None:
    """User ids and example feature bodies, read once per locust process."""
    if DATA:
        return
    if CFG["users_file"]:
        ids = [line.strip() for line in Path(CFG["users_file"]).read_text().splitlines() if line.strip()]
    elif CFG["redis_url"]:
        ids = scan_user_ids(CFG["redis_url"], CFG["prefix"])
    else:
        raise RuntimeError("set MVKE_LT_USERS_FILE or MVKE_LT_REDIS_URL/REDIS_URL (a private Redis)")
    examples = []
    if CFG["new_share"] > 0 and CFG["redis_url"]:
        examples = sample_features(CFG["redis_url"], ids, 50, CFG["prefix"], CFG["seed"])
    mix = parse_mix(CFG["topk_mix"])
    DATA.update(sampler=UserSampler(ids, CFG["zipf"], CFG["seed"] + os.getpid()),
                examples=examples, ks=[k for k, _ in mix], weights=[w for _, w in mix],
                rng=random.Random(CFG["seed"] + os.getpid()), n=0)


@events.init.add_listener
def _on_init(environment, **kw) -> None:
    # Master of a distributed run does not send requests; workers and standalone runs do.
    from locust.runners import MasterRunner
    if not isinstance(environment.runner, MasterRunner):
        load_population()


class TagUser(FastHttpUser):
    """Each simulated user fires requests back to back (no think time): a throughput test."""

    def on_start(self) -> None:
        load_population()

    @task
    def tag(self) -> None:
        d = DATA
        rng = d["rng"]
        body: dict = {"top_k": rng.choices(d["ks"], d["weights"])[0]}
        if d["examples"] and rng.random() < CFG["new_share"]:
            d["n"] += 1
            uid = f"lt-new-{os.getpid()}-{d['n']}"
            body["features"] = d["examples"][d["n"] % len(d["examples"])]
            name = "/users/[new]/tags"
        else:
            uid = d["sampler"].draw()
            name = "/users/[id]/tags"
        with self.client.post(f"/users/{uid}/tags", json=body, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
