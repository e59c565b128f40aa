"""A version that fails to load is tried again with backoff (service/registry.py), never given up on.

Real redis-server (private), real ONNX Runtime, real HTTP (uvicorn in a thread). The failures are made
in Redis itself: a version's file key missing (as when a read times out or a publish is still being
repaired), or a file whose bytes do not match the manifest's sha256 (a broken bundle).
"""
from __future__ import annotations

import re
import time

import pytest

from model_export.feature_store import load_dataset_users
from model_export.publish import publish
from mvke.localredis import LocalRedis
from mvke.runtime.contract import ONNX_FILE
from mvke.runtime.keys import Keys
from tests.export.test_publish import make_variant
from tests.service.test_service import LiveService, make_settings

pytestmark = pytest.mark.integration

KEYS = Keys("mvke")


@pytest.fixture
def store(bundle, dataset_dir):
    """(LocalRedis, client) with the tiny mvke-mt published and the synthetic users loaded."""
    server = LocalRedis().start()
    r = server.client()
    publish(bundle("mvke-mt"), r, keys=KEYS)
    assert load_dataset_users(dataset_dir("synthetic"), r, keys=KEYS, progress=False).loaded > 0
    try:
        yield server, r
    finally:
        r.close()
        server.stop()


def _active(r) -> str:
    return r.get(KEYS.active).decode()


def _attempts(text: str) -> int:
    m = re.search(r"attempt (\d+); next in", text)
    return int(m.group(1)) if m else 0


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_first_load_fails_then_the_service_gets_ready_by_itself(store):
    """The active version's ONNX file is missing when the service starts (the load fails): /readyz is
    503 naming the version, the file and the next attempt; the load is tried again with growing waits,
    and once the file is there the service is ready and answers without a restart."""
    server, r = store
    version = _active(r)
    key = KEYS.file(version, ONNX_FILE)
    onnx_bytes = r.get(key)
    r.delete(key)
    settings = make_settings(server.url, model_poll_s=0.02, model_retry_s=0.1, model_retry_max_s=0.4)
    with LiveService(settings) as s:
        ready = s.client.get("/readyz")
        assert ready.status_code == 503, ready.text
        reason = ready.json()["reason"]
        assert version in reason and ONNX_FILE in reason and "missing" in reason, reason
        assert s.tag("u0000001", {"top_k": 2}).status_code == 503
        # retried, not given up on (the old registry stopped at attempt 1 for good)
        _wait(lambda: _attempts(s.client.get("/readyz").json().get("reason", "")) >= 3, 10, "a third attempt")
        r.set(key, onnx_bytes)                                # the file arrives: the next attempt loads it
        s.wait_version(version, timeout=10)
        resp = s.tag("u0000001", {"top_k": 2})
        assert resp.status_code == 200 and resp.json()["model_version"] == version
        assert s.client.get("/readyz").json() == {"ready": True, "model_version": version}


def test_broken_version_backs_off_and_is_reported_beside_the_serving_one(store, bundle, tmp_path):
    """A new active version with a bad checksum: the old one keeps serving, /readyz stays 200 and names the
    failing version under load_errors; attempts back off (a handful, not one per poll); a republish of the
    right bytes is picked up by the backoff's next attempt."""
    server, r = store
    old = _active(r)
    settings = make_settings(server.url, model_poll_s=0.01, model_retry_s=0.1, model_retry_max_s=0.4)
    with LiveService(settings) as s:
        s.wait_version(old)
        new = publish(make_variant(bundle("mvke-mt"), tmp_path / "v1", 1), r, keys=KEYS, activate=False)["version"]
        key = KEYS.file(new, ONNX_FILE)
        good = r.get(key)
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x01                            # same size, different sha256
        r.set(key, bytes(bad))
        r.set(KEYS.active, new)
        ready = _wait(lambda: (d := s.client.get("/readyz").json()).get("load_errors") and d, 10, "load_errors")
        t0 = time.monotonic()
        assert ready["ready"] is True and ready["model_version"] == old, ready
        error = ready["load_errors"]["active"]
        assert new in error and "sha256" in error, error
        assert s.tag("u0000001", {"top_k": 2}).json()["model_version"] == old   # the old version serves on
        time.sleep(1.5)
        doc = s.client.get("/readyz").json()
        attempts, elapsed = _attempts(doc["load_errors"]["active"]), time.monotonic() - t0
        # 1.5 s at a 0.01 s poll is 150 polls; the backoff (0.1, 0.2, 0.4, 0.4, ...) allows about 5 attempts
        assert 2 <= attempts <= 10, (attempts, elapsed, doc)
        r.set(key, good)                                      # repaired in place
        s.wait_version(new, timeout=10)
        assert s.client.get("/readyz").json() == {"ready": True, "model_version": new}
