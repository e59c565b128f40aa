"""The Open Inference Protocol (issue 24) with the real clients Triton ships: `tritonclient.http`
(binary tensor data on and off) and `tritonclient.grpc`, against a live service (uvicorn + the
gRPC port in the same process) on a private redis-server with the tiny published model.

Every answer is compared with the native route's (POST /users/{id}/tags) for the same users:
same tags in the same order (ties included), same scores; errors carry the native message.
"""
from __future__ import annotations

import gzip
import re
import struct
import threading
import time

import httpx
import numpy as np
import pytest

from mvke.localredis import free_port
from tests.service.test_service import (LiveService, make_settings, published, reference, svc_r, svc_redis,  # noqa: F401
                                        user_ids)

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = "mvke"
CLIENTS = ["http-binary", "http-json", "grpc"]


@pytest.fixture(scope="module")
def oip(svc_redis, published):
    prefix = published("mvke-mt", "synthetic")
    with LiveService(make_settings(svc_redis.url, prefix, grpc_port=free_port())) as s:
        s.grpc_url = f"127.0.0.1:{s.settings.grpc_port}"
        yield s


@pytest.fixture(scope="module")
def users(dataset_dir):
    return user_ids(dataset_dir("synthetic"), 64, seed=11)


@pytest.fixture(scope="module")
def clients(oip):
    h = httpclient.InferenceServerClient(url=oip.url[len("http://"):])
    g = grpcclient.InferenceServerClient(url=oip.grpc_url)
    yield {"http": h, "grpc": g}
    h.close()
    g.close()


def infer(clients, kind: str, user_list: list[str], parameters: dict | None = None, version: str = "",
          outputs: list[str] | None = None, headers: dict | None = None):
    """One inference with a tritonclient -> {output name: numpy array}, the response's model_version."""
    module = grpcclient if kind == "grpc" else httpclient
    binary = kind != "http-json"
    x = module.InferInput("user_id", [len(user_list)], "BYTES")
    x.set_data_from_numpy(np.array(user_list, dtype=object), **({} if kind == "grpc" else {"binary_data": binary}))
    if kind == "http-json" and outputs is None:    # without named outputs the client asks for binary ones
        outputs = ["interest_tags", "interest_scores", "intention_tags", "intention_scores"]
    outs = None if outputs is None else [
        module.InferRequestedOutput(n, **({} if kind == "grpc" else {"binary_data": binary})) for n in outputs]
    client = clients["grpc" if kind == "grpc" else "http"]
    res = client.infer(MODEL, [x], model_version=version, outputs=outs, parameters=parameters, headers=headers)
    doc = res.get_response(as_json=True) if kind == "grpc" else res.get_response()
    names = [o["name"] for o in doc["outputs"]]
    return {n: res.as_numpy(n) for n in names}, doc["model_version"]


def native(svc, user_id: str, body: dict) -> dict:
    resp = svc.tag(user_id, body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def assert_same_as_native(got: dict, want: list[dict], tasks=("interest", "intention")) -> None:
    for i, doc in enumerate(want):
        for task in tasks:
            tags = [text(t) for t in got[f"{task}_tags"][i]]
            scores = got[f"{task}_scores"][i]
            assert got[f"{task}_scores"].dtype == np.float32
            assert tags == [x["tag"] for x in doc["tasks"][task]], (i, task)       # same order, ties included
            np.testing.assert_allclose(scores, [x["score"] for x in doc["tasks"][task]], rtol=0, atol=1e-6)


def text(x) -> str:
    """A BYTES element as tritonclient hands it back: bytes (binary, gRPC) or str (JSON)."""
    return x.decode() if isinstance(x, bytes) else x


def error_of(exc: InferenceServerException) -> tuple[str, str]:
    return str(exc.status()), exc.message()


# ---------------------------------------------------------------------------
# health, readiness, metadata
# ---------------------------------------------------------------------------
def test_health_ready_and_metadata(oip, clients):
    version = oip.client.get("/readyz").json()["model_version"]
    for kind in ("http", "grpc"):
        c = clients[kind]
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
        assert c.is_model_ready(MODEL, version) and not c.is_model_ready(MODEL, "feedfacefeedface")
        assert not c.is_model_ready("other")
        server = c.get_server_metadata(**({"as_json": True} if kind == "grpc" else {}))
        assert server["name"] == "mvke" and "binary_tensor_data" in server["extensions"]
        meta = c.get_model_metadata(MODEL, **({"as_json": True} if kind == "grpc" else {}))
        assert meta["name"] == MODEL and meta["versions"] == [version]
        inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
        outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
        assert inputs["user_id"] == ("BYTES", [-1]) and len(inputs) > 1        # + the raw features
        assert outputs["interest_tags"] == ("BYTES", [-1, -1]) and outputs["intention_scores"] == ("FP32", [-1, -1])
        assert outputs["model_version"] == ("BYTES", [-1])
    assert oip.client.get(f"/v2/models/{MODEL}/versions/{version}").status_code == 200
    resp = oip.client.get(f"/v2/models/{MODEL}/versions/feedfacefeedface")
    assert resp.status_code == 404 and "not a published version" in resp.json()["error"]
    assert oip.client.get("/v2/health/live").json() == {"live": True}
    resp = oip.client.get("/v2/models/other")
    assert resp.status_code == 404 and resp.json() == {"error": "model: unknown model 'other'; this service serves 'mvke'"}
    resp = oip.client.get("/v2/nothing-here")
    assert resp.status_code == 404 and "error" in resp.json()      # the protocol's error shape, also from FastAPI
    metrics = oip.client.get("/metrics").text
    assert 'route="/v2/models/{model_name}"' in metrics and 'route="/v2/health/live"' in metrics


# ---------------------------------------------------------------------------
# same answers as the native route
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("batch", [1, 64])
def test_top_k_equals_native_route(oip, clients, users, kind, batch):
    chosen = users[:batch]
    want = [native(oip, u, {"top_k": 10}) for u in chosen]
    got, version = infer(clients, kind, chosen, {"top_k": 10})
    assert version == want[0]["model_version"]
    assert all(got[f"{t}_tags"].shape == (batch, 10) for t in ("interest", "intention"))
    assert_same_as_native(got, want)


@pytest.mark.parametrize("kind", CLIENTS)
def test_parameters_map_to_the_native_options(oip, clients, users, kind):
    u = users[:3]
    first = native(oip, u[0], {"top_k": 3})["tasks"]["interest"][0]["tag"]
    body = {"top_k": 4, "tasks": ["interest"], "exclude_tags": [first]}
    want = [native(oip, x, body) for x in u]
    got, _ = infer(clients, kind, u, {"top_k": 4, "tasks": "interest", "exclude_tags": first},
                   outputs=["interest_tags", "interest_scores", "model_version"])
    assert set(got) == {"interest_tags", "interest_scores", "model_version"}
    assert_same_as_native(got, want, tasks=("interest",))
    assert [text(v) for v in got["model_version"]] == [w["model_version"] for w in want]
    # candidate tags (a JSON list in a string parameter) and min_score: short rows are padded
    cands = [x["tag"] for x in want[0]["tasks"]["interest"]][:3]
    body = {"tags": cands, "min_score": want[0]["tasks"]["interest"][1]["score"], "tasks": ["interest"]}
    want = [native(oip, x, body) for x in u]
    got, _ = infer(clients, kind, u, {"tags": '["' + '", "'.join(cands) + '"]', "tasks": "interest",
                                      "min_score": body["min_score"]}, outputs=["interest_tags", "interest_scores"])
    k = max(len(w["tasks"]["interest"]) for w in want)
    assert got["interest_tags"].shape == (3, k)
    for row, w in zip(got["interest_tags"], want):
        n = len(w["tasks"]["interest"])
        assert [text(t) for t in row[:n]] == [x["tag"] for x in w["tasks"]["interest"]]
        assert all(text(t) == "" for t in row[n:])


def test_request_features_as_inputs(oip, clients, reference):
    schema = reference("mvke-mt", "synthetic").schema
    cat, multi = schema.cat_fields[0], schema.multi_fields[0]
    feats = {cat.name: cat.vocab[0], multi.name: "|".join(multi.vocab[:3])}      # BYTES: values |-joined
    want = native(oip, "oip-new-user", {"features": {cat.name: cat.vocab[0], multi.name: multi.vocab[:3]}, "top_k": 5})
    for kind in ("http", "grpc"):
        module = grpcclient if kind == "grpc" else httpclient
        xs = []
        for name, value in (("user_id", "oip-new-user"), *feats.items()):
            x = module.InferInput(name, [1], "BYTES")
            x.set_data_from_numpy(np.array([value], dtype=object))
            xs.append(x)
        res = clients[kind].infer(MODEL, xs, parameters={"top_k": 5})
        assert_same_as_native({n: res.as_numpy(n) for n in ("interest_tags", "interest_scores", "intention_tags",
                                                             "intention_scores")}, [want])


# ---------------------------------------------------------------------------
# errors: the native route's messages in the protocol's shape
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CLIENTS)
def test_unknown_user_and_bad_parameters(oip, clients, users, kind):
    code = {"grpc": {404: "StatusCode.NOT_FOUND", 422: "StatusCode.INVALID_ARGUMENT"}}.get(kind, {404: "404", 422: "422"})
    cases = [(["nobody-here"], {}, 404, {}),
             ([users[0], "nobody-here"], {}, 404, {}),                  # one bad row fails the request
             ([users[0]], {"top_k": 0}, 422, {"top_k": 0}),
             ([users[0]], {"top_k": 100000}, 422, {"top_k": 100000}),
             ([users[0]], {"tasks": "nope"}, 422, {"tasks": ["nope"]}),
             ([users[0]], {"exclude_tags": "no/such"}, 422, {"exclude_tags": ["no/such"]})]
    for rows, params, status, body in cases:
        want = oip.tag("nobody-here" if status == 404 else rows[0], body)
        assert want.status_code == status
        with pytest.raises(InferenceServerException) as e:
            infer(clients, kind, rows, params)
        assert error_of(e.value) == (code[status], want.json()["detail"]), (rows, params)
    with pytest.raises(InferenceServerException) as e:
        infer(clients, kind, [users[0]], {"top_kk": 3})
    assert error_of(e.value)[0] == code[422] and "parameters.top_kk: unknown parameter" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        infer(clients, kind, [users[0]], {"top_k": 3}, outputs=["interest_tags", "bogus_tags"])
    assert "outputs: unknown output 'bogus_tags'" in e.value.message()


def test_stream_infer_equals_native_route_and_answers_errors_in_the_stream(oip, users):
    """ModelStreamInfer (Triton's streaming extension, tritonclient's start_stream): every request of the
    stream answered by its id with the native route's tags and scores; a bad request answered with its
    error message while the stream goes on."""
    import queue
    chosen = users[:24]
    want = {u: native(oip, u, {"top_k": 10}) for u in chosen}
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url=oip.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i, uid in enumerate([*chosen, "nobody-here"]):
            x = grpcclient.InferInput("user_id", [1], "BYTES")
            x.set_data_from_numpy(np.array([uid], dtype=object))
            client.async_stream_infer(MODEL, [x], request_id=uid, parameters={"top_k": 10})
        answers = [results.get(timeout=30) for _ in range(len(chosen) + 1)]
    finally:
        client.stop_stream()
        client.close()
    errors = [e for _, e in answers if e is not None]
    assert len(errors) == 1 and errors[0].message() == oip.tag("nobody-here", {}).json()["detail"]
    by_id = {r.get_response().id: r for r, e in answers if e is None}
    assert sorted(by_id) == sorted(chosen)
    for uid, res in by_id.items():
        assert_same_as_native({n: res.as_numpy(n) for n in ("interest_tags", "interest_scores",
                                                               "intention_tags", "intention_scores")}, [want[uid]])


def test_raw_rest_requests(oip, users):
    """JSON nested by shape, gzip, and malformed binary data: 4xx naming the input, never a 500."""
    path = f"/v2/models/{MODEL}/infer"
    doc = {"inputs": [{"name": "user_id", "shape": [2, 1], "datatype": "BYTES", "data": [[users[0]], [users[1]]]}],
           "parameters": {"top_k": 2, "tasks": ["intention"]}, "id": "req-7"}
    resp = oip.client.post(path, json=doc)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "req-7" and [o["name"] for o in body["outputs"]] == ["intention_tags", "intention_scores"]
    want = native(oip, users[1], {"top_k": 2, "tasks": ["intention"]})["tasks"]["intention"]
    assert body["outputs"][0]["data"][2:] == [x["tag"] for x in want]
    import orjson
    zipped = oip.client.post(path, content=gzip.compress(orjson.dumps(doc)), headers={"content-encoding": "gzip"})
    assert zipped.json() == body
    head = orjson.dumps({"inputs": [{"name": "user_id", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 12}}]})
    bad = [struct.pack("<I", 50) + b"u1" * 4,                                  # an element past the data
           struct.pack("<I", 2) + b"u1" + b"abcdef",                            # the 2nd length is garbage
           struct.pack("<I", 2) + b"u1" + struct.pack("<I", 1) + b"u" + b"!"]   # a byte beyond the 2 elements
    for raw in bad:
        resp = oip.client.post(path, content=head + raw, headers={"inference-header-content-length": str(len(head))})
        assert resp.status_code == 400 and resp.json()["error"].startswith("inputs.user_id:"), resp.text
    for content, headers in ((b"{not json", {}), (b'{"inputs": 3}', {}), (head, {"inference-header-content-length": "x"}),
                             (orjson.dumps({"inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64",
                                                        "data": [1]}]}), {})):
        resp = oip.client.post(path, content=content, headers=headers)
        assert 400 <= resp.status_code < 500 and set(resp.json()) == {"error"}, resp.text


# ---------------------------------------------------------------------------
# the batcher: OIP requests share model calls (no timing: the app's loop is held, not raced)
# ---------------------------------------------------------------------------
def model_calls(svc) -> tuple[float, float]:
    """(requests, model calls) so far: the sum and count of the mvke_model_batch_size histogram."""
    found = dict(re.findall(r"^mvke_model_batch_size_(sum|count) (\S+)$", svc.client.get("/metrics").text, re.M))
    return float(found["sum"]), float(found["count"])


def test_grpc_calls_share_model_calls(oip, users):
    """gRPC calls that come in while the app's loop is busy (here: held) are taken in by the gRPC
    thread and reach the batcher together: max_batch_size calls -> one model call. (With the gRPC
    server on the app's loop, a busy loop took in one call per batch: batches of 1.1 at c=32.)"""
    grpc_server, n = oip.app.state.grpc_server, oip.settings.max_batch_size
    inbox = grpc_server.servicer.handoff.inbox
    client = grpcclient.InferenceServerClient(oip.grpc_url)
    done: list = []
    before = model_calls(oip)
    hold = threading.Event()
    grpc_server.main_loop.call_soon_threadsafe(hold.wait, 60)
    try:
        for uid in users[:n]:
            x = grpcclient.InferInput("user_id", [1], "BYTES")
            x.set_data_from_numpy(np.array([uid], dtype=object))
            client.async_infer(MODEL, [x], lambda result, error: done.append((result, error)), parameters={"top_k": 3})
        deadline = time.monotonic() + 30
        while len(inbox) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(inbox) == n, "every call waits in the hand-over while the app's loop is busy"
    finally:
        hold.set()
    deadline = time.monotonic() + 30
    while len(done) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    client.close()
    assert [e for _, e in done] == [None] * n
    assert all(r.as_numpy("interest_tags").shape == (1, 3) for r, _ in done)
    requests, calls = (a - b for a, b in zip(model_calls(oip), before))
    assert (requests, calls) == (n, 1)


def test_a_requests_rows_share_model_calls(oip, users):
    """A request's 64 rows enter the batcher in one step: ceil(64 / max_batch_size) model calls
    (queued one by one, the first row ran alone through the idle bypass: one call more)."""
    doc = {"inputs": [{"name": "user_id", "shape": [64], "datatype": "BYTES", "data": users[:64]}],
           "parameters": {"top_k": 2}}
    before = model_calls(oip)
    resp = oip.client.post(f"/v2/models/{MODEL}/infer", json=doc)
    assert resp.status_code == 200, resp.text
    requests, calls = (a - b for a, b in zip(model_calls(oip), before))
    assert (requests, calls) == (64, -(-64 // oip.settings.max_batch_size))


# ---------------------------------------------------------------------------
# pinned versions (the canary, a version not loaded, an unknown one)
# ---------------------------------------------------------------------------
def test_pinned_version(private_redis, bundle, dataset_dir, tmp_path, users):
    from model_export.feature_store import load_dataset_users
    from model_export.publish import publish
    from mvke.runtime.keys import Keys
    from tests.export.test_publish import make_variant
    r = private_redis.client()
    keys = Keys("oipv")
    a_dir = bundle("mvke-mt")
    a = publish(a_dir, r, keys=keys)["version"]
    b = publish(make_variant(a_dir, tmp_path / "b", 1), r, keys=keys, canary_percent=30)["version"]
    c = publish(make_variant(a_dir, tmp_path / "c", 2), r, keys=keys, activate=False)["version"]
    load_dataset_users(dataset_dir("synthetic"), r, keys=keys, progress=False)
    with LiveService(make_settings(private_redis.url, "oipv", grpc_port=free_port())) as s:
        h = httpclient.InferenceServerClient(url=s.url[len("http://"):])
        g = grpcclient.InferenceServerClient(url=f"127.0.0.1:{s.settings.grpc_port}")
        cl = {"http": h, "grpc": g}
        import time
        deadline = time.monotonic() + 10
        while s.client.get("/readyz").json().get("canary_version") != b and time.monotonic() < deadline:
            time.sleep(0.05)
        want = [native(s, u, {"top_k": 5, "model_version": b}) for u in users[:8]]
        for kind in CLIENTS:
            got, version = infer(cl, kind, users[:8], {"top_k": 5}, version=b,
                                 outputs=["interest_tags", "interest_scores", "intention_tags", "intention_scores",
                                          "model_version"])
            assert version == b and {text(v) for v in got["model_version"]} == {b}
            assert_same_as_native(got, want)
            plain, _ = infer(cl, kind, users[:8], {"top_k": 5}, outputs=["model_version"])
            assert {text(v) for v in plain["model_version"]} <= {a, b}
            for pin, status in ((c, 409), ("feedfacefeedface", 404)):
                detail = s.tag(users[0], {"model_version": pin}).json()["detail"]
                with pytest.raises(InferenceServerException) as e:
                    infer(cl, kind, users[:2], {}, version=pin)
                assert e.value.message() == detail
                assert str(e.value.status()) == (str(status) if kind != "grpc" else
                                                 {409: "StatusCode.FAILED_PRECONDITION", 404: "StatusCode.NOT_FOUND"}[status])
        assert h.get_model_metadata(MODEL)["versions"] == [a, b]
        h.close()
        g.close()
    r.close()


# ---------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------
def test_api_key_missing(svc_redis, published, users):
    settings = make_settings(svc_redis.url, published("mvke-mt", "synthetic"), api_keys="oip-key",
                             grpc_port=free_port())
    with LiveService(settings) as s:
        cl = {"http": httpclient.InferenceServerClient(url=s.url[len("http://"):]),
              "grpc": grpcclient.InferenceServerClient(url=f"127.0.0.1:{settings.grpc_port}")}
        for kind in CLIENTS:
            with pytest.raises(InferenceServerException) as e:
                infer(cl, kind, users[:1], {"top_k": 1})
            assert str(e.value.status()) in ("401", "StatusCode.UNAUTHENTICATED") and "API key" in e.value.message()
            with pytest.raises(InferenceServerException):
                infer(cl, kind, users[:1], {"top_k": 1}, headers={"authorization": "Bearer wrong"})
            for headers in ({"authorization": "Bearer oip-key"}, {"x-api-key": "oip-key"}):
                got, _ = infer(cl, kind, users[:1], {"top_k": 1}, headers=headers)
                assert got["interest_tags"].shape == (1, 1)
        for kind in ("http", "grpc"):       # health stays open, as /healthz and /readyz
            assert cl[kind].is_server_live() and cl[kind].is_server_ready()
        with pytest.raises(InferenceServerException):
            cl["grpc"].get_model_metadata(MODEL)
        assert httpx.get(f"{s.url}/v2/models/{MODEL}").json()["error"].startswith("authorization:")
        for c in cl.values():
            c.close()


# ---------------------------------------------------------------------------
# several workers: one gRPC server per process on the same port
# ---------------------------------------------------------------------------
def test_workers_share_the_grpc_port(svc_redis, published, users):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    port, gport = free_port(), free_port()
    env = {**os.environ, "REDIS_URL": svc_redis.url, "MVKE_KEY_PREFIX": published("mvke-mt", "synthetic"),
           "MVKE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "mvke.cli", "serve", "--port", str(port), "--workers", "2",
                             "--grpc-port", str(gport)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        listening: set[int] = set()
        while time.monotonic() < deadline and len(listening) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            listening = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)
                         for s in c.net_connections("tcp") if s.status == "LISTEN" and s.laddr.port == gport}
            time.sleep(0.2)
        assert len(listening) == 2, "each worker binds the gRPC port (SO_REUSEPORT)"
        for i in range(6):                  # a channel each: connections land on either worker
            c = grpcclient.InferenceServerClient(f"127.0.0.1:{gport}")
            while not c.is_server_ready() and time.monotonic() < deadline:   # that worker loaded the model
                time.sleep(0.1)
            got, _ = infer({"grpc": c}, "grpc", users[i:i + 1], {"top_k": 2})
            assert got["interest_tags"].shape == (1, 2)
            c.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
