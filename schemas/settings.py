"""All settings in one typed object, read from the environment in one place.

Every variable starts with `AGENTFLEET_`, except `REDIS_URL` (the name every Redis tool
knows).  Per-model engine settings come from an optional TOML file (`AGENTFLEET_MODELS_FILE`):

    [models.smollm2-135m]
    max_model_len = 2048
    max_num_seqs = 64

The README's configuration table lists every field below; keep the two in step.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec

from agentfleet.schemas.errors import FatalConfigError
from agentfleet.schemas.keys import valid_model_name

ENV_PREFIX = "AGENTFLEET_"
DEFAULT_MODEL = "smollm2-135m"


class ModelSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One model the fleet serves: where its weights are and how its engine is set up."""

    name: str
    path: str = ""  # a local model directory; "" for the default model's prepared cache
    version: str = ""  # written into every result; "" derives it from the model directory
    max_model_len: int = 2048
    # Bulk-tuned on an H100 (docs/benchmarks.md): 512 sequences, 8192 tokens a step.  Keep
    # KV blocks x block size >= max_num_seqs x (prompt + max_tokens), or vLLM preempts.
    max_num_seqs: int = 512
    max_num_batched_tokens: int | None = 8192
    gpu_memory_utilization: float = 0.45
    kv_cache_space_gib: int = 4  # CPU engine only (VLLM_CPU_KVCACHE_SPACE)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    dtype: str = "auto"  # bfloat16, or float32 on CPUs without native bfloat16
    load_format: str = "auto"  # "dummy" for throughput runs with random weights
    max_prompt_chars: int = 0  # 0: 8 characters per token of max_model_len
    seed: int = 0
    scheduling_policy: str = "priority"  # "priority": interactive before bulk inside vLLM

    @property
    def prompt_chars_limit(self) -> int:
        return self.max_prompt_chars or self.max_model_len * 8


class Settings(msgspec.Struct, kw_only=True):
    redis_url: str = ""  # "" starts the embedded server
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
    engine: str = "vllm"  # "vllm", or "fake" (the test double, for queue-layer runs)
    read_count: int = 512  # at most this many tasks per XREADGROUP
    block_ms: int = 100  # how long an idle read waits for the first task
    window_ms: float = 0.0  # after the first task, wait this long to gather more
    max_inflight: int = 1024  # tasks read but not yet committed, per model (2 x max_num_seqs)
    # Share of the engine's slots (max_num_seqs) bulk-job tasks may hold: the rest is kept
    # for interactive tasks, which then start within an engine step or two.
    bulk_max_share: float = 0.875
    fairness: bool = True  # tenants share engine slots by weight (VTC); False: first come
    # delivery guarantees
    claim_idle_ms: int = 30_000  # a pending task idle this long on its consumer is reclaimed
    max_attempts: int = 3  # engine attempts of a task failing with transient errors
    retry_base_s: float = 0.5  # first retry delay; doubles per attempt, with jitter
    retry_max_s: float = 30.0
    max_deliveries: int = 3  # deliveries before a task that keeps killing workers is dead
    dead_maxlen: int = 100_000  # cap of a model's dead-letter stream
    trim_interval_s: float = 10.0  # how often a worker trims acknowledged entries
    cancel_ttl_s: int = 86_400  # how long a cancellation mark is kept
    server_wait_s: float = 60.0  # a starting worker waits this long for the server, then exits 3
    crash_at: str = ""  # fault injection for the fault suite: before_commit | after_commit
    # retention
    result_ttl_s: int = 86_400
    trace_ttl_s: int = 86_400
    reply_maxlen: int = 1_000_000
    trace_enabled: bool = True
    otel_enabled: bool = False  # OpenTelemetry spans per task (workers/otel.py)
    # limits checked before anything is queued
    max_fanout: int = 8  # follow-ups one task may declare
    max_chain_depth: int = 8  # follow-up nesting
    max_messages: int = 256
    max_metadata_items: int = 64
    # observability (docs/observability.md)
    metrics_port: int = 9464  # `agentfleet worker` serves /metrics here; 0: metrics off
    log_format: str = "auto"  # auto (text on a terminal, else JSON lines), json or text
    sentry_dsn: str = ""  # SENTRY_DSN; "" sends nothing
    sentry_include_text: bool = False  # prompts and outputs go to Sentry only when true
    kpi_ttl_s: int = 8 * 86_400  # per-minute aggregates for `agentfleet report`; 0: not kept
    # replication (docs/operations.md): WAIT for this many replicas after each enqueue, commit
    # and follow-up move, so that a failover cannot lose what was confirmed; 0: no WAIT
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000  # how long one WAIT may take before NotReplicatedError

    @property
    def home_path(self) -> Path:
        return Path(self.home or Path.home() / ".cache" / "agentfleet")

    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    def model(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in msgspec.structs.fields(cls):
            if field.name == "models":
                continue
            raw = env.get(ENV_PREFIX + field.name.upper())
            if field.name == "redis_url":
                raw = env.get("REDIS_URL", raw)
            elif field.name == "sentry_dsn":  # the name every Sentry SDK knows
                raw = env.get("SENTRY_DSN", raw)
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
            raise FatalConfigError(f"models file {path}: model {name}: {exc}") from exc
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
    raise FatalConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean")


def _parse(name: str, type_: object, raw: str) -> object:
    if type_ is bool:
        return parse_bool(name, raw)
    if type_ in (int, float):
        try:
            return type_(raw)  # type: ignore[operator]
        except ValueError as exc:
            raise FatalConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number") from exc
    return raw
