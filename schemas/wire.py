"""The wire format: what producers, workers and the trace store exchange, as msgspec Structs.

Rules (msgspec's schema-evolution guide): every Struct derives from `Base`; new fields get
defaults and go last; unknown fields are ignored on decode, so an older worker still reads a
payload written by a newer producer of the same major `SCHEMA_VERSION`.  Encoders and decoders
are built once, below, and reused.
"""

from __future__ import annotations

import enum

import msgspec

from agentfleet.schemas.errors import DecodeError, ErrorCode, UnsupportedVersionError

SCHEMA_VERSION = 1


class Base(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Shared options: keyword-only construction, defaults left off the wire, and not tracked
    by the cyclic garbage collector (gc=False): a wire Struct holds strings, numbers and other
    Structs, never a cycle, and a worker creates several per task."""


class Message(Base, kw_only=True):
    """A chat message (OpenAI's names).  An assistant turn may carry the tool calls it made;
    a `tool` message answers one of them by its id."""

    role: str
    content: str
    tool_calls: list[ToolCall] = []
    tool_call_id: str = ""


class FunctionCall(Base, kw_only=True):
    """A tool call's function: its name and its arguments as a JSON text (OpenAI's shape)."""

    name: str
    arguments: str = "{}"


class ToolCall(Base, kw_only=True):
    """One call of a tool, as OpenAI's `tool_calls` items: an id the answer refers to."""

    id: str
    type: str = "function"
    function: FunctionCall


class FunctionDef(Base, kw_only=True):
    """A function a model may call: `parameters` is the JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, object] | None = None
    strict: bool | None = None


class Tool(Base, kw_only=True):
    """An item of OpenAI's `tools`: only functions exist today."""

    type: str = "function"
    function: FunctionDef


class FunctionName(Base, kw_only=True):
    name: str


class ToolChoice(Base, kw_only=True):
    """OpenAI's named tool choice: {"type": "function", "function": {"name": ...}}."""

    type: str = "function"
    function: FunctionName


class JsonSchema(Base, kw_only=True):
    """OpenAI's `response_format.json_schema`: the schema under `schema`."""

    name: str = "output"
    schema: dict[str, object] = {}
    description: str = ""
    strict: bool | None = None


class ResponseFormat(Base, kw_only=True):
    """What the output must be, passed to vLLM's structured outputs.

    OpenAI's types: `text` (free), `json_object` (any JSON object), `json_schema` (an instance
    of `json_schema.schema`).  vLLM's further constraints, under their own types: `regex`,
    `choice` (one of the strings) and `grammar` (an EBNF/GBNF or Lark grammar).  The result's
    `parsed` holds the value (a JSON value, the label, the matched text)."""

    type: str = "text"
    json_schema: JsonSchema | None = None
    regex: str = ""
    choice: list[str] = []
    grammar: str = ""


class Condition(Base, kw_only=True):
    """When a follow-up runs: a test of its parent's parsed output.

    `field` is a dotted path into the parsed value ("category", "order.items.0"; "" is the
    whole value, e.g. a `choice` label); it holds when the value `equals` the given one or is
    `one_of` the list.  `tool`: holds when the parent called that tool.  `negate` inverts.
    """

    field: str = ""
    equals: str | int | float | bool | None = None
    one_of: list[str | int | float | bool | None] = []
    tool: str = ""
    negate: bool = False


class JoinRef(Base, kw_only=True):
    """A fan-out's join: its parent's id and the model whose slot keeps the join's state
    (the parent's, `keys.join_state`); `join_model` is the model the join step runs on."""

    parent: str
    model: str
    join_model: str
    join_version: str = ""  # the version of join_model it runs on (docs/versions.md)


class Sampling(Base, kw_only=True):
    """Sampling parameters; bounds are checked by `schemas.validate`, not here."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_tokens: int = 0
    seed: int | None = None
    stop: list[str] = []
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


class FollowUp(Base, kw_only=True):
    """A step to enqueue when the parent succeeds (docs/agent-steps.md).

    `prompt` or the contents of `messages` may hold `{output}` (the parent's output text),
    `{output.FIELD}` (a field of its parsed output, a dotted path), `{tool.name}`,
    `{tool.arguments.FIELD}` (its first tool call), `{item}` / `{item.FIELD}` (in a fan-out,
    this child's item) and, in a join, `{results}` (the children's results as a JSON array).
    An empty `model` means the parent's model; `sampling` None means the parent's.

    `when`: enqueued only when the condition holds on the parent's parsed output.  `for_each`
    (a path to a list in the parsed output) or `items` (a list given here): one child per
    item.  `continue_conversation`: the child's messages are the parent's, then the parent's
    answer (with its tool calls), then the follow-up's own.  `join`: a step that runs once
    when every follow-up this one enqueues has ended, with their results in its input.
    """

    model: str = ""
    prompt: str | None = None
    messages: list[Message] | None = None
    sampling: Sampling | None = None
    agent_id: str = ""
    metadata: dict[str, str] = {}
    followups: list[FollowUp] = []
    needs_approval: bool = False  # the follow-up waits for an admin's approval (ops/approvals.py)
    # Agent steps: structured outputs, tools, branches, fan-out and fan-in.
    response_format: ResponseFormat | None = None
    tools: list[Tool] = []
    tool_choice: str | ToolChoice | None = None  # None: "auto" with tools, else "none"
    retry_max_tokens: int = 0
    when: Condition | None = None
    for_each: str = ""
    items: list[object] = []
    continue_conversation: bool = False
    join: FollowUp | None = None
    affinity_key: str = ""  # "": the parent's (docs/affinity.md)


class Task(Base, kw_only=True):
    """One unit of agent work, as it sits in a model's stream."""

    v: int = SCHEMA_VERSION
    id: str = ""
    correlation_id: str = ""
    parent_id: str = ""
    tenant: str = "default"
    agent_id: str = ""
    model: str
    prompt: str | None = None
    messages: list[Message] | None = None
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    priority: int = 0
    deadline: float | None = None  # epoch seconds
    idempotency_key: str | None = None
    metadata: dict[str, str] = {}
    followups: list[FollowUp] = []
    depth: int = 0  # 0 for a task a producer submitted, parent's + 1 for a follow-up
    reply_to: str = ""  # producer id whose reply stream gets the result; "" for none
    enqueued_at: float = 0.0  # epoch seconds
    attempt: int = 0  # engine attempts already made (retries of transient errors)
    history: list[str] = []  # one line per failed attempt: "<code>: <message>"
    batch_id: str = ""  # set for tasks of a bulk job: they run in the model's bulk lane
    traceparent: str = ""  # W3C trace context of the submitting span (OpenTelemetry)
    stream: bool = False  # the engine publishes partial output (keys.partial_stream)
    needs_approval: bool = False  # held in the model's approval store until an admin decides
    # Agent steps (docs/agent-steps.md).  The output must match `response_format`
    # (vLLM's structured outputs); `tools` and `tool_choice` as OpenAI names them.  An output
    # that fails its format because max_tokens cut it runs again with twice the budget, up to
    # `retry_max_tokens` (0: never).  `join` runs once every follow-up of this task has ended.
    response_format: ResponseFormat | None = None
    tools: list[Tool] = []
    tool_choice: str | ToolChoice | None = None  # None: "auto" with tools, else "none"
    retry_max_tokens: int = 0
    join: FollowUp | None = None
    joins_into: JoinRef | None = None  # set by the worker on a fan-out's child
    join_of: JoinRef | None = None  # set by the worker on a join step: its input's state
    # Model versions (docs/versions.md): the version of `model` it runs on: pinned by its
    # submitter, or chosen by the producer's routing; a follow-up keeps its parent's.
    version: str = ""
    sla: str = ""  # "", or an SLA class: "interactive", "standard", "batch"
    template: str = ""  # the prompt template it was rendered from, "<name>@<version>"
    variables: dict[str, str] = {}  # a template's variables: rendered at submit, then dropped
    # The result cache (docs/result-cache.md): set by the producer, never by its caller, on a
    # deterministic task without effects of a tenant that opted in: the digest of its input
    # (schemas/resultcache.py) and how long its result answers identical tasks.
    cache_digest: str = ""
    cache_ttl_s: int = 0
    # Which tasks should run where their KV blocks are (docs/affinity.md): a session id, or
    # "" for the producer to derive one from the leading prompt (its system prompt or
    # template); a follow-up inherits its parent's.  Picks the task's affinity partition.
    affinity_key: str = ""


class Status(str, enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    DEAD_LETTERED = "dead_lettered"


class Timings(Base, kw_only=True):
    """Epoch seconds at each step; 0.0 where a step did not happen."""

    enqueued: float = 0.0
    read: float = 0.0
    engine_start: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    written: float = 0.0


class Result(Base, kw_only=True):
    v: int = SCHEMA_VERSION
    task_id: str
    correlation_id: str = ""
    parent_id: str = ""
    model: str = ""
    agent_id: str = ""
    tenant: str = ""
    status: Status
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    timings: Timings = msgspec.field(default_factory=Timings)
    worker_id: str = ""
    # (Fields 15 and 16, `batch_id` and `batch_size`, named the read window until schema
    # 1.1; "batch" now means a bulk job only.  Older readers decode them as empty.)
    model_version: str = ""
    error_code: ErrorCode | None = None
    error_message: str = ""
    followup_ids: list[str] = []
    attempts: int = 1
    window_id: str = ""  # the read window it came in: "<worker>/<model>/<seq>"
    window_size: int = 0  # tasks in that window
    # Agent steps: the output parsed by its response format (a JSON value, a
    # label, the matched text; None for free text), the tool calls it made, the join step
    # its follow-ups feed ("" for none), and the follow-ups whose condition did not hold
    # ("<n>: <condition>").
    parsed: object = None
    tool_calls: list[ToolCall] = []
    join_id: str = ""
    skipped: list[str] = []
    template: str = ""  # the prompt template its prompt came from, "<name>@<version>"
    # The result cache (docs/result-cache.md): "" ran in an engine; "hit" answered at submit
    # from an identical task's cached result; "joined" answered by the identical task that was
    # in flight.  `cached_from`: that task's id (its result's other fields are that task's).
    cache: str = ""
    cached_from: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCEEDED


class Enqueued(Base, kw_only=True, tag="enq"):
    """Trace event: a task entered a stream (by a producer, or as a follow-up by a worker)."""

    task_id: str
    parent_id: str = ""
    model: str = ""
    agent_id: str = ""
    at: float = 0.0
    via: str = ""  # how it came: "when <condition>", "item 3 of 20", "join of 20"


class Finished(Base, kw_only=True, tag="fin"):
    """Trace event: a task reached a terminal state; the result without its text."""

    result: Result


class Retried(Base, kw_only=True, tag="retry"):
    """Trace event: an attempt failed with a transient error; the task runs again at `due`."""

    task_id: str
    attempt: int
    error: str
    at: float
    due: float


TraceEvent = Enqueued | Finished | Retried


class DeadLetter(Base, kw_only=True):
    """An entry of a model's dead-letter stream: the task as it was queued, and why it died."""

    task_id: str
    model: str
    reason: str
    error_code: ErrorCode
    payload: bytes  # the original stream payload (a Task, or whatever could not be decoded)
    attempts: int = 0
    deliveries: int = 0
    history: list[str] = []
    worker_id: str = ""
    at: float = 0.0

class Role(str, enum.Enum):
    """What an API key may do, each role including the one before it."""

    READ = "read"  # read its tenant's tasks, results, traces, batches
    SUBMIT = "submit"  # and submit and cancel its tenant's tasks and batches
    ADMIN = "admin"  # and everything of every tenant: approvals, dead-letter replay, keys

    def allows(self, needed: Role) -> bool:
        return _ROLE_RANK[self] >= _ROLE_RANK[needed]


_ROLE_RANK = {Role.READ: 0, Role.SUBMIT: 1, Role.ADMIN: 2}


class ApiKeyRecord(Base, kw_only=True):
    """An API key as stored: never the secret, only its SHA-256 digest."""

    key_id: str
    digest: bytes
    tenant: str
    role: Role
    name: str = ""
    created_at: float = 0.0
    created_by: str = ""
    revoked_at: float = 0.0  # 0: live


class TenantConfig(Base, kw_only=True):
    """A tenant's entry in the registry (producer/tenants.py; docs/tenants.md).  Limits apply
    per model; 0 means no limit.  Bounds are checked by `schemas.tenants.check_config`."""

    weight: float = 1.0  # its fair share of a model's engine, against the others' weights
    max_queued: int = 0  # tasks queued and not ended, per model
    tokens_per_minute: int = 0  # prompt + max_tokens enqueued per minute, per model
    max_running: int = 0  # tasks in the engines at once, per model (split across workers)
    cache_group: str = ""  # "": a prefix cache of its own; tenants naming one group share it
    result_ttl_s: int = 0  # how long its results live; 0: the fleet's result_ttl_s
    trace_ttl_s: int = 0  # how long its traces live; 0: the fleet's trace_ttl_s
    redact: bool = False  # keep its prompts and outputs out of traces, logs and Sentry
    note: str = ""
    # How long a deterministic task's result answers the tenant's identical tasks, and
    # identical tasks join one in flight (docs/result-cache.md); 0: off.
    result_cache_ttl_s: int = 0


class AuditEntry(Base, kw_only=True):
    """One change to a registry (tenants, models, routing, canaries): who, when, what before
    and after, and why.  Appended to `keys.audit_log()`, never edited."""

    kind: str  # "tenant", "model", "route", "canary", ...
    subject: str  # the tenant's or model's name
    action: str  # "set", "remove", "promote", ...
    who: str = ""
    why: str = ""
    at: float = 0.0
    before: object = None  # the entry before (msgspec builtins), None when there was none
    after: object = None


class VersionState(str, enum.Enum):
    """Where a model version stands (docs/versions.md)."""

    ACTIVE = "active"  # serves its weight's share, and tasks pinned to it
    CANARY = "canary"  # serves its weight under a guard, which promotes or rolls it back
    RETIRED = "retired"  # serves nothing: workers drain it, its queued tasks go to the stable
    ROLLED_BACK = "rolled_back"  # a canary the guard (or an operator) took back: as retired


class ModelVersion(Base, kw_only=True):
    """One version of a logical model in the registry (producer/models.py).  Checked at
    registration: the directory exists, vLLM accepts the engine arguments."""

    version: str
    path: str = ""  # the model directory (weights, config, tokenizer)
    # Any vLLM engine argument (AsyncEngineArgs), plus agentfleet's own ModelSpec fields
    # (max_model_len, max_num_seqs, kv_cache_space_gib, ...): they override the model's
    # settings for this version only.
    engine_args: dict[str, object] = {}
    templates: dict[str, int] = {}  # prompt template name -> the version this one renders
    weight: float = 0.0  # share of the logical model's routed traffic, against the others'
    state: VersionState = VersionState.ACTIVE
    # Engines of one sleep group in a worker share a GPU: one awake at a time, the others
    # asleep (vLLM sleep mode), woken when work for them queues.  "" for an engine of its own.
    sleep_group: str = ""
    created_at: float = 0.0
    note: str = ""


class CanaryPlan(Base, kw_only=True):
    """A canary in progress or ended: its guard, its steps, where it stands."""

    version: str
    guard: str  # "error_ratio<1%,p99<2x": every condition must hold (schemas/registry.py)
    steps: list[float]  # the canary's share of traffic at each step, percent, last 100
    step: int = 0
    step_s: float = 300.0  # a step lasts at least this long ...
    min_tasks: int = 50  # ... and until the canary has finished this many attempts in it
    started_at: float = 0.0
    step_started_at: float = 0.0
    status: str = "running"  # running, promoted, rolled_back
    reason: str = ""  # why it ended
    shadow: float = 0.0  # share of the stable version's tasks also run on the canary
    stable_weights: dict[str, float] = {}  # the weights before it started: restored on rollback


class ModelEntry(Base, kw_only=True):
    """A logical model in the registry: what tasks name, and the versions that serve it."""

    name: str
    stable: str  # the version rollbacks and retries of canary tasks go to
    versions: dict[str, ModelVersion] = {}
    # Where tasks go when their SLA class's budget would pass on the version routed to:
    # "<model>", "<model>@<version>" or "@<version>" (of this model); "": refused instead.
    fallback: str = ""
    sla_budget_s: dict[str, float] = {}  # per class, overriding the fleet's settings
    canary: CanaryPlan | None = None


class PromptTemplate(Base, kw_only=True):
    """One version of a prompt template: a prompt or messages with `{variable}` places,
    rendered once at submit by the producer (producer/templates.py)."""

    name: str
    version: int
    prompt: str | None = None
    messages: list[Message] | None = None
    variables: list[str] = []
    created_at: float = 0.0
    note: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


# Built once: encoders and decoders are reused on the hot path (msgspec performance tips).
_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
_task_decoder = msgspec.msgpack.Decoder(Task)
_result_decoder = msgspec.msgpack.Decoder(Result)
_event_decoder = msgspec.msgpack.Decoder(TraceEvent)


class _Versioned(Base, kw_only=True):
    v: int = SCHEMA_VERSION


_peek_version = msgspec.msgpack.Decoder(_Versioned)


def decode_task(data: bytes) -> Task:
    """Decode a stream payload into a Task, raising a typed DecodeError for anything else."""
    try:
        return _task_decoder.decode(data)
    except msgspec.DecodeError as exc:
        # A newer major version may have changed shapes: say so rather than "bad payload".
        try:
            version = _peek_version.decode(data).v
        except msgspec.DecodeError:
            version = SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise UnsupportedVersionError(
                f"schema version {version} is newer than {SCHEMA_VERSION}"
            ) from exc
        raise DecodeError(str(exc)) from exc


def check_version(task: Task) -> None:
    if task.v > SCHEMA_VERSION:
        raise UnsupportedVersionError(f"schema version {task.v} is newer than {SCHEMA_VERSION}")


decode_result = _result_decoder.decode
decode_results = msgspec.msgpack.Decoder(list[Result]).decode  # a reply-stream entry
decode_event = _event_decoder.decode
decode_dead_letter = msgspec.msgpack.Decoder(DeadLetter).decode
decode_api_key = msgspec.msgpack.Decoder(ApiKeyRecord).decode
decode_tenant = msgspec.msgpack.Decoder(TenantConfig).decode
decode_audit = msgspec.msgpack.Decoder(AuditEntry).decode
decode_model_entry = msgspec.msgpack.Decoder(ModelEntry).decode
decode_template = msgspec.msgpack.Decoder(PromptTemplate).decode


def result_to_dict(result: Result) -> dict:
    return msgspec.to_builtins(result)
