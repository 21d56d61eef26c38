"""The gateway through the real vLLM engine on the CPU (SmolLM2-135M), driven by the official
openai client: chat, text completions, streaming (RequestOutputKind.DELTA for streaming
tasks only), files and batches, and an error the engine raises.

One engine, one worker and one gateway serve the whole module (the engine takes about a
minute to start); one server (Valkey) is enough here: the Redis paths run on both servers in
the fake-engine suites.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import time

import openai
import pytest
import pytest_asyncio

from agentfleet.schemas.settings import DEFAULT_MODEL, ModelSpec, Settings

pytestmark = [
    pytest.mark.engine,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
]

SPEC = ModelSpec(name=DEFAULT_MODEL, max_model_len=512, max_num_seqs=8, kv_cache_space_gib=1,
                 enforce_eager=True)
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]


class _Kept:
    """The module's engine for each test's worker: a worker stops its engines when it stops,
    and this one must outlive the test."""

    def __init__(self, engine):
        self._engine = engine
        self.model_version = engine.model_version
        self.slots = engine.slots

    @property
    def partials(self):
        return self._engine.partials

    @partials.setter
    def partials(self, value):
        self._engine.partials = value

    async def start(self) -> None:
        return None

    def submit(self, requests, on_done, *, salts=None) -> None:
        self._engine.submit(requests, on_done, salts=salts)

    def abort(self, request_ids) -> None:
        self._engine.abort(request_ids)

    async def stop(self) -> None:
        return None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    """(gateway URL, API key): Valkey, the vLLM engine, a worker and the gateway."""
    import uvicorn

    from agentfleet.ops import apikeys
    from agentfleet.ops.embedded import ServerProcess, valkey_binary
    from agentfleet.ops.gateway import create_app
    from agentfleet.producer.connection import connect
    from agentfleet.workers.models import prepare_default_model
    from agentfleet.workers.vllm_engine import VllmEngine
    from agentfleet.workers.worker import Worker

    tmp = tmp_path_factory.mktemp("gateway-engine")
    settings = Settings(models={DEFAULT_MODEL: SPEC}, default_model=DEFAULT_MODEL,
                        gateway_files_dir=str(tmp / "files"), block_ms=20)
    engine = VllmEngine(SPEC, prepare_default_model(Settings.from_env().home_path))
    await engine.start()
    with ServerProcess(tmp / "valkey", binary=valkey_binary(), appendonly=False) as server:
        redis = connect(server.url)
        worker = Worker(settings, redis, {DEFAULT_MODEL: _Kept(engine)}, worker_id="w-engine")
        running = asyncio.create_task(worker.run(drain_timeout_s=5))
        await asyncio.wait_for(worker.ready.wait(), 30)
        _, key = await apikeys.create(redis, tenant="acme", role="submit")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        http = uvicorn.Server(uvicorn.Config(create_app(settings, server.url), lifespan="on",
                                             ws="none", log_config=None, access_log=False))
        serving = asyncio.create_task(http.serve(sockets=[sock]))
        while not http.started:
            await asyncio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", key
        finally:
            http.should_exit = True
            await asyncio.wait_for(serving, 30)
            worker.request_stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(running, 30)
            await redis.aclose()
    await engine.stop()
    gc.collect()


def client(fleet) -> openai.AsyncOpenAI:
    url, key = fleet
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)


async def test_chat_and_text_completions(fleet):
    async with client(fleet) as ai:
        chat = await ai.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,
                                                max_tokens=16, temperature=0)
        text = await ai.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is",
                                           max_tokens=8, temperature=0)
    assert "Tokyo" in chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 10 and 0 < chat.usage.completion_tokens <= 16
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert text.choices[0].text.strip() and text.usage.completion_tokens <= 8


async def test_streaming_sends_the_same_answer_in_pieces(fleet):
    async with client(fleet) as ai:
        whole = await ai.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,
                                                 max_tokens=24, temperature=0)
        stream = await ai.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,
                                                  max_tokens=24, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in stream:
            usage = chunk.usage or usage
            pieces += [c.delta.content for c in chunk.choices if c.delta.content]
    assert len(pieces) > 3  # deltas as the engine made them, not one block at the end
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens


async def test_a_batch_through_files_and_batches(fleet):
    lines = b"".join(json.dumps({"custom_id": f"q{i}", "method": "POST",
                                 "url": "/v1/chat/completions",
                                 "body": {"model": DEFAULT_MODEL, "max_tokens": 8,
                                          "temperature": 0, "messages": [
                                              {"role": "user", "content": f"Count to {i}."}]}}
                                ).encode() + b"\n" for i in range(1, 4))
    async with client(fleet) as ai:
        upload = await ai.files.create(file=("q.jsonl", lines), purpose="batch")
        batch = await ai.batches.create(input_file_id=upload.id,
                                        endpoint="/v1/chat/completions", completion_window="1h")
        deadline = time.monotonic() + 300
        while (batch := await ai.batches.retrieve(batch.id)).status != "completed":
            assert batch.status in ("validating", "in_progress", "finalizing"), batch
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)
        output = (await ai.files.content(batch.output_file_id)).content
    rows = [json.loads(line) for line in output.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == ["q1", "q2", "q3"]
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] for r in rows)


async def test_a_prompt_over_the_context_is_a_400_from_the_engine(fleet):
    long_prompt = "word " * 700  # under the character limit, over 511 tokens
    async with client(fleet) as ai:
        with pytest.raises(openai.BadRequestError) as refused:
            await ai.completions.create(model=DEFAULT_MODEL, prompt=long_prompt, max_tokens=4)
    assert refused.value.body["code"] == "prompt_too_long"
