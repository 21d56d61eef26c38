"""A benchmark-only variant of `VllmEngine` with vLLM's priority scheduler.

Interactive tasks go ahead of bulk ones inside vLLM, not only in the worker's reads: with
`scheduling_policy="priority"` the scheduler orders its waiting queue by (priority, arrival)
and preempts a running lower-priority request when a higher-priority one cannot be admitted.
Lower values run first.  Bulk tasks (batch_id set) get `BULK_PRIORITY`; within a class a
higher task priority (0..9) runs earlier.

This is the change proposed for workers/vllm_engine.py (see docs/benchmarks.md); it lives here
until then so that the benchmark can measure it.  `_run` mirrors `VllmEngine._run` with the
one extra argument.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm import SamplingParams
from vllm.outputs import RequestOutput

from agentfleet.schemas.wire import Task
from agentfleet.workers.engine import EngineOutput, OnDone
from agentfleet.workers.vllm_engine import VllmEngine, _classify, _failed, _finished, _token_prompt

BULK_PRIORITY = 10


def vllm_priority(task: Task) -> int:
    """vLLM's priority of a task (lower runs first): interactive 0..9, bulk 10..19."""
    return (BULK_PRIORITY if task.batch_id else 0) + (9 - task.priority)


class PriorityVllmEngine(VllmEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._priority: dict[str, int] = {}

    def _engine_args(self):
        args = super()._engine_args()
        args.scheduling_policy = "priority"
        return args

    def submit(self, requests: Sequence[tuple[str, Task]], on_done: OnDone) -> None:
        for request_id, task in requests:
            self._priority[request_id] = vllm_priority(task)
        super().submit(requests, on_done)
        for request_id, _ in requests:  # refused ones never reach _run
            if request_id not in self._inflight:
                self._priority.pop(request_id, None)

    async def _run(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                   engine_start: float) -> EngineOutput:
        priority = self._priority.pop(request_id, 0)
        final: RequestOutput | None = None
        try:
            async for output in self._llm.generate(_token_prompt(prompt_ids), params,
                                                   request_id, priority=priority):
                final = output
        except Exception as exc:
            return _failed(request_id, engine_start, *_classify(exc))
        return _finished(request_id, final, len(prompt_ids), engine_start)
