"""Structured outputs on the worker's side: what the engine must enforce for a task, and
reading the output back into the result's `parsed` value and `tool_calls`.

Pure (no I/O): used by both engines and by workers/outcomes.py.  The engine enforces the
format (vLLM's structured outputs); this module checks the result again, because an output
can still miss it: cut by max_tokens, or a schema feature a backend does not enforce.  Tool
calls made through structured outputs (no tool parser for the model, or tool_choice
"required" or named) have the shapes of `schemas.steps.tool_schema`, and get ids derived
from the task's id, so that a task that runs twice makes the same calls.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

import msgspec

from agentfleet.schemas import steps
from agentfleet.schemas.wire import FunctionCall, Task, ToolCall

_json_decode = msgspec.json.decode
_json = msgspec.json.Encoder()


class Constraint(msgspec.Struct, frozen=True):
    """What the engine enforces: one of a JSON schema, any JSON object, a regex, a choice, a
    grammar (vLLM's StructuredOutputsParams fields), or nothing."""

    json: dict | None = None
    json_object: bool = False
    regex: str = ""
    choice: tuple[str, ...] = ()
    grammar: str = ""

    @property
    def free(self) -> bool:
        return not (self.json is not None or self.json_object or self.regex or self.choice
                    or self.grammar)


FREE = Constraint()


def constraint(task: Task, *, tool_parser: bool = False) -> Constraint:
    """The constraint of a task: its tools' schema when a call is forced (or "auto" on a model
    without a tool parser), else its response format."""
    if task.tools:
        kind = steps.choice_name(task.tool_choice, task.tools)
        if kind == "auto" and tool_parser:
            return FREE  # the model writes its own call syntax; the parser reads it
        schema = steps.tool_schema(task.tools, task.tool_choice)
        if schema is not None:
            return Constraint(json=schema)
    fmt = task.response_format
    if fmt is None or fmt.type == "text":
        return FREE
    if fmt.type == "json_schema":
        return Constraint(json=fmt.json_schema.schema if fmt.json_schema else {})
    if fmt.type == "json_object":
        return Constraint(json_object=True)
    if fmt.type == "regex":
        return Constraint(regex=fmt.regex)
    if fmt.type == "choice":
        return Constraint(choice=tuple(fmt.choice))
    return Constraint(grammar=fmt.grammar)


class Parsed(msgspec.Struct, kw_only=True):
    """An output read back: `error` is "" when it matches its format."""

    text: str
    parsed: object = None
    tool_calls: list[ToolCall] = []
    error: str = ""


def parse(task: Task, text: str, finish_reason: str,
          engine_calls: Sequence[ToolCall] | None = None) -> Parsed:
    """Read an output by its task's format and tools.  `engine_calls`: what the model's tool
    parser found (vLLM), taken as they are; None where no parser ran."""
    if engine_calls is not None:
        return Parsed(text=text, tool_calls=list(engine_calls))
    kind = steps.choice_name(task.tool_choice, task.tools) if task.tools else "none"
    cut = " (cut by max_tokens)" if finish_reason == "length" else ""
    if kind != "none":
        return _parse_calls(task, text, kind, cut)
    fmt = task.response_format
    if fmt is None or fmt.type == "text":
        return Parsed(text=text)
    if fmt.type in ("json_object", "json_schema"):
        try:
            value = _json_decode(text.strip() or "null")
        except msgspec.DecodeError as exc:
            return Parsed(text=text, error=f"output is not JSON{cut}: {exc}")
        if fmt.type == "json_object" and not isinstance(value, dict):
            return Parsed(text=text, error=f"output is not a JSON object{cut}")
        if fmt.type == "json_schema":
            problem = schema_error(fmt.json_schema.schema if fmt.json_schema else {}, value)
            if problem:
                return Parsed(text=text, error=f"output fails its schema{cut}: {problem}")
        return Parsed(text=text, parsed=value)
    if fmt.type == "choice":
        if text not in fmt.choice:
            label = text.strip()
            if label not in fmt.choice:
                return Parsed(text=text, error=f"output {text[:80]!r} is not one of the "
                              f"choices{cut}")
            return Parsed(text=text, parsed=label)
        return Parsed(text=text, parsed=text)
    if fmt.type == "regex":
        if _fullmatch(fmt.regex, text) is False:
            return Parsed(text=text, error=f"output does not match its regex{cut}")
        return Parsed(text=text, parsed=text)
    # A grammar is the engine's to enforce; only a cut output is known to miss it.
    if cut:
        return Parsed(text=text, error=f"output is incomplete for its grammar{cut}")
    return Parsed(text=text, parsed=text)


def _parse_calls(task: Task, text: str, kind: str, cut: str) -> Parsed:
    try:
        value = _json_decode(text.strip() or "null")
    except msgspec.DecodeError as exc:
        return Parsed(text=text, error=f"tool call output is not JSON{cut}: {exc}")
    if kind == "named":
        name = task.tool_choice.function.name  # type: ignore[union-attr]
        if not isinstance(value, dict):
            return Parsed(text=text, error=f"arguments of {name} are not a JSON object{cut}")
        problem = _arguments_error(task, name, value)
        if problem:
            return Parsed(text=text, error=problem)
        return Parsed(text="", tool_calls=[_call(task, 0, name, value)])
    if kind == "auto" and isinstance(value, dict) and isinstance(value.get("content"), str):
        return Parsed(text=value["content"])  # a plain answer, no call
    if not isinstance(value, list) or not value:
        return Parsed(text=text, error=f"tool calls are not a non-empty JSON array{cut}")
    calls = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return Parsed(text=text, error=f"tool call {i} has no name{cut}")
        args = item.get("parameters", {})
        problem = _arguments_error(task, item["name"], args)
        if problem:
            return Parsed(text=text, error=problem)
        calls.append(_call(task, i, item["name"], args))
    return Parsed(text="", tool_calls=calls)


def _arguments_error(task: Task, name: str, args: object) -> str:
    tool = next((t for t in task.tools if t.function.name == name), None)
    if tool is None:
        return f"call of {name!r}, which is not among the task's tools"
    if tool.function.parameters is not None:
        problem = schema_error(tool.function.parameters, args)
        if problem:
            return f"arguments of {name} fail its parameters: {problem}"
    return ""


def _call(task: Task, index: int, name: str, args: object) -> ToolCall:
    digest = hashlib.blake2b(f"{task.id}/{index}".encode(), digest_size=9).hexdigest()
    return ToolCall(id=f"call_{digest}", function=FunctionCall(
        name=name, arguments=_json.encode(args).decode()))


def arguments(call: ToolCall) -> object:
    """A call's arguments as a value ({} when they are not JSON)."""
    try:
        return _json_decode(call.function.arguments or "{}")
    except msgspec.DecodeError:
        return {}


# ---- JSON schema validation, compiled once per schema ---------------------------------------

_validators: dict[bytes, object] = {}


def schema_error(schema: Mapping, value: object) -> str:
    """"" when `value` is an instance of `schema`, else the first error and where."""
    key = _json.encode(schema)
    validator = _validators.get(key)
    try:
        if validator is None:
            try:
                import jsonschema
            except ImportError:  # a worker without the `steps` extra: the engine enforced it
                return ""

            cls = jsonschema.validators.validator_for(schema)
            validator = cls(schema)
            if len(_validators) > 512:
                _validators.clear()
            _validators[key] = validator
        error = next(iter(validator.iter_errors(value)), None)  # type: ignore[attr-defined]
    except Exception as exc:  # the task's schema (a $ref to nowhere, ...): its failure, not ours
        return f"the schema cannot be applied: {type(exc).__name__}: {str(exc)[:200]}"
    if error is None:
        return ""
    where = ".".join(str(p) for p in error.absolute_path)
    return f"{error.message[:200]}" + (f" (at {where})" if where else "")


_regexes: dict[str, re.Pattern | None] = {}


def _fullmatch(pattern: str, text: str) -> bool | None:
    """Whether Python's `re` matches the whole text; None where it cannot read the pattern
    (the engine's regex dialect is not quite Python's)."""
    compiled = _regexes.get(pattern, False)
    if compiled is False:
        try:
            compiled = re.compile(pattern)
        except re.error:
            compiled = None
        if len(_regexes) > 256:
            _regexes.clear()
        _regexes[pattern] = compiled
    if compiled is None:
        return None
    return compiled.fullmatch(text) is not None
