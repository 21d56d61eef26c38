"""The gateway's HTTP server: one process, uvicorn (httptools and uvloop, all on one thread) by
default, or granian (Rust HTTP in a thread beside the Python loop).

`gateway_server` picks one; docs/gateway.md gives what each measured.  With a trivial handler
granian answered 5,857 requests/s against uvicorn's 4,124 on the 2-core machine, but with the
gateway's own routes it was not faster (submits: 140-150 us of the process's CPU each on
uvicorn, 175-230 on granian), and its runtime thread and the event loop hand the GIL to each
other for every request, which on a busy machine added milliseconds between a Redis reply
and the response (a paced submit's p50: 1.6 ms on uvicorn, 3.4-10 ms on granian).
"""

from __future__ import annotations

import os

from agentfleet.schemas.errors import FatalConfigError

SERVERS = ("granian", "uvicorn")
FACTORY = "agentfleet.ops.gateway.app:app_from_env"


def serve(redis_url: str, *, host: str, port: int, server: str = "uvicorn",
          verbose: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (open requests drain, then the shutdown runs)."""
    os.environ["REDIS_URL"] = redis_url  # read by app_from_env, in this or a child process
    if server == "granian":
        _granian(host, port, verbose)
    elif server == "uvicorn":
        import uvicorn

        # No proxy-headers middleware (a layer per request; the gateway never reads the
        # client's address) and no Server header.
        uvicorn.run(FACTORY, factory=True, host=host, port=port, loop="uvloop",
                    http="httptools", ws="none", lifespan="on", access_log=False,
                    proxy_headers=False, server_header=False, log_config=None,
                    log_level="debug" if verbose else "info", backlog=2048)
    else:
        raise FatalConfigError(f"AGENTFLEET_GATEWAY_SERVER={server!r}: use one of {SERVERS}")


def _granian(host: str, port: int, verbose: bool) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops, RuntimeModes
    from granian.log import LogLevels

    Granian(FACTORY, address=host, port=port, interface=Interfaces.ASGI, workers=1,
            runtime_mode=RuntimeModes.st, loop=Loops.uvloop, factory=True, websockets=False,
            log_access=False, log_level=LogLevels.debug if verbose else LogLevels.info,
            backlog=2048).serve(target_loader=_load)


def _load(target: str):
    """Import by our own name: granian's loader walks up from the working directory while it
    finds __init__.py, and the repository root is itself the package."""
    from agentfleet.ops.gateway.app import app_from_env

    return app_from_env()
