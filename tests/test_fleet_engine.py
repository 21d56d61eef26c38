"""The whole fleet through the real vLLM engine on the CPU: a worker process (`agentfleet
worker`), a real server, the producer, a two-step chain with the real SmolLM2-135M."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from agentfleet.ops.embedded import ServerProcess
from agentfleet.ops.trace import load_trace, render
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.settings import DEFAULT_MODEL, Settings
from agentfleet.schemas.wire import FollowUp, Message, Sampling, Status, Task

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
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ENGINE": "vllm",
           "AGENTFLEET_MODELS_FILE": str(tmp / "models.toml"),
           "AGENTFLEET_WORKER_ID": "engine-worker", "AGENTFLEET_METRICS_PORT": "0"}
    worker = subprocess.Popen([sys.executable, "-m", "agentfleet", "worker"], env=env)
    settings = Settings.from_env({"AGENTFLEET_MODELS_FILE": str(tmp / "models.toml")})
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
            messages=[Message(role="user", content="What is the capital of France?")],
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
        assert first.ok and "Paris" in first.text, first
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
