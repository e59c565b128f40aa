"""The service's API beyond "top tags of one user": candidate scoring, many users per call,
explanations, pinned and canary versions, API keys, and a strict edge (issues 14 and 15).

Real redis-server (private), real ONNX Runtime, real HTTP; helpers and fixtures come
from test_service.py.
"""
from __future__ import annotations

import json
import logging
import math
import socket

import numpy as np
import pytest

from mvke.runtime.contract import decode_array, gates_file, read_bundle
from mvke.runtime.keys import Keys
from model_export.publish import promote, publish, rollback
from service.auth import key_digest
from service.registry import HASH_BUCKETS, user_bucket
from tests.export.test_publish import make_variant
from tests.service.test_service import (ROUTE, LiveService, _error, _sample, assert_matches, make_settings,  # noqa: F401
                                published, reference, stored_row, svc, svc_r, svc_redis, synth_user, user_ids)

BASE_KEYS = ["user_id", "model_version", "model", "feature_source", "tasks"]


def assert_same_answer(got: dict, want: dict, tol: float = 1e-6) -> None:
    """Equal answers up to float32 rounding (a batch's GEMM sums in another order than one user's)."""
    assert {k: v for k, v in got.items() if k != "tasks"} == {k: v for k, v in want.items() if k != "tasks"}
    assert list(got["tasks"]) == list(want["tasks"])
    for task, ranked in want["tasks"].items():
        assert [x["tag"] for x in got["tasks"][task]] == [x["tag"] for x in ranked]
        assert np.allclose([x["score"] for x in got["tasks"][task]], [x["score"] for x in ranked], atol=tol)


def full_scores(svc, user: str) -> dict[str, dict[str, float]]:
    doc = svc.tag(user, {"top_k": 200}).json()
    return {t: {x["tag"]: x["score"] for x in ranked} for t, ranked in doc["tasks"].items()}


# ---------------------------------------------------------------------------
# candidate scoring
# ---------------------------------------------------------------------------
def test_candidate_tags_are_scored_exactly_and_ranked(svc, svc_r, published, reference, synth_user):
    ref = reference("mvke-mt", "synthetic")
    exp = ref.by_tag([stored_row(svc_r, synth_user, published("mvke-mt", "synthetic"))])[0]
    full = full_scores(svc, synth_user)
    cands = ref.tags[5:12] + ref.tags[40:43]
    resp = svc.tag(synth_user, {"tags": cands})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert list(doc) == BASE_KEYS
    for task, ranked in doc["tasks"].items():
        assert sorted(x["tag"] for x in ranked) == sorted(cands)          # all of them by default
        assert_matches(ranked, {t: exp[task][t] for t in cands})          # PyTorch's scores and order
        for x in ranked:                                                   # same as the catalogue path
            assert abs(x["score"] - full[task][x["tag"]]) <= 1e-6
    # top_k, min_score, exclude_tags and tasks still apply; duplicates count once
    best = [x["tag"] for x in doc["tasks"]["interest"]]
    cut = doc["tasks"]["interest"][4]["score"]
    small = svc.tag(synth_user, {"tags": cands + cands[:2], "top_k": 3, "exclude_tags": best[:1],
                                 "tasks": ["interest"]}).json()
    assert [x["tag"] for x in small["tasks"]["interest"]] == best[1:4] and list(small["tasks"]) == ["interest"]
    above = svc.tag(synth_user, {"tags": cands, "min_score": cut, "tasks": ["interest"]}).json()
    assert [x["tag"] for x in above["tasks"]["interest"]] == best[:5]


def test_unknown_candidate_tags_are_named_or_listed(svc, synth_user, reference):
    tags = reference("mvke-mt", "synthetic").tags
    doc = _error(svc.tag(synth_user, {"tags": [tags[0], "no/such-tag", "cat99/x"]}), 422, "tags",
                 "'no/such-tag'", "'cat99/x'", "ignore_unknown")
    assert [e["msg"] for e in doc["errors"]] == ["unknown tag 'no/such-tag'", "unknown tag 'cat99/x'"]
    resp = svc.tag(synth_user, {"tags": [tags[0], "no/such-tag"], "ignore_unknown": True})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["unknown_tags"] == ["no/such-tag"]
    assert all([x["tag"] for x in ranked] == [tags[0]] for ranked in doc["tasks"].values())
    limit = svc.settings.max_candidate_tags
    _error(svc.tag(synth_user, {"tags": [tags[0]] * (limit + 1)}), 422, "tags", str(limit))


# ---------------------------------------------------------------------------
# explanations
# ---------------------------------------------------------------------------
def test_explain_gates_and_expert_shares(svc, synth_user, bundle):
    manifest, blobs = read_bundle(bundle("mvke-mt"))
    resp = svc.tag(synth_user, {"top_k": 4, "explain": True})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    index = {t: i for i, t in enumerate(json.loads(blobs["tags.json"]))}
    for task, ranked in doc["tasks"].items():
        spec = next(t for t in manifest.tasks if t.name == task)
        gates = decode_array(blobs[gates_file(task)], manifest.files[gates_file(task)])
        assert len(ranked) == 4
        for item in ranked:
            ex = item["explain"]
            assert ex["experts"] == spec.experts
            np.testing.assert_allclose(ex["gates"], gates[index[item["tag"]]], atol=1e-7)
            assert math.isclose(sum(ex["contributions"]), ex["cosine"], abs_tol=1e-6)
            assert math.isclose(sum(ex["shares"]), 1.0, abs_tol=1e-5)
            # the explained cosine is the one the score came from
            p = 1 / (1 + math.exp(-(ex["scale"] * ex["cosine"] + ex["bias"])))
            assert abs(p - item["score"]) <= 1e-5
    plain = svc.tag(synth_user, {"top_k": 4}).json()
    assert [[x["tag"] for x in r] for r in plain["tasks"].values()] == \
           [[x["tag"] for x in r] for r in doc["tasks"].values()]
    assert all(list(x) == ["tag", "score"] for r in plain["tasks"].values() for x in r)   # no cost, no key
    cand = svc.tag(synth_user, {"tags": [x["tag"] for x in plain["tasks"]["interest"][:2]], "explain": True,
                                "tasks": ["interest"]}).json()
    for got, want in zip(cand["tasks"]["interest"], doc["tasks"]["interest"][:2]):
        assert got["tag"] == want["tag"] and abs(got["score"] - want["score"]) <= 1e-6
        np.testing.assert_allclose(got["explain"]["contributions"], want["explain"]["contributions"], atol=1e-6)


# ---------------------------------------------------------------------------
# unknown feature values (issue 15, item 7)
# ---------------------------------------------------------------------------
def test_unknown_feature_values_are_counted_in_the_answer(svc, synth_user, reference):
    schema = reference("mvke-mt", "synthetic").schema
    cat, multi = schema.cat_fields[0], schema.multi_fields[0]
    known = {cat.name: cat.vocab[0], multi.name: multi.vocab[:2]}
    doc = svc.tag("new-user", {"top_k": 1, "features": known}).json()
    assert list(doc) == BASE_KEYS + ["missing_fields"]              # nothing unknown; the fields not sent
    assert doc["missing_fields"] == [n for n in schema.names if n not in known]
    typo = {cat.name: cat.vocab[0] + "x", multi.name: [multi.vocab[0], "t-typo", "cat28/tag0362"]}
    doc = svc.tag("new-user", {"top_k": 1, "features": typo}).json()
    assert doc["unknown_values"] == {cat.name: 1, multi.name: 2}
    listed = svc.tag(synth_user, {"top_k": 1, "features": {multi.name: ["zz", multi.vocab[1]]}}).json()
    assert listed["unknown_values"] == {multi.name: 1} and listed["feature_source"] == "store+request"
    # the feature store's `|`-joined form is not a request value: the same 422 as in a feature load
    joined = svc.tag(synth_user, {"top_k": 1, "features": {multi.name: "zz|" + multi.vocab[1]}})
    assert joined.status_code == 422 and joined.json()["detail"] == \
        f"features.{multi.name}: expected a list of values, got str"


# ---------------------------------------------------------------------------
# many users per call
# ---------------------------------------------------------------------------
def test_batch_answers_each_user_in_order_with_its_own_errors(svc, synth_user, dataset_dir, reference):
    users = user_ids(dataset_dir("synthetic"), 4, seed=3)
    schema = reference("mvke-mt", "synthetic").schema
    feats = {schema.cat_fields[0].name: schema.cat_fields[0].vocab[0]}
    body = {"users": [{"user_id": users[0]}, {"user_id": "nobody-here"},
                      {"user_id": "fresh", "features": feats, "top_k": 2},
                      {"user_id": users[1], "tasks": ["clicks"]},
                      {"user_id": users[2], "model_version": "0000000000000000"},
                      {"user_id": users[3], "tags": ["no/such"]}],
            "defaults": {"top_k": 3, "tasks": ["intention"]}}
    resp = svc.client.post("/tags:batch", json=body)
    assert resp.status_code == 200, resp.text
    res = resp.json()["results"]
    assert [r["user_id"] for r in res] == [u["user_id"] for u in body["users"]]
    single = svc.tag(users[0], {"top_k": 3, "tasks": ["intention"]}).json()
    assert_same_answer(res[0], single)
    assert (res[1]["status"], res[1]["error"]["field"]) == (404, "user_id")
    assert res[2]["feature_source"] == "request" and len(res[2]["tasks"]["intention"]) == 2
    assert_same_answer(res[2], svc.tag("fresh", {"top_k": 2, "tasks": ["intention"], "features": feats}).json())
    assert (res[3]["status"], res[3]["error"]["field"]) == (422, "tasks") and res[3]["error"]["errors"]
    assert (res[4]["status"], res[4]["error"]["field"]) == (404, "model_version")
    assert (res[5]["status"], res[5]["error"]["field"]) == (422, "tags")
    # limits and structural errors are the call's
    many = {"users": [{"user_id": "u"}] * (svc.settings.max_batch_users + 1)}
    _error(svc.client.post("/tags:batch", json=many), 422, "users", str(svc.settings.max_batch_users))
    _error(svc.client.post("/tags:batch", json={"users": [{"top_k": 3}]}), 422, "users.0.user_id")
    _error(svc.client.post("/tags:batch", content=b"users=1"), 415, "body", "application/json")


# ---------------------------------------------------------------------------
# versions: pinned, canary, promote, rollback
# ---------------------------------------------------------------------------
def test_pinned_and_canary_versions(private_redis, bundle, dataset_dir, tmp_path):
    from model_export.feature_store import load_dataset_users
    r = private_redis.client()
    keys = Keys("cv")
    a_dir = bundle("mvke-mt")
    b_dir = make_variant(a_dir, tmp_path / "b", 1)     # same scores, another version id
    c_dir = make_variant(a_dir, tmp_path / "c", 2)
    a = publish(a_dir, r, keys=keys)["version"]
    b = publish(b_dir, r, keys=keys, canary_percent=30)["version"]
    c = publish(c_dir, r, keys=keys, activate=False)["version"]
    load_dataset_users(dataset_dir("synthetic"), r, keys=keys, progress=False)
    users = user_ids(dataset_dir("synthetic"), 60, seed=5)
    with LiveService(make_settings(private_redis.url, "cv")) as s:
        _wait_canary(s, b)
        got = {u: s.tag(u, {"top_k": 2}).json()["model_version"] for u in users}
        want = {u: b if user_bucket(u) < 30 * HASH_BUCKETS // 100 else a for u in users}
        assert got == want and {a, b} == set(got.values())
        assert all(s.tag(u, {"top_k": 2}).json()["model_version"] == got[u] for u in users[:10])  # sticky
        pinned = s.tag(users[0], {"top_k": 2, "model_version": b}).json()
        assert pinned["model_version"] == b
        _error(s.tag(users[0], {"model_version": c}), 409, "model_version", c, "not loaded")
        _error(s.tag(users[0], {"model_version": "feedfacefeedface"}), 404, "model_version", "not a published")
        metrics = s.client.get("/metrics").text
        n_b = sum(v == b for v in got.values())
        assert _sample(metrics, "mvke_version_requests_total", version=b) >= n_b + 1
        assert _sample(metrics, "mvke_version_requests_total", version=a) >= len(users) - n_b
        assert _sample(metrics, "mvke_model_info", version=b, role="canary") == 1.0
        listing = s.client.get("/models").json()
        assert listing["active"] == a and listing["canary"] == {"version": b, "percent": 30.0, "source": "redis"}
        state = {v["version"]: (v["active"], v["canary"], v["loaded"]) for v in listing["versions"]}
        assert state == {a: (True, False, True), b: (False, True, True), c: (False, False, False)}
        assert all(v["gate"] is None for v in listing["versions"])   # published by hand: no cycle record
        promote(r, keys)
        s.wait_version(b)
        _wait(lambda: s.client.get("/readyz").json().get("canary_version") is None)
        assert {s.tag(u, {"top_k": 1}).json()["model_version"] for u in users} == {b}
        publish(c_dir, r, keys=keys, canary_percent=100)
        _wait_canary(s, c)
        assert {s.tag(u, {"top_k": 1}).json()["model_version"] for u in users[:10]} == {c}
        rollback(r, keys)
        _wait(lambda: s.client.get("/readyz").json().get("canary_version") is None)
        assert {s.tag(u, {"top_k": 1}).json()["model_version"] for u in users[:10]} == {b}
    # MVKE_CANARY overrides what Redis says
    with LiveService(make_settings(private_redis.url, "cv", canary=f"{a}:100")) as s:
        _wait_canary(s, a)
        assert s.tag(users[0], {"top_k": 1}).json()["model_version"] == a
        assert s.client.get("/models").json()["canary"]["source"] == "env"
    r.close()


def _wait(pred, timeout: float = 10.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def _wait_canary(s: LiveService, version: str) -> None:
    _wait(lambda: s.client.get("/readyz").json().get("canary_version") == version)


def test_no_model_503_names_the_prefixed_key(svc_redis):
    alias = Keys("acme").active            # {acme}:active (layout 2: every model key in one cluster slot)
    with LiveService(make_settings(svc_redis.url, "acme")) as s:
        _error(s.tag("u1"), 503, None, alias)
        assert alias in s.client.get("/readyz").json()["reason"]


# ---------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------
def test_api_keys(svc_redis, published, synth_user, tmp_path, caplog):
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# ops team\n{key_digest('file-key-2')}\n")
    settings = make_settings(svc_redis.url, published("mvke-mt", "synthetic"), api_keys="env-key-1",
                             api_keys_file=str(keyfile), access_log=True, log_level="INFO")
    with caplog.at_level(logging.INFO), LiveService(settings) as s:
        for headers in ({}, {"authorization": "Bearer nope"}, {"x-api-key": "env-key-"},
                        {"authorization": "Basic env-key-1"}):
            resp = s.tag(synth_user, {"top_k": 1}, headers=headers)
            _error(resp, 401, "authorization", "API key")
            assert resp.headers["www-authenticate"].startswith("Bearer")
        assert s.tag(synth_user, {"top_k": 1}, headers={"authorization": "Bearer env-key-1"}).status_code == 200
        assert s.tag(synth_user, {"top_k": 1}, headers={"x-api-key": "file-key-2"}).status_code == 200
        assert s.client.post("/tags:batch", json={"users": [{"user_id": synth_user}]}).status_code == 401
        assert s.client.get("/models").status_code == 401 and s.client.get("/model").status_code == 401
        for open_path in ("/healthz", "/readyz", "/metrics", "/ui", "/docs", "/openapi.json"):
            assert s.client.get(open_path).status_code == 200, open_path
        spec = s.client.get("/openapi.json").json()
        assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        assert "401" in spec["paths"]["/users/{user_id}/tags"]["post"]["responses"]
    logged = caplog.text
    assert "env-key-1" not in logged and "file-key-2" not in logged and "nope" not in logged
    assert "/users/" in logged  # the access log did run
    with LiveService(make_settings(svc_redis.url, published("mvke-mt", "synthetic"), api_keys="k",
                                   metrics_need_key=True)) as s:
        assert s.client.get("/metrics").status_code == 401
        assert s.client.get("/metrics", headers={"x-api-key": "k"}).status_code == 200


# ---------------------------------------------------------------------------
# the strict edge (issue 15, item 6) and offline /docs (item 8)
# ---------------------------------------------------------------------------
def test_non_json_body_is_415(svc, synth_user):
    resp = svc.client.post(ROUTE.format(synth_user), content=b'{"top_k": 3}',
                           headers={"content-type": "application/x-www-form-urlencoded"})  # curl -d
    _error(resp, 415, "body", "Content-Type: application/json", "x-www-form-urlencoded")
    resp = svc.client.post(ROUTE.format(synth_user), content=b'{"top_k": 3}', headers={"content-type": ""})
    _error(resp, 415, "body")
    ok = svc.client.post(ROUTE.format(synth_user), content=b'{"top_k": 3}',
                         headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


@pytest.mark.parametrize("body,field,words", [
    ({"top_k": "5"}, "top_k", ["valid integer"]),
    ({"top_k": True}, "top_k", ["valid integer"]),
    ({"min_score": True}, "min_score", ["valid number"]),
    ({"explain": "yes"}, "explain", ["boolean"]),
    ({"top_k": 100000}, "top_k", ["<= 200", "100000"]),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)
def test_strict_edge_every_422_has_the_same_shape(svc, synth_user, body, field, words):
    doc = _error(svc.tag(synth_user, body), 422, field, *words)
    assert set(doc) == {"detail", "field", "errors"} and len(doc["errors"]) == 1
    assert doc["errors"][0]["loc"][-1] == field.split(".")[-1]


def test_null_feature_value_is_one_clear_error(svc, synth_user, reference):
    name = reference("mvke-mt", "synthetic").schema.cat_fields[0].name
    doc = _error(svc.tag(synth_user, {"features": {name: None}}), 422, f"features.{name}", "got null",
                 "leave the feature out")
    assert len(doc["errors"]) == 1


def _raw_post(port: int, path: str) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("n,status", [(1000, 422), (100_000, 414)])
def test_overlong_user_id_is_json_naming_the_field(svc, n, status):
    code, headers, body = _raw_post(svc.port, "/users/" + "x" * n + "/tags")
    assert code == status and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["field"] == "user_id" and "128" in doc["detail"]
    assert len(body) < 2000  # the id is not echoed back whole


def test_docs_are_served_offline_from_the_package(svc):
    html = svc.client.get("/docs").text
    assert "docs/assets/swagger-ui-bundle.js" in html and "docs/assets/swagger-ui.css" in html
    assert "cdn" not in html.lower() and "https://" not in html.split("<body>", 1)[-1]
    for asset, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "css")):
        resp = svc.client.get(f"/docs/assets/{asset}")
        assert resp.status_code == 200 and kind in resp.headers["content-type"] and len(resp.content) > 10_000
    ui = svc.client.get("/ui")
    assert ui.status_code == 200 and "MVKE tag inspector" in ui.text and "https://" not in ui.text
    assert svc.client.get("/ui/app.js").status_code == 200 and svc.client.get("/ui/nope.js").status_code == 404
