"""`agentfleet console`: a read-only web console (queues, batches, dead letters, traces, the
report) with login by API key.  Install the `console` extra (litestar, uvicorn)."""

from agentfleet.ops.console.app import Console, console_router, create_app, run_console

__all__ = ["Console", "console_router", "create_app", "run_console"]
