"""Every Redis key and stream name agentfleet uses, built here and nowhere else.

All keys of one model share the hash tag `{<model>}`, so a Redis Cluster keeps a model's
stream, results, reply streams and traces in one slot and the worker's commit script touches
one slot (a follow-up for another model is the one cross-slot write; see docs/operations.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PREFIX = "af"
GROUP = "workers"  # one consumer group per model stream

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$")


def valid_model_name(model: str) -> bool:
    """Model names go into keys: letters, digits, '.', '_' and '-', 100 at most, no braces."""
    return bool(_MODEL_NAME.match(model))


_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")


def valid_tenant_name(tenant: str) -> bool:
    """Tenant names may go into keys: letters, digits, '.', '_' and '-', 64 at most."""
    return bool(_TENANT_NAME.match(tenant))


def _tag(model: str) -> str:
    return f"{PREFIX}:{{{model}}}"


def task_stream(model: str) -> str:
    """The stream producers add tasks to and the model's consumer group reads."""
    return f"{_tag(model)}:tasks"


def result_key(model: str, task_id: str) -> str:
    """The stored result of one task (a string holding the msgpack Result, with a TTL)."""
    return f"{_tag(model)}:result:{task_id}"


def result_prefix(model: str) -> str:
    """What every result key of a model starts with: result_key(m, id) == prefix + id."""
    return result_key(model, "")


def reply_stream(model: str, producer_id: str) -> str:
    """Where workers push results of one producer's tasks, so it waits without polling."""
    return f"{_tag(model)}:reply:{producer_id}"


def trace_key(model: str, correlation_id: str) -> str:
    """The trace events of one correlation id that happened on this model (a list)."""
    return f"{_tag(model)}:trace:{correlation_id}"


def stats_key(model: str) -> str:
    """Counters of one model (a hash): written, duplicates."""
    return f"{_tag(model)}:stats"


def idempotency_key(model: str, key: str) -> str:
    """Holds the id of the task first enqueued under a producer's idempotency key."""
    return f"{_tag(model)}:idem:{key}"


def workers_key(model: str) -> str:
    """Live workers of a model (a hash: worker id -> epoch seconds of its last heartbeat)."""
    return f"{_tag(model)}:workers"


HEARTBEAT_S = 2.0  # how often a worker writes its heartbeat into workers_key
LIVE_WITHIN_S = 10.0  # a worker whose last heartbeat is older (five missed) is gone


def live_workers(beats: Iterable[bytes | str | float], now: float,
                 within_s: float = LIVE_WITHIN_S) -> int:
    """How many of a workers_key hash's heartbeat values are recent enough to be live."""
    return sum(now - float(beat) <= within_s for beat in beats)


def delayed_key(model: str) -> str:
    """Tasks waiting for a retry (a sorted set: payload scored by the epoch second it is due)."""
    return f"{_tag(model)}:delayed"


def dead_stream(model: str) -> str:
    """Dead letters of a model (a stream of msgpack DeadLetter under field 'd')."""
    return f"{_tag(model)}:dead"


def cancelled_key(model: str) -> str:
    """Cancelled task ids (a sorted set scored by when the mark expires)."""
    return f"{_tag(model)}:cancelled"


def cancel_channel(model: str) -> str:
    """Pub/sub channel telling workers to abort a running task."""
    return f"{_tag(model)}:cancel"


def bulk_stream(model: str) -> str:
    """The model's bulk lane: tasks of bulk jobs, read only when interactive work leaves room."""
    return f"{_tag(model)}:bulk"


def batch_output(model: str, batch_id: str) -> str:
    """Results of one bulk job's tasks on this model, in completion order (a stream)."""
    return f"{_tag(model)}:batch:{batch_id}:out"


def batch_counts(model: str, batch_id: str) -> str:
    """Counts of one bulk job's finished tasks on this model, by status (a hash)."""
    return f"{_tag(model)}:batch:{batch_id}:counts"


def kpi_key(model: str, minute: int) -> str:
    """Per-minute aggregates of finished tasks by tenant (a hash; `minute` is epoch seconds of
    the minute's start), for `agentfleet report` and `status`.  Fields: workers/kpi.py."""
    return f"{_tag(model)}:kpi:{minute}"


# Bulk jobs in the OpenAI Batch format (producer/batch.py).  A job can span models, so its
# own keys are global, outside every model's slot: their hash tag is the batch id.  Its tasks'
# results and counts stay per model (batch_output, batch_counts above).

def batch_meta(batch_id: str) -> str:
    """The record of one bulk job (a hash: status, created_at, totals per model, ...)."""
    return f"{PREFIX}:batch:{{{batch_id}}}:meta"


def batch_seen(batch_id: str, pass_id: str) -> str:
    """The custom ids one validation pass has seen (a hash: custom id -> line number)."""
    return f"{PREFIX}:batch:{{{batch_id}}}:seen:{pass_id}"


def batch_index() -> str:
    """Every bulk job's id (a sorted set scored by its creation time, epoch seconds)."""
    return f"{PREFIX}:batches"


# API keys of the gateway and the console (ops/apikeys.py): global, outside every model's slot.

def api_keys() -> str:
    """Every API key (a hash: key id -> msgpack ApiKeyRecord, holding the secret's digest)."""
    return f"{PREFIX}:apikeys"
