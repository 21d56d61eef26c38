"""The gateway's HTTP server: granian (Rust HTTP, uvloop, one single-threaded runtime), one
worker process.  Measured against uvicorn (httptools, uvloop) on the same 2-core machine,
same Litestar app, a trivial JSON handler: 5,857 against 4,124 requests/s (docs/gateway.md).
"""

from __future__ import annotations

import os

TARGET = "agentfleet.ops.gateway.app:app_from_env"


def serve(redis_url: str, *, host: str, port: int, verbose: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (granian drains open requests, then runs the shutdown)."""
    from granian import Granian
    from granian.constants import Interfaces, Loops, RuntimeModes
    from granian.log import LogLevels

    os.environ["REDIS_URL"] = redis_url  # read by the worker process (app_from_env)
    Granian(TARGET, address=host, port=port, interface=Interfaces.ASGI, workers=1,
            runtime_mode=RuntimeModes.st, loop=Loops.uvloop, factory=True, websockets=False,
            log_access=False, log_level=LogLevels.debug if verbose else LogLevels.info,
            backlog=2048).serve(target_loader=_load)


def _load(target: str):
    """Import by our own name: granian's loader walks up from the working directory while it
    finds __init__.py, and the repository root is itself the package."""
    from agentfleet.ops.gateway.app import app_from_env

    return app_from_env()
