"""The gRPC ceiling: grpcio's asyncio server with a ModelInfer that answers at once.

The gRPC twin of loadtest/empty_app.py: the same server as the service's gRPC port (grpcio's
asyncio server on uvloop, one process) and a fixed answer of the service's shape (two tasks,
top 20: tag names and float32 scores as raw output contents), so `loadtest.oip_bench --ceilings`
shows what grpcio itself costs per call on this machine, under the same client as the service.

    python -m loadtest.empty_grpc PORT
"""
from __future__ import annotations

import asyncio
import struct
import sys

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

TOP_K = 20
TAGS = b"".join(struct.pack("<I", 12) + f"cat01/tag{i:03d}".encode() for i in range(TOP_K))
SCORES = struct.pack(f"<{TOP_K}f", *([0.5] * TOP_K))


class EmptyServicer(pb_grpc.GRPCInferenceServiceServicer):
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request, context):
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for task in ("interest", "intention"):
            response.outputs.add(name=f"{task}_tags", datatype="BYTES", shape=[1, TOP_K])
            response.raw_output_contents.append(TAGS)
            response.outputs.add(name=f"{task}_scores", datatype="FP32", shape=[1, TOP_K])
            response.raw_output_contents.append(SCORES)
        return response


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EmptyServicer(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(int(sys.argv[1])))
