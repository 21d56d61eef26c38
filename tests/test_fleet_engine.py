"""The whole fleet through the real vLLM engine on the CPU: a worker process (`agentfleet
worker`), a real server, the producer, a two-step chain with the real SmolLM2-135M.  The
worker and producer run with affinity partitions on (docs/affinity.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from agentfleet.ops.embedded import ServerProcess, free_port
from agentfleet.ops.trace import load_trace, render
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.settings import DEFAULT_MODEL, Settings
from agentfleet.schemas.wire import (
    Condition,
    FollowUp,
    JsonSchema,
    Message,
    ResponseFormat,
    Sampling,
    Status,
    Task,
)
from agentfleet.workers.structured import schema_error

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

MODELS_TOML = f"""
[models.{DEFAULT_MODEL}]
max_model_len = 512
max_num_seqs = 16
kv_cache_space_gib = 1
enforce_eager = true
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    (tmp / "models.toml").write_text(MODELS_TOML)
    server = ServerProcess(tmp / "server", appendonly=False)
    server.start()
    port = free_port()
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ENGINE": "vllm",
           "AGENTFLEET_MODELS_FILE": str(tmp / "models.toml"),
           "AGENTFLEET_WORKER_ID": "engine-worker", "AGENTFLEET_METRICS_PORT": str(port),
           "AGENTFLEET_AFFINITY_PARTITIONS": "4"}
    worker = subprocess.Popen([sys.executable, "-m", "agentfleet", "worker"], env=env)
    settings = Settings.from_env({"AGENTFLEET_MODELS_FILE": str(tmp / "models.toml"),
                                  "AGENTFLEET_AFFINITY_PARTITIONS": "4"})
    worker.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield server, settings, worker
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(120) == 0  # drains and exits cleanly
    server.stop()


async def test_two_step_chain_through_the_real_engine(fleet):
    server, settings, worker = fleet
    producer = Producer(connect(server.url), settings=settings)
    try:
        root = Task(
            model=DEFAULT_MODEL, agent_id="agent-1", correlation_id="engine-chain",
            messages=[Message(role="user", content="What is the capital of Japan?")],
            sampling=Sampling(max_tokens=12),
            followups=[FollowUp(prompt="Repeat this in one word: {output}",
                                sampling=Sampling(max_tokens=6))],
        )
        long_prompt = Task(model=DEFAULT_MODEL, prompt="word " * 700,  # ~700 tokens > 512
                           sampling=Sampling(max_tokens=4))
        root_id, long_id = await producer.submit_many([root, long_prompt])
        deadline = time.monotonic() + 600
        while not await producer.redis.hlen(keys.workers_key(DEFAULT_MODEL)):
            assert worker.poll() is None, "the worker died while starting its engine"
            assert time.monotonic() < deadline
            time.sleep(0.5)
        first, second = await producer.wait_chain(root_id, timeout_s=600)
        assert first.ok and "Tokyo" in first.text, first
        assert second.ok and second.parent_id == root_id and second.text.strip()
        for r in (first, second):
            t = r.timings
            assert r.prompt_tokens > 0 and 0 < r.output_tokens <= 12
            assert t.enqueued <= t.read <= t.engine_start <= t.first_token <= t.finished
            assert t.finished <= t.written
            assert r.model_version.startswith(DEFAULT_MODEL)
            assert r.worker_id == "engine-worker"
        refused = await producer.wait(long_id, timeout_s=60)
        assert refused.status is Status.FAILED
        assert refused.error_code is ErrorCode.PROMPT_TOO_LONG
        trace = render("engine-chain", await load_trace(producer.redis, settings,
                                                        "engine-chain"))
        assert "first token" in trace and "follow-up enqueued" in trace
    finally:
        await producer.close()


TRIAGE = {"type": "object", "required": ["category", "summary"], "additionalProperties": False,
          "properties": {"category": {"type": "string", "enum": ["refund", "bug"]},
                         "summary": {"type": "string", "maxLength": 60}}}
REFUND = {"type": "object", "required": ["approve", "reply"], "additionalProperties": False,
          "properties": {"approve": {"type": "boolean"},
                         "reply": {"type": "string", "maxLength": 60}}}
BUG = {"type": "object", "required": ["severity", "component"], "additionalProperties": False,
       "properties": {"severity": {"type": "string", "enum": ["low", "high"]},
                      "component": {"type": "string", "maxLength": 30}}}
CUSTOMERS = ["I was charged twice for my order, please give me my money back.",
             "The app crashes every time I open the settings page.",
             "Refund please: the shoes I got are the wrong size.",
             "Error 500 when I click save; the page is broken."]


def _json(schema: dict) -> ResponseFormat:
    return ResponseFormat(type="json_schema", json_schema=JsonSchema(name="out", schema=schema))


async def test_a_triage_chain_with_a_schema_and_two_branches_through_the_real_engine(fleet):
    """Issue 16's CPU target: a JSON-schema triage step, a refund desk and a bug desk each
    with its own schema, taken by the triage's category; every result parses against its
    schema (vLLM's structured outputs on SmolLM2-135M)."""
    server, settings, worker = fleet
    producer = Producer(connect(server.url), settings=settings)
    try:
        roots = [Task(
            model=DEFAULT_MODEL, correlation_id=f"triage-{i}", sampling=Sampling(max_tokens=48),
            retry_max_tokens=192,
            messages=[Message(role="system", content="Sort the customer's message: category "
                              "refund (money back) or bug (the product is broken)."),
                      Message(role="user", content=text)],
            response_format=_json(TRIAGE),
            followups=[
                FollowUp(when=Condition(field="category", equals="refund"), agent_id="refunds",
                         prompt="Refund request: {output.summary}\nDecide and reply.",
                         response_format=_json(REFUND), retry_max_tokens=192),
                FollowUp(when=Condition(field="category", equals="bug"), agent_id="bugs",
                         prompt="Bug report: {output.summary}\nRate it.",
                         response_format=_json(BUG), retry_max_tokens=192)])
            for i, text in enumerate(CUSTOMERS)]
        ids = await producer.submit_many(roots)
        taken = set()
        for root_id in ids:
            first, *rest = await producer.wait_chain(root_id, timeout_s=600)
            assert first.ok, (first.error_code, first.error_message, first.text)
            assert not schema_error(TRIAGE, first.parsed), first.text
            [desk] = rest  # exactly one branch, the one its category names
            category = first.parsed["category"]
            assert desk.agent_id == {"refund": "refunds", "bug": "bugs"}[category]
            assert desk.ok, (desk.error_code, desk.error_message, desk.text)
            assert not schema_error(REFUND if category == "refund" else BUG, desk.parsed)
            assert first.skipped == [f"{2 if category == 'refund' else 1}: category == "
                                     f"{'bug' if category == 'refund' else 'refund'!r}"]
            taken.add(category)
        trace = render("triage-0", await load_trace(producer.redis, settings, "triage-0"))
        assert "(not taken) follow-up" in trace and "when category ==" in trace
        print(f"branches taken: {sorted(taken)}")
    finally:
        await producer.close()


def _metric(url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{"))


async def test_a_continued_chain_finds_its_parents_prefix_in_the_cache(fleet):
    """Issue 18, item 3: each step of a chain continuing its conversation starts with its
    parent's tokens, so the engine's prefix cache holds them (hits go up by at least the
    system prompt's blocks per step); the chain kept its affinity key and partition."""
    server, settings, worker = fleet
    producer = Producer(connect(server.url), settings=settings)
    try:
        system = "You are a support agent for a shoe shop. " * 25  # ~250 tokens
        root = Task(model=DEFAULT_MODEL, messages=[Message(role="system", content=system),
                                                   Message(role="user", content="Hello.")],
                    sampling=Sampling(max_tokens=8),
                    followups=[FollowUp(prompt="Go on.", continue_conversation=True,
                                        followups=[FollowUp(prompt="Once more.",
                                                            continue_conversation=True)])])
        deadline = time.monotonic() + 600
        while not await producer.redis.hlen(keys.workers_key(DEFAULT_MODEL)):
            assert worker.poll() is None, "the worker died while starting its engine"
            assert time.monotonic() < deadline
            time.sleep(0.5)
        hits = _metric(worker.metrics_url, "agentfleet_engine_prefix_cache_hits_total")
        root_id = await producer.submit(root)
        results = await producer.wait_chain(root_id, timeout_s=600)
        assert [r.ok for r in results] == [True, True, True]
        assert results[2].prompt_tokens > results[1].prompt_tokens > results[0].prompt_tokens
        gained = _metric(worker.metrics_url, "agentfleet_engine_prefix_cache_hits_total") - hits
        # Steps 2 and 3 each find their parent's prompt in the cache, in whole blocks (16
        # tokens on GPUs, 128 on the CPU backend): at least half of it each.
        assert gained >= (results[0].prompt_tokens + results[1].prompt_tokens) / 2, gained
        assert root.affinity_key.startswith("h:")
        assert _metric(worker.metrics_url, "agentfleet_affinity_hits_total") >= 3
    finally:
        await producer.close()
