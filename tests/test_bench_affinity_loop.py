"""bench/gpu/affinity.py's agents through a fleet (here on the fake engine): all started at
once, or a closed loop of N agents in flight; every chain's steps come back, and no more
than N agents run at once."""

from __future__ import annotations

import msgspec

from bench.gpu.affinity import ChainWorkload, _fleet_agents
from bench.gpu.common import MODEL_NAME
from agentfleet.schemas.settings import ModelSpec
from agentfleet.workers.fake_engine import FakeEngine


def _work(agents: int, in_flight: int) -> ChainWorkload:
    return ChainWorkload(systems=["You are kind 0.", "You are kind 1."],
                         kinds=[a % 2 for a in range(agents)],
                         firsts=[f"Case {a}" for a in range(agents)],
                         followups=["Step 2: go on.", "Step 3: go on."], max_tokens=4,
                         system_tokens=4, in_flight=in_flight)


async def test_agents_all_at_once_and_in_a_closed_loop(producer, start_worker, settings):
    s = msgspec.structs.replace(settings, models={
        MODEL_NAME: ModelSpec(name=MODEL_NAME, max_model_len=512)}, default_model=MODEL_NAME)
    await start_worker((MODEL_NAME,), engines={MODEL_NAME: FakeEngine(delay_s=0.02)},
                       worker_settings=s)
    producer.settings = s
    results = await _fleet_agents(producer, _work(13, 0), list(range(6)), 30)
    assert sorted(r.task_id for r in results) == sorted(
        f"a{a}" + ".1" * step for a in range(6) for step in range(3))
    assert all(r.ok for r in results)

    results = await _fleet_agents(producer, _work(13, 2), list(range(6, 13)), 30)
    assert len(results) == 21 and all(r.ok for r in results)
    # A closed loop of 2: an agent's first step is queued only when one of the 2 running
    # agents has ended, so the (i+2)-th first step comes after the i-th chain's last step.
    firsts = sorted(r.timings.enqueued for r in results if "." not in r.task_id)
    lasts = sorted(r.timings.finished for r in results if r.task_id.count(".") == 2)
    assert all(firsts[i + 2] >= lasts[i] for i in range(len(firsts) - 2)), (firsts, lasts)
    all_at_once = await _fleet_agents(producer, _work(20, 0), list(range(13, 20)), 30)
    firsts = sorted(r.timings.enqueued for r in all_at_once if "." not in r.task_id)
    lasts = sorted(r.timings.finished for r in all_at_once if r.task_id.count(".") == 2)
    assert firsts[-1] < lasts[0]  # the check above can fail: all at once, it does
