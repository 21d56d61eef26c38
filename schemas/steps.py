"""The little language of agent steps: template placeholders, paths and conditions.

Pure functions, shared by the producer's checks (schemas/validate.py) and the worker's rules
(workers/outcomes.py), so that what is accepted at submit is what runs (docs/agent-steps.md).

Placeholders in a follow-up's prompt or messages:
    {output}               the parent's output text
    {output.PATH}          a value of the parent's parsed output ("category", "parts.0.title")
    {tool.name} {tool.id}  the parent's first tool call; {tool.arguments} its arguments (JSON)
    {tool.arguments.PATH}  one of its arguments
    {item} {item.PATH}     in a fan-out, this child's item
    {results}              in a join, the children's results (a JSON array; also .PATH)
A string value goes in as it is, any other value as compact JSON; a path that names nothing
in the value renders as "".  Other braces are left alone, so prompts may hold JSON examples.
Rendering is one pass: text brought in by a placeholder is never read for placeholders again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import msgspec

from agentfleet.schemas.wire import Condition, Tool, ToolCall, ToolChoice

ROOTS = ("output", "item", "tool", "results")
_PLACEHOLDER = re.compile(r"\{(output|item|tool|results)((?:\.[A-Za-z0-9_\-]+)*)\}")
_json = msgspec.json.Encoder()


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()  # what `lookup` returns for a path that names nothing


def placeholders(text: str) -> list[tuple[str, str]]:
    """(root, path) of every placeholder in `text`; path "" for the root itself."""
    return [(m.group(1), m.group(2)[1:]) for m in _PLACEHOLDER.finditer(text)]


def lookup(value: object, path: str) -> object:
    """The value at a dotted path ("a.b.0"): dict keys, list indexes; MISSING if none."""
    if not path:
        return value
    for part in path.split("."):
        if isinstance(value, Mapping):
            if part not in value:
                return MISSING
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
    return value


def as_text(value: object) -> str:
    """How a value goes into a prompt: strings as they are, the rest as compact JSON."""
    if value is MISSING or value is None:
        return ""
    if isinstance(value, str):
        return value
    return _json.encode(value).decode()


def render(text: str, context: Mapping[str, object]) -> str:
    """Fill the placeholders whose root is in `context` (root -> value); "output" maps to
    (text, parsed): `{output}` is the text, `{output.PATH}` a path into the parsed value."""
    def fill(m: re.Match) -> str:
        root, path = m.group(1), m.group(2)[1:]
        if root not in context:
            return m.group(0)
        value = context[root]
        if root == "output":
            text_, parsed = value  # type: ignore[misc]
            return text_ if not path else as_text(lookup(parsed, path))
        return as_text(lookup(value, path))

    if "{" not in text:
        return text
    if "output" in context and text.count("{") == text.count("{output}"):
        return text.replace("{output}", context["output"][0])  # the common case, 5x faster
    return _PLACEHOLDER.sub(fill, text)


def same(a: object, b: object) -> bool:
    """JSON equality: True is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def holds(cond: Condition, value: object, tool_calls: Sequence[ToolCall]) -> bool:
    """Whether a follow-up's condition holds on its parent's output: `value` is the parsed
    output (or the stripped text of a free-text step), `tool_calls` the calls it made."""
    if cond.tool:
        result = any(call.function.name == cond.tool for call in tool_calls)
    else:
        found = lookup(value, cond.field)
        if found is MISSING:
            result = False
        elif cond.one_of:
            result = any(same(found, x) for x in cond.one_of)
        else:
            result = same(found, cond.equals)
    return result != cond.negate


def describe(cond: Condition) -> str:
    """A condition as one line, for traces: "category == 'refund'", "tool lookup"."""
    if cond.tool:
        text = f"tool {cond.tool}"
    else:
        name = cond.field or "output"
        text = (f"{name} in {list(cond.one_of)!r}" if cond.one_of
                else f"{name} == {cond.equals!r}")
    return "not " + text if cond.negate else text


# ---- tools by structured outputs ------------------------------------------------------------

def tool_dict(tool: Tool) -> dict:
    """A tool as OpenAI writes it (every field, where the wire leaves defaults out)."""
    function: dict = {"name": tool.function.name}
    if tool.function.description:
        function["description"] = tool.function.description
    if tool.function.parameters is not None:
        function["parameters"] = tool.function.parameters
    if tool.function.strict is not None:
        function["strict"] = tool.function.strict
    return {"type": tool.type, "function": function}


def call_dict(call: ToolCall) -> dict:
    """A tool call as OpenAI writes it: arguments as a JSON text."""
    return {"id": call.id, "type": call.type,
            "function": {"name": call.function.name, "arguments": call.function.arguments}}


def choice_name(tool_choice: str | ToolChoice | None, tools: Sequence[Tool]) -> str:
    """"none", "auto", "required", or "named" (a ToolChoice); None is OpenAI's default."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, ToolChoice):
        return "named"
    return tool_choice


def _params(tool: Tool) -> dict:
    return dict(tool.function.parameters) if tool.function.parameters is not None else {
        "type": "object", "properties": {}}


def calls_schema(tools: Sequence[Tool]) -> dict:
    """The output of tool_choice "required": a JSON array of {"name", "parameters"} (vLLM's
    own schema for it, so that outputs read the same either way)."""
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": [t.function.name]},
                        "parameters": _params(t)},
         "required": ["name", "parameters"]} for t in tools]}}


def tool_schema(tools: Sequence[Tool], tool_choice: str | ToolChoice | None) -> dict | None:
    """The JSON schema that structured outputs enforce for a task's tools, or None when the
    choice leaves the output free ("none", or "auto" on a model with a tool parser).

    named: the arguments object of that tool; required: the array above; auto (no parser):
    either that array or {"content": "..."}, a plain answer."""
    kind = choice_name(tool_choice, tools)
    if kind == "none" or not tools:
        return None
    if kind == "named":
        name = tool_choice.function.name  # type: ignore[union-attr]
        return next((_params(t) for t in tools if t.function.name == name), None)
    if kind == "required":
        return calls_schema(tools)
    return {"anyOf": [calls_schema(tools), {
        "type": "object", "properties": {"content": {"type": "string"}},
        "required": ["content"], "additionalProperties": False}]}


# ---- JSON schemas, as far as a path goes ----------------------------------------------------

class _Unknown:
    pass


UNKNOWN = _Unknown()  # a schema shape this walk does not follow ($ref, anyOf, ...): anything goes


def schema_at(schema: object, path: str) -> object:
    """The sub-schema at a dotted path, None when the schema says nothing can be there, or
    UNKNOWN where it cannot tell (references, combinations, undeclared properties)."""
    node = schema
    for part in path.split(".") if path else ():
        if not isinstance(node, Mapping):
            return UNKNOWN
        if "$ref" in node or any(k in node for k in ("anyOf", "oneOf", "allOf")):
            return UNKNOWN
        props = node.get("properties")
        if isinstance(props, Mapping):
            if part in props:
                node = props[part]
                continue
            # Undeclared: a typo, unless the schema lets other names in on purpose.
            if node.get("patternProperties") or node.get("additionalProperties"):
                return UNKNOWN
            return None
        items = node.get("items")
        if part.isdigit() and isinstance(items, Mapping):
            node = items
            continue
        if node.get("type") in ("string", "integer", "number", "boolean", "null"):
            return None
        return UNKNOWN
    return node
