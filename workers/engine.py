"""What a worker needs from an inference engine, and what it gets back.

The worker hands a whole read window to `submit` and is called back once per finished
request, from the event loop thread.  The engine batches as it likes (vLLM continuously);
the worker never waits for a whole window before reading more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.wire import Task, ToolCall


class EngineOutput(msgspec.Struct, kw_only=True, gc=False):
    """One finished request.  Times are epoch seconds; `error_code` None means success.

    One per task: untracked by the cyclic collector (gc=False; it holds no containers)."""

    request_id: str
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    engine_start: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    error_code: ErrorCode | None = None
    error_message: str = ""
    # The calls the model's tool parser read from the text (which then holds the rest); None
    # where no parser ran: calls made through structured outputs are read by the worker.
    tool_calls: list[ToolCall] | None = None


OnDone = Callable[[EngineOutput], None]


def engine_priority(task: Task) -> int:
    """The order inside an engine, lower first (vLLM's priority scheduling): interactive
    tasks 0..9 (task priority 9 first), then bulk-job tasks 10..19, so that a bulk job never
    delays interactive work waiting for a slot."""
    return (10 if task.batch_id else 0) + (9 - task.priority)


class Engine(Protocol):
    """An engine serving one model."""

    model_version: str
    # How many requests it runs at once (its batch size, vLLM's max_num_seqs); None when it
    # has no such limit.  The bulk cap is a share of it (workers/runner.py).
    slots: int | None

    async def start(self) -> None:
        """Load the model; raise `FatalConfigError` if it cannot be loaded."""

    def submit(self, requests: Sequence[tuple[str, Task]], on_done: OnDone, *,
               salts: Sequence[str] | None = None) -> None:
        """Start every (request_id, task); call `on_done` once per request when it ends.

        `salts`, one per request: its prefix-cache salt (vLLM's `cache_salt`): requests only
        share cached prefixes with requests of the same salt (a tenant, or its cache group).
        Must not raise for one bad request: report it through `on_done` with an error code.
        """

    def abort(self, request_ids: Sequence[str]) -> None:
        """Stop these requests; `on_done` is still called for each (finish_reason "abort")."""

    async def stop(self) -> None:
        """Release the engine (processes, memory)."""
