"""GET /users/{id}/profile (service/profiles.py, issue 23 §2.5): the daily profiles `mvke tag-all
--to-redis` writes (batch/redis_out.py: the users' hashes, then summary + latest pointer in one
MULTI), read with their version and computed date; 404 naming why; ?fallback=live; and the switch
to a new version is atomic: a reader hammering the route while the next version is written sees
only whole answers of the old version, then only of the new. Real Redis, real HTTP."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from batch.redis_out import UserTagWriter, write_job_summary
from model_export.feature_store import load_dataset_users
from model_export.publish import publish
from mvke.runtime.keys import Keys
from tests.service.test_service import LiveService, _error, make_settings, user_ids

PREFIX = "pf"
TASKS = ["interest", "intention"]


def write_version(url: str, version: str, users: list[str], chunk: int = 50, between=None) -> None:
    """A tag-all job's Redis output for `version`: every tag named after the version, written in chunks."""
    tags = [f"{version}/tag{i}" for i in range(30)]
    w = UserTagWriter(url, version, TASKS, tags, PREFIX)
    rng = np.random.default_rng(0)
    for i in range(0, len(users), chunk):
        part = users[i:i + chunk]
        ranked = [(np.argsort(rng.random((len(part), 30)))[:, :5], np.sort(rng.random((len(part), 5)))[:, ::-1])
                  for _ in TASKS]
        w.write(part, ranked)
        if between:
            between()
    w.close()
    write_job_summary(url, version, {"model": "mvke-mt", "tasks": TASKS, "top_k": 5, "users": len(users),
                                     "rejected": 0}, PREFIX)


def profile(s: LiveService, user: str, **params):
    return s.client.get(f"/users/{user}/profile", params=params)


@pytest.fixture
def live(private_redis, bundle, dataset_dir):
    r = private_redis.client()
    publish(bundle("mvke-mt"), r, keys=Keys(PREFIX))
    load_dataset_users(dataset_dir("synthetic"), r, keys=Keys(PREFIX), progress=False)
    with LiveService(make_settings(private_redis.url, PREFIX, profile_poll_s=0.0)) as s:
        yield s, private_redis.url, user_ids(dataset_dir("synthetic"), 200, seed=1)
    r.close()


@pytest.mark.integration
def test_profile_404_and_live_fallback(live):
    s, url, users = live
    _error(profile(s, users[0]), 404, "user_id", "no daily profiles yet", "{pf:usertags}:latest")
    write_version(url, "aaaa", users[:100])
    doc = profile(s, users[0]).json()
    assert doc["model_version"] == "aaaa" and doc["source"] == "profile" and set(doc["tasks"]) == set(TASKS)
    assert doc["computed_at"].endswith("Z") and 0 <= doc["age_s"] < 60
    assert [x["score"] for x in doc["tasks"]["interest"]] == sorted((x["score"] for x in doc["tasks"]["interest"]),
                                                                    reverse=True)
    _error(profile(s, users[150]), 404, "user_id", "no profile in version aaaa", "100 users", "fallback=live")
    live_doc = profile(s, users[150], fallback="live").json()
    assert live_doc["source"] == "live" and live_doc["model_version"] != "aaaa"
    assert "no profile in version aaaa" in live_doc["profile_missing"] and len(live_doc["tasks"]["interest"]) == 20
    _error(profile(s, users[150], fallback="yes"), 422, "query.fallback")


@pytest.mark.integration
def test_a_reader_never_sees_a_mix_of_two_versions(live):
    s, url, users = live
    write_version(url, "aaaa", users)
    seen, stop = [], threading.Event()

    def reader():
        import httpx
        with httpx.Client(base_url=s.url, timeout=10) as c:
            i = 0
            while not stop.is_set():
                doc = c.get(f"/users/{users[i % len(users)]}/profile").json()
                tags = {x["tag"].split("/")[0] for ranked in doc["tasks"].values() for x in ranked}
                seen.append((doc["model_version"], tags))
                i += 1

    t = threading.Thread(target=reader)
    t.start()
    during = []

    def between():          # a slow job: the reader reads between its parts
        during.append(len(seen))
        time.sleep(0.05)

    while not seen:
        time.sleep(0.01)
    write_version(url, "bbbb", users, chunk=20, between=between)
    n_switch = len(seen)
    time.sleep(0.3)
    stop.set()
    t.join(10)
    assert all(tags == {version} for version, tags in seen)       # every answer one version's, whole
    versions = [v for v, _ in seen]
    assert during[-1] > during[0] and set(versions[:during[-1]]) == {"aaaa"}   # while B is written: A only
    after = versions[n_switch + 1:]     # the one request in flight at the switch may be either
    assert after and set(after) == {"bbbb"}                        # after the pointer: B only
    assert versions == sorted(versions)                            # never back to A
