"""A task's affinity key, derived once by the producer when the caller gave none.

Agents of one kind share a long system prompt (or a prompt template): tasks whose leading
prompt is the same should run on the worker whose prefix cache holds it.  The key is a hash
of the system message, else of the first `prefix_chars` characters of the first message or
the prompt, so tasks of one kind share a key and unrelated tasks spread evenly.  The key
picks the task's affinity partition (`keys.affinity_partition`); follow-ups inherit their
parent's (workers/outcomes.py).  docs/affinity.md has the whole design.

Cost: one BLAKE2b of at most `prefix_chars` characters per task (about 1 us for 2,048).
"""

from __future__ import annotations

import hashlib

from agentfleet.schemas.wire import Task

KEY_PREFIX = "h:"  # derived keys; a caller's own (a session id) is used as it is


def derive_affinity_key(task: Task, prefix_chars: int) -> str:
    """The key of a task without one: a hash of its leading prompt."""
    if task.messages:
        lead = task.messages[0].content
    else:
        lead = task.prompt or ""
    digest = hashlib.blake2b(lead[:prefix_chars].encode(), digest_size=8).hexdigest()
    return KEY_PREFIX + digest
