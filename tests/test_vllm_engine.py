"""End to end through the real vLLM engine and the real SmolLM2-135M, on the CPU.

One engine serves the whole module (it takes about a minute to start).  The engine runs
eager: torch.compile costs minutes on a small CPU.  The answer checks ask questions whose
greedy answer is the same in float32 and in bf16 on every CPU kernel we met: on CPUs with
AMX, vLLM's bf16 kernels flip this tiny model's answer to "What is the capital of France?"
(HF gives "The" 0.17 against "L" 0.14 for its first token) to "L'Étoile, la Marseillaise".
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Sequence

import pytest
import pytest_asyncio

from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.settings import DEFAULT_MODEL, ModelSpec, Settings
from agentfleet.schemas.wire import Message, Sampling, Task
from agentfleet.workers.engine import EngineOutput

pytestmark = [
    pytest.mark.engine,
    pytest.mark.asyncio(loop_scope="module"),
    # Third-party, not ours: torch's inductor imports a deprecated torch.jit API, and vLLM
    # leaves its ZeroMQ context to the garbage collector after shutdown.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
]

SPEC = ModelSpec(
    name=DEFAULT_MODEL,
    max_model_len=512,
    max_num_seqs=8,
    kv_cache_space_gib=1,
    enforce_eager=True,
)
WAIT_S = 300


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    # Imported here so that collecting this module (say, with -m "not engine") skips vLLM.
    from agentfleet.workers.models import prepare_default_model
    from agentfleet.workers.vllm_engine import VllmEngine

    path = prepare_default_model(Settings.from_env().home_path)
    engine = VllmEngine(SPEC, path)
    engine.prefix_hits = [0, 0]  # (queries, hits) in tokens, from vLLM's scheduler stats

    def sink(*, prefix_cache_queries: int = 0, prefix_cache_hits: int = 0, **_) -> None:
        engine.prefix_hits[0] += prefix_cache_queries
        engine.prefix_hits[1] += prefix_cache_hits

    engine.set_stats_sink(sink)
    await engine.start()
    yield engine
    await engine.stop()
    gc.collect()  # collect vLLM's ZeroMQ context here, under this module's warning filters


async def run(engine, requests: Sequence[tuple[str, Task]]) -> dict[str, EngineOutput]:
    """Submit one window and wait for every request's on_done."""
    done: dict[str, EngineOutput] = {}
    all_done = asyncio.Event()

    def on_done(output: EngineOutput) -> None:
        assert output.request_id not in done, "on_done called twice"
        done[output.request_id] = output
        if len(done) == len(requests):
            all_done.set()

    engine.submit(requests, on_done)
    await asyncio.wait_for(all_done.wait(), WAIT_S)
    return done


def task(prompt: str | None = None, messages: list[Message] | None = None, **sampling) -> Task:
    return Task(
        model=DEFAULT_MODEL,
        prompt=prompt,
        messages=messages,
        sampling=Sampling(**{"max_tokens": 16, **sampling}),
    )


@pytest.mark.timeout(600)
async def test_chat_message_gets_the_right_answer(engine):
    question = [Message(role="user", content="What is the capital of Japan?")]

    out = (await run(engine, [("chat", task(messages=question))]))["chat"]

    assert out.error_code is None, out.error_message
    assert "Tokyo" in out.text
    assert out.finish_reason in ("stop", "length")


@pytest.mark.timeout(600)
async def test_raw_prompt_reports_tokens_and_times(engine):
    before = time.time()

    out = (await run(engine, [("raw", task("Once upon a time", max_tokens=8, ignore_eos=True))]))[
        "raw"
    ]

    assert out.error_code is None, out.error_message
    assert out.text.strip()
    assert out.finish_reason == "length"
    assert out.output_tokens == 8
    assert out.prompt_tokens == 4
    assert before <= out.engine_start <= out.first_token <= out.finished <= time.time()
    assert out.first_token < out.finished  # seven decode steps come after the first token


@pytest.mark.timeout(600)
async def test_a_window_tokenizes_in_one_call_as_each_task_would_alone(engine):
    tok = engine._tokenizer
    question = [Message(role="user", content="What is the capital of Japan?")]
    chat = tok.apply_chat_template([{"role": "user", "content": question[0].content}],
                                   add_generation_prompt=True, tokenize=False)

    got = engine._tokenize_window([task("Once upon a time"), task(messages=question),
                                   task("Hello"), task()])

    assert got == [tok.encode("Once upon a time"), tok.encode(chat, add_special_tokens=False),
                   tok.encode("Hello"), tok.encode("")]


@pytest.mark.timeout(600)
async def test_bad_requests_fail_alone_through_on_done(engine):
    requests = [
        ("long", task("word " * 2 * SPEC.max_model_len)),
        ("empty", task()),
        ("top_p", task("Hello", top_p=0.0)),
        ("good", task("Hello", max_tokens=2)),
    ]

    outs = await run(engine, requests)

    assert outs["long"].error_code is ErrorCode.PROMPT_TOO_LONG
    assert "max_model_len=512" in outs["long"].error_message
    assert outs["empty"].error_code is ErrorCode.INVALID_TASK
    assert outs["top_p"].error_code is ErrorCode.INVALID_TASK
    assert "top_p" in outs["top_p"].error_message
    assert outs["good"].error_code is None, outs["good"].error_message
    assert outs["good"].output_tokens > 0


@pytest.mark.timeout(600)
async def test_abort_before_the_request_starts(engine):
    done: list[EngineOutput] = []
    engine.submit([("early", task("Count to ten:", ignore_eos=True))], done.append)

    engine.abort(["early"])

    await _until(lambda: done)
    assert done[0].finish_reason == "abort"
    assert done[0].error_code is None
    assert engine.inflight == 0


@pytest.mark.timeout(600)
async def test_abort_in_flight_stops_it_in_vllm(engine):
    llm = engine._llm  # white box: how many requests vLLM itself still holds
    done: list[EngineOutput] = []
    engine.submit([("late", task("Count to ten: " * 40, ignore_eos=True))], done.append)
    await _until(lambda: llm.output_processor.get_num_unfinished_requests() == 1)

    engine.abort(["late"])

    await _until(lambda: done)
    assert done[0].finish_reason == "abort"
    await _until(lambda: llm.output_processor.get_num_unfinished_requests() == 0)
    # ...and the engine goes on serving.
    after = await run(engine, [("after", task("Hello", max_tokens=2))])
    assert after["after"].error_code is None


async def _until(condition, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


@pytest.mark.timeout(600)
async def test_tenants_never_hit_each_others_prefix_cache_but_hit_their_own(engine):
    """Each tenant's requests carry their own cache_salt: a prompt tenant A has run is a hit
    for A again and a miss for B (who cannot time A's cached prefixes)."""
    long_prompt = "An agent's shared system prompt, line %d. " * 30 % tuple(range(30))

    async def hits_of(name: str, salt: str) -> int:
        before = engine.prefix_hits[1]
        t = task(long_prompt, max_tokens=1)
        done = {}
        ready = asyncio.Event()

        def on_done(output: EngineOutput) -> None:
            done[output.request_id] = output
            ready.set()

        engine.submit([(name, t)], on_done, salts=[salt])
        await asyncio.wait_for(ready.wait(), WAIT_S)
        assert done[name].error_code is None, done[name].error_message
        await asyncio.sleep(0.5)  # the step's stats reach the logger after the output
        return engine.prefix_hits[1] - before

    await hits_of("salt-a-1", "t:alpha")  # fills alpha's cache
    assert await hits_of("salt-a-2", "t:alpha") > 0  # alpha hits its own prefix
    assert await hits_of("salt-b-1", "t:beta") == 0  # beta does not hit alpha's
    assert await hits_of("salt-g-1", "g:shared") == 0
    assert await hits_of("salt-g-2", "g:shared") > 0  # a cache group shares one salt


async def test_a_models_tool_parser_reads_its_calls_out_of_the_text():
    """tool_choice "auto" on a model whose tool_parser is set: vLLM's own parser (hermes here,
    with the real tokenizer; no engine needed) finds the calls and leaves the content."""
    from vllm.tokenizers import get_tokenizer

    from agentfleet.schemas.wire import FunctionDef, Tool
    from agentfleet.workers.models import prepare_default_model
    from agentfleet.workers.vllm_engine import read_tool_calls, tool_parser_class

    tokenizer = get_tokenizer(str(prepare_default_model(Settings.from_env().home_path)))
    t = Task(model=DEFAULT_MODEL, messages=[Message(role="user", content="weather?")],
             tools=[Tool(function=FunctionDef(name="weather", parameters={"type": "object"}))])
    text = ('Let me look.<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>')
    content, calls = read_tool_calls(tool_parser_class(DEFAULT_MODEL, "hermes"), tokenizer, t,
                                     text, DEFAULT_MODEL)
    assert content.strip() == "Let me look."
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("weather", '{"city": "Paris"}')]
    assert read_tool_calls(tool_parser_class(DEFAULT_MODEL, "hermes"), tokenizer, t,
                           "No call here.", DEFAULT_MODEL) == ("No call here.", [])
