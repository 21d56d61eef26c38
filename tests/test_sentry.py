"""Sentry: events reach a local endpoint tagged with correlation id, model and worker, and
without prompt or output text.

The SDK keeps global state (hooks on logging, threads, the excepthook), so every process that
turns it on is a child process here; the endpoint is a tiny HTTP server in the test that
records the envelopes the SDK posts.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agentfleet.ops.embedded import free_port
from agentfleet.ops.sentry import SCRUBBED, before_send, scrub, tag_from_extra

pytestmark = pytest.mark.timeout(90)

SECRET_PROMPT = "SECRET-PROMPT-4242 do not ship me"
SECRET_OUTPUT = "SECRET-OUTPUT-1717"


class Sink:
    """Envelopes posted to /api/<project>/envelope/, decoded."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                sink.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.dsn = f"http://publickey@127.0.0.1:{self.server.server_port}/42"

    def events(self) -> list[dict]:
        out = []
        for body in self.bodies:
            lines = body.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2]):
                if json.loads(header).get("type") == "event":
                    out.append(json.loads(payload))
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def _tags(event: dict) -> dict:
    tags = event.get("tags") or {}
    return dict(tags) if isinstance(tags, list) else tags


# A worker process with Sentry on, serving m1 on a test-double engine that raises for one
# prompt (an engine bug) and answers the others with a secret text.
WORKER_SCRIPT = textwrap.dedent('''
    import asyncio, os, sys, time
    from agentfleet.ops.sentry import init_sentry
    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.settings import ModelSpec, Settings
    from agentfleet.schemas.wire import Task
    from agentfleet.workers.fake_engine import FakeEngine
    from agentfleet.workers.worker import Worker

    class BuggyEngine(FakeEngine):
        """A test double: raises in submit for 'BREAK' prompts, answers a secret otherwise."""
        def submit(self, requests, on_done, *, salts=None):
            for _, task in requests:
                if "BREAK" in task.prompt:
                    raise RuntimeError("engine bug while starting a window")
            def done(out):
                out.text = os.environ["SECRET_OUTPUT"]
                on_done(out)
            super().submit(requests, done)

    async def main():
        settings = Settings(models={"m1": ModelSpec(name="m1")}, default_model="m1",
                            engine="fake", block_ms=20, retry_base_s=0.05,
                            sentry_dsn=os.environ["DSN"])
        assert init_sentry(settings, component="worker", worker_id="sentry-w")
        redis = connect(os.environ["URL"])
        await redis.flushall()
        worker = Worker(settings, redis, {"m1": BuggyEngine()}, worker_id="sentry-w")
        run = asyncio.create_task(worker.run())
        await worker.ready.wait()
        async with Producer(connect(os.environ["URL"]), settings=settings) as p:
            secret = os.environ["SECRET_PROMPT"]
            # One after the other: the buggy engine fails a whole window, not one task.
            ok = await p.submit(model="m1", prompt=secret, correlation_id="corr-ok")
            results = [await p.wait(ok, timeout_s=20)]
            bad = await p.submit(model="m1", prompt="BREAK " + secret,
                                 correlation_id="corr-bad")
            results.append(await p.wait(bad, timeout_s=20))
            print([r.status.value for r in results], flush=True)
        await asyncio.sleep(0.2)  # the failure line is logged right after its commit
        worker.request_stop()
        await run
        await redis.aclose()

    asyncio.run(main())
    import sentry_sdk
    sentry_sdk.flush(10)
''')


async def test_worker_errors_reach_sentry_tagged_and_scrubbed(sink, server, tmp_path):
    script = tmp_path / "worker_with_sentry.py"
    script.write_text(WORKER_SCRIPT)
    env = {**os.environ, "URL": server.url, "DSN": sink.dsn, "SECRET_PROMPT": SECRET_PROMPT,
           "SECRET_OUTPUT": SECRET_OUTPUT, "PYTHONPATH": os.getcwd()}
    out = await asyncio.to_thread(subprocess.run, [sys.executable, str(script)], env=env,
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "['succeeded', 'dead_lettered']" in out.stdout
    events = sink.events()
    raw = b"".join(sink.bodies)
    assert SECRET_PROMPT.encode() not in raw and b"SECRET-PROMPT" not in raw
    assert SECRET_OUTPUT.encode() not in raw
    # The engine bug: an exception event, its frames' variables present but scrubbed.
    crashes = [e for e in events if e.get("exception")
               and e["exception"]["values"][-1]["type"] == "RuntimeError"]
    assert crashes, [e.get("logentry") for e in events]
    assert _tags(crashes[0])["worker"] == "sentry-w"
    assert _tags(crashes[0])["component"] == "worker"
    frames = crashes[0]["exception"]["values"][-1]["stacktrace"]["frames"]
    assert any(f.get("vars") for f in frames)
    assert SCRUBBED in json.dumps(frames)
    # The task that exhausted its attempts: one event tagged with its chain, model and worker.
    failed = [e for e in events if _tags(e).get("error_code") == "attempts_exhausted"]
    assert len(failed) == 1, [_tags(e) for e in events]
    tags = _tags(failed[0])
    assert (tags["correlation_id"], tags["model"], tags["worker"]) == ("corr-bad", "m1",
                                                                       "sentry-w")
    assert tags["task_id"]
    # The task that succeeded sends nothing.
    assert not [e for e in events if _tags(e).get("correlation_id") == "corr-ok"]


async def test_cli_reports_a_broker_error_and_scrubs_the_prompt(sink, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = {**os.environ, "REDIS_URL": dead, "SENTRY_DSN": sink.dsn,
           "AGENTFLEET_HOME": str(tmp_path), "AGENTFLEET_SERVER_WAIT_S": "0.2"}
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "agentfleet", "submit", "--prompt", SECRET_PROMPT,
                         "--wait-s", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr  # the server is unreachable
    assert f"the server at {dead} is unreachable" in out.stderr
    events = sink.events()
    assert SECRET_PROMPT.encode() not in b"".join(sink.bodies)
    broker = [e for e in events if e.get("exception")
              and e["exception"]["values"][-1]["type"] == "ServerUnreachableError"]
    assert broker, events
    assert _tags(broker[0])["component"] == "submit"
    assert any(f.get("vars") for v in broker[0]["exception"]["values"]
               for f in v["stacktrace"]["frames"])


async def test_producer_calls_tagged_by_sentry_tags(sink, tmp_path):
    script = tmp_path / "producer_with_sentry.py"
    script.write_text(textwrap.dedent('''
        import asyncio, os
        import sentry_sdk
        from agentfleet.ops.sentry import init_sentry, sentry_tags
        from agentfleet.producer.client import Producer
        from agentfleet.producer.connection import connect
        from agentfleet.schemas.errors import BrokerError
        from agentfleet.schemas.settings import Settings

        async def main():
            settings = Settings(sentry_dsn=os.environ["DSN"])
            init_sentry(settings, component="producer")
            p = Producer(connect(os.environ["URL"]), settings=settings)
            with sentry_tags(model="smollm2-135m", correlation_id="corr-p1"):
                try:
                    await p.submit(model="smollm2-135m", prompt=os.environ["SECRET_PROMPT"],
                                   correlation_id="corr-p1")
                except BrokerError:
                    sentry_sdk.capture_exception()
            await p.close()

        asyncio.run(main())
        sentry_sdk.flush(10)
    '''))
    env = {**os.environ, "URL": f"redis://127.0.0.1:{free_port()}/0", "DSN": sink.dsn,
           "SECRET_PROMPT": SECRET_PROMPT, "PYTHONPATH": os.getcwd()}
    out = await asyncio.to_thread(subprocess.run, [sys.executable, str(script)], env=env,
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    (event,) = sink.events()
    assert SECRET_PROMPT.encode() not in b"".join(sink.bodies)
    tags = _tags(event)
    assert (tags["component"], tags["model"], tags["correlation_id"]) == (
        "producer", "smollm2-135m", "corr-p1")


def test_scrub_removes_text_everywhere_it_hides():
    event = {
        "extra": {"model": "m1", "correlation_id": "c-1", "prompt": "hide me", "n": 3,
                  "sys.argv": ["cli.py", "submit", "--prompt", "hide me", "--prompt=hide me",
                               "--wait-s", "0"]},
        "breadcrumbs": {"values": [{"message": "ok", "data": {"text": "hide me"}}]},
        "exception": {"values": [{"stacktrace": {"frames": [{"vars": {
            "task": "Task(v=1, id='t1', prompt='hide \\'quoted\\' me', model='m1')",
            "out": 'EngineOutput(request_id="r", text="hide me", finish_reason="stop")',
            "cut": "Task(id='t2', prompt='hide me but Sentry cut this sh...",
            "msg": "Message(role='user', content='hide me')",
            "args": ["b'\\x82\\xa4text\\xa7hide me'", 'b"hide me"', 42],
            "messages": [{"role": "user", "content": "hide me"}],
            "entry_id": "1-0",
        }}]}}]},
    }
    out = before_send(event, {})
    assert "hide" not in json.dumps(out)
    assert out["tags"] == {"model": "m1", "correlation_id": "c-1"}
    frame = out["exception"]["values"][0]["stacktrace"]["frames"][0]["vars"]
    assert frame["task"] == f"Task(v=1, id='t1', prompt='{SCRUBBED}', model='m1')"
    assert frame["entry_id"] == "1-0" and frame["args"][2] == 42
    assert out["extra"]["n"] == 3
    assert out["extra"]["sys.argv"] == ["cli.py", "submit", "--prompt", SCRUBBED,
                                        f"--prompt={SCRUBBED}", "--wait-s", "0"]


def test_tags_only_when_text_is_allowed():
    event = tag_from_extra({"extra": {"worker": "w1", "prompt": "kept"}})
    assert event["tags"] == {"worker": "w1"} and event["extra"]["prompt"] == "kept"
    assert scrub("no text here") == "no text here"
