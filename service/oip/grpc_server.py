"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on grpcio's asyncio server.

It runs on the event loop of the HTTP app (started and stopped in its lifespan), so a
ModelInfer goes through the same `ServiceState`, the same dynamic batcher and the same
loaded versions as POST /users/{id}/tags. Its own port: `MVKE_GRPC_PORT` / `mvke serve
--grpc-port`. With several uvicorn workers every worker process binds that port with
SO_REUSEPORT and the kernel spreads the (long-lived, HTTP/2) connections over them, one
gRPC server per process; a client that opens a single channel therefore talks to one
worker, so a client that should reach all of them opens several channels.

API keys (when MVKE_API_KEYS is set) come as metadata, `authorization: Bearer <key>` or
`x-api-key: <key>`; ServerLive and ServerReady are open, as /healthz and /readyz. Errors
carry the native route's message with the gRPC code of its HTTP status.
"""
from __future__ import annotations

import logging

import grpc

from service.oip import core
from service.oip import inference_pb2 as pb
from service.oip import inference_pb2_grpc as pb_grpc
from service.oip.core import InferInput
from service.oip.tensors import TensorError, decode_bytes, element_count, encode_fp32, encode_strings
from service.state import ServiceState
from service.tagger import ServiceError

log = logging.getLogger("mvke.service.grpc")

CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
         422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
         503: grpc.StatusCode.UNAVAILABLE}
NEED_KEY = ("authorization: this call needs an API key (metadata `authorization: Bearer <key>` or "
            "`x-api-key: <key>`)")


def grpc_code(status: int) -> grpc.StatusCode:
    return CODES.get(status, grpc.StatusCode.UNKNOWN)


def parameter_value(p: pb.InferParameter):
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def decode_inputs(request: pb.ModelInferRequest) -> list[InferInput]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ServiceError(400, f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs",
                           field="raw_input_contents")
    out = []
    for i, t in enumerate(request.inputs):
        shape = list(t.shape)
        count = element_count(t.name, shape)
        if t.datatype != "BYTES":
            elements: list[bytes] = []          # core names the datatype in its error
        elif raw:
            elements = decode_bytes(t.name, raw[i], count)
        else:
            elements = list(t.contents.bytes_contents)
            if len(elements) != count:
                raise TensorError(t.name, f"bytes_contents has {len(elements)} elements, its shape needs {count}")
        out.append(InferInput(t.name, t.datatype, shape, elements))
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServiceState, server_version: str):
        self.state, self.server_version = state, server_version
        self.keys = state.api_keys if state.api_keys.enabled else None

    async def _check_key(self, context) -> None:
        if self.keys is None:
            return
        headers = {k.encode("latin-1"): (v if isinstance(v, bytes) else v.encode("latin-1"))
                   for k, v in context.invocation_metadata() or ()}
        if not self.keys.allows(headers):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, NEED_KEY)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await core.not_ready(self.state) is None)

    async def ModelReady(self, request, context):
        await self._check_key(context)
        try:
            core.check_model(request.name)
            core.resolve(self.state, request.version or None)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await core.not_ready(self.state) is None)

    async def ServerMetadata(self, request, context):
        await self._check_key(context)
        return pb.ServerMetadataResponse(**core.server_metadata(self.server_version))

    async def ModelMetadata(self, request, context):
        await self._check_key(context)
        try:
            core.check_model(request.name)
            doc = core.model_metadata(self.state, request.version or None)
        except ServiceError as e:
            await context.abort(grpc_code(e.status), e.message)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=doc["name"], versions=doc["versions"], platform=doc["platform"],
                                        inputs=[tensor(**t) for t in doc["inputs"]],
                                        outputs=[tensor(**t) for t in doc["outputs"]])

    async def ModelInfer(self, request, context):
        await self._check_key(context)
        try:
            core.check_model(request.model_name)
            parameters = {k: parameter_value(v) for k, v in request.parameters.items()}
            outputs = [o.name for o in request.outputs] or None
            answer = await core.infer(self.state, decode_inputs(request), parameters, outputs,
                                      request.model_version or None)
        except ServiceError as e:
            await context.abort(grpc_code(e.status), e.message)
        response = pb.ModelInferResponse(model_name=core.MODEL_NAME, model_version=answer.model_version,
                                         id=request.id)
        for out in answer.outputs:
            response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
            response.raw_output_contents.append(encode_strings(out.data) if out.datatype == "BYTES"
                                                else encode_fp32(out.data))
        return response


class GrpcServer:
    """The gRPC server of one process, on the running event loop."""

    def __init__(self, state: ServiceState, host: str, port: int, server_version: str):
        self.state, self.host, self.port, self.server_version = state, host, port, server_version
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        limit = self.state.settings.max_body_bytes
        # so_reuseport: every uvicorn worker binds the same port (one server per process)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", limit)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.state, self.server_version), server)
        address = f"{self.host}:{self.port}"
        if server.add_insecure_port(address) == 0:
            raise RuntimeError(f"gRPC: cannot listen on {address}")
        await server.start()
        self.server = server
        log.info("gRPC listening", extra={"address": address})

    async def stop(self, grace: float = 2.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
