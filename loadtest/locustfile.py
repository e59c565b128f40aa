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
    MVKE_LT_EVENTS_SHARE  share of simulated users that send events (POST /events) instead of tag
                          requests: EventUser, a mix of impressions, clicks and conversions of the same
                          users (default 0: tags only; `mvke features stream` applies them)
    MVKE_LT_EVENTS_BATCH  events per POST /events (default 50)
    MVKE_LT_EVENT_TAGS    file of tag values the events carry, one per line (default: t0000..t1779,
                          the synthetic world's history values)
    MVKE_LT_API_KEY       API key sent by both user classes (default none)

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
    "events_share": float(os.environ.get("MVKE_LT_EVENTS_SHARE", "0")),
    "events_batch": int(os.environ.get("MVKE_LT_EVENTS_BATCH", "50")),
    "event_tags": os.environ.get("MVKE_LT_EVENT_TAGS", ""),
    "api_key": os.environ.get("MVKE_LT_API_KEY", ""),
}
HEADERS = {"x-api-key": CFG["api_key"]} if CFG["api_key"] else {}
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

    weight = max(1, round(100 * (1 - CFG["events_share"])))
    abstract = CFG["events_share"] >= 1      # events only

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
        with self.client.post(f"/users/{uid}/tags", json=body, name=name, headers=HEADERS,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")


def event_tags() -> list[str]:
    if CFG["event_tags"]:
        return [t.strip() for t in Path(CFG["event_tags"]).read_text().splitlines() if t.strip()]
    return [f"t{i:04d}" for i in range(1780)]


class EventUser(FastHttpUser):
    """Sends batches of events of the same users the tag requests ask about: every impression has a
    30% chance of a click, a click 25% of a conversion (the synthetic world's rates)."""

    weight = max(1, round(100 * CFG["events_share"]))
    abstract = CFG["events_share"] <= 0      # tags only (the default)

    def on_start(self) -> None:
        load_population()
        self.tags = event_tags()
        self.n = 0

    @task
    def send(self) -> None:
        import time
        rng, events = DATA["rng"], []
        while len(events) < CFG["events_batch"]:
            self.n += 1
            uid, ts = DATA["sampler"].draw(), int(time.time())
            base = f"lt-{os.getpid()}-{id(self)}-{self.n}"
            tags = rng.sample(self.tags, rng.randint(1, 3))
            events.append({"event_id": base, "user_id": uid, "ts": ts, "type": "impression", "tags": tags})
            if rng.random() < 0.3:
                events.append({"event_id": base + ":click", "user_id": uid, "ts": ts, "type": "click", "tags": tags})
                if rng.random() < 0.25:
                    events.append({"event_id": base + ":conversion", "user_id": uid, "ts": ts,
                                   "type": "conversion", "tags": tags})
        with self.client.post("/events", json={"events": events}, name="/events", headers=HEADERS,
                              catch_response=True) as resp:
            if resp.status_code != 202:
                resp.failure(f"HTTP {resp.status_code}")
