"""All settings in one typed object, read from the environment in one place.

Every variable starts with `AGENTFLEET_`, except `REDIS_URL` (the name every Redis tool
knows).  Per-model engine settings come from an optional TOML file (`AGENTFLEET_MODELS_FILE`):

    [models.smollm2-135m]
    max_model_len = 2048
    max_num_seqs = 64

Every number has a range and every word its values (`Bound`, beside each field), checked
whenever a `Settings` or a `ModelSpec` is made: a value out of range raises one
`InvalidSettingError` naming the variable, the value and what is allowed.  The README's
configuration table lists every field below with its variable and default; a test
(tests/test_settings_doc.py) reads the table and checks it against this file.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated

import msgspec

from agentfleet.schemas.errors import FatalConfigError, InvalidSettingError
from agentfleet.schemas.keys import valid_model_name

ENV_PREFIX = "AGENTFLEET_"
DEFAULT_MODEL = "smollm2-135m"


class Bound:
    """What a setting allows: a range (`ge`, `gt`, `le`) or a set of words (`one_of`)."""

    __slots__ = ("ge", "gt", "le", "one_of", "prefixes")

    def __init__(self, *, ge: float | None = None, gt: float | None = None,
                 le: float | None = None, one_of: tuple[str, ...] = (),
                 prefixes: tuple[str, ...] = ()):
        self.ge, self.gt, self.le, self.one_of, self.prefixes = ge, gt, le, one_of, prefixes

    def allows(self, value: object) -> bool:
        if self.one_of:
            return value in self.one_of
        if self.prefixes:  # "" (unset) or a value starting with one of them
            return value == "" or str(value).startswith(self.prefixes)
        return not ((self.ge is not None and value < self.ge)
                    or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le))

    def __str__(self) -> str:
        if self.one_of:
            return "one of " + ", ".join(repr(v) for v in self.one_of)
        if self.prefixes:
            return "unset, or a URL starting with " + ", ".join(self.prefixes)
        if self.ge is not None and self.le is not None:
            return f"{self.ge:g}..{self.le:g}"
        parts = [f">= {self.ge:g}" if self.ge is not None else "",
                 f"> {self.gt:g}" if self.gt is not None else "",
                 f"<= {self.le:g}" if self.le is not None else ""]
        return " and ".join(p for p in parts if p)


# The shapes most fields share.
Count = Annotated[int, Bound(ge=1)]  # at least one
Count0 = Annotated[int, Bound(ge=0)]  # 0 has a meaning (off, none, derived): see the field
NonNegative = Annotated[float, Bound(ge=0)]
Positive = Annotated[float, Bound(gt=0)]
Share = Annotated[float, Bound(gt=0, le=1)]
Port = Annotated[int, Bound(ge=0, le=65535)]  # 0: off


@functools.cache
def _bounds(cls: type) -> tuple[tuple[str, Bound], ...]:
    found = []
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        for arg in (hint, *typing.get_args(hint)):  # `Count | None` holds its Annotated
            if typing.get_origin(arg) is Annotated:
                found += [(name, m) for m in arg.__metadata__ if isinstance(m, Bound)]
    return tuple(found)


def check_bounds(obj: msgspec.Struct, variable: Callable[[str], str]) -> None:
    """Raise `InvalidSettingError` for the first field of `obj` outside its `Bound`."""
    for name, bound in _bounds(type(obj)):
        value = getattr(obj, name)
        if value is not None and not bound.allows(value):
            raise InvalidSettingError(variable(name), value, str(bound))


def variable(field: str) -> str:
    """The environment variable of a `Settings` field."""
    return _OWN_NAMES.get(field, ENV_PREFIX + field.upper())


_OWN_NAMES = {"redis_url": "REDIS_URL", "sentry_dsn": "SENTRY_DSN"}  # names every tool knows


class ModelSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One model the fleet serves: where its weights are and how its engine is set up."""

    name: str
    path: str = ""  # a local model directory; "" for the default model's prepared cache
    version: str = ""  # written into every result; "" derives it from the model directory
    max_model_len: Count = 2048
    # Bulk-tuned on an H100 (docs/benchmarks.md): 512 sequences, 8192 tokens a step.  Keep
    # KV blocks x block size >= max_num_seqs x (prompt + max_tokens), or vLLM preempts.
    max_num_seqs: Count = 512
    # Engine slots beyond max_num_seqs, as a share of it, that only a tenant below its fair
    # share may take: its next task starts now, not when a flood's wave of slots frees
    # (workers/admission.py).  vLLM gets max_num_seqs plus these.
    spare_share: Annotated[float, Bound(ge=0, le=1)] = 0.0625
    max_num_batched_tokens: Count | None = 8192
    gpu_memory_utilization: Share = 0.45
    kv_cache_space_gib: Count = 4  # CPU engine only (VLLM_CPU_KVCACHE_SPACE)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    dtype: str = "auto"  # bfloat16, or float32 on CPUs without native bfloat16
    load_format: str = "auto"  # "dummy" for throughput runs with random weights
    max_prompt_chars: Count0 = 0  # 0: 8 characters per token of max_model_len
    seed: Count0 = 0
    # "priority": interactive before bulk inside vLLM; "fcfs": arrival order
    scheduling_policy: Annotated[str, Bound(one_of=("priority", "fcfs"))] = "priority"
    # vLLM's tool parser for this model family ("hermes", "llama3_json", ...): tool calls of
    # tasks with tool_choice "auto" are read by it; "": by structured outputs instead.
    tool_parser: str = ""
    # Any other vLLM engine argument (AsyncEngineArgs), passed as is: a registered model
    # version's (docs/versions.md), or a models file's `[models.NAME.engine_args]`.
    engine_args: dict[str, object] = {}
    sleep_group: str = ""  # engines of one group in a worker share a GPU, taking turns

    def __post_init__(self) -> None:
        check_bounds(self, lambda field: f"[models.{self.name}] {field}")

    @property
    def spare_seqs(self) -> int:
        """Engine slots kept for tenants below their fair share (`spare_share`)."""
        return math.ceil(self.max_num_seqs * self.spare_share)

    @property
    def prompt_chars_limit(self) -> int:
        return self.max_prompt_chars or self.max_model_len * 8


class Settings(msgspec.Struct, kw_only=True):
    redis_url: Annotated[str, Bound(prefixes=(
        "redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://",
        "redis+sentinel://", "rediss+sentinel://"))] = ""  # producer/connection.py
    # "" finds (or starts) the local server (ops/localserver.py)
    home: str = ""  # cache and data folder; "" is ~/.cache/agentfleet
    models: dict[str, ModelSpec] = msgspec.field(
        # Eager: on a small CPU torch.compile costs minutes per start and its bf16 kernels
        # flip this tiny model's greedy answers; a GPU models file turns compilation on.
        default_factory=lambda: {DEFAULT_MODEL: ModelSpec(name=DEFAULT_MODEL, enforce_eager=True,
                                                          max_num_seqs=64)}
    )
    default_model: str = DEFAULT_MODEL
    # worker
    worker_id: str = ""  # "" is <host>-<pid>
    engine: Annotated[str, Bound(one_of=("vllm", "fake"))] = "vllm"  # fake: the test double
    read_count: Count = 512  # at most this many tasks per XREADGROUP
    block_ms: Count = 100  # how long an idle read waits for the first task
    window_ms: NonNegative = 0.0  # after the first task, wait this long to gather more
    max_inflight: Count = 1024  # tasks read but not yet committed, per model (2 x max_num_seqs)
    # Share of the engine's slots (max_num_seqs) bulk-job tasks may hold: the rest is kept
    # for interactive tasks, which then start within an engine step or two.
    bulk_max_share: Share = 0.875
    fairness: bool = True  # tenants share engine slots by weight (VTC); False: first come
    # delivery guarantees
    claim_idle_ms: Count = 30_000  # a pending task idle this long on its consumer is reclaimed
    max_attempts: Count = 3  # engine attempts of a task failing with transient errors
    retry_base_s: NonNegative = 0.5  # first retry delay; doubles per attempt, with jitter
    retry_max_s: NonNegative = 30.0
    max_deliveries: Count = 3  # deliveries before a task that keeps killing workers is dead
    dead_maxlen: Count = 100_000  # cap of a model's dead-letter stream
    trim_interval_s: Positive = 10.0  # how often a worker trims acknowledged entries
    cancel_ttl_s: Count = 86_400  # how long a cancellation mark is kept
    server_wait_s: NonNegative = 60.0  # a command waits this long for the server, then exits 3
    # fault injection for the fault suite
    crash_at: Annotated[str, Bound(one_of=("", "before_commit", "after_commit"))] = ""
    # retention
    result_ttl_s: Count = 86_400
    trace_ttl_s: Count = 86_400
    reply_maxlen: Count = 1_000_000
    trace_enabled: bool = True
    otel_enabled: bool = False  # OpenTelemetry spans per task (workers/otel.py)
    # limits checked before anything is queued
    max_fanout: Count0 = 8  # follow-ups one task may declare
    max_chain_depth: Count0 = 8  # follow-up nesting
    max_messages: Count = 256
    max_metadata_items: Count0 = 64
    max_children: Count0 = 100  # children one step may enqueue (after for_each/items): a join's inputs
    # observability (docs/observability.md)
    metrics_port: Port = 9464  # `agentfleet worker` serves /metrics here; 0: metrics off
    # auto (text on a terminal, else JSON lines), json or text
    log_format: Annotated[str, Bound(one_of=("auto", "json", "text"))] = "auto"
    sentry_dsn: str = ""  # SENTRY_DSN; "" sends nothing
    sentry_include_text: bool = False  # prompts and outputs go to Sentry only when true
    kpi_ttl_s: Count0 = 8 * 86_400  # per-minute aggregates for `agentfleet report`; 0: not kept
    # the fake engine (a test double, AGENTFLEET_ENGINE=fake): requests it runs at once
    # (0: no limit) and how long each takes, for queue and headroom benchmarks
    fake_slots: Count0 = 0
    fake_delay_s: NonNegative = 0.0
    # replication (docs/operations.md): WAIT for this many replicas after each enqueue, commit
    # and follow-up move, so that a failover cannot lose what was confirmed; 0: no WAIT
    wait_replicas: Annotated[int, Bound(ge=0, le=16)] = 0
    wait_timeout_ms: Annotated[int, Bound(ge=1, le=600_000)] = 1000  # then NotReplicatedError
    # streaming (workers/streaming.py)
    stream_ttl_s: Count = 600  # how long a streaming task's partial output is kept
    # the gateway (ops/gateway/, docs/gateway.md)
    gateway_host: str = "127.0.0.1"
    gateway_port: Port = 8000  # the console (ops/console) takes 8080
    gateway_server: Annotated[str, Bound(one_of=("uvicorn", "granian"))] = "uvicorn"
    gateway_files_dir: str = ""  # "" is <home>/files; a volume in a pod
    gateway_max_file_bytes: Count = 200 * 1024 * 1024  # an uploaded file's limit
    gateway_max_body_bytes: Count = 4 * 1024 * 1024  # a JSON request's limit
    gateway_wait_timeout_s: Positive = 600.0  # how long a completion request waits
    gateway_key_cache_s: NonNegative = 5.0  # a revoked key is refused within this long
    webhook_secret: str = ""  # signs webhooks (a key per tenant is derived); "" turns them off
    webhook_max_attempts: Count = 8
    webhook_retry_base_s: Positive = 1.0  # first retry delay; doubles per attempt, with jitter
    webhook_retry_max_s: Positive = 300.0
    webhook_timeout_s: Positive = 10.0
    # model versions and routing (docs/versions.md)
    sla_interactive_s: NonNegative = 2.0  # queue-wait budget of the SLA class "interactive"
    sla_standard_s: NonNegative = 30.0  # ... of "standard"
    sla_batch_s: NonNegative = 0.0  # ... of "batch" (0: no budget, never refused)
    sla_refresh_s: Positive = 0.25  # a producer re-reads a version's queue at most this often
    canary_guard: bool = True  # workers take turns running the canary guard (one at a time)
    sleep_idle_s: Positive = 60.0  # an engine of a sleep group idle this long goes to sleep
    sleep_turn_s: NonNegative = 5.0  # it keeps the GPU at least this long while another waits

    def __post_init__(self) -> None:
        check_bounds(self, variable)

    @property
    def home_path(self) -> Path:
        return Path(self.home or Path.home() / ".cache" / "agentfleet")

    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    def model(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def sla_budget_s(self, sla: str) -> float | None:
        """The fleet's queue-wait budget of an SLA class (0: none); None for an unknown class."""
        return {"interactive": self.sla_interactive_s, "standard": self.sla_standard_s,
                "batch": self.sla_batch_s}.get(sla)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in msgspec.structs.fields(cls):
            if field.name == "models":
                continue
            raw = env.get(ENV_PREFIX + field.name.upper())
            if field.name in _OWN_NAMES:  # REDIS_URL, SENTRY_DSN win over AGENTFLEET_...
                raw = env.get(_OWN_NAMES[field.name], raw)
            if raw is not None:
                values[field.name] = _parse(field.name, field.type, raw)
        models_file = env.get(ENV_PREFIX + "MODELS_FILE")
        if models_file:
            values["models"] = load_models_file(Path(models_file))
        settings = cls(**values)
        if settings.default_model not in settings.models:
            raise FatalConfigError(
                f"{ENV_PREFIX}DEFAULT_MODEL={settings.default_model!r} is not among the models "
                f"{sorted(settings.models)}"
            )
        return settings


def load_models_file(path: Path) -> dict[str, ModelSpec]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FatalConfigError(f"models file {path}: {exc}") from exc
    models: dict[str, ModelSpec] = {}
    for name, table in data.get("models", {}).items():
        if not valid_model_name(name):
            raise FatalConfigError(f"models file {path}: bad model name {name!r}")
        try:
            models[name] = msgspec.convert({**table, "name": name}, ModelSpec)
        except msgspec.ValidationError as exc:
            raise FatalConfigError(f"models file {path}: [models.{name}]: {exc}") from exc
        except InvalidSettingError as exc:
            raise InvalidSettingError(f"{exc.variable} in {path}", exc.value,
                                      exc.allowed) from None
    if not models:
        raise FatalConfigError(f"models file {path}: no [models.NAME] table")
    return models


def parse_bool(name: str, raw: str) -> bool:
    """The one boolean parser: 1/true/yes/on and 0/false/no/off, any case."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise InvalidSettingError(variable(name), raw, "a boolean: 1, true, yes, on, 0, false, no, off")


def _parse(name: str, type_: object, raw: str) -> object:
    if typing.get_origin(type_) is Annotated:
        type_ = typing.get_args(type_)[0]
    if type_ is bool:
        return parse_bool(name, raw)
    if type_ in (int, float):
        try:
            return type_(raw)  # type: ignore[operator]
        except ValueError:
            raise InvalidSettingError(variable(name), raw, "a whole number" if type_ is int
                                      else "a number") from None
    return raw
