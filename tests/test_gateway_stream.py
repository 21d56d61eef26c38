"""Streaming: the worker publishes partial output of streaming tasks only, coalesced; the
gateway sends it as server-sent events to the openai client; a client that leaves cancels."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from agentfleet.schemas import keys
from agentfleet.schemas.wire import Task
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.streaming import PartialPublisher

PROMPT = "the quick brown fox jumps over the lazy dog"


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


async def test_publisher_coalesces_a_loop_pass_into_one_entry(redis):
    publisher = PartialPublisher(redis, ttl_s=60)
    task = Task(id="t1", model="m1", prompt="x", stream=True)
    for i in range(100):
        publisher.delta(task, f"w{i} ", i + 1)
    publisher.final(task, "stop", 100)
    await publisher.close()
    entries = await redis.xrange(keys.partial_stream("m1", "t1"))
    assert len(entries) == 2  # one delta entry holding all 100, then the end
    assert entries[0][1][b"d"] == "".join(f"w{i} " for i in range(100)).encode()
    assert entries[0][1][b"n"] == b"100" and entries[1][1][b"f"] == b"stop"
    assert 0 < await redis.ttl(keys.partial_stream("m1", "t1")) <= 60


async def test_streamed_chat_arrives_token_by_token_and_equals_the_answer(gateway, api_key,
                                                                         start_worker, redis):
    await start_worker(engines={"m1": FakeEngine(token_delay_s=0.03), "m2": FakeEngine()})
    url, _ = await gateway()
    messages = [{"role": "user", "content": PROMPT}]
    async with client(url, await api_key()) as ai:
        whole = await ai.chat.completions.create(model="m1", messages=messages)
        pieces, arrivals, finish, usage = [], [], None, None
        stream = await ai.chat.completions.create(model="m1", messages=messages, stream=True,
                                                  stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                    arrivals.append(time.monotonic())
                finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) == len(whole.choices[0].message.content.split())  # a chunk per word
    assert arrivals[-1] - arrivals[0] > 0.03 * (len(pieces) - 2)  # as made, not at the end
    assert finish == "stop" and usage.completion_tokens == whole.usage.completion_tokens
    assert not await redis.keys("af:{m1}:partial:*")  # read and dropped


async def test_text_completion_streams_too(gateway, api_key, start_worker):
    await start_worker()
    url, _ = await gateway()
    async with client(url, await api_key()) as ai:
        stream = await ai.completions.create(model="m2", prompt="one two three", stream=True)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == "echo: one two three"


async def test_tasks_that_do_not_stream_publish_nothing(gateway, api_key, start_worker, redis):
    worker = await start_worker()
    url, _ = await gateway()
    async with client(url, await api_key()) as ai:
        for _ in range(5):
            await ai.chat.completions.create(model="m1",
                                             messages=[{"role": "user", "content": "hi"}])
    assert worker.partials.published == 0
    assert not await redis.keys("af:*:partial:*")


class _Failing(FakeEngine):
    """Fails every request with an engine error (retried, then dead-lettered)."""

    def submit(self, requests, on_done) -> None:
        for request_id, task in requests:
            task.metadata = {**task.metadata, "fake_error": "engine_error"}
        super().submit(requests, on_done)


async def test_a_failed_streaming_task_ends_with_an_error_event(gateway, api_key, start_worker):
    await start_worker(engines={"m1": _Failing(), "m2": FakeEngine()})
    url, _ = await gateway()
    async with client(url, await api_key()) as ai:
        stream = await ai.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "doomed"}], stream=True)
        with pytest.raises(openai.APIError) as failed:
            async for _ in stream:
                pass
    assert "attempts failed" in failed.value.message


async def test_a_client_that_leaves_mid_stream_cancels_its_task(gateway, api_key, start_worker,
                                                               redis):
    engines = {"m1": FakeEngine(token_delay_s=0.2), "m2": FakeEngine()}
    await start_worker(engines=engines)
    url, gw = await gateway()
    async with client(url, await api_key()) as ai:
        stream = await ai.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": PROMPT}], stream=True)
        got = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
                if got == 2:
                    break
        await stream.close()
    deadline = time.monotonic() + 5
    while not await redis.zcard(keys.cancelled_key("m1")):
        assert time.monotonic() < deadline, "the task was not cancelled"
        await asyncio.sleep(0.05)
    task_id = (await redis.zrange(keys.cancelled_key("m1"), 0, 0))[0].decode()
    result = await gw.producer.wait(task_id, timeout_s=5)
    assert result.status.value == "cancelled" and result.finish_reason == "abort"
