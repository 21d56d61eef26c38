"""vLLM's scheduler statistics into a lane's metrics: KV-cache use, prefix-cache hits.

vLLM's `AsyncLLM` hands every engine step's `SchedulerStats` (and `IterationStats`) to its
stat loggers (vllm/v1/metrics/loggers.py).  Its own `PrometheusStatLogger` writes `vllm:*`
series into prometheus_client's global registry, but it unregisters every `vllm:*` collector
each time an engine starts, so a worker serving two models would only show the last one; and
a worker's /metrics serves its own registry (workers/metrics.py).  So the engine also gets
this logger, which passes the few figures we chart to `LaneMetrics.engine_stats`:

    from agentfleet.workers.vllm_stats import stat_logger_factory
    AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(sink)])

It runs in the worker's process, in AsyncLLM's output handler, once per engine step: a few
attribute reads, no lock.  `SchedulerStats` is not a stable vLLM interface (the base class
says so), hence `getattr` with defaults: a renamed field reads as absent, not as a crash.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm.v1.metrics.loggers import StatLoggerBase

Sink = Callable[..., None]


class AgentfleetStatLogger(StatLoggerBase):
    """A per-engine vLLM stat logger that forwards to `sink` (LaneMetrics.engine_stats)."""

    sink: Sink  # set on the subclass `stat_logger_factory` makes

    def __init__(self, vllm_config, engine_index: int = 0):
        self.engine_index = engine_index

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
        self.sink(
            kv_cache_usage=getattr(scheduler_stats, "kv_cache_usage", None),
            running=getattr(scheduler_stats, "num_running_reqs", None),
            waiting=getattr(scheduler_stats, "num_waiting_reqs", 0)
            + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0),
            prefix_cache_queries=getattr(prefix, "queries", 0),
            prefix_cache_hits=getattr(prefix, "hits", 0),
            preemptions=getattr(iteration_stats, "num_preempted_reqs", 0)
            if iteration_stats is not None else 0,
        )

    def log_engine_initialized(self) -> None:
        return None


def stat_logger_factory(sink: Sink) -> type[AgentfleetStatLogger]:
    """A stat-logger class bound to `sink`, for `AsyncLLM(..., stat_loggers=[...])`.

    vLLM calls a per-engine factory as `factory(vllm_config, engine_index)`; a class whose
    constructor takes those is the factory, and each bound class keeps its own sink.
    """
    return type("AgentfleetStatLogger", (AgentfleetStatLogger,), {"sink": staticmethod(sink)})
