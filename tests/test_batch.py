"""Bulk jobs in the OpenAI Batch format: submit, lifecycle, results, on real servers.

The fake engine (a test double) answers "echo: <end of the prompt>"; the last test runs a
small file through the real vLLM engine and compares the output, line by line, with what
vLLM's own `run-batch` writes for the same input.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import msgspec
import pytest

from agentfleet.producer.batch import BatchClient
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.producer.openai_batch import (
    CHAT_URL,
    COMPLETIONS_URL,
    LineContext,
    LineError,
    output_line,
    parse_line,
    parse_model_map,
    parse_window,
)
from agentfleet.schemas import keys
from agentfleet.schemas.errors import BatchError, ErrorCode, InvalidBatchFileError, ValidationError
from agentfleet.schemas.wire import FunctionCall, Result, Status, Task, Timings, ToolCall
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.worker import Worker

MODEL_MAP = {"gpt-a": "m1", "gpt-b": "m2"}


def request(custom_id: str, content: str = "hello", *, model: str = "gpt-a",
            url: str = CHAT_URL, **body) -> dict:
    if url == COMPLETIONS_URL:
        body = {"model": model, "prompt": content, **body}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def write_jsonl(path: Path, lines: list) -> Path:
    with path.open("w") as f:
        for line in lines:
            f.write(line if isinstance(line, str) else json.dumps(line))
            f.write("\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f]


@pytest.fixture
async def batches(server, redis, settings):
    client = BatchClient(Producer(connect(server.url), settings=settings))
    yield client
    await client.close()


async def bulk_lengths(redis) -> dict[str, int]:
    return {m: await redis.xlen(keys.bulk_stream(m)) for m in ("m1", "m2")}


# ---- the format, without a server ----------------------------------------------------------

def ctx(settings, **kw) -> LineContext:
    return LineContext(batch_id="b1", endpoint=kw.pop("endpoint", None), deadline=2e9,
                       settings=settings, model_map=kw.pop("model_map", MODEL_MAP))


def test_a_chat_line_maps_onto_a_task(settings):
    line = request("q-1", model="gpt-b", max_completion_tokens=12, temperature=0.5, top_p=0.9,
                   stop="\n", seed=7, presence_penalty=0.1, user="ignored")
    line["body"]["messages"] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "One"},
                                     {"type": "text", "text": "Two"}]}]

    url, task = parse_line(json.dumps(line), ctx(settings))

    assert url == CHAT_URL
    assert task.id == task.idempotency_key == "b1:q-1"
    assert task.model == "m2" and task.batch_id == "b1" and task.deadline == 2e9
    assert task.metadata == {"custom_id": "q-1", "batch_url": CHAT_URL}
    assert [(m.role, m.content) for m in task.messages] == [("system", "Be brief."),
                                                          ("user", "One\nTwo")]
    s = task.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed, s.presence_penalty) == (
        12, 0.5, 0.9, ["\n"], 7, 0.1)


def test_defaults_follow_openai(settings):
    _, chat = parse_line(json.dumps(request("c")), ctx(settings))
    _, text = parse_line(json.dumps(request("t", url=COMPLETIONS_URL)),
                         ctx(settings, endpoint=COMPLETIONS_URL))
    assert chat.sampling.max_tokens == 512  # up to the context of m1
    assert chat.sampling.temperature == 1.0
    assert text.prompt == "hello" and text.messages is None
    assert text.sampling.max_tokens == 16  # /v1/completions' default


@pytest.mark.parametrize("line, reason", [
    ("{nope", "not a JSON object: JSON is malformed"),
    ('{"method": "POST"}', "object missing required field `custom_id`"),
    (json.dumps({**request("x"), "body": {"model": 3}}), "body.model: expected `str`, got `int`"),
    (json.dumps({**request("x"), "method": "GET"}), "method: 'GET' is not POST"),
    (json.dumps(request("x", url="/v1/embeddings")), "url: '/v1/embeddings' is not supported"),
    (json.dumps(request("x", model="gpt-9")), "body.model: unknown model 'gpt-9'"),
    (json.dumps(request("x", max_tokens=5000)),
     "body.max_tokens: 5000 is outside 1..512 (max_model_len of m1)"),
    (json.dumps(request("x", max_completion_tokens=0)), "body.max_completion_tokens: 0 is outside"),
    (json.dumps(request("x", temperature=3)), "body.temperature: 3.0 is outside 0.0..2.0"),
    (json.dumps(request("x", n=2)), "body.n: 2 choices: one choice per request is supported"),
    (json.dumps(request("x", stream=True)), "body.stream: streaming is not supported"),
    (json.dumps({**request("x"), "body": {"model": "gpt-a", "messages": []}}),
     "body.messages: is empty"),
    (json.dumps({**request("x"), "body": {"model": "gpt-a", "prompt": "hi"}}),
     "body.messages: a chat completion request needs messages"),
    (json.dumps({**request("x"), "body": {"model": "gpt-a", "messages": [
        {"role": "user", "content": [{"type": "image_url"}]}]}}),
     "body.messages[0].content[0]: a 'image_url' part; only text parts are supported"),
    (json.dumps(request("x" * 129)), "custom_id: 129 characters, outside 1..128"),
])
def test_a_bad_line_names_the_field(settings, line, reason):
    with pytest.raises(LineError) as err:
        parse_line(line, ctx(settings))
    assert err.value.reason.startswith(reason), err.value.reason


def test_structured_outputs_and_tools_map_as_openai_defines_them(settings):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    line = request("s", response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}})
    _, task = parse_line(json.dumps(line), ctx(settings))
    assert task.response_format.json_schema.schema == schema
    line = request("t", tools=[{"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "lookup"}})
    line["body"]["messages"] += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "found"}]
    _, task = parse_line(json.dumps(line), ctx(settings))
    assert task.tools[0].function.name == "lookup"
    assert task.tool_choice.function.name == "lookup"
    assert task.messages[1].tool_calls[0].id == "c1" and task.messages[2].tool_call_id == "c1"
    _, task = parse_line(json.dumps(request("v", structured_outputs={"choice": ["y", "n"]})),
                         ctx(settings))
    assert (task.response_format.type, task.response_format.choice) == ("choice", ["y", "n"])


@pytest.mark.parametrize("body, reason", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 1}}}},
     "body.response_format.json_schema.schema: does not compile"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "body.tools[0].function: object missing required field `name`"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]},
     "body.tools[0].function.name: '': a tool needs a name"),
    ({"tool_choice": "required"}, "body.tool_choice: 'required' without tools"),
    ({"structured_outputs": {"regex": "(a"}}, "body.response_format.regex: does not parse"),
])
def test_bad_structured_outputs_and_tools_name_the_field(settings, body, reason):
    with pytest.raises(LineError) as err:
        parse_line(json.dumps(request("x", **body)), ctx(settings))
    assert err.value.reason.startswith(reason), err.value.reason


def test_an_answer_with_tool_calls_is_written_as_openai_writes_it():
    call = ToolCall(id="call_1", function=FunctionCall(name="lookup", arguments='{"a":1}'))
    _, raw = output_line(result(Status.SUCCEEDED, tool_calls=[call]), CHAT_URL)
    [choice] = json.loads(raw)["response"]["body"]["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": None, "refusal": None,
                                 "tool_calls": [{"id": "call_1", "type": "function", "function": {
                                     "name": "lookup", "arguments": '{"a":1}'}}]}


def test_one_endpoint_per_batch(settings):
    c = ctx(settings)
    parse_line(json.dumps(request("a")), c)
    with pytest.raises(LineError, match="differs from the batch's endpoint"):
        parse_line(json.dumps(request("b", url=COMPLETIONS_URL)), c)


def test_windows_and_model_maps():
    assert parse_window("24h") == 86400 and parse_window("30m") == 1800
    assert parse_window("1.5s") == 1.5 and parse_window("2d") == 172800
    assert parse_window("90") == 90
    for bad in ("0h", "soon", "-1s"):
        with pytest.raises(ValidationError, match="completion_window"):
            parse_window(bad)
    assert parse_model_map("gpt-a=m1, gpt-b=m2") == MODEL_MAP
    with pytest.raises(ValidationError, match="model_map"):
        parse_model_map("gpt-a")


def result(status: Status, **kw) -> Result:
    return Result(task_id="b1:q-7", model="m1", status=status, model_version="v1",
                  timings=Timings(finished=1700000000.5), **kw)


def test_output_lines_follow_openai_batch_output():
    ok, raw = output_line(result(Status.SUCCEEDED, text="Hi!", finish_reason="length",
                                 prompt_tokens=5, output_tokens=2), CHAT_URL)
    line = json.loads(raw)
    assert ok and line["custom_id"] == "q-7" and line["id"].startswith("batch_req_")
    assert line["error"] is None
    response = line["response"]
    assert response["status_code"] == 200 and response["request_id"] == "b1:q-7"
    body = response["body"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert (body["created"], body["model"], body["system_fingerprint"]) == (1700000000, "m1", "v1")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hi!",
                                                        "refusal": None},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

    _, raw = output_line(result(Status.SUCCEEDED, text="Hi!"), COMPLETIONS_URL)
    body = json.loads(raw)["response"]["body"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "Hi!" and body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("status, code, http, error", [
    (Status.EXPIRED, ErrorCode.DEADLINE_EXCEEDED, None, "batch_expired"),
    (Status.CANCELLED, ErrorCode.CANCELLED, None, "batch_cancelled"),
    (Status.FAILED, ErrorCode.PROMPT_TOO_LONG, 400, None),
    (Status.FAILED, ErrorCode.ENGINE_ERROR, 500, None),
    (Status.DEAD_LETTERED, ErrorCode.ATTEMPTS_EXHAUSTED, 500, None),
])
def test_error_lines(status, code, http, error):
    ok, raw = output_line(result(status, error_code=code, error_message="why"), CHAT_URL)
    line = json.loads(raw)
    assert not ok and line["custom_id"] == "q-7"
    if error:
        assert line["response"] is None
        assert line["error"]["code"] == error and line["error"]["message"]
    else:
        assert line["error"] is None
        assert line["response"]["status_code"] == http
        assert line["response"]["body"]["error"] == {
            "message": "why", "type": "invalid_request_error" if http == 400 else "server_error",
            "param": None, "code": code.value}


# ---- submitting ----------------------------------------------------------------------------

@pytest.mark.parametrize("server", ["valkey"], indirect=True)  # 100k lines: one server is enough
@pytest.mark.timeout(180)
async def test_a_100k_line_file_completes_with_every_custom_id_once(
        batches, start_worker, redis, tmp_path):
    n = 100_000
    path = tmp_path / "requests.jsonl"
    with path.open("w") as f:
        for i in range(n):
            model = "gpt-a" if i % 3 else "gpt-b"
            f.write(f'{{"custom_id": "r{i}", "method": "POST", "url": "{CHAT_URL}", "body": '
                    f'{{"model": "{model}", "messages": [{{"role": "user", "content": '
                    f'"Question {i}?"}}], "max_tokens": 16}}}}\n')
    await start_worker()
    started = time.monotonic()

    report = await batches.submit(path, model_map=MODEL_MAP)
    st = await batches.wait(report.batch_id, timeout_s=120)
    out = await batches.write_results(report.batch_id, tmp_path / "out.jsonl",
                                      tmp_path / "err.jsonl")

    elapsed = time.monotonic() - started
    assert report.total == n and report.models == {"m1": n - n // 3 - 1, "m2": n // 3 + 1}
    assert st.status == "completed" and st.finished
    assert st.by_status == {"succeeded": n} and (st.completed, st.failed) == (n, 0)
    assert st.models == {"m1": (n - n // 3 - 1,) * 2, "m2": (n // 3 + 1,) * 2}
    assert (out.output, out.errors, out.missing) == (n, 0, 0)
    ids = []
    with (tmp_path / "out.jsonl").open() as f:
        for raw in f:
            line = msgspec.json.decode(raw)
            ids.append(line["custom_id"])
            body = line["response"]["body"]
            assert body["choices"][0]["message"]["content"] == (
                "echo: Question " + line["custom_id"][1:] + "?")
    assert len(ids) == n and set(ids) == {f"r{i}" for i in range(n)}  # none lost, none twice
    assert (tmp_path / "err.jsonl").read_bytes() == b""
    print(f"100k lines: submitted at {n / (report.validate_s + report.submit_s):,.0f} lines/s, "
          f"all done and written in {elapsed:.1f} s")


def invalid_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "mixed.jsonl", [
        request("a", "one"),                                 # 1 valid
        "{not json",                                         # 2
        {k: v for k, v in request("z").items() if k != "custom_id"},  # 3 no custom_id
        request("b", max_tokens=5000),                       # 4 over m1's context
        "",                                                  # 5 blank: skipped
        request("a", "again", model="gpt-b"),                # 6 repeats line 1, other model
        request("c", model="gpt-9"),                         # 7 unknown model
        request("d", "two", model="gpt-b"),                  # 8 valid
    ])


@pytest.mark.cluster_too
async def test_invalid_lines_are_reported_by_number_and_nothing_is_queued(
        batches, redis, tmp_path):
    with pytest.raises(InvalidBatchFileError) as err:
        await batches.submit(invalid_file(tmp_path), model_map=MODEL_MAP, batch_id="bad-1")

    assert [n for n, _ in err.value.errors] == [2, 3, 4, 6, 7]
    reasons = dict(err.value.errors)
    assert reasons[2].startswith("not a JSON object")
    assert reasons[3] == "object missing required field `custom_id`"
    assert reasons[4].startswith("body.max_tokens: 5000 is outside 1..512")
    assert reasons[6] == "custom_id: 'a' repeats line 1"
    assert reasons[7].startswith("body.model: unknown model 'gpt-9'")
    assert err.value.invalid == 5
    assert "5 invalid lines; nothing was queued" in str(err.value)
    assert await bulk_lengths(redis) == {"m1": 0, "m2": 0}
    st = await batches.status("bad-1")
    assert st.status == "failed" and st.settled and st.invalid == 5 and st.errors[0][0] == 2
    assert [k for k in await redis.keys("*seen*")] == []


async def test_skip_invalid_queues_the_valid_lines_only(batches, start_worker, redis, tmp_path):
    report = await batches.submit(invalid_file(tmp_path), model_map=MODEL_MAP,
                                  skip_invalid=True, batch_id="skip-1")

    assert (report.total, report.invalid) == (2, 5)
    assert report.models == {"m1": 1, "m2": 1}
    # The repeated custom id of line 6 (model m2) was not queued: only line 8 went to m2.
    assert await bulk_lengths(redis) == {"m1": 1, "m2": 1}
    await start_worker()
    st = await batches.wait("skip-1", timeout_s=10)
    assert st.status == "completed" and st.by_status == {"succeeded": 2}
    await batches.write_results("skip-1", tmp_path / "out.jsonl")
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert sorted((x["custom_id"], x["response"]["body"]["choices"][0]["message"]["content"])
                  for x in lines) == [("a", "echo: one"), ("d", "echo: two")]


@pytest.mark.cluster_too
async def test_resubmitting_the_same_file_queues_nothing_twice(
        server, batches, start_worker, redis, settings, tmp_path):
    n = 5000
    path = write_jsonl(tmp_path / "in.jsonl",
                       [request(f"r{i}", model="gpt-a" if i % 2 else "gpt-b") for i in range(n)])
    # A submitter that dies after its third chunk ...
    crashing = BatchClient(Producer(connect(server.url), settings=settings), chunk_lines=500)
    calls = 0
    submit_many = crashing.producer.submit_many

    async def dies_on_the_fourth_chunk(tasks, **kw):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise ConnectionError("the submitter's host went away")
        return await submit_many(tasks, **kw)

    crashing.producer.submit_many = dies_on_the_fourth_chunk
    with pytest.raises(ConnectionError):
        await crashing.submit(path, model_map=MODEL_MAP, batch_id="again-1")
    await crashing.close()
    assert sum((await bulk_lengths(redis)).values()) == 1500
    st = await batches.status("again-1")
    assert st.status == "in_progress" and st.total == n and st.enqueued < n

    # ... is run again, twice, with the same file and batch id.
    first = await batches.submit(path, model_map=MODEL_MAP, batch_id="again-1")
    second = await batches.submit(path, model_map=MODEL_MAP, batch_id="again-1")

    assert first.resumed and second.resumed and first.total == second.total == n
    assert await bulk_lengths(redis) == {"m1": n // 2, "m2": n // 2}
    with pytest.raises(BatchError, match="holds another file"):
        await batches.submit(path, model_map={"gpt-a": "m1", "gpt-b": "m1"}, batch_id="again-1")
    await start_worker()
    st = await batches.wait("again-1", timeout_s=30)
    assert st.status == "completed" and st.by_status == {"succeeded": n}
    report = await batches.write_results("again-1", tmp_path / "out.jsonl")
    ids = [x["custom_id"] for x in read_jsonl(tmp_path / "out.jsonl")]
    assert report.output == len(ids) == len(set(ids)) == n
    with pytest.raises(BatchError, match="already completed"):
        await batches.submit(path, model_map=MODEL_MAP, batch_id="again-1")


# ---- lifecycle -----------------------------------------------------------------------------

async def test_a_tiny_completion_window_expires_what_is_left(
        batches, start_worker, settings, tmp_path):
    slow = msgspec.structs.replace(settings, max_inflight=4)
    await start_worker(engines={"m1": FakeEngine(delay_s=0.1), "m2": FakeEngine()},
                       worker_settings=slow)
    path = write_jsonl(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(200)])

    report = await batches.submit(path, model_map=MODEL_MAP, completion_window="2s")
    st = await batches.wait(report.batch_id, timeout_s=30)

    assert st.status == "expired" and st.finished and st.expired_at
    done, expired = st.by_status.get("succeeded", 0), st.by_status.get("expired", 0)
    assert done > 0 and expired > 0 and done + expired == 200
    out = await batches.write_results(report.batch_id, tmp_path / "out.jsonl",
                                      tmp_path / "err.jsonl")
    assert (out.output, out.errors) == (done, expired)
    errors = read_jsonl(tmp_path / "err.jsonl")
    assert {(e["response"] is None, e["error"]["code"]) for e in errors} == {
        (True, "batch_expired")}
    custom_ids = [x["custom_id"] for x in read_jsonl(tmp_path / "out.jsonl") + errors]
    assert sorted(custom_ids) == sorted(f"r{i}" for i in range(200))


async def test_past_its_window_a_job_is_expired_at_once_and_settles_when_drained(
        batches, start_worker, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(30)])
    report = await batches.submit(path, model_map=MODEL_MAP, completion_window="0.3s")
    assert (await batches.status(report.batch_id)).status == "in_progress"
    await asyncio.sleep(0.4)

    st = await batches.status(report.batch_id)  # no worker yet: nothing has finished
    assert (st.status, st.done, st.settled) == ("expired", 0, False)
    await start_worker()
    st = await batches.wait(report.batch_id, timeout_s=10)
    assert st.status == "expired" and st.settled and st.by_status == {"expired": 30}


@pytest.mark.cluster_too
async def test_cancel_finishes_queued_requests_as_cancelled(
        batches, start_worker, settings, tmp_path):
    slow = msgspec.structs.replace(settings, max_inflight=4)
    await start_worker(engines={"m1": FakeEngine(delay_s=0.05), "m2": FakeEngine()},
                       worker_settings=slow)
    path = write_jsonl(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(1000)])
    report = await batches.submit(path, model_map=MODEL_MAP)
    while (await batches.status(report.batch_id)).done < 20:
        await asyncio.sleep(0.05)

    cancelling = await batches.cancel(report.batch_id)
    st = await batches.wait(report.batch_id, timeout_s=30)

    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    assert st.status == "cancelled" and st.finished and st.cancelled_at
    assert st.by_status["succeeded"] >= 20 and st.by_status["cancelled"] > 900
    assert st.done == st.total == 1000
    out = await batches.write_results(report.batch_id, tmp_path / "out.jsonl",
                                      tmp_path / "err.jsonl")
    assert out.errors == st.by_status["cancelled"]
    assert {x["error"]["code"] for x in read_jsonl(tmp_path / "err.jsonl")} == {
        "batch_cancelled"}
    assert (await batches.cancel(report.batch_id)).status == "cancelled"  # settled: no-op


async def test_interactive_tasks_finish_while_a_batch_runs(
        batches, producer, start_worker, settings, tmp_path):
    """The bulk lane yields to interactive work (the latency figures: bench/bulk_batch.py)."""
    lane = msgspec.structs.replace(settings, max_inflight=64)
    await start_worker(engines={"m1": FakeEngine(delay_s=0.05), "m2": FakeEngine()},
                       worker_settings=lane)
    path = write_jsonl(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(5000)])
    report = await batches.submit(path, model_map=MODEL_MAP)
    while (await batches.status(report.batch_id)).done < 200:
        await asyncio.sleep(0.02)

    ids = await producer.submit_many([Task(model="m1", prompt=f"now {i}") for i in range(50)])
    results = await producer.wait_many(ids, timeout_s=10)
    st = await batches.status(report.batch_id)

    assert all(r.ok for r in results)
    assert st.status == "in_progress" and st.done < st.total  # the batch is still running
    slowest_s = max(r.timings.written - r.timings.enqueued for r in results)
    assert slowest_s < 2.0, slowest_s


@pytest.mark.cluster_too
async def test_results_can_be_iterated_as_they_complete(batches, start_worker, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [request(f"r{i}", model="gpt-a" if i % 2
                                                       else "gpt-b") for i in range(300)])
    report = await batches.submit(path, model_map=MODEL_MAP)
    seen: list[Result] = []

    async def collect() -> None:
        async for r in batches.results(report.batch_id, block_ms=100):
            seen.append(r)

    collecting = asyncio.create_task(collect())
    await asyncio.sleep(0.2)
    assert not seen  # no worker yet: the iterator blocks
    await start_worker()
    await asyncio.wait_for(collecting, 20)
    assert sorted(r.task_id for r in seen) == sorted(f"{report.batch_id}:r{i}"
                                                     for i in range(300))
    assert {r.model for r in seen} == {"m1", "m2"}


@pytest.mark.cluster_too
async def test_an_iterable_of_dicts_is_submitted_like_a_file(batches, start_worker, redis):
    lines = (request(f"r{i}", f"p{i}", url=COMPLETIONS_URL) for i in range(50))  # an iterator

    report = await batches.submit(lines, model_map=MODEL_MAP, batch_id="gen-1",
                                  input_name="generated")

    assert (report.total, report.endpoint) == (50, COMPLETIONS_URL)
    await start_worker()
    st = await batches.wait("gen-1", timeout_s=10)
    assert st.status == "completed" and st.input_file == "generated"
    assert [b.status for b in await batches.list_batches()] == ["completed"]
    with pytest.raises(BatchError, match="no batch 'nope'"):
        await batches.status("nope")


# ---- the command line ----------------------------------------------------------------------

async def cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentfleet", "batch", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.timeout(120)
@pytest.mark.cluster_too
async def test_cli_submit_wait_results(server, start_worker, tmp_path):
    models = tmp_path / "models.toml"
    models.write_text("[models.m1]\nmax_model_len = 512\n[models.m2]\nmax_model_len = 256\n")
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_MODELS_FILE": str(models),
           "AGENTFLEET_DEFAULT_MODEL": "m1", "AGENTFLEET_HOME": str(tmp_path), "COLUMNS": "200"}
    await start_worker()
    bad = write_jsonl(tmp_path / "bad.jsonl", [request("a"), request("b", model="gpt-9")])
    good = write_jsonl(tmp_path / "good.jsonl", [request(f"r{i}") for i in range(20)])

    rc, out, err = await cli("submit", str(bad), "--model-map", "gpt-a=m1", env=env)
    assert rc == 2
    assert "line 2: body.model: unknown model 'gpt-9'" in err
    assert "1 invalid lines; nothing was queued" in err

    rc, out, err = await cli("submit", str(good), "--model-map", "gpt-a=m1", "--batch-id",
                             "cli-1", env=env)
    assert rc == 0, err
    assert "batch cli-1: 20 requests queued (m1: 20)" in out
    rc, out, err = await cli("wait", "cli-1", "--timeout-s", "30", env=env)
    assert rc == 0, err
    assert "batch cli-1: completed  20/20 finished" in out
    rc, out, err = await cli("results", "cli-1", "-o", str(tmp_path / "out.jsonl"),
                             "--errors", str(tmp_path / "err.jsonl"), env=env)
    assert rc == 0, err
    assert "20 lines to" in out
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 20
    rc, out, err = await cli("status", "cli-1", "--json", env=env)
    batch = json.loads(out)
    assert (batch["object"], batch["status"], batch["endpoint"]) == ("batch", "completed",
                                                                     CHAT_URL)
    assert batch["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    assert batch["input_file_id"] == "good.jsonl" and batch["completed_at"]


# ---- through the real engine, against vLLM's run-batch -------------------------------------

def assert_same_shape(ours: object, theirs: object, path: str = "$") -> None:
    """`ours` has the shape of vLLM's line `theirs`: every key vLLM writes with a value we
    write too, with a value of the same JSON type; we write no key vLLM does not know.  A
    null in vLLM's line is an optional field (vLLM writes its extensions as nulls)."""
    if theirs is None:
        return
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{path}: {ours!r} is not an object"
        assert set(ours) <= set(theirs), f"{path}: keys vLLM does not write: " \
                                         f"{sorted(set(ours) - set(theirs))}"
        for key, value in theirs.items():
            assert value is None or key in ours, f"{path}.{key} is missing"
            if key in ours:
                assert_same_shape(ours[key], value, f"{path}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), f"{path}: {ours!r}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_shape(a, b, f"{path}[{i}]")
    else:
        assert type(ours) is type(theirs), f"{path}: {ours!r} against vLLM's {theirs!r}"


@pytest.mark.engine
@pytest.mark.timeout(900)
@pytest.mark.parametrize("server", ["valkey"], indirect=True)
# Third-party, not ours (as in test_vllm_engine.py): torch's inductor imports a deprecated
# torch.jit API, and vLLM leaves its ZeroMQ context to the garbage collector.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning")
async def test_output_matches_vllm_run_batch_through_the_real_engine(server, redis, tmp_path):
    pytest.importorskip("vllm")
    from agentfleet.schemas.settings import DEFAULT_MODEL, ModelSpec, Settings
    from agentfleet.workers.models import prepare_default_model
    from agentfleet.workers.vllm_engine import VllmEngine

    home = Settings.from_env().home_path
    path = prepare_default_model(home)
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        request("q1", "What is the capital of France?", model=DEFAULT_MODEL, max_tokens=8,
                temperature=0),
        {**request("q2", model=DEFAULT_MODEL, max_completion_tokens=4),
         "body": {"model": DEFAULT_MODEL, "max_completion_tokens": 4, "messages": [
             {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]}},
        request("q3", "Count to three.", model=DEFAULT_MODEL, max_tokens=6, stop=["3"]),
        request("long", "hello " * 600, model=DEFAULT_MODEL, max_tokens=4),  # too many tokens
    ])
    text = write_jsonl(tmp_path / "text.jsonl", [
        request("t1", "Once upon a time", model=DEFAULT_MODEL, url=COMPLETIONS_URL,
                max_tokens=5),
        request("t2", "The sky is", model=DEFAULT_MODEL, url=COMPLETIONS_URL, max_tokens=3,
                temperature=0)])
    # vLLM's own batch runner on the same chat file, in its own process, meanwhile.
    theirs_path = tmp_path / "vllm_out.jsonl"
    vllm_env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "VLLM_CPU_KVCACHE_SPACE": "1"}
    runner = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(chat), "-o",
        str(theirs_path), "--model", str(path), "--served-model-name", DEFAULT_MODEL,
        "--max-model-len", "512", "--max-num-seqs", "8", "--enforce-eager", env=vllm_env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

    spec = ModelSpec(name=DEFAULT_MODEL, max_model_len=512, max_num_seqs=8,
                     kv_cache_space_gib=1, enforce_eager=True)
    settings = Settings(models={DEFAULT_MODEL: spec}, default_model=DEFAULT_MODEL, block_ms=20)
    # Started here, not by start_worker: the engine takes a minute or more to load.
    worker = Worker(settings, redis, {DEFAULT_MODEL: VllmEngine(spec, path)}, worker_id="w1")
    serving = asyncio.create_task(worker.run(drain_timeout_s=30))
    batches = BatchClient(Producer(connect(server.url), settings=settings))
    try:
        await asyncio.wait_for(worker.ready.wait(), 600)
        for name, source in (("chat", chat), ("text", text)):
            report = await batches.submit(source, batch_id=f"e2e-{name}")
            st = await batches.wait(report.batch_id, timeout_s=600)
            assert st.finished and st.done == st.total, st
            await batches.write_results(report.batch_id, tmp_path / f"ours_{name}.jsonl")
    finally:
        await batches.close()
        worker.request_stop()
        await asyncio.wait_for(serving, 60)
    _, stderr = await asyncio.wait_for(runner.communicate(), 600)
    assert runner.returncode == 0, stderr.decode()[-3000:]

    ours = {x["custom_id"]: x for x in read_jsonl(tmp_path / "ours_chat.jsonl")}
    theirs = {x["custom_id"]: x for x in read_jsonl(theirs_path)}
    assert sorted(ours) == sorted(theirs) == ["long", "q1", "q2", "q3"]
    for custom_id in ("q1", "q2", "q3"):
        a, b = ours[custom_id], theirs[custom_id]
        assert_same_shape(a, b)
        assert a["error"] is None and a["response"]["status_code"] == 200
        body, ref = a["response"]["body"], b["response"]["body"]
        assert (body["object"], body["model"]) == (ref["object"], ref["model"])
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["prompt_tokens"] == ref["usage"]["prompt_tokens"]  # the same prompt
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 0 < usage["completion_tokens"] <= 8
    # A request the engine refuses: 400 in both.  vLLM writes the error object into `error`
    # with an empty body; we follow OpenAI's batch output: the error body under `response`.
    a, b = ours["long"], theirs["long"]
    assert a["response"]["status_code"] == b["response"]["status_code"] == 400
    assert "tokens" in a["response"]["body"]["error"]["message"]
    assert b["error"]["error"]["message"] and a["error"] is None

    # /v1/completions: vLLM 0.32's run-batch refuses the endpoint (it reads chat requests
    # only), so the reference is its CompletionResponse, in run-batch's envelope.
    from vllm.entrypoints.openai.completion.protocol import (
        CompletionResponse,
        CompletionResponseChoice,
    )
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    envelope = theirs["q1"]
    for line in read_jsonl(tmp_path / "ours_text.jsonl"):
        body = line["response"]["body"]
        ref = CompletionResponse(
            model=DEFAULT_MODEL, usage=UsageInfo(prompt_tokens=1, completion_tokens=1,
                                                 total_tokens=2),
            choices=[CompletionResponseChoice(index=0, text="x", finish_reason="length")],
        ).model_dump(mode="json")
        assert_same_shape(line, {**envelope, "response": {**envelope["response"], "body": ref}})
        assert body["object"] == "text_completion" and body["choices"][0]["text"]
        assert 0 < body["usage"]["completion_tokens"] <= 5


def test_the_shape_comparison_catches_missing_extra_and_mistyped_fields():
    theirs = {"a": 1, "b": {"c": "x", "d": None}, "e": [{"f": 1.5}]}
    assert_same_shape({"a": 2, "b": {"c": "y"}, "e": [{"f": 2.5}]}, theirs)
    for ours in ({"b": {"c": "y"}, "e": [{"f": 2.5}]},                    # a missing
                 {"a": 2, "b": {"c": "y", "z": 1}, "e": [{"f": 2.5}]},    # z unknown to vLLM
                 {"a": "2", "b": {"c": "y"}, "e": [{"f": 2.5}]},          # a mistyped
                 {"a": 2, "b": {"c": "y"}, "e": []}):                     # e shorter
        with pytest.raises(AssertionError):
            assert_same_shape(ours, theirs)
