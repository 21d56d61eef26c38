"""Agent steps without a server: the template and condition language (schemas/steps.py), the
checks at submit (schemas/validate.py), reading outputs back (workers/structured.py) and the
fake engine's structured answers."""

from __future__ import annotations

import pytest

from agentfleet.schemas import steps
from agentfleet.schemas.errors import ValidationError
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.validate import validate_task
from agentfleet.schemas.wire import (
    Condition,
    FollowUp,
    FunctionCall,
    FunctionDef,
    FunctionName,
    JoinRef,
    JsonSchema,
    ResponseFormat,
    Sampling,
    Task,
    Tool,
    ToolCall,
    ToolChoice,
)
from agentfleet.workers import structured
from agentfleet.workers.fake_engine import answer

SETTINGS = Settings(models={"m1": ModelSpec(name="m1", max_model_len=2048),
                            "m2": ModelSpec(name="m2", max_model_len=256)},
                    default_model="m1", max_children=20)
TRIAGE = {"type": "object", "required": ["category"],
          "properties": {"category": {"enum": ["refund", "bug"]},
                         "order": {"type": "object", "properties": {"id": {"type": "integer"}}},
                         "parts": {"type": "array", "maxItems": 10, "items": {"type": "string"}},
                         "open": {"type": "array", "items": {"type": "string"}}}}
SCHEMA = ResponseFormat(type="json_schema", json_schema=JsonSchema(schema=TRIAGE))
TOOLS = [Tool(function=FunctionDef(name="lookup", parameters={
    "type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}))]


# ---- the language ---------------------------------------------------------------------------

def test_templates_fill_paths_in_one_pass_and_leave_other_braces_alone():
    context = {"output": ('{"a": 1}', {"a": {"b": [10, {"c": "x"}]}, "s": "{item}"}),
               "item": {"n": 3}, "tool": steps.MISSING}
    assert steps.render("{output.a.b.1.c}/{output.a.b.0}/{item.n}/{item}", context) == (
        'x/10/3/{"n":3}')
    assert steps.render("{output} {output.s} {output.nope} {tool.name}", context) == (
        '{"a": 1} {item}  ')  # text brought in is not read again; missing paths are ""
    assert steps.render('JSON like {"k": 1} and {other} stay', context) == (
        'JSON like {"k": 1} and {other} stay')
    assert steps.placeholders("{output.a} {results} {x}") == [("output", "a"), ("results", "")]


@pytest.mark.parametrize("cond, value, calls, holds", [
    (Condition(field="c", equals="refund"), {"c": "refund"}, [], True),
    (Condition(field="c", equals="refund"), {"c": "bug"}, [], False),
    (Condition(field="c", equals="refund", negate=True), {"c": "bug"}, [], True),
    (Condition(field="c", one_of=["a", "b"]), {"c": "b"}, [], True),
    (Condition(field="n", equals=1), {"n": True}, [], False),  # JSON: true is not 1
    (Condition(field="n", equals=1), {"n": 1.0}, [], True),
    (Condition(field="x.0", equals=2), {"x": [2]}, [], True),
    (Condition(field="missing", equals=None), {}, [], False),
    (Condition(equals="yes"), "yes", [], True),
    (Condition(tool="lookup"), None, [ToolCall(id="1", function=FunctionCall(name="lookup"))],
     True),
    (Condition(tool="lookup"), None, [], False),
])
def test_conditions(cond, value, calls, holds):
    assert steps.holds(cond, value, calls) is holds


def test_conditions_read_as_one_line():
    assert steps.describe(Condition(field="c", equals="x")) == "c == 'x'"
    assert steps.describe(Condition(one_of=[1, 2], negate=True)) == "not output in [1, 2]"
    assert steps.describe(Condition(tool="t")) == "tool t"


# ---- checks at submit -----------------------------------------------------------------------

def _task(**kw) -> Task:
    return Task(**{"model": "m1", "prompt": "hi", **kw})


def _fu(**kw) -> FollowUp:
    return FollowUp(**{"prompt": "next", **kw})


BAD = [
    ("response_format.json_schema.schema", dict(response_format=ResponseFormat(
        type="json_schema", json_schema=JsonSchema(schema={"type": "objekt"})))),
    ("response_format.json_schema.schema", dict(response_format=ResponseFormat(
        type="json_schema"))),
    ("response_format.regex", dict(response_format=ResponseFormat(type="regex", regex="(a"))),
    ("response_format.grammar", dict(response_format=ResponseFormat(
        type="grammar", grammar='root ::= "a" |'))),
    ("response_format.choice", dict(response_format=ResponseFormat(type="choice"))),
    ("response_format.choice", dict(response_format=ResponseFormat(type="choice",
                                                                   choice=["a", "a"]))),
    ("response_format.type", dict(response_format=ResponseFormat(type="xml"))),
    ("tools[0].function.name", dict(tools=[Tool(function=FunctionDef(name=""))])),
    ("tools[1].function.name", dict(tools=[*TOOLS, *TOOLS])),
    ("tools[0].function.parameters", dict(tools=[Tool(function=FunctionDef(
        name="f", parameters={"type": 5}))])),
    ("tools[0].type", dict(tools=[Tool(type="web", function=FunctionDef(name="f"))])),
    ("tool_choice.function.name", dict(tools=TOOLS, tool_choice=ToolChoice(
        function=FunctionName(name="other")))),
    ("tool_choice", dict(tool_choice="required")),
    ("tool_choice", dict(tools=TOOLS, tool_choice="always")),
    ("response_format", dict(tools=TOOLS, response_format=SCHEMA)),
    ("retry_max_tokens", dict(retry_max_tokens=128)),  # nothing that could fail its format
    ("retry_max_tokens", dict(response_format=SCHEMA, retry_max_tokens=4096)),
    ("retry_max_tokens", dict(response_format=SCHEMA, retry_max_tokens=32)),  # below max_tokens
    ("followups[0].when", dict(response_format=SCHEMA, followups=[_fu(when=Condition())])),
    ("followups[0].when.field", dict(response_format=SCHEMA, followups=[
        _fu(when=Condition(field="categry", equals="bug"))])),
    ("followups[0].when.field", dict(followups=[_fu(when=Condition(field="c", equals=1))])),
    ("followups[0].when.tool", dict(tools=TOOLS, followups=[_fu(when=Condition(tool="x"))])),
    ("followups[0].when.tool", dict(tools=TOOLS, followups=[
        _fu(when=Condition(tool="lookup", equals=1))])),
    ("followups[0].when.equals", dict(
        response_format=ResponseFormat(type="choice", choice=["y", "n"]),
        followups=[_fu(when=Condition(equals="maybe"))])),
    ("followups[0].prompt", dict(response_format=SCHEMA, followups=[
        _fu(prompt="{output.nope}")])),
    ("followups[0].prompt", dict(followups=[_fu(prompt="{item}")])),
    ("followups[0].prompt", dict(followups=[_fu(prompt="{results}")])),
    ("followups[0].prompt", dict(followups=[_fu(prompt="{tool.name}")])),
    ("followups[0].for_each", dict(response_format=SCHEMA, followups=[_fu(for_each="open")])),
    ("followups[0].for_each", dict(response_format=SCHEMA, followups=[
        _fu(for_each="category")])),
    ("followups[0].for_each", dict(followups=[_fu(for_each="parts")])),  # free text
    ("followups[0].items", dict(followups=[_fu(items=list(range(21)))])),
    ("followups[0].items", dict(response_format=SCHEMA, followups=[
        _fu(items=[1], for_each="parts")])),
    ("followups", dict(response_format=SCHEMA, followups=[
        _fu(for_each="parts"), _fu(for_each="parts"), _fu(items=[1])])),  # 21 > 20
    ("join", dict(join=_fu())),
    ("join.when", dict(followups=[_fu()], join=_fu(when=Condition(equals="x")))),
    ("join.items", dict(followups=[_fu()], join=_fu(items=[1]))),
    ("join", dict(followups=[_fu(items=list(range(10)), sampling=Sampling(max_tokens=8))],
                  join=_fu(model="m2"))),  # 10 x (8 + 32) + 64 > 256
    ("followups[0].join.prompt", dict(followups=[_fu(followups=[_fu()], join=_fu(
        prompt="{item}"))])),
    ("joins_into", dict(joins_into=JoinRef(parent="p", model="m1", join_model="m1"))),
]


@pytest.mark.parametrize("field, fields", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_steps_are_refused_naming_the_field(field, fields):
    with pytest.raises(ValidationError) as caught:
        validate_task(_task(**fields), SETTINGS)
    assert caught.value.field == field, str(caught.value)


def test_good_steps_pass():
    validate_task(_task(
        response_format=SCHEMA, retry_max_tokens=512,
        followups=[
            _fu(prompt="Refund {output.order.id}", when=Condition(field="category",
                                                                 equals="refund")),
            _fu(for_each="parts", prompt="Part {item}", sampling=Sampling(max_tokens=16),
                response_format=ResponseFormat(type="regex", regex=r"\d+")),
            _fu(items=[{"k": 1}], prompt="{item.k}")],
        join=_fu(prompt="All of {output.category}: {results}")), SETTINGS)
    validate_task(_task(tools=TOOLS, tool_choice="required", followups=[
        _fu(when=Condition(tool="lookup"), prompt="{tool.arguments.id}")]), SETTINGS)
    validate_task(_task(response_format=ResponseFormat(type="grammar", grammar=(
        'root ::= "yes" | "no"'))), SETTINGS)
    # the worker reads its own children and joins
    validate_task(_task(joins_into=JoinRef(parent="p", model="m1", join_model="m1")),
                  SETTINGS, internal=True)


# ---- reading outputs back -------------------------------------------------------------------

def _parse(text: str, finish: str = "stop", **task) -> structured.Parsed:
    return structured.parse(Task(model="m1", id="t", prompt="x", **task), text, finish)


def test_outputs_are_read_by_their_format():
    assert _parse('{"a": 1}', response_format=ResponseFormat(type="json_object")).parsed == {
        "a": 1}
    assert "not a JSON object" in _parse("[1]", response_format=ResponseFormat(
        type="json_object")).error
    assert _parse("42", response_format=ResponseFormat(type="regex", regex=r"\d+")).parsed == "42"
    assert _parse("4x", response_format=ResponseFormat(type="regex", regex=r"\d+")).error
    assert _parse(" no\n", response_format=ResponseFormat(type="choice",
                                                          choice=["yes", "no"])).parsed == "no"
    grammar = ResponseFormat(type="grammar", grammar='root ::= "a"+')
    assert _parse("aaa", response_format=grammar).parsed == "aaa"
    assert "cut by max_tokens" in _parse("aa", "length", response_format=grammar).error


def test_tool_outputs_by_structured_outputs():
    named = ToolChoice(function=FunctionName(name="lookup"))
    got = _parse('{"id": 3}', tools=TOOLS, tool_choice=named)
    assert got.tool_calls[0].function.arguments == '{"id":3}' and got.text == ""
    assert "fail its parameters" in _parse('{"id": "x"}', tools=TOOLS, tool_choice=named).error
    assert _parse('{"content": "hello"}', tools=TOOLS).text == "hello"  # auto: no call
    assert "not among the task's tools" in _parse('[{"name": "rm", "parameters": {}}]',
                                                  tools=TOOLS, tool_choice="required").error
    schema = steps.tool_schema(TOOLS, None)
    assert schema["anyOf"][0]["minItems"] == 1 and "content" in schema["anyOf"][1]["properties"]
    assert steps.tool_schema(TOOLS, "none") is None


# ---- the fake engine's answers --------------------------------------------------------------

def test_the_fake_engine_answers_a_schema_with_an_instance_picked_from_the_input():
    task = _task(prompt="I want a refund", response_format=SCHEMA,
                 sampling=Sampling(max_tokens=64))
    out = answer("r", task, 0.0)
    got = structured.parse(task, out.text, out.finish_reason)
    assert not got.error and got.parsed["category"] == "refund"
    cut = answer("r", _task(prompt="I want a refund", response_format=SCHEMA,
                            sampling=Sampling(max_tokens=4)), 0.0)
    assert cut.finish_reason == "length" and cut.output_tokens == 4 and len(cut.text) == 16


def test_the_fake_engine_calls_the_tool_its_input_names():
    out = answer("r", _task(prompt="please lookup order", tools=TOOLS,
                            sampling=Sampling(max_tokens=64)), 0.0)
    assert out.text == '[{"name":"lookup","parameters":{"id":0}}]'
    plain = answer("r", _task(prompt="hello", tools=TOOLS, sampling=Sampling(max_tokens=64)), 0)
    assert plain.text == '{"content":"echo: hello"}'


def test_a_schema_that_cannot_be_applied_fails_the_output_not_the_worker():
    broken = ResponseFormat(type="json_schema", json_schema=JsonSchema(schema={
        "$ref": "#/$defs/nowhere"}))
    got = _parse('{"a": 1}', response_format=broken)
    assert got.error.startswith("output fails its schema: the schema cannot be applied")
    looping = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
    out = answer("r", _task(response_format=ResponseFormat(
        type="json_schema", json_schema=JsonSchema(schema=looping))), 0.0)
    assert out.text == "null"


def test_without_the_jsonschema_package_a_structural_check_still_names_the_field(monkeypatch):
    """The client install (msgspec and redis) has no jsonschema: the `steps` extra adds it."""
    import sys

    monkeypatch.setitem(sys.modules, "jsonschema", None)  # `import jsonschema` fails
    with pytest.raises(ValidationError) as caught:
        validate_task(_task(response_format=ResponseFormat(type="json_schema", json_schema=(
            JsonSchema(schema={"type": "object", "properties": {"a": {"type": "txt"}}})))),
            SETTINGS)
    assert caught.value.field == "response_format.json_schema.schema"
    assert "(at properties/a)" in str(caught.value)
    validate_task(_task(response_format=SCHEMA), SETTINGS)
    fresh = {"type": "integer", "minimum": 16}  # compiled by no other test: not cached
    assert structured.schema_error(fresh, "x") == ""  # a worker leaves it to the engine


def test_a_checker_skips_only_steps_it_has_seen_pass():
    from agentfleet.schemas.validate import TaskChecker

    check = TaskChecker(SETTINGS)
    good = dict(response_format=SCHEMA, followups=[_fu(prompt="{output.category}")])
    check(_task(**good))
    check(_task(**good))  # the same shape: not checked again
    with pytest.raises(ValidationError) as caught:  # another shape is
        check(_task(response_format=SCHEMA, followups=[_fu(prompt="{output.nope}")]))
    assert caught.value.field == "followups[0].prompt"
    with pytest.raises(ValidationError):  # the same follow-ups under a parent without a schema
        check(_task(followups=[_fu(prompt="{output.category}")]))
