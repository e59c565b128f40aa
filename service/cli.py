"""`mvke serve`: run the tag service with uvicorn; `mvke api-key`: make an API key."""
from __future__ import annotations

import argparse
import os

from mvke.runtime.keys import PREFIX_ENV, add_key_prefix_option
from mvke.runtime.redis_client import REDIS_URL_HELP

EXTRA = "service"   # the pyproject extra these commands need (named by `mvke` when it is missing)
HTTP_PROTOCOL = "service.http_protocol:JsonErrorHttpToolsProtocol"  # httptools, JSON answers to parse errors


def _serve(a: argparse.Namespace) -> None:
    import uvicorn

    from service.busy_board import BOARD_ENV, create_board
    from service.settings import Settings
    # the worker processes read their settings from the environment: the options go there
    for value, name in ((a.workers, "MVKE_WORKERS"), (a.redis, "REDIS_URL"), (a.key_prefix, PREFIX_ENV)):
        if value:
            os.environ[name] = str(value)
    if a.grpc_port:   # the workers read it from the environment (each binds it with SO_REUSEPORT)
        os.environ["MVKE_GRPC_PORT"] = str(a.grpc_port)
    os.environ.setdefault("MVKE_GRPC_HOST", a.host)   # gRPC (when on) listens where HTTP does
    settings = Settings()
    workers = settings.worker_count()
    # the workers' requests in flight, seen by each other (service/busy_board.py): the idle session's
    # second thread only while the other workers have nothing to do
    board = create_board(workers) if workers > 1 and settings.ort_idle_thread_count() > 1 else None
    if board:
        os.environ[BOARD_ENV] = str(board)
    try:
        uvicorn.run("service.app:create_app", factory=True, host=a.host, port=a.port, workers=workers,
                    loop="uvloop", http=HTTP_PROTOCOL, access_log=False, log_level=settings.log_level.lower(),
                    timeout_keep_alive=30, backlog=2048)
    finally:
        if board:
            board.unlink(missing_ok=True)


def _api_key(a: argparse.Namespace) -> None:
    from service.auth import new_key
    key, digest = new_key()
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"line for MVKE_API_KEYS_FILE: {digest}")


ENVIRONMENT = "@environment@"    # the serve epilog, filled in from service/settings.py when help is printed


class _ServeHelp(argparse.HelpFormatter):
    """Lists every MVKE_* variable the service reads (from its Settings) when `mvke serve --help` prints."""

    def add_text(self, text):
        if text == ENVIRONMENT:
            text = environment_help()
        super().add_text(text)

    def _fill_text(self, text, width, indent):
        if not text.startswith("environment"):
            return super()._fill_text(text, width, indent)
        import textwrap
        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent + "      ")
                         for line in text.splitlines())


def environment_help() -> str:
    """The environment `mvke serve` reads: one line per setting of service/settings.py."""
    try:
        from service.settings import Settings
    except ImportError as e:   # the service extra is not installed: say where the list is
        return f"environment: every MVKE_* setting of service/settings.py (README's table); not listed here: {e}"
    lines = ["environment (each setting is MVKE_<NAME>; --redis, --key-prefix and --workers set REDIS_URL, "
             "MVKE_KEY_PREFIX and MVKE_WORKERS):"]
    for name, f in Settings.model_fields.items():
        env = "REDIS_URL (or MVKE_REDIS_URL)" if name == "redis_url" else f"MVKE_{name.upper()}"
        lines.append(f"  {env} (default {f.default!r}){': ' + f.description if f.description else ''}")
    return "\n".join(lines)


def register(sub) -> None:
    k = sub.add_parser("api-key", help="make an API key and its sha256 line for MVKE_API_KEYS_FILE",
                       description="Print a new random API key and the sha256 line that lets the service accept "
                                   "it. Nothing is stored: give the key to the client, append the line to the file "
                                   "the service reads from MVKE_API_KEYS_FILE (or put the key itself in "
                                   "MVKE_API_KEYS, comma-separated). With either set, the tag and model routes "
                                   "answer 401 without a key (Authorization: Bearer KEY or X-API-Key: KEY); "
                                   "MVKE_METRICS_NEED_KEY=true protects /metrics too. Reads no environment.")
    k.set_defaults(func=_api_key, extra=EXTRA)

    s = sub.add_parser("serve", help="serve POST /users/{id}/tags (settings from MVKE_* env, REDIS_URL)",
                       description="Run the tag service (FastAPI on uvicorn): POST /users/{id}/tags, /tags:batch, "
                                   "/readyz, /metrics, /docs, /ui. It serves the version {prefix}:active names in "
                                   "Redis (and the canary), reloading when it changes, and reads users from the "
                                   "feature store there. Every setting comes from the environment (below); "
                                   "--redis, --key-prefix and --workers override theirs.",
                       epilog=ENVIRONMENT, formatter_class=_ServeHelp)
    s.add_argument("--redis", metavar="URL", help=REDIS_URL_HELP)
    add_key_prefix_option(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--workers", type=int, help="uvicorn worker processes (default MVKE_WORKERS, else 0: one per usable CPU; 1 on a shared machine)")
    s.add_argument("--grpc-port", type=int, help="also serve the Open Inference Protocol over gRPC on this port, "
                                                 "on --host (default MVKE_GRPC_PORT; unset: no gRPC)")
    s.set_defaults(func=_serve, extra=EXTRA)
