"""Issue 28 §1: a model and the feature store must agree.

`mvke features load` records the schema it wrote (mvke/runtime/store_schema.py); `mvke publish`
refuses a bundle whose features the store does not match (naming the fields, saying what to do),
`--force` publishes it anyway; the service checks again when it loads a version: a mismatched
canary is not loaded (its users stay on the active version), a mismatched active version is
served and named in /readyz. Real redis-server, real bundles, real HTTP.
"""
from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from model_export.feature_store import load_dataset_users
from model_export.publish import PublishError, publish
from mvke.runtime.contract import read_bundle
from mvke.runtime.keys import Keys
from mvke.runtime.store_schema import StoreSchema, compare, fingerprint, read_store_schema

KEYS = Keys()


def _features(**fields) -> dict:
    return {"fields": [{"name": n, "kind": k, "max_len": 1, "vocab": v} for n, (k, v) in fields.items()]}


def test_compare_names_every_kind_of_difference():
    store = StoreSchema({"age": "cat", "tags": "multi", "extra": "cat"},
                        {"age": ["a1", "a2", "a1"], "tags": ["x", "y"], "extra": ["e"]})
    assert compare(store, _features(age=("cat", ["a1", "a2"]), tags=("multi", ["x", "y", "z"]))) == []   # extra: fine
    problems = compare(store, _features(age=("multi", ["a1"]), tags=("multi", ["p", "q"]), city=("cat", ["c"])))
    assert len(problems) == 3
    assert "'age'" in problems[0] and "multi" in problems[0] and "cat" in problems[0]
    assert "'tags'" in problems[1] and "0 of 2" in problems[1]
    assert "'city'" in problems[2] and "no such field" in problems[2]
    assert fingerprint({"a": "cat", "b": "multi"}) == fingerprint({"b": "multi", "a": "cat"}) != fingerprint({"a": "cat"})


@pytest.mark.integration
def test_publish_refuses_other_fields_force_publishes_service_flags(redis_server, redis_client, bundle, dataset_dir,
                                                                     capsys):
    from mvke.cli import main
    from tests.service.test_service import LiveService, make_settings
    synth, other = bundle("mvke-mt"), bundle("mvke-mt", "ml100k")
    data = dataset_dir("synthetic")
    kinds = json.loads((data / "meta.json").read_text())["fields"]

    assert read_store_schema(redis_client, KEYS) is None
    first = publish(synth, redis_client)                           # nothing recorded yet: a warning, not a refusal
    assert first["feature_store"]["checked"] is False and "warning" in first["feature_store"]
    load_dataset_users(data, redis_client, progress=False)
    store = read_store_schema(redis_client, KEYS)
    assert store.fields == kinds and store.fingerprint == fingerprint(kinds) and store.users == 400
    assert set(store.samples) == set(kinds) and all(store.samples.values())
    again = publish(synth, redis_client)
    assert again["feature_store"] == {"checked": True, "store_fingerprint": store.fingerprint, "compatible": True}

    # another dataset's bundle: other fields, another catalogue -> refused, names the fields and what to do
    other_fields = [f["name"] for f in read_bundle(other)[0].features["fields"] if f["name"] not in kinds]
    assert other_fields
    with pytest.raises(PublishError) as refused:
        publish(other, redis_client, canary_percent=50)
    assert all(repr(name) in str(refused.value) for name in other_fields)
    assert "mvke features load" in str(refused.value) and "--force" in str(refused.value)
    assert redis_client.get(KEYS.canary) is None and len(redis_client.zrange(KEYS.versions, 0, -1)) == 1

    url = ["--redis", redis_server.url]
    capsys.readouterr()
    assert main(["publish", str(other), "--canary", "50", *url]) == 2
    assert other_fields[0] in capsys.readouterr().err
    assert main(["publish", str(other), "--canary", "50", "--force", *url]) == 0
    out = capsys.readouterr()
    assert "WARNING" in out.err and json.loads(out.out)["feature_store"]["forced"] is True
    other_version = read_bundle(other)[0].version

    # the service: the mismatched canary is not served; the active version answers everyone
    with LiveService(make_settings(redis_server.url)) as svc:
        svc.wait_version(first["version"])
        deadline = time.monotonic() + 10
        while "canary" not in (ready := svc.client.get("/readyz").json()).get("load_errors", {}):
            assert time.monotonic() < deadline, ready
        assert "canary_version" not in ready
        assert "not served as the canary" in ready["load_errors"]["canary"]
        metrics = svc.client.get("/metrics").text
        assert 'mvke_schema_mismatch{role="canary"} 1.0' in metrics and 'mvke_schema_mismatch{role="active"} 0.0' in metrics
        assert 'mvke_model_load_failing{role="canary"} 0.0' in metrics
        assert other_fields[0] in ready["load_errors"]["canary"]
        users = [str(u) for u in pd.read_parquet(data / "users.parquet")["user_id"][:40]]
        served = {svc.tag(u).json()["model_version"] for u in users}
        assert served == {first["version"]}

        # §6: /docs examples (and the /ui placeholders, read from them) use a stored user and the model's fields
        schemas = svc.client.get("/openapi.json").json()["components"]["schemas"]
        example_user = schemas["TagResponse"]["examples"][0]["user_id"]
        assert example_user == store.example_user == users[0]
        assert svc.tag(example_user).json()["feature_source"] == "store"
        assert set(schemas["TagRequest"]["examples"][0]["features"]) <= set(kinds)

        # forced to active: served (nothing else to serve with), flagged in /readyz
        assert main(["promote", *url]) == 0
        svc.wait_version(other_version)
        ready = svc.client.get("/readyz").json()
        assert ready["ready"] is True and other_fields[0] in ready["schema_mismatch"]["active"]
        deadline = time.monotonic() + 5
        while 'mvke_schema_mismatch{role="active"} 1.0' not in svc.client.get("/metrics").text:
            assert time.monotonic() < deadline
