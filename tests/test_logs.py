"""Structured logs: JSON lines with context, readable text on a terminal, and the CLI's set-up."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from agentfleet.ops.logs import JsonFormatter, TextFormatter, setup_logging
from agentfleet.schemas.errors import FatalConfigError
from agentfleet.schemas.wire import Task

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def root_logging():
    """setup_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _record(msg: str, *args, exc_info=None, **extra) -> logging.LogRecord:
    record = logging.getLogger("agentfleet.test").makeRecord(
        "agentfleet.test", logging.ERROR, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_json_line_carries_the_context_given_with_extra():
    line = JsonFormatter({"worker": "host-1"}).format(_record(
        "model %s: %d failed", "m1", 3, model="m1", task_id="t-1", correlation_id="c-1",
        window_id="host-1/m1/7", batch_id="job-1", error_code="engine_error",
        unrelated=object()))
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == "model m1: 3 failed"
    assert out["level"] == "error" and out["logger"] == "agentfleet.test"
    assert out["ts"].endswith("Z") and out["ts"][:2] == "20"
    assert {k: out[k] for k in ("model", "task_id", "correlation_id", "window_id",
                                "batch_id", "worker", "error_code")} == {
        "model": "m1", "task_id": "t-1", "correlation_id": "c-1", "window_id": "host-1/m1/7",
        "batch_id": "job-1", "worker": "host-1", "error_code": "engine_error"}
    assert "unrelated" not in out  # only the known context fields, never arbitrary objects


def test_json_line_holds_the_traceback_and_survives_odd_values():
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed", exc_info=sys.exc_info(), model=("not", "a", "string"))
    out = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in out["exc"] and "Traceback" in out["exc"]
    assert out["model"] == ["not", "a", "string"]
    weird = json.loads(JsonFormatter().format(_record("x", task_id=object())))
    assert weird["task_id"].startswith("<object object at")


def test_text_line_ends_with_the_context():
    line = TextFormatter().format(_record("commit refused", model="m1", task_id="t-9"))
    assert line.endswith("ERROR agentfleet.test: commit refused [model=m1 task_id=t-9]")
    assert TextFormatter().format(_record("plain")).endswith("agentfleet.test: plain")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_text_on_a_terminal_and_json_elsewhere(root_logging):
    tty, pipe = _Tty(), io.StringIO()
    setup_logging("auto", stream=tty)
    logging.getLogger("agentfleet.x").info("hello %s", "you", extra={"model": "m1"})
    assert tty.getvalue().rstrip().endswith("agentfleet.x: hello you [model=m1]")
    setup_logging("auto", stream=pipe, worker_id="w-9")
    logging.getLogger("agentfleet.x").info("hello")
    out = json.loads(pipe.getvalue())
    assert out["msg"] == "hello" and out["worker"] == "w-9"
    assert len(logging.getLogger().handlers) == 1  # replaced, not stacked
    setup_logging("json", stream=tty)
    logging.getLogger("agentfleet.x").warning("forced")
    assert json.loads(tty.getvalue().splitlines()[-1])["msg"] == "forced"
    setup_logging("text", stream=pipe)
    logging.getLogger("agentfleet.x").warning("readable")
    assert pipe.getvalue().splitlines()[-1].endswith("agentfleet.x: readable")


def test_bad_log_format_is_named(root_logging):
    with pytest.raises(FatalConfigError, match="AGENTFLEET_LOG_FORMAT='xml'"):
        setup_logging("xml")


async def test_worker_failure_lines_carry_task_context(producer, start_worker, root_logging):
    stream = io.StringIO()
    setup_logging("json", stream=stream, worker_id="w1")
    await start_worker()
    task_id = await producer.submit(Task(model="m2", prompt="x", correlation_id="chain-5",
                                         metadata={"fake_error": "internal"}))
    await producer.wait(task_id, timeout_s=5)
    deadline = time.monotonic() + 5  # the line is written right after the commit returns
    while True:
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        failed = [out for out in lines if out.get("error_code") == "internal"]
        if failed or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert failed, lines
    assert failed[0]["level"] == "error"
    assert (failed[0]["model"], failed[0]["task_id"], failed[0]["correlation_id"],
            failed[0]["worker"]) == ("m2", task_id, "chain-5", "w1")
    assert failed[0]["window_id"].startswith("w1/m2/")


async def test_cli_worker_writes_json_lines_when_not_on_a_terminal(server, tmp_path):
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ENGINE": "fake",
           "AGENTFLEET_WORKER_ID": "json-worker", "AGENTFLEET_METRICS_PORT": "0",
           "AGENTFLEET_HOME": str(tmp_path), "AGENTFLEET_BLOCK_MS": "20"}
    env.pop("AGENTFLEET_LOG_FORMAT", None)  # auto: stderr is a pipe here
    proc = subprocess.Popen([sys.executable, "-m", "agentfleet", "worker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        seen = [await asyncio.to_thread(proc.stderr.readline)]
        while "serving" not in seen[-1] and time.monotonic() < deadline and seen[-1]:
            seen.append(await asyncio.to_thread(proc.stderr.readline))
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    lines = [json.loads(line) for line in [*seen, *rest.splitlines()] if line.strip()]
    serving = [out for out in lines if "serving" in out["msg"]]
    assert serving and serving[0]["worker"] == "json-worker"
    assert all(out["worker"] == "json-worker" for out in lines)
    assert any("draining" in out["msg"] for out in lines)
