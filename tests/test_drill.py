"""`agentfleet drill` against a local fleet: a real server, real worker processes (fake
engine), and hooks that are local commands (kill -9 of a worker, a script that SIGKILLs the
server and starts it again on the same data)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agentfleet.ops.drill import DrillReport, Step, audit_traces, end_to_end_s, render
from agentfleet.ops.embedded import ServerProcess, valkey_binary
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import Enqueued, Finished, FollowUp, Result, Status, Task, Timings

MODEL = "smollm2-135m"  # the default model's name; the workers run the fake engine
pytestmark = pytest.mark.timeout(150)

RESTART = textwrap.dedent('''\
    """The drill's restart hook in these tests: SIGKILL the server, start it again."""
    import json, os, shutil, signal, socket, subprocess, sys, time
    state = json.load(open(sys.argv[1]))
    os.kill(state["pid"], signal.SIGKILL)
    if "--wipe" in sys.argv:  # a failover to a replica that had nothing: the data is gone
        time.sleep(0.3)
        for name in os.listdir(state["dir"]):
            if name != "server.log":
                path = os.path.join(state["dir"], name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        proc = subprocess.Popen(state["args"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        state["pid"] = proc.pid
        json.dump(state, open(sys.argv[1], "w"))
        for _ in range(100):
            if proc.poll() is not None:
                break  # the port was not free yet: try again
            try:
                with socket.create_connection(("127.0.0.1", state["port"]), 0.5) as s:
                    s.sendall(b"PING\\r\\n")
                    if s.recv(64).startswith(b"+PONG"):
                        sys.exit(0)
            except OSError:
                pass
            time.sleep(0.05)
    sys.exit(1)
''')


class LocalFleet:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.server = ServerProcess(tmp_path / "server", binary=valkey_binary(),
                                    appendfsync="always")
        self.server.start()
        self.state = tmp_path / "server.json"
        self.state.write_text(json.dumps({"pid": self.server.proc.pid, "port": self.server.port,
                                          "dir": str(self.server.data_dir),
                                          "args": self.server._args(self.server.port)}))
        (tmp_path / "restart.py").write_text(RESTART)
        self.workers: list[subprocess.Popen] = []
        self.env = {**os.environ, "REDIS_URL": self.server.url, "AGENTFLEET_ENGINE": "fake",
                    "AGENTFLEET_CLAIM_IDLE_MS": "1000", "AGENTFLEET_BLOCK_MS": "50",
                    "AGENTFLEET_HOME": str(tmp_path), "AGENTFLEET_METRICS_PORT": "0"}
        self.env.pop("AGENTFLEET_WORKER_ID", None)  # the default id: <host>-<pid>

    def worker(self) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "agentfleet", "worker"], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers.append(proc)
        return proc

    def restart_cmd(self, *flags: str) -> str:
        return " ".join([sys.executable, str(self.tmp / "restart.py"), str(self.state), *flags])

    def drill(self, *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentfleet", "drill", *argv],
                              env=self.env, capture_output=True, text=True, timeout=timeout_s)

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        pid = json.loads(self.state.read_text())["pid"]
        if pid != self.server.proc.pid:  # restarted by the hook: not our child any more
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.server.kill()


@pytest.fixture
def local_fleet(tmp_path):
    fleet = LocalFleet(tmp_path)
    yield fleet
    fleet.close()


async def _live(redis, n: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await redis.hlen(keys.workers_key(MODEL)) < n:
        assert time.monotonic() < deadline, "workers did not start"
        await asyncio.sleep(0.1)


async def test_drill_kills_a_worker_restarts_the_server_floods_and_finds_nothing_wrong(
        local_fleet):
    workers = [local_fleet.worker(), local_fleet.worker()]
    redis = connect(local_fleet.server.url)
    bystander = Producer(connect(local_fleet.server.url), settings=Settings.from_env({}),
                         producer_id="other")
    try:
        await _live(redis, 2)
        # Another tenant's chains, running through the drill: it must not touch them.
        others = await bystander.submit_many([
            Task(model=MODEL, id=f"other-{i}", idempotency_key=f"other-{i}", tenant="other",
                 prompt=f"other {i}", metadata={"fake_delay_s": "0.5"},
                 followups=[FollowUp(prompt="again: {output}")]) for i in range(40)])
        run = await asyncio.to_thread(
            local_fleet.drill, "--target", "staging", "--tasks", "60", "--flood-tasks", "300",
            "--metadata", "fake_delay_s=1.0", "--kill-local-worker",
            "--restart-server-cmd", local_fleet.restart_cmd(), "--late-s", "30",
            "--deadline-s", "60", "--json")
        assert run.returncode == 0, run.stdout + run.stderr
        report = json.loads(run.stdout)
        assert report["passed"]
        assert report["submitted"] == report["completed"] == 2 * (60 + 300)
        assert report["lost"] == report["doubled"] == report["late"] == []
        print(run.stderr)  # the drill's steps, shown with a failing test
        steps = {s["name"]: s for s in report["steps"]}
        assert steps["kill worker"]["ok"] and "SIGKILL to worker" in steps["kill worker"]["detail"]
        assert steps["restart server"]["ok"]
        assert sorted(w.poll() is None for w in workers) == [False, True]  # one was killed
        (killed,) = [w for w in workers if w.poll() is not None]
        assert killed.returncode == -signal.SIGKILL
        detail = steps["kill worker"]["detail"]
        assert f"-{killed.pid}" in detail
        held = int(detail.split("it held ")[1].split()[0])
        assert held > 0  # the worker holding the most tasks was the one killed
        # Its tasks were reclaimed (claim idle 1 s) and then took their 1 s again.
        assert report["slowest_s"] >= 2.0
        # The bystander's chains all finished, once, and carry no trace of the drill.
        results = await bystander.wait_many(others + [f"{o}.1" for o in others], timeout_s=30)
        assert all(r.status is Status.SUCCEEDED and r.tenant == "other" for r in results)
        assert not any(r.task_id.startswith("drill-") for r in results)
    finally:
        await bystander.close()
        await redis.aclose()


async def test_drill_reports_tasks_lost_to_a_failover_that_lost_the_data(local_fleet):
    worker = local_fleet.worker()
    redis = connect(local_fleet.server.url)
    try:
        await _live(redis, 1)
    finally:
        await redis.aclose()
    run = await asyncio.to_thread(
        local_fleet.drill, "--target", "staging", "--tasks", "20", "--flood-tasks", "0",
        "--metadata", "fake_delay_s=3", "--kill-worker-cmd",
        'kill -9 "${AGENTFLEET_DRILL_WORKER##*-}"',  # the pid: the worker id is <host>-<pid>
        "--restart-server-cmd", local_fleet.restart_cmd("--wipe"), "--deadline-s", "8")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAILED" in run.stdout
    lost = int(run.stdout.split("lost: ")[1].split()[0])
    assert lost == 40  # every chain: the roots were in the wiped stream, so no follow-ups
    assert worker.poll() == -signal.SIGKILL
    assert "exited 0" in run.stderr and f"-{worker.pid}:" in run.stderr


def test_audit_finds_a_result_or_follow_up_recorded_twice():
    def fin(task_id: str) -> Finished:
        return Finished(result=Result(task_id=task_id, status=Status.SUCCEEDED))

    chains = {
        "a": [Enqueued(task_id="a.1", parent_id="a"), fin("a"), fin("a.1")],
        "b": [Enqueued(task_id="b.1", parent_id="b"), Enqueued(task_id="b.1", parent_id="b"),
              fin("b")],
        "c": [fin("c"), fin("c")],
    }
    assert audit_traces(chains) == ["b.1", "c"]
    late = Result(task_id="x", status=Status.SUCCEEDED,
                  timings=Timings(enqueued=100.0, finished=130.0, written=131.5))
    assert end_to_end_s(late) == 31.5
    report = DrillReport(run_id="r", target="staging", model=MODEL, submitted=4, completed=3,
                         lost=["a.1"], doubled=[], late=["x"], slowest_s=31.5,
                         steps=[Step(name="kill worker", ok=True, detail="done")],
                         fleet_counters={"duplicates": 2, "written": 0}, duration_s=40)
    assert not report.passed
    text = render(report)
    assert "FAILED" in text and "lost: a.1" in text and "late: x" in text
    assert "duplicates +2" in text


def test_drill_refuses_a_production_target_and_a_missing_server(tmp_path):
    env = {**os.environ, "AGENTFLEET_HOME": str(tmp_path), "REDIS_URL": "redis://127.0.0.1:1/0"}
    prod = subprocess.run([sys.executable, "-m", "agentfleet", "drill", "--target",
                           "eu-production"], env=env, capture_output=True, text=True, timeout=30)
    assert prod.returncode == 2 and "--yes" in prod.stderr
    env.pop("REDIS_URL")
    env.pop("AGENTFLEET_REDIS_URL", None)
    none = subprocess.run([sys.executable, "-m", "agentfleet", "drill", "--target", "staging"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert none.returncode == 2 and "REDIS_URL" in none.stderr
