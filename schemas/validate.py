"""Bounds on a task, checked by the producer before queueing and again by the worker.

Each failure raises a `ValidationError` naming the field (dotted path) and the limit.
"""

from __future__ import annotations

from agentfleet.schemas.errors import PromptTooLongError, UnknownModelError, ValidationError
from agentfleet.schemas.keys import DEFAULT_TENANT, valid_tenant_name
from agentfleet.schemas.tenants import check_name
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import SCHEMA_VERSION, FollowUp, Message, Sampling, Task

MAX_ID_CHARS = 200
MAX_STOP_SEQUENCES = 16
ROLES = frozenset(("system", "user", "assistant", "tool"))


def validate_task(task: Task, settings: Settings, *, sampling_checked: bool = False) -> ModelSpec:
    """Check every bound of `task`; return the spec of its model.

    `sampling_checked`: the caller has already checked a Sampling equal to this task's.
    """
    if task.v != SCHEMA_VERSION:
        raise ValidationError("v", f"schema version {task.v} is not {SCHEMA_VERSION}",
                              limit=SCHEMA_VERSION, value=task.v)
    spec = _model(task.model, "model", settings)
    if (len(task.id) > MAX_ID_CHARS or len(task.correlation_id) > MAX_ID_CHARS
            or len(task.parent_id) > MAX_ID_CHARS or len(task.agent_id) > MAX_ID_CHARS
            or len(task.tenant) > MAX_ID_CHARS):
        _too_long_id(task)
    if task.tenant != DEFAULT_TENANT and not valid_tenant_name(task.tenant):
        check_name(task.tenant)  # a tenant's name goes into its stream's key
    _check_input(task.prompt, task.messages, "", spec, settings, required=True)
    if not sampling_checked:
        _check_sampling(task.sampling, "sampling.", spec)
    if not 0 <= task.priority <= 9:
        raise ValidationError("priority", f"{task.priority} is outside 0..9",
                              limit=(0, 9), value=task.priority)
    if task.deadline is not None and task.deadline <= 0:
        raise ValidationError("deadline", "must be epoch seconds above 0", value=task.deadline)
    if task.idempotency_key is not None and not 0 < len(task.idempotency_key) <= MAX_ID_CHARS:
        raise ValidationError("idempotency_key", f"must hold 1..{MAX_ID_CHARS} characters",
                              limit=MAX_ID_CHARS, value=len(task.idempotency_key))
    if len(task.metadata) > settings.max_metadata_items:
        raise ValidationError("metadata", f"{len(task.metadata)} items, more than "
                              f"{settings.max_metadata_items}", limit=settings.max_metadata_items)
    if task.depth < 0 or task.depth > settings.max_chain_depth:
        raise ValidationError("depth", f"{task.depth} is outside 0..{settings.max_chain_depth}",
                              limit=settings.max_chain_depth, value=task.depth)
    _check_followups(task.followups, "followups", task.depth + 1, spec, settings)
    return spec


class TaskChecker:
    """`validate_task` for a run of tasks: a sampling equal to the last one that passed is not
    checked again (one Struct comparison in C; the tasks of a stream or of one `submit_many`
    mostly share theirs).  Only for tasks whose sampling nobody mutates after the check."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._sampling_ok: Sampling | None = None

    def __call__(self, task: Task) -> ModelSpec:
        same = task.sampling == self._sampling_ok
        spec = validate_task(task, self.settings, sampling_checked=same)
        if not same:
            self._sampling_ok = task.sampling
        return spec


def _too_long_id(task: Task) -> None:
    for name in ("id", "correlation_id", "parent_id", "agent_id", "tenant"):
        value = getattr(task, name)
        if len(value) > MAX_ID_CHARS:
            raise ValidationError(name, f"{len(value)} characters, more than {MAX_ID_CHARS}",
                                  limit=MAX_ID_CHARS, value=len(value))


def _model(name: str, field: str, settings: Settings) -> ModelSpec:
    spec = settings.models.get(name)  # registry names are checked when settings load
    if spec is None:
        raise UnknownModelError(field, f"unknown model {name!r}; known: {sorted(settings.models)}",
                                limit=sorted(settings.models), value=name)
    return spec


def _check_input(prompt: str | None, messages: list[Message] | None, prefix: str,
                 spec: ModelSpec, settings: Settings, *, required: bool) -> None:
    if prompt is not None and messages is not None:
        raise ValidationError(prefix + "prompt", "give a prompt or messages, not both")
    limit = spec.prompt_chars_limit
    if prompt is not None:
        if not prompt.strip():
            raise ValidationError(prefix + "prompt", "is empty", limit=1, value=0)
        if len(prompt) > limit:
            raise PromptTooLongError(prefix + "prompt", f"{len(prompt)} characters, more than "
                                     f"{limit} for model {spec.name}", limit=limit, value=len(prompt))
        return
    if messages is None:
        if required:
            raise ValidationError(prefix + "prompt", "a task needs a prompt or messages")
        return
    if not messages:
        raise ValidationError(prefix + "messages", "is empty", limit=1, value=0)
    if len(messages) > settings.max_messages:
        raise ValidationError(prefix + "messages", f"{len(messages)} messages, more than "
                              f"{settings.max_messages}", limit=settings.max_messages)
    total = 0
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise ValidationError(f"{prefix}messages[{i}].role",
                                  f"{message.role!r} is not one of {sorted(ROLES)}")
        total += len(message.content)
    if total == 0:
        raise ValidationError(prefix + "messages", "all contents are empty", limit=1, value=0)
    if total > limit:
        raise PromptTooLongError(prefix + "messages", f"{total} characters, more than {limit} "
                                 f"for model {spec.name}", limit=limit, value=total)


def _check_sampling(s: Sampling, prefix: str, spec: ModelSpec) -> None:
    def bad(name: str, value: object, limit: str) -> ValidationError:
        return ValidationError(prefix + name, f"{value!r} is outside {limit}", limit=limit,
                               value=value)

    if not 1 <= s.max_tokens <= spec.max_model_len:
        raise bad("max_tokens", s.max_tokens, f"1..{spec.max_model_len} (max_model_len of "
                  f"{spec.name})")
    if not 0 <= s.min_tokens <= s.max_tokens:
        raise bad("min_tokens", s.min_tokens, f"0..max_tokens ({s.max_tokens})")
    if not 0.0 <= s.temperature <= 2.0:
        raise bad("temperature", s.temperature, "0.0..2.0")
    if not 0.0 < s.top_p <= 1.0:
        raise bad("top_p", s.top_p, "(0.0, 1.0]")
    if not (s.top_k == -1 or 0 <= s.top_k <= 1000):
        raise bad("top_k", s.top_k, "-1 or 0..1000")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not -2.0 <= value <= 2.0:
            raise bad(name, value, "-2.0..2.0")
    if not 0.0 < s.repetition_penalty <= 2.0:
        raise bad("repetition_penalty", s.repetition_penalty, "(0.0, 2.0]")
    if s.seed is not None and not 0 <= s.seed < 2**63:
        raise bad("seed", s.seed, "0..2**63-1")
    if len(s.stop) > MAX_STOP_SEQUENCES:
        raise bad("stop", len(s.stop), f"at most {MAX_STOP_SEQUENCES} sequences")


def _check_followups(followups: list[FollowUp], prefix: str, depth: int, parent: ModelSpec,
                     settings: Settings) -> None:
    if not followups:
        return
    if len(followups) > settings.max_fanout:
        raise ValidationError(prefix, f"{len(followups)} follow-ups, more than max_fanout "
                              f"{settings.max_fanout}", limit=settings.max_fanout,
                              value=len(followups))
    if depth > settings.max_chain_depth:
        raise ValidationError(prefix, f"chain depth {depth} is more than max_chain_depth "
                              f"{settings.max_chain_depth}", limit=settings.max_chain_depth,
                              value=depth)
    for i, f in enumerate(followups):
        at = f"{prefix}[{i}]."
        spec = _model(f.model, at + "model", settings) if f.model else parent
        if f.prompt is None and f.messages is None:
            raise ValidationError(at + "prompt", "a follow-up needs a prompt or messages")
        _check_input(f.prompt, f.messages, at, spec, settings, required=True)
        if f.sampling is not None:
            _check_sampling(f.sampling, at + "sampling.", spec)
        _check_followups(f.followups, at + "followups", depth + 1, spec, settings)
