"""The enqueue script (producer/lua/enqueue.lua): a chunk of tasks for one model, with their idempotency keys.

One EVALSHA per chunk, so a chunk costs one round trip.  A task whose idempotency key was
seen before is not added again; the script answers with the id of the task holding the key.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentfleet.schemas.scripts import lua


def enqueue_lua() -> str:
    return lua("agentfleet.producer", "enqueue")


def enqueue_args(stream: str, idem_ttl_s: int,
                 items: Sequence[tuple]) -> tuple[list, list]:
    """KEYS and ARGV of enqueue.lua for (task id, idempotency key or None, payload, ...)."""
    keys: list = [stream]
    args: list = [idem_ttl_s]
    for task_id, idem_key, payload, *_ in items:
        if idem_key is None:
            args += (0, payload)
        else:
            keys.append(idem_key)
            args += (len(keys), task_id, payload)
    return keys, args
