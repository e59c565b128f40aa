"""`install_oip(app, state)`: the Open Inference Protocol's REST routes on the app, and the gRPC
server to start in the app's lifespan (None when MVKE_GRPC_PORT is not set)."""
from __future__ import annotations

from fastapi import FastAPI

from service.state import ServiceState


def install_oip(app: FastAPI, state: ServiceState, edge):
    """Add the /v2 routes -> (the gRPC server to start or None, `edge` wrapped in the error shape of /v2:
    outermost, so that the edge's own 401 / 413 under /v2 are reshaped too)."""
    from service.oip.rest import OipErrorShape, install_rest
    install_rest(app, state)
    port = state.settings.grpc_port
    if not port:
        return None, OipErrorShape(edge)
    from service.oip.grpc_server import GrpcServer   # grpcio only where gRPC is on
    return GrpcServer(state, state.settings.grpc_host, port, app.version), OipErrorShape(edge)
