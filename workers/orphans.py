"""Engine processes end with their worker, however the worker ends.

vLLM runs each engine core in a process of its own (spawned, on the CPU platform) and stops it
from the worker's shutdown.  A worker that never gets there (SIGKILL: the OOM killer, `kill -9`,
a supervisor out of patience) leaves its engine cores idling under init, holding their memory
and a GPU, invisible to the supervisor that restarts the worker: vLLM's engine core does not
watch its parent.  So `agentfleet worker` starts this guardian, a small process of its own:
it notes the worker's descendants every second, and once the worker is gone (the guardian is
reparented) it sends SIGTERM to those still alive (vLLM's engine core shuts down on it), then
SIGKILL to any left after a grace period.  Descendants the worker had when it started the
guardian (the local server `agentfleet worker` may start without REDIS_URL, which others
share) are left alone, with their own children.  `start_guardian()` starts it; by hand:
`python -m agentfleet.workers.orphans WORKER_PID --exempt PID,PID`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 10.0


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat, which tells a process from a later one that reuses its
    pid; None once it is gone (or a zombie: it has ended, its parent has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == b"Z" else fields[19].decode()


def _children(pid: int) -> list[int]:
    """`pid`'s children, from each of its threads' /proc children list: the walk costs the
    size of the worker's tree, not of the host's process table."""
    found: list[int] = []
    try:
        with os.scandir(f"/proc/{pid}/task") as threads:
            for thread in threads:
                try:
                    with open(f"/proc/{pid}/task/{thread.name}/children", "rb") as f:
                        found += map(int, f.read().split())
                except OSError:
                    continue  # the thread ended meanwhile
    except OSError:
        pass  # the process ended meanwhile
    return found


def descendants(pid: int, skip: set[int] | frozenset[int] = frozenset()) -> dict[int, str]:
    """`pid`'s live descendants, but for `skip` and theirs: their start times, by pid."""
    found: dict[int, str] = {}
    todo = _children(pid)
    while todo:
        p = todo.pop()
        if p not in found and p not in skip and (start := start_time(p)) is not None:
            found[p] = start
            todo += _children(p)
    return found


def _alive(known: dict[int, str]) -> dict[int, str]:
    return {p: start for p, start in known.items() if start_time(p) == start}


def guard(worker: int, exempt: set[int] | frozenset[int] = frozenset(),
          poll_s: float = POLL_S, grace_s: float = GRACE_S) -> int:
    """Watch `worker` (this process's parent) until it is gone, then end what it left, but
    for `exempt` and their descendants.  Prints "ready" once it watches."""
    exempt = {*exempt, os.getpid()}
    seen = descendants(worker, exempt)
    print("ready", flush=True)
    while os.getppid() == worker:
        seen = descendants(worker, exempt)
        time.sleep(poll_s)
    left = _alive(seen)
    if not left:
        return 0
    print(f"agentfleet guardian: worker {worker} is gone; stopping what it left: "
          f"{sorted(left)}", file=sys.stderr, flush=True)
    for pid in left:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := _alive(left)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    return 0


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


_started: list[subprocess.Popen] = []  # held: a collected Popen warns that it still runs


def start_guardian(poll_s: float = POLL_S, grace_s: float = GRACE_S) -> subprocess.Popen:
    """The guardian of this process (see the module's docstring), watching when this returns.
    What this process has started so far is not its business: that is decided here, not by
    the guardian once it has started (by then this process may have started more)."""
    exempt = ",".join(map(str, descendants(os.getpid())))
    guardian = subprocess.Popen(
        [sys.executable, "-m", "agentfleet.workers.orphans", str(os.getpid()),
         f"--exempt={exempt}", f"--poll-s={poll_s}", f"--grace-s={grace_s}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    _started.append(guardian)
    with guardian.stdout:  # type: ignore[union-attr]
        if guardian.stdout.readline() != b"ready\n":  # type: ignore[union-attr]
            raise RuntimeError(f"the worker's guardian did not start (exit {guardian.wait()})")
    return guardian


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m agentfleet.workers.orphans")
    parser.add_argument("worker", type=int)
    parser.add_argument("--exempt", default="", help="comma-separated pids left alone")
    parser.add_argument("--poll-s", type=float, default=POLL_S)
    parser.add_argument("--grace-s", type=float, default=GRACE_S)
    args = parser.parse_args()
    # Ctrl-C reaches the whole foreground group: the guardian outlives it to do its job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exempt = {int(p) for p in args.exempt.split(",") if p}
    return guard(args.worker, exempt, poll_s=args.poll_s, grace_s=args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
