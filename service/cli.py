"""`mvke serve`: run the tag service with uvicorn."""
from __future__ import annotations

import argparse
import os

EXTRA = "service"   # the pyproject extra these commands need (named by `mvke` when it is missing)
HTTP_PROTOCOL = "service.http_protocol:JsonErrorHttpToolsProtocol"  # httptools, JSON answers to parse errors


def _serve(a: argparse.Namespace) -> None:
    import uvicorn

    from service.settings import Settings
    if a.workers:
        os.environ["MVKE_WORKERS"] = str(a.workers)
    if a.grpc_port:   # the workers read it from the environment (each binds it with SO_REUSEPORT)
        os.environ["MVKE_GRPC_PORT"] = str(a.grpc_port)
    os.environ.setdefault("MVKE_GRPC_HOST", a.host)   # gRPC (when on) listens where HTTP does
    settings = Settings()
    uvicorn.run("service.app:create_app", factory=True, host=a.host, port=a.port, workers=settings.worker_count(),
                loop="uvloop", http=HTTP_PROTOCOL, access_log=False, log_level=settings.log_level.lower(),
                timeout_keep_alive=30, backlog=2048)


def _api_key(a: argparse.Namespace) -> None:
    from service.auth import new_key
    key, digest = new_key()
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"line for MVKE_API_KEYS_FILE: {digest}")


def register(sub) -> None:
    k = sub.add_parser("api-key", help="make an API key and its sha256 line for MVKE_API_KEYS_FILE")
    k.set_defaults(func=_api_key, extra=EXTRA)

    s = sub.add_parser("serve", help="serve POST /users/{id}/tags (settings from MVKE_* env, REDIS_URL)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--workers", type=int, help="uvicorn worker processes (default MVKE_WORKERS, else 0: one per usable CPU; 1 on a shared machine)")
    s.add_argument("--grpc-port", type=int, help="also serve the Open Inference Protocol over gRPC on this port, "
                                                 "on --host (default MVKE_GRPC_PORT; unset: no gRPC)")
    s.set_defaults(func=_serve, extra=EXTRA)
