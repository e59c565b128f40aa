"""`install_oip(app, state)`: the Open Inference Protocol's REST routes on the app, and the gRPC
server to start in the app's lifespan (None when MVKE_GRPC_PORT is not set)."""
from __future__ import annotations

from fastapi import FastAPI

from service.state import ServiceState


def install_oip(app: FastAPI, state: ServiceState):
    """Add the /v2 routes and the error shape of /v2; -> the gRPC server to start, or None."""
    from service.oip.rest import OipErrorShape, install_rest
    install_rest(app, state)
    app.add_middleware(OipErrorShape)     # outermost: also reshapes the edge's 401 / 413 under /v2
    port = state.settings.grpc_port
    if not port:
        return None
    from service.oip.grpc_server import GrpcServer   # grpcio only where gRPC is on
    return GrpcServer(state, state.settings.grpc_host, port, app.version)
