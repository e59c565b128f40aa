"""Tag service end to end: real redis-server, real ONNX Runtime sessions, real HTTP.

The app runs under uvicorn in a background thread on a free 127.0.0.1 port and
is called with httpx. Models come from `tests/fixtures/model_fixtures.py`
(tiny checkpoints + exported bundles), are published with
`model_export.publish.publish` and the users' features loaded with
`model_export.feature_store.load_dataset_users` into a private redis-server
(never the shared one on 6379). Each (dataset, model) pair lives under its own
key prefix in the module's Redis, so services for different models share it.

The resilience tests (hot swap under load, Redis restart, pool exhaustion)
live in `tests/service/test_service_resilience.py` and reuse the helpers defined here.
"""
from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from mvke.runtime.keys import Keys
from model_export.feature_store import load_dataset_users, read_user
from model_export.publish import publish
from mvke.localredis import LocalRedis, free_port
from service.settings import Settings

pytestmark = pytest.mark.integration

TOL = 1e-4
ROUTE = "/users/{}/tags"


# ---------------------------------------------------------------------------
# helpers (imported by test_service_resilience.py)
# ---------------------------------------------------------------------------
class LiveService:
    """`create_app(settings)` served by uvicorn in a daemon thread on a free port."""

    def __init__(self, settings: Settings, port: int | None = None):
        import uvicorn

        from service.app import create_app
        self.settings = settings
        self.port = port or free_port()
        self.app = create_app(settings)
        from service.cli import HTTP_PROTOCOL
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=2, http=HTTP_PROTOCOL))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client: httpx.Client | None = None

    def start(self, timeout: float = 20.0) -> "LiveService":
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=10.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn thread died during startup")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"service on port {self.port} did not answer /healthz within {timeout}s")

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> "LiveService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # conveniences
    def tag(self, user_id: str, body=None, **kw) -> httpx.Response:
        return self.client.post(ROUTE.format(user_id), json=body, **kw)

    def wait_version(self, version: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.client.get("/readyz")
            if r.status_code == 200 and r.json().get("model_version") == version:
                return
            time.sleep(0.02)
        raise AssertionError(f"service did not load version {version} within {timeout}s: {r.text}")


def make_settings(redis_url: str, prefix: str = "mvke", **kw) -> Settings:
    # The service runs in this process's thread beside the test's client threads: on a loaded 2-core CI box its
    # event loop can wait longer than the production 0.5 s socket timeout for the GIL, and a parity test then
    # fails with a 503 (CI stop 35). Tests of timeouts pass their own, shorter redis_timeout_s.
    base = dict(redis_url=redis_url, key_prefix=prefix, model_poll_s=0.05, log_level="WARNING", redis_timeout_s=5.0)
    base.update(kw)
    return Settings(**base)


def publish_dataset(r, bundle_dir: Path, data_dir: Path, prefix: str) -> str:
    """Publish one bundle and load the dataset's users under `prefix`; -> version."""
    keys = Keys(prefix)
    info = publish(bundle_dir, r, keys=keys)
    report = load_dataset_users(data_dir, r, keys=keys, progress=False)
    assert report.loaded > 0 and not report.bad_rows
    return info["version"]


class Reference:
    """The PyTorch model of a checkpoint: sigmoid(model(cat, multi, tag)) for every tag, one at a time."""

    def __init__(self, ckpt_dir: Path):
        from mvke.training.trainer import load_checkpoint
        res = load_checkpoint(ckpt_dir)
        self.model, self.schema, self.tags = res.model.eval(), res.schema, res.tags
        self.tasks = list(self.model.tasks)

    def scores(self, rows: list[dict]) -> dict[str, np.ndarray]:
        """Raw feature rows -> per task [len(rows), T] probabilities (column j = tag id j+1)."""
        import torch
        cat, multi = self.schema.encode(rows).ids()
        n, T = len(rows), len(self.tags)
        tag_ids = torch.arange(1, T + 1).repeat(n).unsqueeze(1)                  # [n*T, 1]
        with torch.no_grad():
            p = torch.sigmoid(self.model(torch.from_numpy(cat).repeat_interleave(T, 0),
                                         torch.from_numpy(multi).repeat_interleave(T, 0), tag_ids))
        p = p.numpy().reshape(n, T, len(self.tasks))
        return {t: p[:, :, i] for i, t in enumerate(self.tasks)}

    def by_tag(self, rows: list[dict]) -> list[dict[str, dict[str, float]]]:
        """Per row: task -> {tag name: probability}."""
        s = self.scores(rows)
        return [{t: dict(zip(self.tags, s[t][i].tolist())) for t in self.tasks} for i in range(len(rows))]


def assert_matches(ranked: list[dict], ref: dict[str, float], full: bool = True, tol: float = TOL) -> None:
    """A task's ranked [{tag, score}] vs the reference {tag: p}: same scores, same ranking.

    Ranking: the tag at rank i has the i-th best reference score (within tol, so
    float32 near-ties may come in either order). `full`: every tag is present.
    """
    tags = [x["tag"] for x in ranked]
    got = np.array([x["score"] for x in ranked])
    want = np.array([ref[t] for t in tags])
    if full:
        assert sorted(tags) == sorted(ref), "not every tag was returned"
    assert len(set(tags)) == len(tags)
    assert np.all(np.diff(got) <= 0), "response not sorted by score"
    assert np.abs(got - want).max(initial=0) <= tol, f"scores differ by {np.abs(got - want).max():.2e}"
    best = np.sort(np.array(list(ref.values())))[::-1][: len(tags)]
    assert np.abs(want - best).max(initial=0) <= tol, "ranking differs from the model's"


def stored_row(r, user_id: str, prefix: str) -> dict:
    row = read_user(r, user_id, Keys(prefix))
    assert row is not None
    return row


def user_ids(data_dir: Path, n: int, seed: int = 0) -> list[str]:
    import pyarrow.parquet as pq
    ids = [str(u) for u in pq.read_table(Path(data_dir) / "users.parquet", columns=["user_id"])["user_id"].to_pylist()]
    return random.Random(seed).sample(ids, n)


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def svc_redis():
    """This module's private redis-server."""
    server = LocalRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def svc_r(svc_redis):
    r = svc_redis.client()
    yield r
    r.close()


@pytest.fixture(scope="module")
def published(svc_r, bundle, dataset_dir):
    """published(model, dataset) -> key prefix holding that model (active) and the dataset's users."""
    done: dict[tuple[str, str], str] = {}

    def get(model: str = "mvke-mt", dataset: str = "synthetic") -> str:
        if (model, dataset) not in done:
            prefix = f"t-{dataset}-{model}"
            publish_dataset(svc_r, bundle(model, dataset), dataset_dir(dataset), prefix)
            done[(model, dataset)] = prefix
        return done[(model, dataset)]

    return get


@pytest.fixture(scope="module")
def reference(checkpoint):
    cache: dict[tuple[str, str], Reference] = {}

    def get(model: str = "mvke-mt", dataset: str = "synthetic") -> Reference:
        if (model, dataset) not in cache:
            cache[(model, dataset)] = Reference(checkpoint(model, dataset))
        return cache[(model, dataset)]

    return get


@pytest.fixture(scope="module")
def svc(svc_redis, published):
    """The service most edge tests talk to: mvke-mt on the synthetic data, batching on."""
    prefix = published("mvke-mt", "synthetic")
    with LiveService(make_settings(svc_redis.url, prefix)) as s:
        yield s


@pytest.fixture(scope="module")
def synth_user(svc_r, published, dataset_dir):
    """A synthetic user that is in the feature store."""
    prefix = published("mvke-mt", "synthetic")
    uid = user_ids(dataset_dir("synthetic"), 1, seed=7)[0]
    assert read_user(svc_r, uid, Keys(prefix))
    return uid


# ---------------------------------------------------------------------------
# parity with the PyTorch model
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
@pytest.mark.parametrize("model", ["mvke-mt", "nomtl"])
@pytest.mark.parametrize("dataset", ["synthetic", "ml100k"])
def test_scores_match_pytorch_forward(dataset, model, batching, svc_redis, svc_r, published, reference,
                                      dataset_dir):
    prefix = published(model, dataset)
    ref = reference(model, dataset)
    T = len(ref.tags)
    users = user_ids(dataset_dir(dataset), 12, seed=1)
    expected = ref.by_tag([stored_row(svc_r, u, prefix) for u in users])
    with LiveService(make_settings(svc_redis.url, prefix, batching=batching)) as s:
        # concurrent requests, so that the batcher actually coalesces several users into one model call
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda u: s.client.post(ROUTE.format(u), json={"top_k": T}), users))
        metrics = s.client.get("/metrics").text
    for uid, resp, exp in zip(users, responses, expected):
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        assert doc["user_id"] == uid and doc["model"] == model and doc["feature_source"] == "store"
        assert set(doc["tasks"]) == set(ref.tasks)
        for task in ref.tasks:
            assert len(doc["tasks"][task]) == T
            assert_matches(doc["tasks"][task], exp[task])
    count = _sample(metrics, "mvke_model_batch_size_count")
    assert count is not None and 1 <= count <= len(users)
    if not batching:
        assert count == len(users)  # one model call per request


def test_top_k_returns_the_best_k_and_task_subset(svc, svc_r, published, reference, synth_user):
    ref = reference("mvke-mt", "synthetic")
    exp = ref.by_tag([stored_row(svc_r, synth_user, published("mvke-mt", "synthetic"))])[0]
    resp = svc.tag(synth_user, {"top_k": 5, "tasks": ["intention"]})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert list(doc["tasks"]) == ["intention"]
    assert len(doc["tasks"]["intention"]) == 5
    assert_matches(doc["tasks"]["intention"], exp["intention"], full=False)
    default = svc.tag(synth_user).json()  # no body at all: every task, top_k default 20
    assert set(default["tasks"]) == set(ref.tasks) and all(len(v) == 20 for v in default["tasks"].values())


# ---------------------------------------------------------------------------
# request options
# ---------------------------------------------------------------------------
def test_exclude_tags_and_min_score(svc, synth_user):
    full = svc.tag(synth_user, {"top_k": 200}).json()["tasks"]
    top = [full["interest"][0]["tag"], full["intention"][1]["tag"], full["interest"][-1]["tag"]]
    resp = svc.tag(synth_user, {"top_k": 200, "exclude_tags": top})
    assert resp.status_code == 200, resp.text
    for task, ranked in resp.json()["tasks"].items():
        assert ranked == [x for x in full[task] if x["tag"] not in top]
    cut = full["interest"][9]["score"]
    resp = svc.tag(synth_user, {"top_k": 200, "min_score": cut, "tasks": ["interest"]})
    ranked = resp.json()["tasks"]["interest"]
    assert ranked == [x for x in full["interest"] if x["score"] >= cut]
    assert len(ranked) >= 10 and all(x["score"] >= cut for x in ranked)
    # both at once, and a min_score nothing reaches
    both = svc.tag(synth_user, {"top_k": 3, "min_score": cut, "exclude_tags": top[:1], "tasks": ["interest"]})
    assert both.json()["tasks"]["interest"] == [x for x in full["interest"] if x["tag"] != top[0]][:3]
    assert svc.tag(synth_user, {"min_score": 1.0}).json()["tasks"] == {"interest": [], "intention": []}


def test_request_features_override_stored_ones(svc, svc_r, published, reference, synth_user):
    prefix = published("mvke-mt", "synthetic")
    ref = reference("mvke-mt", "synthetic")
    T = len(ref.tags)
    stored = stored_row(svc_r, synth_user, prefix)
    cat = ref.schema.cat_fields[0]
    multi = ref.schema.multi_fields[0]
    other = next(v for v in cat.vocab if v != stored.get(cat.name))
    override = {cat.name: other, multi.name: multi.vocab[:3]}

    # a stored user, some fields overridden by the body
    resp = svc.tag(synth_user, {"top_k": T, "features": override})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["feature_source"] == "store+request"
    exp = ref.by_tag([{**stored, **override}])[0]
    for task in ref.tasks:
        assert_matches(doc["tasks"][task], exp[task])
    plain = svc.tag(synth_user, {"top_k": T}).json()
    assert plain["feature_source"] == "store"
    assert plain["tasks"] != doc["tasks"], "the override changed nothing"

    # a user the store does not know, all features from the body (unknown values -> OOV, not an error)
    body_only = {**override, ref.schema.cat_fields[1].name: "never-seen-value"}
    resp = svc.tag("brand-new-user", {"top_k": T, "features": body_only})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["feature_source"] == "request" and doc["user_id"] == "brand-new-user"
    exp = ref.by_tag([body_only])[0]
    for task in ref.tasks:
        assert_matches(doc["tasks"][task], exp[task])


def test_movielens_user_ids_and_openapi(svc_redis, published, dataset_dir):
    """Numeric MovieLens ids work in the path; the OpenAPI schema carries the examples."""
    prefix = published("mvke-mt", "ml100k")
    with LiveService(make_settings(svc_redis.url, prefix)) as s:
        uid = user_ids(dataset_dir("ml100k"), 1)[0]
        resp = s.tag(uid, {"top_k": 3})
        assert resp.status_code == 200, resp.text
        assert resp.json()["user_id"] == uid
        spec = s.client.get("/openapi.json").json()
        op = spec["paths"]["/users/{user_id}/tags"]["post"]
        assert {"200", "404", "413", "422", "503"} <= set(op["responses"])
        assert "examples" in json.dumps(spec["components"]["schemas"]["TagRequest"])


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
def _error(resp: httpx.Response, status: int, field: str | None, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    doc = resp.json()
    assert doc["field"] == field, doc
    for w in words:
        assert w in doc["detail"], (w, doc)
    return doc


def test_unknown_user_without_features_is_404(svc):
    _error(svc.tag("nobody-0042"), 404, "user_id", "nobody-0042", "features")
    _error(svc.tag("nobody-0042", {"top_k": 3}), 404, "user_id", "nobody-0042")


@pytest.mark.parametrize("body,field,words", [
    ({"top_k": 0}, "top_k", ["top_k", "greater than or equal to 1"]),
    ({"top_k": -5}, "top_k", ["top_k"]),
    ({"top_k": 201}, "top_k", ["top_k", "200"]),
    ({"top_k": "many"}, "top_k", ["top_k", "integer"]),
    ({"top_k": 2.5}, "top_k", ["top_k"]),
    ({"min_score": 1.5}, "min_score", ["min_score"]),
    ({"min_score": "high"}, "min_score", ["min_score"]),
    ({"min_score": 10 ** 30}, "min_score", ["min_score"]),  # an int orjson cannot write back (was a 500)
    ({"top_k": 10 ** 30}, "top_k", ["top_k", "200"]),
    ({"tasks": "interest"}, "tasks", ["tasks", "list"]),
    ({"tasks": []}, "tasks", ["tasks"]),
    ({"tasks": ["interest", "clicks"]}, "tasks", ["tasks", "clicks"]),
    ({"exclude_tags": "cat00/tag0001"}, "exclude_tags", ["exclude_tags"]),
    ({"exclude_tags": ["no/such/tag"]}, "exclude_tags", ["no/such/tag"]),
    ({"topk": 5}, "topk", ["topk", "Extra inputs are not permitted"]),
    ({"features": ["age_bucket"]}, "features", ["features"]),
    ({"features": {"age_bucket": {"a": 1}}}, "features.age_bucket", ["features.age_bucket"]),
    ({"features": {"no_such_feature": "x"}}, "features.no_such_feature", ["features.no_such_feature", "unknown"]),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)
def test_invalid_body_is_422_naming_the_field(svc, synth_user, body, field, words):
    _error(svc.tag(synth_user, body), 422, field, *words)


def test_list_for_a_single_valued_feature_is_422(svc, synth_user, reference):
    schema = reference("mvke-mt", "synthetic").schema
    cat, multi = schema.cat_fields[0].name, schema.multi_fields[0].name
    _error(svc.tag(synth_user, {"features": {cat: ["a", "b"]}}), 422, f"features.{cat}", "expected one value")
    # a scalar for a multi-valued field passes the schema check but fails encoding: still a 422 naming it
    _error(svc.tag("new-user", {"features": {multi: 17}}), 422, f"features.{multi}", "list")
    # a list item of the wrong kind inside a multi-valued field
    _error(svc.tag("new-user", {"features": {multi: [["x"]]}}), 422, f"features.{multi}")


@pytest.mark.parametrize("raw", [b"{not json", b'{"top_k": 3', b'{"top_k": 3}}', b"\x00"])
def test_malformed_json_is_422(svc, synth_user, raw):
    resp = svc.client.post(ROUTE.format(synth_user), content=raw, headers={"content-type": "application/json"})
    doc = _error(resp, 422, "body", "JSON decode error at character")
    assert doc["errors"][0]["type"] == "json_invalid"


def test_body_that_is_not_utf8_is_4xx(svc, synth_user):
    resp = svc.client.post(ROUTE.format(synth_user), content=b'{"top_k": \xff}', headers={"content-type": "application/json"})
    _error(resp, 400, "body", "parsing the body")
    # the same bytes without a JSON content type: 415, saying what to send (was a 500, then a 422)
    resp = svc.client.post(ROUTE.format(synth_user), content=b"\x9c\xe8\xba", headers={"content-type": "text/plain"})
    _error(resp, 415, "body", "application/json", "text/plain")


def test_oversized_body_is_413_with_and_without_content_length(svc, synth_user):
    limit = svc.settings.max_body_bytes
    big = json.dumps({"features": {"clicked_tags": ["t%05d" % i for i in range(limit // 6)]}}).encode()
    assert len(big) > limit
    resp = svc.client.post(ROUTE.format(synth_user), content=big, headers={"content-type": "application/json"})
    _error(resp, 413, "body", str(limit))

    def chunks():  # a generator body: httpx sends it chunked, without Content-Length
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]
    resp = svc.client.post(ROUTE.format(synth_user), content=chunks(), headers={"content-type": "application/json"})
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in resp.request.headers
    _error(resp, 413, "body", str(limit))
    # a small chunked body is fine
    small = json.dumps({"top_k": 2}).encode()
    resp = svc.client.post(ROUTE.format(synth_user), content=iter([small[:5], small[5:]]),
                           headers={"content-type": "application/json"})
    assert resp.status_code == 200 and all(len(v) == 2 for v in resp.json()["tasks"].values())


def test_no_model_published_is_503(svc_redis):
    with LiveService(make_settings(svc_redis.url, "empty-prefix")) as s:
        _error(s.tag("u1", {"top_k": 3}), 503, None, "no model")
        assert s.client.get("/healthz").status_code == 200
        ready = s.client.get("/readyz")
        assert ready.status_code == 503 and not ready.json()["ready"]
        assert "no model" in ready.json()["reason"]
        assert s.client.get("/model").status_code == 503


def test_redis_unreachable_is_503_with_retry_after():
    port = free_port()  # nothing listens there
    with LiveService(make_settings(f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.2)) as s:
        resp = s.tag("u1", {"top_k": 3})
        _error(resp, 503, None, "redis")
        assert int(resp.headers["retry-after"]) >= 1
        assert s.client.get("/healthz").status_code == 200
        ready = s.client.get("/readyz")
        assert ready.status_code == 503 and "redis" in ready.json()["reason"]


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "null", "list", "dict", "bigint"]
    if depth > 2:
        kinds = kinds[:5]
    k = rng.choice(kinds)
    if k == "int":
        return rng.randint(-5, 300)
    if k == "bigint":
        return rng.choice([10 ** 30, -(10 ** 30), 2 ** 63, 2 ** 64 + 1])
    if k == "float":
        return rng.choice([0.0, 0.5, -1.0, 1e308, 1e-308, rng.random()])
    if k == "str":
        return rng.choice(["", "interest", "intention", "x" * rng.randint(1, 50), "é\u2603\U0001F600", "a|b|c",
                           "\x00", "cat00/tag0001", "NaN"])
    if k == "bool":
        return rng.random() < 0.5
    if k == "null":
        return None
    if k == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["a", "top_k", "features", "age_bucket", "clicked_tags", ""]): _random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def test_client_input_never_causes_a_500(svc, synth_user, reference):
    """Property-style: random and malformed bodies, paths and headers never get a 5xx."""
    schema = reference("mvke-mt", "synthetic").schema
    keys = ["top_k", "tasks", "min_score", "exclude_tags", "features", "extra"]
    feature_names = schema.names[:4] + [schema.multi_fields[0].name, "bogus"]
    rng = random.Random(1234)
    seen: dict[int, int] = {}
    for _ in range(200):
        user = rng.choice([synth_user, "nobody", "ü-ser", "a" * 128, "%2F..%2F", "1", "x" * 129])
        mode = rng.random()
        headers = {"content-type": rng.choice(["application/json"] * 4 + ["text/plain", ""])}
        if mode < 0.15:  # raw junk
            content = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        elif mode < 0.3:  # truncated valid JSON
            text = json.dumps({"top_k": rng.randint(1, 10), "features": {feature_names[0]: "x"}})
            content = text[: rng.randint(0, len(text))].encode()
        elif mode < 0.55:  # a valid body, maybe with one field mutated
            body = {"top_k": rng.randint(1, 60), "tasks": rng.sample(["interest", "intention"], rng.randint(1, 2)),
                    "min_score": rng.random() / 2, "features": {feature_names[0]: "x", feature_names[4]: ["a", 1]}}
            if rng.random() < 0.3:
                body[rng.choice(keys)] = _random_json(rng)
            content = json.dumps(body).encode()
        else:
            body = {rng.choice(keys): _random_json(rng) for _ in range(rng.randint(0, 4))}
            if rng.random() < 0.5:
                body["features"] = {rng.choice(feature_names): _random_json(rng) for _ in range(rng.randint(1, 4))}
            if rng.random() < 0.3:
                body.pop("extra", None)
            content = json.dumps(body).encode()
        resp = svc.client.post("/users/" + user + "/tags", content=content, headers=headers)
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, (user, content[:200], resp.status_code, resp.text[:300])
        assert resp.headers["content-type"].startswith("application/json")
    assert seen.get(422, 0) > 30 and seen.get(200, 0) > 8, seen
    assert svc.client.get("/readyz").status_code == 200


# ---------------------------------------------------------------------------
# observability
# ---------------------------------------------------------------------------
def _samples(text: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _sample(text: str, name: str, **labels) -> float | None:
    for s in _samples(text):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_metrics_and_model_info(svc, synth_user):
    for _ in range(3):
        assert svc.tag(synth_user, {"top_k": 2}).status_code == 200
    assert svc.tag("nobody-at-all").status_code == 404
    assert svc.tag(synth_user, {"top_k": 0}).status_code == 422
    text = svc.client.get("/metrics").text
    route = "/users/{user_id}/tags"
    assert _sample(text, "mvke_requests_total", route=route, status="200") >= 3
    assert _sample(text, "mvke_requests_total", route=route, status="404") >= 1
    assert _sample(text, "mvke_requests_total", route=route, status="422") >= 1
    assert _sample(text, "mvke_requests_total", route="/healthz", status="200") >= 1
    assert _sample(text, "mvke_request_seconds_count", route=route, status="200") >= 3
    assert _sample(text, "mvke_request_seconds_bucket", route=route, status="200", le="+Inf") >= 3
    assert _sample(text, "mvke_model_batch_size_count") >= 3
    assert _sample(text, "mvke_model_batch_size_bucket", le="1.0") >= 1
    model = svc.client.get("/model").json()
    # KServe's shape: preprocess (encode), one predictor call (predict), postprocess
    for step in ("fetch", "encode", "predict", "postprocess"):
        assert _sample(text, "mvke_step_seconds_count", step=step) >= 1, step
    assert _sample(text, "mvke_step_seconds_count", step="tower") is None
    assert model["scoring"] in ("onnx", "numpy") and model["approximate"] is False
    assert _sample(text, "mvke_model_info", version=model["version"], model="mvke-mt",
                   provider=model["provider"]) == 1.0
    assert model["model"] == "mvke-mt"
    assert model["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert [t["name"] for t in model["tasks"]] == ["interest", "intention"]
    assert model["num_tags"] > 0 and model["features"] and "test_auc" in model["metrics"]
    assert model["serving"] == svc.settings.serving_summary() and model["serving"]["batching"] is True
    ready = svc.client.get("/readyz").json()
    assert ready == {"ready": True, "model_version": model["version"]}
    resp = svc.tag(synth_user, {"top_k": 1}, headers={"x-request-id": "req-abc"})
    assert resp.headers["x-request-id"] == "req-abc"


# ---------------------------------------------------------------------------
# one set of feature-value rules (mvke/runtime/feature_values.py) behind every entry point
# ---------------------------------------------------------------------------
def test_a_bad_value_reads_the_same_through_request_feature_load_and_tag_all(svc, synth_user, bundle, tmp_path):
    """The same bad raw value sent as request features, loaded into the feature store and tagged by
    tag-all gets the same message naming the field (HTTP 422 / the loader's reject / tag-all's reject)."""
    import pyarrow as pa

    from batch.tag_all import PartWorker
    from model_export.feature_store import validate_row
    from model_export.feature_writer import store_columns
    from mvke.runtime.contract import read_bundle
    manifest, blobs = read_bundle(bundle("mvke-mt"))
    worker = PartWorker(manifest, blobs, {"ort_threads": 1, "provider": "cpu", "top_k": 5, "out": str(tmp_path)})
    schema = worker.model.schema
    kinds = {f.name: f.kind for f in schema.fields}
    cat, multi = schema.cat_fields[0].name, schema.multi_fields[0].name
    cases = [(cat, ["a", "b"], "expected one value, got list"),
             (multi, 7, "expected a list of values, got int"),
             (multi, "t1|t2", "expected a list of values, got str"),
             (multi, [["nested"], ["list"]], "list items must be scalar values"),
             (multi, ["a|b"], "list items must not contain '|'")]
    for field, value, message in cases:
        seen = {}
        resp = svc.tag(synth_user, {"features": {field: value}})
        if resp.status_code == 422:
            seen["http"] = resp.json()["detail"]
        _, bad_field, reason = validate_row({"user_id": "u", field: value}, kinds)
        seen["load rows"] = f"features.{bad_field}: {reason}"
        cols = store_columns(pa.Table.from_pylist([{"user_id": "u", field: value}]), kinds)
        seen["load columns"] = f"features.{cols.rejects[0][1]}: {cols.rejects[0][2]}"
        res = worker.tag_batch(pa.Table.from_pylist([{"user_id": "u", field: value}]).to_batches()[0])
        seen["tag-all"] = f"features.{res.rejects[0][1]}: {res.rejects[0][2]}"
        assert len(seen) == 4, (field, value, seen)
        assert len(set(seen.values())) == 1 and next(iter(seen.values())).startswith(f"features.{field}: {message}"), \
            (field, value, seen)


def test_request_rules_features_empty_missing_fields_and_a_batch_users_own_bad_option(svc, synth_user, svc_r,
                                                                                      published):
    """`"features": {}` is a 422 naming the problem; a request-only user lacking model fields is told which
    (`missing_fields`, counted in /metrics); in /tags:batch a user's own bad option is that user's 422."""
    _error(svc.tag(synth_user, {"features": {}}), 422, "features", "empty")
    schema = svc.app.state.svc.registry.current.schema
    first = schema.cat_fields[0].name
    doc = svc.tag("brand-new-user", {"features": {first: schema.cat_fields[0].vocab[0]}}).json()
    assert doc["missing_fields"] == [n for n in schema.names if n != first], doc
    assert "missing_fields" not in svc.tag(synth_user).json()            # a complete stored user: as before
    text = svc.client.get("/metrics").text
    assert _sample(text, "mvke_missing_fields_total", field=schema.names[-1]) >= 1
    batch = svc.client.post("/tags:batch", json={"users": [{"user_id": synth_user, "top_k": 0},
                                                           {"user_id": synth_user, "top_k": 2}]}).json()["results"]
    assert batch[0]["status"] == 422 and batch[0]["error"]["field"] == "users.0.top_k", batch[0]
    assert all(len(ranked) == 2 for ranked in batch[1]["tasks"].values()), batch[1]
