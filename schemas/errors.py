"""Every error agentfleet raises, and the typed codes that failed results carry.

One base class, `AgentFleetError`. Errors a caller can fix or retry are apart from the
fatal ones (`EngineDeadError`, `FatalConfigError`), which mean the process should stop.
"""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """Typed error codes written into failed results (the wire value is the string)."""

    INVALID_TASK = "invalid_task"  # a field out of range, or a payload of the wrong shape
    DECODE_ERROR = "decode_error"  # the payload is not a task at all
    UNSUPPORTED_VERSION = "unsupported_version"  # a schema version newer than this worker reads
    UNKNOWN_MODEL = "unknown_model"  # the task names a model this fleet does not know
    PROMPT_TOO_LONG = "prompt_too_long"  # more prompt tokens than the model's context allows
    ENGINE_ERROR = "engine_error"  # the engine failed this request; others go on
    ENGINE_DEAD = "engine_dead"  # the engine died; the worker stops
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the task's deadline passed before it ran
    CANCELLED = "cancelled"  # its producer cancelled it, queued or running
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"  # transient errors on every allowed attempt
    DELIVERY_LIMIT = "delivery_limit"  # delivered again and again: it keeps killing workers
    LOST = "lost"  # its stream entry vanished while pending (trimmed or deleted by hand)
    INTERNAL = "internal"  # a bug in agentfleet: the message says where
    REJECTED = "rejected"  # an admin rejected a task that needed approval (ops/approvals.py)
    # the output does not parse by its response format or tools (cut by max_tokens, or a
    # fan-out's list longer than its bound): docs/agent-steps.md
    OUTPUT_INVALID = "output_invalid"
    JOIN_INPUT_LOST = "join_input_lost"  # a join step's input (its children's results) expired


class AgentFleetError(Exception):
    """Base class of every error agentfleet raises on purpose."""


class ValidationError(AgentFleetError, ValueError):
    """Raised before anything is queued (producer) or run (worker) when a task breaks a limit.

    `field` is the dotted path of the offending field, `limit` the bound it broke.
    """

    code = ErrorCode.INVALID_TASK

    def __init__(self, field: str, message: str, *, limit: object = None, value: object = None):
        self.field = field
        self.limit = limit
        self.value = value
        super().__init__(f"{field}: {message}")


class UnknownModelError(ValidationError):
    """Raised when a task names a model that is not in the configured model registry."""

    code = ErrorCode.UNKNOWN_MODEL


class PromptTooLongError(ValidationError):
    """Raised when a prompt is longer than the model's limit (characters or tokens)."""

    code = ErrorCode.PROMPT_TOO_LONG


class UnknownVersionError(ValidationError):
    """Raised at submit when a task is pinned to a version its model's registry entry does not
    have (`limit` lists the versions it serves)."""


class RetiredVersionError(ValidationError):
    """Raised at submit when a task is pinned to a version that was retired or rolled back:
    nothing routes to it any more (`limit` lists the versions it serves)."""


class SlaExceededError(AgentFleetError):
    """Raised at submit when a task's SLA class has a time budget that the version it was
    routed to would pass (its estimated queue wait) and no fallback can take it: nothing was
    queued.  Never silently late: retry after `retry_after_s`, or submit without a class.
    The estimate: docs/versions.md."""

    def __init__(self, model: str, version: str, sla: str, budget_s: float,
                 estimated_wait_s: float, reason: str = ""):
        self.model = model
        self.version = version
        self.sla = sla
        self.budget_s = budget_s
        self.estimated_wait_s = estimated_wait_s
        self.retry_after_s = max(0.5, estimated_wait_s - budget_s)
        where = f"{model}@{version}" if version else model
        wait = "unknown" if estimated_wait_s == float("inf") else f"{estimated_wait_s:.2f}s"
        super().__init__(f"sla {sla!r}: the estimated queue wait on {where} ({wait}) passes "
                         f"its budget of {budget_s:g}s" + (f"; {reason}" if reason else ""))


class RegistryError(AgentFleetError):
    """Raised by the model registry (producer/models.py) for a change that cannot apply: an
    unknown model or version, a version registered twice, retiring the stable version,
    a second canary."""


class DecodeError(AgentFleetError):
    """Raised by the worker when a stream entry cannot be decoded into a task."""

    code = ErrorCode.DECODE_ERROR


class UnsupportedVersionError(DecodeError):
    """Raised when a payload's schema version is newer than this code understands."""

    code = ErrorCode.UNSUPPORTED_VERSION


class JoinInputLostError(AgentFleetError):
    """Raised by the worker when a join step's input (its join's state: the children's
    results) is gone when the step is read: it expired (result_ttl_s) before the step ran.
    The step ends failed with this code; nothing else stops."""

    code = ErrorCode.JOIN_INPUT_LOST


class QuotaExceededError(AgentFleetError):
    """Raised at submit when a tenant's quota (`max_queued` or `tokens_per_minute` of its
    registry entry, per model) would be passed: nothing of the call was queued, unless
    `queued_ids` says otherwise (another producer of the tenant raced in between the chunks
    of one large call).  Retry after `retry_after_s`."""

    def __init__(self, tenant: str, model: str, quota: str, limit: int, retry_after_s: float,
                 queued_ids: list[str] | None = None):
        self.tenant = tenant
        self.model = model
        self.quota = quota
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.queued_ids = queued_ids or []
        super().__init__(f"tenant {tenant!r} is over its {quota} quota ({limit}) on model "
                         f"{model!r}; retry after {retry_after_s:.1f}s")


class ResultTimeoutError(AgentFleetError, TimeoutError):
    """Raised by `Producer.wait*` when results do not arrive within `timeout_s`."""

    def __init__(self, message: str, missing: list[str]):
        self.missing = missing
        super().__init__(message)


class BrokerError(AgentFleetError):
    """Raised when Redis cannot be reached or refuses a command; wraps the redis-py error."""


class ServerOutOfMemoryError(BrokerError):
    """Raised on enqueue when the server is at maxmemory: nothing of that chunk was queued."""


class NotReplicatedError(BrokerError):
    """Raised after a write when `wait_replicas` is set and fewer replicas than that confirmed
    it within `wait_timeout_ms`: the write is on the primary, but a failover now could lose
    it (resubmit with the same idempotency key to be sure).  `reply` is the write's own
    answer, `acked` how many replicas confirmed it."""

    def __init__(self, message: str, reply: object = None, acked: int = 0, wanted: int = 0):
        super().__init__(message)
        self.reply = reply
        self.acked = acked
        self.wanted = wanted


class EngineError(AgentFleetError):
    """Raised by an engine adapter when one request fails; the engine itself goes on."""

    code = ErrorCode.ENGINE_ERROR


class EngineDeadError(AgentFleetError):
    """Raised when the engine process died: fatal, the worker stops and its tasks are reclaimed."""

    code = ErrorCode.ENGINE_DEAD


class WorkerCrashedError(AgentFleetError):
    """Raised by `Worker.run` after a drain that a crash started: one of its loops failed
    (logged with its traceback) or an engine died.  `agentfleet worker` then exits 1."""


class ServerUnreachableError(BrokerError):
    """Raised when the server cannot be reached within the wait allowed (start-up of a
    worker, a CLI command): the CLI prints one line and exits 3."""


class FatalConfigError(AgentFleetError):
    """Raised at start-up for settings that cannot work (bad URL, missing model files)."""


class InvalidSettingError(FatalConfigError):
    """Raised when a `Settings` or `ModelSpec` is made with a value its field does not allow:
    `variable` names where it came from (AGENTFLEET_MAX_INFLIGHT, or a models file's field),
    `allowed` says what would be accepted."""

    def __init__(self, variable: str, value: object, allowed: str):
        self.variable = variable
        self.value = value
        self.allowed = allowed
        super().__init__(f"{variable}={value!r}: must be {allowed}")


class EvictingServerError(FatalConfigError):
    """Raised at start-up against a server whose maxmemory-policy may evict our keys."""


class UnknownIdError(AgentFleetError):
    """Raised by a lookup (`agentfleet trace`, `dlq show|replay|purge`) whose id names
    nothing: never there, expired, or already removed."""


class BatchError(AgentFleetError):
    """Raised by the bulk-job client (producer/batch.py) for a job it cannot submit or find:
    an unknown batch id, a batch id that already holds another file or a finished job."""


class InvalidBatchFileError(BatchError, ValueError):
    """Raised before anything is queued when lines of a batch input file are invalid.

    `errors` holds the first invalid lines as (line number, reason), `invalid` their count.
    """

    def __init__(self, message: str, errors: list[tuple[int, str]], invalid: int):
        self.errors = errors
        self.invalid = invalid
        super().__init__(message)
