"""Every command reports expected failures in one line on stderr, with its exit code, and no
traceback: the server down, bad configuration, a missing model or model files, unknown ids.

Exit codes (docs/operations.md): 0 ok, 1 crashed or the work failed, 2 usage or
configuration, 3 server unreachable.  Each case is a real process: a driver imports the CLI
once and forks a child per case, which runs `agentfleet.ops.cli.main` as the `agentfleet`
entry point does, with stderr at the file-descriptor level and the exit handlers run, so a
case costs milliseconds rather than an interpreter start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from agentfleet.ops.embedded import ServerProcess

# Commands without REDIS_URL: the local server's default port (conftest's lock).
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("default_port_lock")]

DRIVER = r"""
import atexit, json, os, sys, traceback
import agentfleet.ops.cli as cli
# What the commands import lazily, imported once here before the forks.
import agentfleet.ops.batch, agentfleet.ops.demo, agentfleet.ops.dlq, agentfleet.ops.exporter
import agentfleet.ops.localserver, agentfleet.ops.report, agentfleet.ops.status
import agentfleet.ops.trace, agentfleet.ops.tenants, agentfleet.producer.batch
import agentfleet.workers.worker

cases, folder = json.loads(sys.stdin.read()), sys.argv[1]
results, running = [None] * len(cases), {}


def reap():
    pid, status = os.wait()
    i = running.pop(pid)
    with open(f"{folder}/{i}.err") as err:
        results[i] = {"rc": os.waitstatus_to_exitcode(status), "stderr": err.read()}


for i, case in enumerate(cases):
    while len(running) >= 4:
        reap()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        out = os.open(f"{folder}/{i}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(f"{folder}/{i}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.clear()
        os.environ.update(case["env"])
        sys.argv = ["agentfleet", *case["argv"]]
        try:
            rc = cli.main(case["argv"])
        except SystemExit as exc:  # argparse
            rc = exc.code
        except BaseException:  # what the interpreter would print
            traceback.print_exc()
            rc = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)  # skips tearing down the modules: copy-on-write pages, seconds of CPU
    running[pid] = i
while running:
    reap()
print(json.dumps(results))
"""


def run_cases(cases: list[dict], folder) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(folder)], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("live"), appendonly=False)
    server.start()
    yield server
    server.stop()


def test_every_command_fails_in_one_line_with_its_exit_code(tmp_path, live):
    base = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    base.update(AGENTFLEET_HOME=str(tmp_path / "home"), AGENTFLEET_ENGINE="fake",
                AGENTFLEET_METRICS_PORT="0", AGENTFLEET_SERVER_WAIT_S="0.1", COLUMNS="200")
    batch_file = tmp_path / "in.jsonl"
    batch_file.write_text(json.dumps({"custom_id": "a", "method": "POST",
                                      "url": "/v1/chat/completions",
                                      "body": {"model": "gpt-9", "messages": [
                                          {"role": "user", "content": "hi"}]}}) + "\n")
    missing_files = tmp_path / "models.toml"
    missing_files.write_text(f'[models.m]\npath = "{tmp_path / "nowhere"}"\n')
    out = str(tmp_path / "out.jsonl")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    commands = {
        "submit": ["submit", "--prompt", "hi", "--wait-s", "1"],
        "trace": ["trace", "some-correlation-id"],
        "dlq": ["dlq", "list"],
        "status": ["status", "--json"],
        "report": ["report"],
        "exporter": ["exporter", "--once"],
        "batch submit": ["batch", "submit", str(batch_file), "--model-map", "gpt-9=smollm2-135m"],
        "batch status": ["batch", "status", "b1"],
        "batch wait": ["batch", "wait", "b1", "--timeout-s", "1"],
        "batch results": ["batch", "results", "b1", "-o", out],
        "batch cancel": ["batch", "cancel", "b1"],
        "batch list": ["batch", "list"],
        "keys": ["keys", "list"],
        "tenants": ["tenants", "list"],
        "audit": ["audit"],
        "console": ["console", "--port", str(free_port())],
        "plan": ["plan", "--model", "smollm2-135m", "--deadline", "6h"],
        "drill": ["drill", "--target", "test-fleet", "--tasks", "1", "--flood-tasks", "1"],
        "worker": ["worker"],
        "demo": ["demo", "--engine", "fake", "--agents", "1"],
    }
    live_env = {"REDIS_URL": live.url}
    cases: list[tuple[str, list[str], dict, int, str]] = []
    for name, argv in commands.items():
        cases.append((f"{name}, server down", argv, {"REDIS_URL": dead}, 3,
                      f"the server at {dead} is unreachable"))
    for name, argv in {**commands, "server": ["server"],
                       "prepare-model": ["prepare-model"]}.items():
        cases.append((f"{name}, bad configuration", argv, {"AGENTFLEET_MAX_INFLIGHT": "-5"}, 2,
                      "AGENTFLEET_MAX_INFLIGHT=-5: must be >= 1"))
    cases += [
        ("server, port in use", ["server", "--port", str(busy.getsockname()[1])], {}, 2,
         f"port {busy.getsockname()[1]} is in use"),
        ("worker, bad engine", ["worker"], {"AGENTFLEET_ENGINE": "bogus"}, 2,
         "AGENTFLEET_ENGINE='bogus': must be one of 'vllm', 'fake'"),
        ("any, no models file", ["status", "--json"],
         {"AGENTFLEET_MODELS_FILE": str(tmp_path / "absent.toml")}, 2, "absent.toml"),
    ]
    unknown_model = "unknown model 'gpt-9'"
    for name, argv in {"submit": ["submit", "--model", "gpt-9", "--prompt", "hi"],
                       "dlq": ["dlq", "list", "--model", "gpt-9"],
                       "status": ["status", "--json", "--models", "gpt-9"],
                       "report": ["report", "--models", "gpt-9"],
                       "exporter": ["exporter", "--once", "--models", "gpt-9"],
                       "worker": ["worker", "--models", "gpt-9"]}.items():
        cases.append((f"{name}, unknown model", argv, live_env, 2, unknown_model))
    model_files = {**live_env, "AGENTFLEET_MODELS_FILE": str(missing_files),
                   "AGENTFLEET_DEFAULT_MODEL": "m", "AGENTFLEET_ENGINE": "vllm"}
    cases += [
        ("batch submit, unknown model", ["batch", "submit", str(batch_file)], live_env, 2,
         "invalid"),
        ("demo, unknown default model", ["demo", "--engine", "fake"],
         {"AGENTFLEET_DEFAULT_MODEL": "gpt-9"}, 2, "AGENTFLEET_DEFAULT_MODEL='gpt-9'"),
        ("worker, missing model files", ["worker"], model_files, 2, "is not a model directory"),
        ("demo, missing model files", ["demo"], model_files, 2, "is not a model directory"),
    ]
    for name, argv, text in [
            ("trace", ["trace", "nope"], "no trace for correlation id 'nope'"),
            ("dlq show", ["dlq", "show", "1-0"], "no dead letter 1-0"),
            ("dlq replay", ["dlq", "replay", "1-0", "2-0"], "no dead letter 1-0, 2-0"),
            ("dlq purge", ["dlq", "purge", "1-0"], "no dead letter 1-0"),
            ("dlq show, not an id", ["dlq", "show", "junk"], "not dead-letter entry ids: junk"),
            ("batch status", ["batch", "status", "nope"], "no batch 'nope'"),
            ("batch wait", ["batch", "wait", "nope"], "no batch 'nope'"),
            ("batch results", ["batch", "results", "nope", "-o", out], "no batch 'nope'"),
            ("batch cancel", ["batch", "cancel", "nope"], "no batch 'nope'"),
            ("keys revoke", ["keys", "revoke", "nope"], "no API key with id 'nope'"),
            ("tenants remove", ["tenants", "remove", "nope"], "nope")]:
        cases.append((f"{name}, unknown id", argv, live_env, 2, text))

    try:
        results = run_cases([{"argv": argv, "env": {**base, **env}}
                             for _, argv, env, _, _ in cases], tmp_path)
    finally:
        busy.close()
    wrong = []
    for (name, _, _, rc, text), got in zip(cases, results, strict=True):
        err = got["stderr"]
        lines = [line for line in err.splitlines() if line.startswith("agentfleet: ")]
        if (got["rc"] != rc or "Traceback" in err or len(lines) != 1 or text not in lines[0]
                or not err.rstrip("\n").endswith(lines[0])):
            wrong.append(f"{name}: exit {got['rc']} (want {rc}), stderr:\n{err[-1500:]}")
    assert not wrong, "\n\n".join(wrong)
    # The failures that need no file to explain them say it all in that one line.
    for (name, *_), got in zip(cases, results, strict=True):
        if "server down" in name or "configuration" in name:
            assert got["stderr"].count("\n") == 1, (name, got["stderr"])
