"""Capacity: backlog tokens (exporter), `agentfleet plan`, on real servers with real workers."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agentfleet.ops.capacity import (
    DEFAULT_TASK_TOKENS,
    LaneMinute,
    TokenHistory,
    backlog_tokens,
    load_token_history,
)
from agentfleet.ops.exporter import exporter_registry
from agentfleet.ops.plan import PlanInput, compute_plan, measured_throughput, render
from agentfleet.producer.connection import connect_sync
from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError
from agentfleet.schemas.wire import Sampling, Task

pytestmark = pytest.mark.timeout(90)


# ---- the arithmetic ----------------------------------------------------------------------

def test_plan_divides_the_backlog_by_what_a_worker_does_in_the_usable_time():
    # 3.6M tokens; a worker does 100 tokens/s; 2 h deadline minus 10 min start-up.
    plan = compute_plan(PlanInput(model="m", deadline_s=7200, backlog_tokens=3.6e6,
                                  tokens_per_s_per_worker=100, startup_s=600, efficiency=1.0))
    assert plan.usable_s == 6600
    assert plan.workers == 6  # 3.6e6 / (100 * 6600) = 5.45
    assert plan.finish_s == pytest.approx(600 + 3.6e6 / 600)  # 6 workers: 6,600 s
    assert plan.feasible
    # 90% efficiency: 3.6e6 / (90 * 6600) = 6.06 -> 7
    assert compute_plan(PlanInput(model="m", deadline_s=7200, backlog_tokens=3.6e6,
                                  tokens_per_s_per_worker=100, startup_s=600,
                                  efficiency=0.9)).workers == 7
    # exactly divisible: no extra worker
    assert compute_plan(PlanInput(model="m", deadline_s=1100, backlog_tokens=2000,
                                  tokens_per_s_per_worker=1, startup_s=100,
                                  efficiency=1.0)).workers == 2


def test_plan_says_when_the_deadline_cannot_be_met():
    inside_startup = compute_plan(PlanInput(model="m", deadline_s=200, backlog_tokens=1e6,
                                            tokens_per_s_per_worker=100, startup_s=300))
    assert not inside_startup.feasible and math.isinf(inside_startup.finish_s)
    assert "NOT POSSIBLE" in render(inside_startup)
    capped = compute_plan(PlanInput(model="m", deadline_s=3600, backlog_tokens=1e9,
                                    tokens_per_s_per_worker=100, startup_s=0, max_workers=8))
    assert capped.workers > 8 and not capped.feasible
    assert "--max-workers" in render(capped)
    nothing = compute_plan(PlanInput(model="m", deadline_s=60, backlog_tokens=0,
                                     tokens_per_s_per_worker=100))
    assert nothing.workers == 0 and nothing.feasible
    with pytest.raises(AgentFleetError, match="tokens-per-s-per-worker"):
        compute_plan(PlanInput(model="m", deadline_s=60, backlog_tokens=5,
                               tokens_per_s_per_worker=0))
    with pytest.raises(AgentFleetError, match="--efficiency"):
        compute_plan(PlanInput(model="m", deadline_s=60, backlog_tokens=5,
                               tokens_per_s_per_worker=1, efficiency=1.5))


def _history(per_minute: dict[int, int], until: float) -> TokenHistory:
    return TokenHistory(model="m", since=0, until=until, minutes={
        minute: {"bulk": LaneMinute(tasks=1, prompt_tokens=tokens, output_tokens=0)}
        for minute, tokens in per_minute.items()})


def test_throughput_is_the_busiest_quarter_of_finished_minutes_per_live_worker():
    # eight finished minutes (and the current one, still filling up, left out)
    minutes = {60 * i: 600 * i for i in range(1, 9)}
    minutes[60 * 9] = 999_999
    per_worker, notes = measured_throughput(_history(minutes, until=60 * 9 + 30), 2)
    # busiest quarter of 8: minutes with 4,800 and 4,200 tokens -> 75 tokens/s, 2 workers
    assert per_worker == pytest.approx((4800 + 4200) / 120 / 2)
    assert any("busiest 2 of 8 minutes" in n for n in notes)
    assert measured_throughput(_history({}, until=100), 2)[0] == 0
    assert measured_throughput(_history({60: 600}, until=200), 0)[0] == 0


def test_backlog_estimate_uses_the_lanes_mean_then_the_models_then_the_default():
    history = TokenHistory(model="m", since=0, until=120, minutes={60: {
        "interactive": LaneMinute(tasks=4, prompt_tokens=300, output_tokens=100)}})
    got = backlog_tokens({"interactive": 10, "bulk": 3}, history)
    assert got == {"interactive": 1000.0, "bulk": 300.0}  # bulk: the model's mean, 100
    assert backlog_tokens({"bulk": 2}, None) == {"bulk": 2 * DEFAULT_TASK_TOKENS}
    assert math.isnan(backlog_tokens({"bulk": math.nan}, history)["bulk"])


# ---- measured on a real fleet ------------------------------------------------------------

async def _wait_for(check, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def _finished_tokens(redis, model: str) -> tuple[int, int]:
    """(succeeded tasks, prompt + output tokens) summed over the model's kpi hashes."""
    tasks = tokens = 0
    async for key in redis.scan_iter(match=keys.kpi_key(model, 0)[:-1] + "*"):
        for field, raw in (await redis.hgetall(key)).items():
            f = field.decode()
            if f.startswith("s:succeeded:"):
                tasks += int(raw)
            elif f.startswith(("p:", "o:")):
                tokens += int(float(raw))
    return tasks, tokens


@pytest.mark.cluster_too
async def test_exporter_and_plan_measure_backlog_tokens_and_throughput(
        server, redis, producer, start_worker, tmp_path):
    await start_worker(("m1",))
    done = await producer.submit_many(
        [Task(model="m1", prompt="word " * (5 + i % 7), sampling=Sampling(max_tokens=16))
         for i in range(40)])
    results = await producer.wait_many(done, timeout_s=30)
    spent = sum(r.prompt_tokens + r.output_tokens for r in results)
    # The worker writes its per-minute aggregates once a second.
    await _wait_for(lambda: _eq(_finished_tokens(redis, "m1"), (40, spent)))
    mean = spent / 40
    # Bulk work the worker holds (pending) and more it cannot take yet: 25 queued tasks.
    held = [Task(model="m1", prompt="x", batch_id="b1", metadata={"fake_delay_s": "60"})
            for _ in range(25)]
    await producer.submit_many(held)
    await _wait_for(lambda: _pending(redis, "m1", 1))

    client = connect_sync(server.url)
    try:
        text = await asyncio.to_thread(
            lambda: generate_latest(exporter_registry(client, ["m1"])).decode())
        history = (await asyncio.to_thread(load_token_history, client, ["m1"]))["m1"]
    finally:
        client.close()
    found = {(s.name, s.labels.get("lane")): s.value
             for fam in text_string_to_metric_families(text) for s in fam.samples
             if s.name == "agentfleet_queue_backlog_tokens"}
    # No bulk task finished in the last hour: the bulk lane costs the model's mean per task.
    assert found[("agentfleet_queue_backlog_tokens", "bulk")] == pytest.approx(25 * mean)
    assert found[("agentfleet_queue_backlog_tokens", "interactive")] == 0
    assert "ESTIMATE" in text

    models_file = tmp_path / "models.toml"
    models_file.write_text("[models.m1]\nmax_model_len = 512\n")
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_HOME": str(tmp_path),
           "AGENTFLEET_MODELS_FILE": str(models_file), "AGENTFLEET_DEFAULT_MODEL": "m1"}

    def plan(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentfleet", "plan", "--model", "m1",
                               *argv], env=env, capture_output=True, text=True, timeout=30)

    run = await asyncio.to_thread(plan, "--deadline", "1h", "--startup-s", "60", "--json")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["backlog_tokens"] == pytest.approx(25 * mean)
    expected_rate, _ = measured_throughput(history, live_workers=1)
    assert expected_rate > 0
    assert got["tokens_per_s_per_worker"] == pytest.approx(expected_rate, rel=1e-6)
    assert got["workers"] == math.ceil(25 * mean / (expected_rate * 0.9 * 3540))
    assert any("1 live worker(s) now" in a for a in got["assumptions"])

    text_run = await asyncio.to_thread(plan, "--deadline", "30m", "--backlog-tokens", "1e9",
                                       "--tokens-per-s-per-worker", "1000", "--max-workers",
                                       "4", "--startup-s", "0", "--efficiency", "1")
    assert text_run.returncode == 1  # 1e9 / (1000 * 1800) = 556 workers > 4
    assert "workers needed: 556" in text_run.stdout
    assert "as given (--backlog-tokens)" in text_run.stdout
    bad = await asyncio.to_thread(plan, "--deadline", "soon")
    assert bad.returncode == 2 and "--deadline" in bad.stderr
    unknown = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "agentfleet", "plan", "--model", "nope", "--deadline", "1h"],
        env=env, capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 2 and "unknown 'nope'" in unknown.stderr


async def _eq(coro, expected) -> bool:
    return await coro == expected


async def _pending(redis, model: str, n: int) -> bool:
    try:
        info = await redis.xpending(keys.bulk_stream(model), keys.GROUP)
    except Exception:
        return False
    return info["pending"] >= n
