"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on grpcio's asyncio server.

The server runs on an event loop of its own, in a thread of the HTTP app's process (started and
stopped in the app's lifespan); a ModelInfer is handed to the app's loop (InferHandoff), so it
goes through the same `ServiceState`, the same dynamic batcher and the same loaded versions as
POST /users/{id}/tags. Why a thread: grpcio's asyncio server takes in one new call per trip
through its completion queue (its poller thread -> the loop -> a request for the next call), so
on the app's loop, busy with model batches, it took in about one call per batch, and gRPC calls
did not share model calls (1.1 requests per model call at c=32, against 15.8 for the native
route: docs/results/oip_bench.md). Its own port: `MVKE_GRPC_PORT` / `mvke serve --grpc-port`.
With several uvicorn workers every worker process binds that port with SO_REUSEPORT and the
kernel spreads the (long-lived, HTTP/2) connections over them, one gRPC server per process; a
client that opens a single channel therefore talks to one worker, so a client that should reach
all of them opens several channels.

API keys (when MVKE_API_KEYS is set) come as metadata, `authorization: Bearer <key>` or
`x-api-key: <key>`; ServerLive and ServerReady are open, as /healthz and /readyz. Errors
carry the native route's message with the gRPC code of its HTTP status.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import sys
import threading
from collections import deque
from typing import Any, Callable

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


class InferHandoff:
    """ModelInfer calls go to the app's loop in groups, and each group enters the batcher in one
    step (core.infer_many), so calls that arrive together share model calls as HTTP requests do.

    The gRPC thread puts each call in an inbox and wakes the app's loop only if no wake-up is
    pending; the app's loop, when it gets to it (often after the batch it was running), takes
    everything that came in meanwhile. Handed over one by one, each call found the batcher idle
    and ran alone: 1.1 requests per model call at c=32 (docs/results/oip_bench.md). A cancelled
    call's rows are still computed; its answer is dropped."""

    def __init__(self, state: ServiceState, main_loop: asyncio.AbstractEventLoop):
        self.state, self.main_loop = state, main_loop
        self.inbox: deque[tuple[tuple, asyncio.Future]] = deque()    # appended by one thread, taken by the other
        self.wake_pending = False

    def submit(self, call: tuple) -> asyncio.Future:
        """`call`: core.infer's arguments after the state -> a future of the gRPC loop: its answer."""
        fut = asyncio.get_running_loop().create_future()
        self.inbox.append((call, fut))
        if not self.wake_pending:
            self.wake_pending = True
            self.main_loop.call_soon_threadsafe(self._take, asyncio.get_running_loop())
        return fut

    def _take(self, loop: asyncio.AbstractEventLoop) -> None:        # on the app's loop
        self.wake_pending = False        # first: a call added from now on wakes the loop again
        group = []
        while self.inbox:
            group.append(self.inbox.popleft())
        if group:
            task = self.main_loop.create_task(core.infer_many(self.state, [call for call, _ in group]))
            task.add_done_callback(lambda t: loop.call_soon_threadsafe(_deliver, group, t))


def _deliver(group: list[tuple[tuple, asyncio.Future]], task: asyncio.Task) -> None:
    """On the gRPC loop: infer_many's answers (or its failure) -> the futures the handlers await."""
    failed = task.cancelled() or task.exception() is not None
    for i, (_, fut) in enumerate(group):
        if fut.done():                    # the call was cancelled meanwhile
            continue
        if task.cancelled():
            fut.cancel()
        elif failed:
            fut.set_exception(task.exception())
        else:
            answer = task.result()[i]
            fut.set_exception(answer) if isinstance(answer, ServiceError) else fut.set_result(answer)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServiceState, server_version: str, main_loop: asyncio.AbstractEventLoop):
        self.state, self.server_version, self.main_loop = state, server_version, main_loop
        self.keys = state.api_keys if state.api_keys.enabled else None
        self.handoff = InferHandoff(state, main_loop)

    async def _on_main(self, fn: Callable[..., Any], *args) -> Any:
        """`fn(*args)` (awaited if it is a coroutine function) on the HTTP app's loop, where the state
        (the registry, Redis) lives: nothing of it is read from the gRPC thread."""
        async def call():
            out = fn(*args)
            return await out if inspect.isawaitable(out) else out
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self.main_loop))

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
        return pb.ServerReadyResponse(ready=await self._on_main(core.not_ready, self.state) is None)

    async def ModelReady(self, request, context):
        await self._check_key(context)
        try:
            core.check_model(request.name)
            await self._on_main(core.resolve, self.state, request.version or None)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self._on_main(core.not_ready, self.state) is None)

    async def ServerMetadata(self, request, context):
        await self._check_key(context)
        return pb.ServerMetadataResponse(**core.server_metadata(self.server_version))

    async def ModelMetadata(self, request, context):
        await self._check_key(context)
        try:
            core.check_model(request.name)
            doc = await self._on_main(core.model_metadata, self.state, request.version or None)
        except ServiceError as e:
            await context.abort(grpc_code(e.status), e.message)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=doc["name"], versions=doc["versions"], platform=doc["platform"],
                                        inputs=[tensor(**t) for t in doc["inputs"]],
                                        outputs=[tensor(**t) for t in doc["outputs"]])

    async def ModelInfer(self, request, context):
        await self._check_key(context)
        try:
            return await self._infer(request)
        except ServiceError as e:
            await context.abort(grpc_code(e.status), e.message)

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming extension: the stream's requests are answered as each is done (in the
        batcher beside everything else), an inference's error as its response's `error_message`.
        grpcio's per-call cost (about 2.4x an HTTP request's on uvicorn: docs/results/oip_bench.md)
        is paid once per stream instead of once per inference."""
        await self._check_key(context)
        answers: asyncio.Queue = asyncio.Queue()
        reader = asyncio.ensure_future(self._read_stream(request_iterator, answers))
        try:
            while (response := await answers.get()) is not None:
                yield response
        finally:
            reader.cancel()

    async def _read_stream(self, request_iterator, answers: asyncio.Queue) -> None:
        """Each request of the stream inferred in a task of its own; None on `answers` once all are answered."""
        running: set[asyncio.Task] = set()

        async def one(request) -> None:
            try:
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=await self._infer(request)))
                return
            except ServiceError as e:
                error = e.message
            except Exception as e:     # never a silent gap in the stream: the request is answered
                log.exception("stream inference %r failed", request.id)
                error = f"internal error: {type(e).__name__}"
            answers.put_nowait(pb.ModelStreamInferResponse(error_message=error,
                                                           infer_response=pb.ModelInferResponse(id=request.id)))
        try:
            async for request in request_iterator:
                task = asyncio.ensure_future(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:
            answers.put_nowait(None)

    async def _infer(self, request) -> pb.ModelInferResponse:
        """One ModelInferRequest -> its response (ServiceError: the reason it has none)."""
        core.check_model(request.model_name)
        given = request.parameters            # by key: the protobuf map's items() is Python-level, slow
        parameters = {k: parameter_value(given[k]) for k in given}
        outputs = [o.name for o in request.outputs] or None
        answer = await self.handoff.submit((decode_inputs(request), parameters, outputs,
                                            request.model_version or None))
        response = pb.ModelInferResponse(model_name=core.MODEL_NAME, model_version=answer.model_version,
                                         id=request.id)
        for out in answer.outputs:
            response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
            response.raw_output_contents.append(encode_strings(out.data) if out.datatype == "BYTES"
                                                else encode_fp32(out.data))
        return response


class GrpcServer:
    """The gRPC server of one process: grpcio's asyncio server on an event loop of its own, in a
    thread (see the module's docstring); it takes in calls while the app's loop runs a batch."""

    def __init__(self, state: ServiceState, host: str, port: int, server_version: str):
        self.state, self.host, self.port, self.server_version = state, host, port, server_version
        self.loop: asyncio.AbstractEventLoop | None = None     # the gRPC thread's
        self.main_loop: asyncio.AbstractEventLoop | None = None  # the app's
        self.servicer: InferenceServicer | None = None
        self._stop: asyncio.Future | None = None
        self.thread: threading.Thread | None = None

    async def start(self) -> None:
        # two busy threads now share the GIL: a holder drops it after the switch interval at the latest
        sys.setswitchinterval(self.state.settings.grpc_switch_interval_ms / 1000)
        started: concurrent.futures.Future = concurrent.futures.Future()
        main_loop = self.main_loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._thread, args=(main_loop, started), name="grpc", daemon=True)
        self.thread.start()
        await asyncio.wrap_future(started)
        log.info("gRPC listening", extra={"address": f"{self.host}:{self.port}"})

    def _thread(self, main_loop: asyncio.AbstractEventLoop, started: concurrent.futures.Future) -> None:
        loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(main_loop, started))
        except BaseException as e:  # noqa: BLE001 - handed to start(), or logged once serving
            if not started.done():
                started.set_exception(e)
            else:
                log.exception("gRPC server stopped")
        finally:
            loop.close()

    async def _serve(self, main_loop: asyncio.AbstractEventLoop, started: concurrent.futures.Future) -> None:
        limit = self.state.settings.max_body_bytes
        # so_reuseport: every uvicorn worker binds the same port (one server per process)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", limit)])
        self.servicer = InferenceServicer(self.state, self.server_version, main_loop)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        address = f"{self.host}:{self.port}"
        if server.add_insecure_port(address) == 0:
            raise RuntimeError(f"gRPC: cannot listen on {address}")
        await server.start()
        self.loop, self._stop = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()
        started.set_result(None)
        grace = await self._stop            # stop() asks, from the app's loop
        await server.stop(grace)

    async def stop(self, grace: float = 2.0) -> None:
        if self.thread is None:
            return
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._stop.set_result, grace)
        await asyncio.to_thread(self.thread.join, grace + 5)
        self.thread = self.loop = None


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()
