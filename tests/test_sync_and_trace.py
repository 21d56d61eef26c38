"""The blocking client, and the trace timeline."""

from __future__ import annotations

import asyncio

import pytest

from agentfleet.ops.trace import load_trace, render
from agentfleet.producer.sync import SyncProducer
from agentfleet.schemas.wire import FollowUp, Task


@pytest.mark.cluster_too
async def test_sync_producer_round_trip(server, settings, start_worker):
    await start_worker()

    def use_it() -> tuple:
        with SyncProducer.from_url(server.url, settings=settings) as p:
            one = p.wait(p.submit(model="m1", prompt="sync hello"), timeout_s=5)
            ids = p.submit_many([Task(model="m2", prompt=f"n{i}") for i in range(50)])
            streamed = [r.task_id for r in p.as_completed(ids, timeout_s=5)]
            chain = p.wait_chain(p.submit(model="m1", prompt="a",
                                          followups=[FollowUp(prompt="b {output}")]), 5)
            return one, ids, streamed, chain

    one, ids, streamed, chain = await asyncio.to_thread(use_it)
    assert one.text == "echo: sync hello"
    assert sorted(streamed) == sorted(ids)
    assert [r.text for r in chain] == ["echo: a", "echo: b echo: a"]


@pytest.mark.cluster_too
async def test_trace_timeline_of_a_chain(producer, start_worker, redis, settings):
    await start_worker()
    root = Task(model="m1", prompt="one", correlation_id="c-9", agent_id="agent-7",
                followups=[FollowUp(model="m2", prompt="two {output}"),
                           FollowUp(prompt="three {output}")])
    await producer.wait_chain(await producer.submit(root), timeout_s=5)
    text = render("c-9", await load_trace(redis, settings, "c-9"))
    lines = text.splitlines()
    assert lines[0].startswith("correlation c-9: 3 finished task(s) on m1, m2")
    assert lines[1].split()[:3] == ["+0.000s", root.id, "enqueued"]
    assert sum("follow-up" in line for line in lines) == 2
    assert sum("result written" in line for line in lines) == 3
    assert any("read by w1" in line and "window w1/m1/" in line for line in lines)


async def test_trace_of_a_lone_task_comes_from_its_result(producer, start_worker, redis,
                                                           settings):
    await start_worker()
    task_id = await producer.submit(model="m1", prompt="alone")
    await producer.wait(task_id, timeout_s=5)
    text = render(task_id, await load_trace(redis, settings, task_id))
    assert "1 finished task(s) on m1" in text and "engine start" in text


async def test_trace_of_unknown_id(redis, settings):
    assert "no trace" in render("nope", await load_trace(redis, settings, "nope"))
