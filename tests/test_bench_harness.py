"""bench.harness: a benchmark stops at once, with the error, when a process it started dies;
the measures and the result file; the queue-layer benchmark end to end on small sizes (with
arq in its own environment and the same-run comparison of two checkouts' fleets)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import harness
from bench.harness import Check, ChildDied, Processes, TreeCpu, percentiles
from bench.queue_layer import Bench, arq_python, fleet_producer, fleet_worker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench():
    with Processes() as procs, harness.server("valkey", procs) as server:
        yield Bench(procs, server, argparse.Namespace(tasks=2000, arq_jobs=50))


def test_a_worker_that_cannot_start_stops_the_benchmark_with_its_error():
    with Processes() as procs:
        started = time.monotonic()
        worker = procs.spawn(fleet_worker, "redis://127.0.0.1:1/0", {"server_wait_s": 0.3},
                             0.0, serving=True)
        with pytest.raises(ChildDied) as died:
            procs.expect(worker, "ready", 60)
    assert time.monotonic() - started < 20
    message = str(died.value)
    assert message.startswith("fleet_worker (pid ") and "exited with status 1" in message
    # The tail of its log: the worker's own error, with its traceback.
    assert "ServerUnreachableError" in message and "AGENTFLEET_SERVER_WAIT_S" in message


def test_a_worker_that_dies_mid_run_stops_the_benchmark_at_once(bench):
    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.wire import Task
    from bench.queue_layer import MODEL, _settings

    procs = bench.procs
    worker = bench._worker({}, 0.5, None)  # each task takes 0.5 s: 2,000 take a while
    producer = procs.spawn(fleet_producer, bench.server.url, 2000)

    async def poison() -> None:  # a task that kills the worker's process (FakeEngine's hook)
        async with Producer(connect(bench.server.url), settings=_settings()) as p:
            # A tenant of its own: read at once, not after the 2,000 in the default stream.
            await p.submit(Task(model=MODEL, prompt="poison", tenant="poison",
                                metadata={"fake_crash": "1"}))

    time.sleep(0.5)
    asyncio.run(poison())
    started = time.monotonic()
    with pytest.raises(ChildDied, match=rf"fleet_worker \(pid {worker.pid}\) exited with "
                                        r"status 3"):
        procs.expect(producer, "done", 600)  # the producer would wait for 600 s
    assert time.monotonic() - started < 5
    with pytest.raises(ChildDied):  # and every later wait says so at once
        procs.sleep(10)


def test_a_dead_server_stops_an_async_wait_at_once(bench):
    async def forever() -> None:
        await asyncio.sleep(600)

    bench.server.proc.send_signal(signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(ChildDied, match=r"server \(pid \d+\) was killed by signal 9"):
        bench.procs.run(forever())
    assert time.monotonic() - started < 5


def test_a_dead_command_ends_the_benchmark_with_a_fail_line(tmp_path, capsys):
    """`agentfleet worker` started as a command (bench.engine_cpu does): its one-line error
    is what the benchmark prints, and the status is 1."""
    def main() -> int:
        with Processes() as procs:
            procs.command([sys.executable, "-m", "agentfleet", "worker"], name="worker",
                          env=harness.child_env(REDIS_URL="redis://127.0.0.1:1/0",
                                                AGENTFLEET_ENGINE="fake",
                                                AGENTFLEET_SERVER_WAIT_S="0.3",
                                                AGENTFLEET_HOME=str(tmp_path)))
            procs.run(asyncio.sleep(600))
        return 0

    assert harness.entry(main) == 1
    err = capsys.readouterr().err
    assert "FAIL  a process the benchmark started died: worker (pid" in err
    assert "exited with status 3" in err and "unreachable" in err


def test_a_child_that_ends_without_its_report_is_a_death():
    with Processes() as procs:
        child = procs.spawn(fleet_producer, "redis://127.0.0.1:1/0", "not a number")
        with pytest.raises(ChildDied, match="TypeError"):
            procs.expect(child, "done", 60)


def test_stopping_a_scope_stops_only_its_children(bench):
    procs = bench.procs
    with procs.scope():
        worker = bench._worker({}, 0.0, None)
    assert not worker.alive() and bench.server.proc.poll() is None
    procs.check()  # stopped on purpose: not a death


def test_percentiles_are_nearest_rank():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentiles(values, scale=1000, ndigits=3) == {
        "p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0, "n": 100}
    assert percentiles([3.0], (0.5, 0.999)) == {"p50": 3.0, "p99.9": 3.0, "max": 3.0, "n": 1}
    assert percentiles([]) == {}


def test_checks_print_pass_fail_and_set_the_status(capsys):
    assert harness.print_checks([Check("a", True, "1"), Check("b", None)]) == 0
    assert harness.print_checks([Check("a", True), Check("c", False, "2 ms")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == ["PASS  a: 1", "PASS  a", "FAIL  c: 2 ms"]


def test_cpu_of_a_process_tree_counts_its_descendants():
    burn = ("import time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.8: pass\ntime.sleep(30)")
    with Processes() as procs:
        parent = procs.command([sys.executable, "-c", "import subprocess, sys, time; "
                                f"subprocess.Popen([sys.executable, '-c', {burn!r}]); "
                                "time.sleep(30)"], name="tree")
        tree = TreeCpu(parent.pid)
        time.sleep(2.5)
        rows = tree.delta()["processes"]
        [grandchild] = [r for r in rows if r["pid"] != parent.pid and r["cpu_s"] >= 0.5]
        # Background counts other processes only: this one's descendants are not others.
        assert grandchild["pid"] in harness._tree(os.getpid(), harness.all_cpu_s())
    # Stopped with its whole process group: the grandchild too.
    assert not harness._group_alive(parent.pid)


def _tmp(root: Path) -> str:
    """A sibling of the checkout is not the checkout; under /tmp (a clone there) it is $TMPDIR's."""
    return "$TMPDIR" + str(root)[4:] if str(root).startswith("/tmp/") else str(root)


def test_results_carry_no_machine_paths(tmp_path):
    home = str(Path.home())
    value = {"out": f"{ROOT}/docs/x.json", "tmp": "/tmp/af-1/y", "cfg": f"{home}/.cache/z",
             "list": [str(ROOT)], "other": f"--from {ROOT}-before/.pkg"}
    assert harness.portable(value) == {"out": "./docs/x.json", "tmp": "$TMPDIR/af-1/y",
                                       "cfg": "~/.cache/z", "list": ["."],
                                       "other": f"--from {_tmp(ROOT)}-before/.pkg"}
    path = tmp_path / "r.json"
    harness.write_result(path, benchmark="t", checks=[Check("a", False, 1)],
                         machine_info=harness.machine(), where=str(ROOT / "bench"))
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "t" and doc["where"] == "./bench"
    assert doc["checks"] == [{"target": "a", "status": "FAIL", "value": 1}]
    assert {"cores", "cpu", "python", "date_utc", "commit"} <= doc["machine"].keys()


@pytest.mark.timeout(300)
def test_arq_runs_in_its_own_environment(bench):
    """arq 0.28 needs redis-py < 6: its processes use an interpreter of their own (made
    once, with pip), while the project's environment keeps its newer redis-py."""
    import redis

    python = arq_python()
    found = subprocess.run([python, "-c", "import arq, redis; print(arq.VERSION, "
                            "redis.__version__)"], capture_output=True, text=True, check=True)
    arq_version, redis_version = found.stdout.split()
    assert arq_version == "0.28.0" and int(redis_version.split(".")[0]) < 6
    assert int(redis.__version__.split(".")[0]) >= 6
    figures = bench.arq()
    assert figures["tasks"] == 50 and figures["tasks_per_s"] > 0
    assert set(figures["cpu_us_per_task"]) == {"producer", "worker", "server"}


@pytest.mark.timeout(300)
def test_queue_layer_end_to_end_with_a_second_checkout(tmp_path):
    """The whole benchmark on small sizes, with --fleet-from naming this checkout's own
    import path as a second version: every path measured, PASS/FAIL lines, the JSON."""
    out = tmp_path / "q.json"
    pkg = tmp_path / "pkg"  # an import path whose `agentfleet` is this checkout
    pkg.mkdir()
    (pkg / "agentfleet").symlink_to(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.queue_layer", "--tasks", "1000", "--arq-jobs", "50",
         "--rounds", "1", "--latency-rate", "200", "--latency-low-rate", "0",
         "--latency-duration-s", "1", "--fleet-from", f"same={pkg}", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, env=harness.child_env())
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "round 1 fleet@same" in proc.stdout and "round 1 latency@same" in proc.stdout
    assert "fleet >= 10 x arq" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "queue_layer"
    assert set(doc["summary"]["tasks_per_s"]["median"]) == {"fleet", "fleet@same", "bare",
                                                             "floor", "arq"}
    assert doc["summary"]["compared"]["same"]["code"] == [harness.portable(str(pkg))]
    assert [c["status"] for c in doc["checks"]] == [
        "PASS" if line.startswith("PASS") else "FAIL"
        for line in proc.stdout.splitlines() if line[:4] in ("PASS", "FAIL")]
