"""Bounds on a task, checked by the producer before queueing and again by the worker.

Each failure raises a `ValidationError` naming the field (dotted path) and the limit.
Agent steps (docs/agent-steps.md) are checked here too: response formats that do not compile
(JSON schemas by the jsonschema package, regexes by Python's `re`, grammars by xgrammar where
it is installed), tools without names, conditions and templates naming nothing in the
parent's output, fan-outs and joins beyond their bounds.
"""

from __future__ import annotations

import re
import msgspec

from agentfleet.schemas import steps
from agentfleet.schemas.errors import PromptTooLongError, UnknownModelError, ValidationError
from agentfleet.schemas.keys import DEFAULT_TENANT, valid_tenant_name
from agentfleet.schemas.tenants import check_name
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import (
    SCHEMA_VERSION,
    FollowUp,
    Message,
    ResponseFormat,
    Sampling,
    Task,
    Tool,
    ToolChoice,
)

MAX_ID_CHARS = 200
MAX_STOP_SEQUENCES = 16
ROLES = frozenset(("system", "user", "assistant", "tool"))
FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "choice", "grammar")
MAX_FORMAT_BYTES = 65_536  # a JSON schema (encoded), regex or grammar
MAX_CHOICES = 256
MAX_TOOLS = 128  # OpenAI's limit
TOOL_CHOICES = ("none", "auto", "required")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")  # OpenAI's rule for function names
# A join's input holds each child's output (at most its max_tokens) and about this many
# tokens of its own (id, status, JSON punctuation): all of it must fit the join's context.
JOIN_TOKENS_PER_CHILD = 32


def validate_task(task: Task, settings: Settings, *, sampling_checked: bool = False,
                  internal: bool = False, steps_checked: bool = False) -> ModelSpec:
    """Check every bound of `task`; return the spec of its model.

    `sampling_checked`: the caller has already checked a Sampling equal to this task's.
    `steps_checked`: ... and the same follow-ups, join, format and tools (`_shape`).
    `internal`: a task as the worker reads it, where the fields only workers set
    (`joins_into`, `join_of`) may be set; a producer may not set them.
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
    if (task.joins_into is not None or task.join_of is not None) and not internal:
        raise ValidationError("joins_into" if task.joins_into is not None else "join_of",
                              "is set by workers only")
    if steps_checked:
        return spec
    step = None
    if task.response_format is not None or task.tools or task.tool_choice is not None \
            or task.retry_max_tokens:
        step = _Step(task.response_format, task.tools, task.tool_choice)
        _check_step(step, task.retry_max_tokens, task.sampling, "", spec)
    if task.followups or task.join is not None:
        _check_followups(task.followups, "followups", task.depth + 1, spec, settings,
                         step or _Step(task.response_format, task.tools, task.tool_choice),
                         task.sampling, task.join)
    return spec


def _shape(task: Task) -> tuple | None:
    """What the agent-step checks of a task depend on (None: it has none of them)."""
    if not (task.followups or task.join is not None or task.response_format is not None
            or task.tools):
        return None
    return (task.model, task.depth, task.sampling, task.response_format, task.tools,
            task.tool_choice, task.retry_max_tokens, task.followups, task.join)


class TaskChecker:
    """`validate_task` for a run of tasks: a sampling equal to the last one that passed is not
    checked again (one Struct comparison in C; the tasks of a stream or of one `submit_many`
    mostly share theirs).  Only for tasks whose sampling nobody mutates after the check.
    Likewise the agent steps (follow-ups, join, format, tools: one tuple comparison), which
    cost ten times the rest to check and which the tasks of a run mostly share too.
    `internal`: the worker's checker (see `validate_task`)."""

    def __init__(self, settings: Settings, *, internal: bool = False):
        self.settings = settings
        self.internal = internal
        self._sampling_ok: Sampling | None = None
        self._steps_ok: tuple | None = None

    def __call__(self, task: Task) -> ModelSpec:
        same = task.sampling == self._sampling_ok
        shape = _shape(task)
        spec = validate_task(task, self.settings, sampling_checked=same, internal=self.internal,
                             steps_checked=shape is not None and shape == self._steps_ok)
        if shape is not None:
            self._steps_ok = shape
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
                     settings: Settings, step: _Step | None = None,
                     sampling: Sampling | None = None, join: FollowUp | None = None) -> None:
    """The follow-ups (and join) of a step; `step` is that step's output format and tools,
    `sampling` its sampling (follow-ups without one inherit it)."""
    if not followups:
        if join is not None:
            raise ValidationError(prefix[:-len("followups")] + "join",
                                  "a join waits for follow-ups, and there are none")
        return
    step = step or _NO_STEP
    sampling = sampling or Sampling()
    if len(followups) > settings.max_fanout:
        raise ValidationError(prefix, f"{len(followups)} follow-ups, more than max_fanout "
                              f"{settings.max_fanout}", limit=settings.max_fanout,
                              value=len(followups))
    if depth > settings.max_chain_depth:
        raise ValidationError(prefix, f"chain depth {depth} is more than max_chain_depth "
                              f"{settings.max_chain_depth}", limit=settings.max_chain_depth,
                              value=depth)
    children = 0
    join_tokens = 0
    for i, f in enumerate(followups):
        at = f"{prefix}[{i}]."
        spec = _check_one(f, at, depth, parent, settings, step, sampling, in_join=False)
        count = _children(f, at, step, settings)
        children += count
        join_tokens += count * ((f.sampling or sampling).max_tokens + JOIN_TOKENS_PER_CHILD)
    if children > settings.max_children:
        raise ValidationError(prefix, f"{children} children, more than max_children "
                              f"{settings.max_children}", limit=settings.max_children,
                              value=children)
    if join is not None:
        join_prefix = prefix[:-len("followups")] + "join"
        spec = _check_one(join, join_prefix + ".", depth, parent, settings, step, sampling,
                          in_join=True)
        need = join_tokens + (join.sampling or sampling).max_tokens
        if need > spec.max_model_len:
            raise ValidationError(join_prefix, f"its input may hold {children} children's "
                                  f"outputs ({join_tokens} tokens) and it answers in up to "
                                  f"{need - join_tokens}: more than max_model_len "
                                  f"{spec.max_model_len} of {spec.name}",
                                  limit=spec.max_model_len, value=need)


def _check_one(f: FollowUp, at: str, depth: int, parent: ModelSpec, settings: Settings,
               step: _Step, sampling: Sampling, *, in_join: bool) -> ModelSpec:
    """One follow-up or join: its own bounds, and what it reads of its parent's output."""
    spec = _model(f.model, at + "model", settings) if f.model else parent
    if f.prompt is None and f.messages is None:
        raise ValidationError(at + "prompt", "a follow-up needs a prompt or messages")
    _check_input(f.prompt, f.messages, at, spec, settings, required=True)
    if f.sampling is not None:
        _check_sampling(f.sampling, at + "sampling.", spec)
    own = _NO_STEP
    if f.response_format is not None or f.tools or f.tool_choice is not None \
            or f.retry_max_tokens:
        own = _Step(f.response_format, f.tools, f.tool_choice)
        _check_step(own, f.retry_max_tokens, f.sampling or sampling, at, spec)
    if f.when is not None:
        if in_join:
            raise ValidationError(at + "when", "a join runs once its children ended: no "
                                  "condition")
        _check_condition(f, at + "when.", step)
    if in_join and (f.for_each or f.items):
        raise ValidationError(at + ("for_each" if f.for_each else "items"),
                              "a join is one step: no fan-out")
    _check_templates(f, at, step, fan_out=bool(f.for_each or f.items), in_join=in_join)
    if f.followups or f.join is not None:
        _check_followups(f.followups, at + "followups", depth + 1, spec, settings, own,
                         f.sampling or sampling, f.join)
    return spec


class _Step(msgspec.Struct, frozen=True):
    """What a step's follow-ups may read of its output: its format and its tools."""

    response_format: ResponseFormat | None
    tools: list[Tool]
    tool_choice: str | ToolChoice | None

    @property
    def schema(self) -> dict | None:
        f = self.response_format
        return f.json_schema.schema if f is not None and f.type == "json_schema" \
            and f.json_schema is not None else None

    @property
    def structured(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"


_NO_STEP = _Step(None, [], None)  # a free-text step without tools


def _check_step(step: _Step, retry_max_tokens: int, sampling: Sampling, prefix: str,
                spec: ModelSpec) -> None:
    """A step's response format, tools and budget retry."""
    if step.response_format is not None:
        _check_format(step.response_format, prefix + "response_format.")
    _check_tools(step.tools, step.tool_choice, prefix)
    if step.tools and step.structured and steps.choice_name(step.tool_choice,
                                                           step.tools) != "none":
        raise ValidationError(prefix + "response_format", "a structured response format "
                              "and tools that may be called cannot both shape one output; "
                              "set tool_choice 'none' or drop one")
    if retry_max_tokens:
        if not step.structured and not step.tools:
            raise ValidationError(prefix + "retry_max_tokens", "only a structured output "
                                  "(response_format or tools) can fail its format")
        if not sampling.max_tokens < retry_max_tokens <= spec.max_model_len:
            raise ValidationError(prefix + "retry_max_tokens", f"{retry_max_tokens} is "
                                  f"outside {sampling.max_tokens + 1}..{spec.max_model_len} "
                                  f"(above max_tokens, at most max_model_len of {spec.name})",
                                  limit=spec.max_model_len, value=retry_max_tokens)


_checked_formats: dict[bytes, None] = {}  # formats that compiled, by their encoding (LRU-ish)


def _check_format(fmt: ResponseFormat, at: str) -> None:
    if fmt.type not in FORMAT_TYPES:
        raise ValidationError(at + "type", f"{fmt.type!r} is not one of {list(FORMAT_TYPES)}",
                              limit=list(FORMAT_TYPES), value=fmt.type)
    if fmt.type in ("text", "json_object"):
        return
    raw = msgspec.msgpack.encode(fmt)
    if len(raw) > MAX_FORMAT_BYTES:
        raise ValidationError(at + fmt.type, f"{len(raw)} bytes, more than "
                              f"{MAX_FORMAT_BYTES}", limit=MAX_FORMAT_BYTES, value=len(raw))
    if raw in _checked_formats:
        return
    if fmt.type == "json_schema":
        if fmt.json_schema is None or not fmt.json_schema.schema:
            raise ValidationError(at + "json_schema.schema", "a json_schema format needs a "
                                  "schema")
        check_json_schema(fmt.json_schema.schema, at + "json_schema.schema")
    elif fmt.type == "regex":
        if not fmt.regex:
            raise ValidationError(at + "regex", "is empty")
        try:
            re.compile(fmt.regex)
        except re.error as exc:
            raise ValidationError(at + "regex", f"does not parse: {exc}") from None
    elif fmt.type == "choice":
        if not fmt.choice or len(fmt.choice) > MAX_CHOICES:
            raise ValidationError(at + "choice", f"{len(fmt.choice)} choices, outside "
                                  f"1..{MAX_CHOICES}", limit=MAX_CHOICES, value=len(fmt.choice))
        if not all(fmt.choice) or len(set(fmt.choice)) != len(fmt.choice):
            raise ValidationError(at + "choice", "choices must be distinct, non-empty strings")
    else:
        _check_grammar(fmt.grammar, at + "grammar")
    if len(_checked_formats) > 256:
        _checked_formats.clear()
    _checked_formats[raw] = None


def check_json_schema(schema: object, at: str) -> None:
    """A JSON schema that compiles, or ValidationError: against its draft's meta-schema with
    the jsonschema package (the `steps` extra; workers have it), else a structural check of
    the keywords that shape an output (types, properties, items, required, enum)."""
    if not isinstance(schema, dict):
        raise ValidationError(at, "a JSON schema is an object")
    try:
        import jsonschema
    except ImportError:
        _check_shape(schema, at, "")
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ValidationError(at, f"does not compile: {exc.message}"
                              + (f" (at {where})" if where else "")) from None


_JSON_TYPES = frozenset(("object", "array", "string", "number", "integer", "boolean", "null"))


def _check_shape(schema: object, at: str, where: str) -> None:
    def bad(message: str) -> ValidationError:
        return ValidationError(at, f"does not compile: {message}"
                               + (f" (at {where.lstrip('/')})" if where else ""))

    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise bad(f"{schema!r} is not a schema")
    kinds = schema.get("type", [])
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind not in _JSON_TYPES:
            raise bad(f"type {kind!r} is not one of {sorted(_JSON_TYPES)}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise bad("required is not a list of names")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise bad("enum is not a non-empty list")
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        sub = schema.get(key, {})
        if not isinstance(sub, dict):
            raise bad(f"{key} is not an object")
        for name, value in sub.items():
            _check_shape(value, at, f"{where}/{key}/{name}")
    for key in ("items", "additionalProperties", "not"):
        if key in schema:
            _check_shape(schema[key], at, f"{where}/{key}")
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise bad(f"{key} is not a non-empty list")
            for i, value in enumerate(schema[key]):
                _check_shape(value, at, f"{where}/{key}/{i}")


def _check_grammar(grammar: str, at: str) -> None:
    """Not empty; parsed by xgrammar where it is installed (workers, or `pip install
    xgrammar`): EBNF (GBNF) directly, a Lark grammar after vLLM's own conversion."""
    if not grammar.strip():
        raise ValidationError(at, "is empty")
    try:
        import xgrammar
    except ImportError:
        return  # a client without the engine's packages: the worker checks it
    text = grammar
    if "::=" not in grammar:  # Lark, as vLLM takes it
        try:
            from vllm.v1.structured_output.utils import convert_lark_to_ebnf
        except ImportError:
            return
        try:
            text = convert_lark_to_ebnf(grammar)
        except Exception as exc:  # vLLM raises ValueError or its own errors
            raise ValidationError(at, f"does not parse: {exc}") from None
    try:
        xgrammar.Grammar.from_ebnf(text)
    except Exception as exc:  # xgrammar raises RuntimeError with the parser's message
        raise ValidationError(at, f"does not parse: {str(exc).strip()[:300]}") from None


def _check_tools(tools: list[Tool], tool_choice: str | ToolChoice | None, at: str) -> None:
    if len(tools) > MAX_TOOLS:
        raise ValidationError(at + "tools", f"{len(tools)} tools, more than {MAX_TOOLS}",
                              limit=MAX_TOOLS, value=len(tools))
    names = set()
    for i, tool in enumerate(tools):
        where = f"{at}tools[{i}]."
        if tool.type != "function":
            raise ValidationError(where + "type", f"{tool.type!r}: only 'function' tools exist")
        name = tool.function.name
        if not _TOOL_NAME.match(name):
            raise ValidationError(where + "function.name", f"{name!r}: a tool needs a name of "
                                  "1..64 letters, digits, '_' or '-'", value=name)
        if name in names:
            raise ValidationError(where + "function.name", f"{name!r} is named twice")
        names.add(name)
        if tool.function.parameters is not None:
            check_json_schema(tool.function.parameters, where + "function.parameters")
    if tool_choice is None:
        return
    if isinstance(tool_choice, ToolChoice):
        if tool_choice.function.name not in names:
            raise ValidationError(at + "tool_choice.function.name", f"{tool_choice.function.name!r}"
                                  f" is not among the tools {sorted(names)}")
    elif tool_choice not in TOOL_CHOICES:
        raise ValidationError(at + "tool_choice", f"{tool_choice!r} is not one of "
                              f"{list(TOOL_CHOICES)} or a named function")
    elif tool_choice != "none" and not tools:
        raise ValidationError(at + "tool_choice", f"{tool_choice!r} without tools")


def _check_condition(f: FollowUp, at: str, parent: _Step) -> None:
    cond = f.when
    value_test = cond.equals is not None or bool(cond.one_of)
    if cond.tool:
        if value_test or cond.field:
            raise ValidationError(at + "tool", "a condition tests a tool or a value, not both")
        names = [t.function.name for t in parent.tools]
        if cond.tool not in names:
            raise ValidationError(at + "tool", f"{cond.tool!r} names no tool of the parent "
                                  f"(its tools: {names})", value=cond.tool)
        return
    if not value_test:
        raise ValidationError(at.rstrip("."), "names nothing: give equals, one_of or tool")
    fmt = parent.response_format
    if cond.field:
        _check_path(parent, cond.field, at + "field")
    elif fmt is not None and fmt.type == "choice":
        for value in (cond.one_of or [cond.equals]):
            if value not in fmt.choice:
                raise ValidationError(at + ("one_of" if cond.one_of else "equals"),
                                      f"{value!r} is not one of the parent's choices "
                                      f"{fmt.choice}", value=value)


def _check_path(parent: _Step, path: str, at: str) -> object:
    """A path into the parent's parsed output: it must be able to name something."""
    if not parent.structured or parent.response_format.type in ("regex", "choice", "grammar"):
        raise ValidationError(at, f"{path!r} names nothing: the parent's output is not a JSON "
                              "value (give it a json_schema or json_object response_format)",
                              value=path)
    schema = parent.schema
    if schema is None:
        return steps.UNKNOWN
    found = steps.schema_at(schema, path)
    if found is None:
        raise ValidationError(at, f"{path!r} names nothing in the parent's JSON schema",
                              value=path)
    return found


def _children(f: FollowUp, at: str, parent: _Step, settings: Settings) -> int:
    """How many children a follow-up may make: its items, its list's maxItems, or one."""
    if f.for_each and f.items:
        raise ValidationError(at + "items", "give for_each or items, not both")
    if f.items:
        if len(f.items) > settings.max_children:
            raise ValidationError(at + "items", f"{len(f.items)} items, more than max_children "
                                  f"{settings.max_children}", limit=settings.max_children,
                                  value=len(f.items))
        return len(f.items)
    if not f.for_each:
        return 1
    found = _check_path(parent, f.for_each, at + "for_each")
    limit = settings.max_children
    bound = found.get("maxItems") if isinstance(found, dict) else None
    if not isinstance(found, dict) or found.get("type", "array") != "array":
        raise ValidationError(at + "for_each", f"{f.for_each!r} must name an array of the "
                              "parent's JSON schema", value=f.for_each)
    if not isinstance(bound, int) or not 0 <= bound <= limit:
        raise ValidationError(at + "for_each", f"the array {f.for_each!r} needs maxItems "
                              f"(at most max_children {limit}) in the parent's schema",
                              limit=limit, value=bound)
    return bound


_NAMED = re.compile(r"\{(?:output\.|item|tool|results)")


def _check_templates(f: FollowUp, at: str, parent: _Step, *, fan_out: bool,
                     in_join: bool) -> None:
    texts: list[tuple[str, str]] = []
    if f.prompt is not None:
        texts.append((at + "prompt", f.prompt))
    for i, m in enumerate(f.messages or ()):
        texts.append((f"{at}messages[{i}].content", m.content))
    for where, text in texts:
        if "{" not in text or not _NAMED.search(text):
            continue  # no placeholder but {output}: nothing to check
        for root, path in steps.placeholders(text):
            if root == "item" and not fan_out:
                raise ValidationError(where, "{item} outside a fan-out (for_each or items)")
            if root == "results" and not in_join:
                raise ValidationError(where, "{results} outside a join")
            if root == "tool" and not parent.tools:
                raise ValidationError(where, "{tool...} but the parent has no tools")
            if root == "output" and path:
                _check_path(parent, path, where)
