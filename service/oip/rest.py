"""The Open Inference Protocol over REST (KServe v2): health, metadata and inference routes.

`POST /v2/models/mvke[/versions/{v}]/infer` takes JSON, or JSON plus the binary tensor
extension: the header `Inference-Header-Content-Length: n` says the first n bytes are the
JSON document and the rest is the raw data of the inputs whose `parameters` carry a
`binary_data_size` (in order). Outputs come back in binary when the request parameter
`binary_data_output` or an output's own `binary_data` parameter asks for it (what
`tritonclient.http` does by default). Errors are `{"error": "<the native route's message>"}`
with the native route's status (404 unknown user or version, 409 version not loaded, 422 bad
parameter, 401 no API key, 503 no model or no Redis), Retry-After where it has one.
"""
from __future__ import annotations

import gzip
import zlib
from typing import Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.routing import Route

from service.oip import core
from service.oip.core import InferAnswer, InferInput
from service.oip.tensors import (TensorError, decode_bytes, element_count, encode_fp32, encode_strings,
                                 json_bytes_elements)
from service.state import ServiceState
from service.tagger import ServiceError

HEADER_LENGTH = "inference-header-content-length"
OIP_PREFIX = "/v2"


def oip_error(e: ServiceError) -> Response:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return Response(orjson.dumps({"error": e.message}), status_code=e.status, media_type="application/json",
                    headers=headers)


def _json(doc: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


def _body(raw: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity":
        return raw
    try:
        if encoding == "gzip":
            return gzip.decompress(raw)
        if encoding == "deflate":
            return zlib.decompress(raw)
    except (OSError, zlib.error, EOFError) as e:
        raise ServiceError(400, f"body: cannot decompress ({encoding}): {e}", field="body") from None
    raise ServiceError(415, f"content-encoding: {encoding!r} is not supported (gzip, deflate)",
                       field="content-encoding")


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, list[InferInput]]:
    """The request body (JSON, or JSON + binary tensor data) -> (its JSON document, decoded inputs)."""
    raw = b""
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise ServiceError(400, f"inference-header-content-length: {header_length!r} is not a length within "
                                    f"the body ({len(body)} bytes)", field="inference-header-content-length")
        n = int(header_length)
        body, raw = body[:n], body[n:]
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ServiceError(400, f"body: not valid JSON: {e}", field="body") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ServiceError(400, "body: a JSON object with an `inputs` list is expected", field="body")
    inputs, pos = [], 0
    for t in doc["inputs"]:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ServiceError(400, "inputs: each input is an object with a name, shape, datatype and data",
                               field="inputs")
        name, shape = t["name"], t.get("shape")
        count = element_count(name, shape if isinstance(shape, list) else [-1])
        datatype = t.get("datatype")
        size = (t.get("parameters") or {}).get("binary_data_size")
        elements: list[bytes] = []           # another datatype: core names it in its error
        if size is not None:
            if not isinstance(size, int) or size < 0 or pos + size > len(raw):
                raise TensorError(name, f"binary_data_size {size!r} is beyond the {len(raw) - pos} bytes of "
                                        "binary data left")
            if datatype == "BYTES":
                elements = decode_bytes(name, raw[pos:pos + size], count)
            pos += size
        elif datatype == "BYTES":
            elements = json_bytes_elements(name, t.get("data"), count)
        inputs.append(InferInput(name, str(datatype), shape, elements))
    if pos != len(raw):
        raise ServiceError(400, f"body: {len(raw) - pos} bytes of binary data that no input's binary_data_size "
                                "claims", field="body")
    return doc, inputs


def _requested(doc: dict) -> tuple[list[str] | None, dict[str, bool]]:
    """Requested output names (None: all) and each one's own binary_data choice."""
    outs = doc.get("outputs")
    if outs is None:
        return None, {}
    if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs):
        raise ServiceError(400, "outputs: a list of objects with a name is expected", field="outputs")
    binary = {o["name"]: bool(o["parameters"]["binary_data"]) for o in outs
              if isinstance(o.get("parameters"), dict) and "binary_data" in o["parameters"]}
    return [o["name"] for o in outs], binary


def render_answer(answer: InferAnswer, request_id, binary_default: bool, binary: dict[str, bool]) -> Response:
    tensors, blobs = [], []
    for out in answer.outputs:
        doc = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        as_bytes = out.datatype == "BYTES"
        if binary.get(out.name, binary_default):
            blob = encode_strings(out.data) if as_bytes else encode_fp32(out.data)
            doc["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            doc["data"] = out.data if as_bytes else out.data.ravel().tolist()
        tensors.append(doc)
    head = {"model_name": core.MODEL_NAME, "model_version": answer.model_version, "outputs": tensors}
    if request_id is not None:
        head["id"] = request_id
    text = orjson.dumps(head)
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(text))})


class _Handlers:
    """The protocol's REST handlers over the service state (each takes the Request only)."""

    def __init__(self, state: ServiceState, server_version: str):
        self.state, self.server_version = state, server_version

    async def server_metadata(self, request: Request) -> Response:
        """Open Inference Protocol: server name, version and extensions."""
        return _json(core.server_metadata(self.server_version))

    async def live(self, request: Request) -> Response:
        """Open Inference Protocol: alive (as /healthz)."""
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        """Open Inference Protocol: a model is loaded and Redis answers (as /readyz); else 503 with the reason."""
        reason = await core.not_ready(self.state)
        return _json({"ready": True}) if reason is None else _json({"ready": False, "error": reason}, 503)

    async def metadata(self, request: Request) -> Response:
        """Open Inference Protocol: inputs and outputs (name, datatype, shape) and the loaded versions;
        with a version: 404 not published, 409 not loaded."""
        try:
            core.check_model(request.path_params["model_name"])
            return _json(core.model_metadata(self.state, request.path_params.get("version")))
        except ServiceError as e:
            return oip_error(e)

    async def model_ready(self, request: Request) -> Response:
        """Open Inference Protocol: the model (the active version, or the one named) is loaded and ready."""
        name = request.path_params["model_name"]
        try:
            core.check_model(name)
            core.resolve(self.state, request.path_params.get("version"))
        except ServiceError as e:
            return oip_error(e)
        reason = await core.not_ready(self.state)
        doc = {"name": name, "ready": reason is None}
        return _json(doc) if reason is None else _json({**doc, "error": reason}, 503)

    async def infer(self, request: Request) -> Response:
        """Open Inference Protocol: top tags per task for a batch of users (`user_id` BYTES [B]); JSON or the
        binary tensor extension; with a version: pinned to it."""
        return await self.answer(request.path_params["model_name"], request.path_params.get("version"),
                                 await request.body(), request.headers.get)

    async def answer(self, model: str, version: str | None, raw: bytes, header: Callable[[str], str | None]
                     ) -> Response:
        """An inference request's body (and `header(name)`, for its encoding and binary header) -> the response."""
        try:
            core.check_model(model)
            body = _body(raw, header("content-encoding"))
            doc, inputs = parse_request(body, header(HEADER_LENGTH))
            parameters = doc.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise ServiceError(400, "parameters: a JSON object is expected", field="parameters")
            outputs, binary = _requested(doc)
            answer = await core.infer(self.state, inputs, parameters, outputs, version)
        except ServiceError as e:
            return oip_error(e)
        return render_answer(answer, doc.get("id"), parameters.get("binary_data_output") is True, binary)


class FastInfer:
    """`POST /v2/models/{model}[/versions/{v}]/infer` served by the edge middleware's fast path
    (service/middleware.py), as the native route is: no router, no Request object. The Starlette
    routes stay for what the fast path passes on (a body it could not read in one piece)."""

    def __init__(self, handlers: _Handlers):
        self.handlers = handlers

    @staticmethod
    def match(path: str) -> tuple[str, str | None] | None:
        """(model, version or None) of an inference path; None for any other path."""
        parts = path.split("/")        # '', 'v2', 'models', model, ['versions', version,] 'infer'
        if len(parts) == 5 and parts[4] == "infer" and parts[3]:
            return parts[3], None
        if len(parts) == 7 and parts[4] == "versions" and parts[6] == "infer" and parts[3] and parts[5]:
            return parts[3], parts[5]
        return None

    async def answer(self, where: tuple[str, str | None], headers: dict, body: bytes) -> Response:
        """The response to an inference request; `headers` as the edge holds them (bytes names)."""
        def header(name: str) -> str | None:
            value = headers.get(name.encode("latin-1"))
            return None if value is None else value.decode("latin-1")
        return await self.handlers.answer(*where, body, header)

    @staticmethod
    def reshape_error(headers, body: bytes) -> tuple[list, bytes]:
        return in_oip_shape(headers, body)


def install_rest(app: FastAPI, state: ServiceState) -> None:
    h = _Handlers(state, app.version)
    app.state.oip_infer = FastInfer(h)      # found by the edge middleware on the first request
    # Plain Starlette routes (each handler takes the Request only): no FastAPI dependency solving per
    # request, and out of /openapi.json (the protocol has its own spec, KServe's REST API).
    app.router.routes += [Route("/v2", h.server_metadata, methods=["GET"]),
                          Route("/v2/health/live", h.live, methods=["GET"]),
                          Route("/v2/health/ready", h.ready, methods=["GET"])]
    for base in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{version}"):
        app.router.routes += [Route(base, h.metadata, methods=["GET"]),
                              Route(base + "/ready", h.model_ready, methods=["GET"]),
                              Route(base + "/infer", h.infer, methods=["POST"])]


def in_oip_shape(headers, body: bytes) -> tuple[list, bytes]:
    """An error answer under /v2 in the protocol's shape: `{"detail": ...}` becomes `{"error": ...}`, and
    content-length is stated last (OipErrorShape on the ASGI path, the edge's `serve_read` without it)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and "detail" in doc and "error" not in doc:
        body = orjson.dumps({"error": doc["detail"]})
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    return [*headers, (b"content-length", str(len(body)).encode())], body


class OipErrorShape:
    """Errors raised before an OIP route runs (401 from the API key check, 413, an unknown /v2 path)
    answer in the protocol's shape: `{"detail": ...}` becomes `{"error": ...}` under /v2."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith(OIP_PREFIX):
            return await self.app(scope, receive, send)
        start: dict | None = None

        async def reshape(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message          # held until the body shows whether it needs reshaping
                return
            if start is not None and message["type"] == "http.response.body":
                headers, body = in_oip_shape(start.get("headers", ()), message.get("body", b""))
                await send({**start, "headers": headers})
                message = {**message, "body": body, "more_body": False}
            await send(message)

        await self.app(scope, receive, reshape)
