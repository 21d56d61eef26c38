"""One local server per AGENTFLEET_HOME: commands without REDIS_URL find it or start it (one,
even when they race), share it, and it stops with its last user, even one killed with
SIGKILL; embedded servers die with the process that started them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentfleet.ops import localserver

# Commands without REDIS_URL: the local server's default port (conftest's lock).
pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("default_port_lock")]


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(AGENTFLEET_HOME=str(home), AGENTFLEET_ENGINE="fake", AGENTFLEET_METRICS_PORT="0",
               AGENTFLEET_BLOCK_MS="20", AGENTFLEET_LOG_FORMAT="text", **extra)
    return env


def cli(*args: str, home: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agentfleet", *args], env=env_for(home),
                            text=True, **kwargs)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stopped(home: Path, record: localserver.Record) -> bool:
    return (not port_open(record.port) and not alive(record.pid)
            and localserver.read_record(localserver.data_dir(home)) is None)


def test_a_worker_and_a_submit_in_two_terminals_share_one_server(tmp_path):
    worker = cli("worker", home=tmp_path, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: localserver.running(tmp_path) is not None)
        record = localserver.running(tmp_path)
        submit = subprocess.run([sys.executable, "-m", "agentfleet", "submit", "--prompt",
                                 "two terminals", "--wait-s", "30"], env=env_for(tmp_path),
                                capture_output=True, text=True, timeout=60)
        assert submit.returncode == 0, submit.stderr
        assert submit.stdout.splitlines()[-1] == "echo: two terminals"
        assert "no live worker" not in submit.stderr  # the worker's heartbeat was there
        assert localserver.running(tmp_path) == record  # the same server, still up
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err[-2000:]
    assert stopped(tmp_path, record)  # the last user stopped it on its way out


def test_commands_racing_start_one_server_which_stops_after_the_last(tmp_path):
    hold = ("import sys, time; from pathlib import Path; from agentfleet.ops import localserver; "
            "home = Path(sys.argv[1])\n"
            "with localserver.local_server(home) as url:\n"
            "    rec = localserver.read_record(localserver.data_dir(home))\n"
            "    print(url, rec.pid, flush=True); time.sleep(float(sys.argv[2]))")
    users = [subprocess.Popen([sys.executable, "-c", hold, str(tmp_path), str(1 + i)],
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    first = users[0].stdout.readline().split()
    assert all(u.stdout.readline().split() == first for u in users[1:])  # one server
    record = localserver.read_record(localserver.data_dir(tmp_path))
    assert record.url == first[0] and record.pid == int(first[1])
    users[0].communicate(timeout=30)
    assert localserver.running(tmp_path) == record  # two users left
    for u in users:
        u.communicate(timeout=30)
    assert stopped(tmp_path, record)
    # The next command starts it again, on the port it had, with the data it had.
    again = subprocess.run([sys.executable, "-m", "agentfleet", "status", "--json"],
                           env=env_for(tmp_path), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert (localserver.data_dir(tmp_path) / "port").read_text().strip() == str(record.port)


def test_sigkill_of_agentfleet_server_leaves_no_server_behind(tmp_path):
    server = cli("server", home=tmp_path, stdout=subprocess.PIPE)
    url = server.stdout.readline().strip()
    assert url.startswith("REDIS_URL=redis://127.0.0.1:")
    record = localserver.running(tmp_path)
    assert record is not None and url == f"REDIS_URL={record.url}"
    server.kill()
    server.communicate()
    wait_for(lambda: stopped(tmp_path, record), 10)  # the keeper saw nobody use it


def test_server_stop_stops_it_while_commands_use_it(tmp_path):
    server = cli("server", home=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert server.stdout.readline().startswith("REDIS_URL=")
    record = localserver.running(tmp_path)
    out = subprocess.run([sys.executable, "-m", "agentfleet", "server", "stop"],
                         env=env_for(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"stopped the local server at {record.url}"
    _, err = server.communicate(timeout=10)
    assert server.returncode == 0 and "was stopped" in err  # the foreground command ended
    assert stopped(tmp_path, record)


def test_sigkill_of_the_keeper_takes_its_server_along(tmp_path):
    server = cli("server", home=tmp_path, stdout=subprocess.PIPE)
    server.stdout.readline()
    record = localserver.running(tmp_path)
    os.kill(record.pid, signal.SIGKILL)
    wait_for(lambda: not port_open(record.port), 10)  # PR_SET_PDEATHSIG
    server.terminate()
    server.communicate(timeout=10)


def test_an_embedded_server_dies_with_the_process_that_started_it(tmp_path):
    """What tests and benchmarks start themselves (ops/embedded.py), killed with SIGKILL."""
    code = ("import sys, time; from agentfleet.ops.embedded import ServerProcess\n"
            "s = ServerProcess(sys.argv[1]); s.start(); print(s.port, flush=True); time.sleep(60)")
    wrapper = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)
    port = int(wrapper.stdout.readline())
    assert port_open(port)
    wrapper.kill()
    wrapper.communicate()
    wait_for(lambda: not port_open(port), 10)


def test_submit_warns_at_once_when_no_live_worker_serves_the_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "agentfleet", "submit", "--prompt", "anyone?",
                          "--wait-s", "0.5"], env=env_for(tmp_path), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1  # the result did not come in time
    lines = out.stderr.splitlines()
    warning = [line for line in lines if "no live worker serves model smollm2-135m" in line]
    assert len(warning) == 1, out.stderr
    assert lines[-1] == "agentfleet: 1 results missing after 0.5s"
    dump = json.dumps(out.stderr)
    assert "Traceback" not in dump
