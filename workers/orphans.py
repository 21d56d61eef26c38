"""Engine processes end with their worker, however the worker ends.

vLLM runs each engine core in a process of its own (spawned, on the CPU platform) and stops it
from the worker's shutdown.  A worker that never gets there (SIGKILL: the OOM killer, `kill -9`,
a supervisor out of patience) leaves its engine cores idling under init, holding their memory
and a GPU, invisible to the supervisor that restarts the worker: vLLM's engine core does not
watch its parent.  So `agentfleet worker` starts this guardian, a small process of its own:
it notes the worker's descendants every second, and once the worker is gone (the guardian is
reparented) it sends SIGTERM to those still alive (vLLM's engine core shuts down on it), then
SIGKILL to any left after a grace period.  Descendants the worker had before the guardian
started (the local server `agentfleet worker` may start without REDIS_URL, which others share)
are left alone.  Run as `python -m agentfleet.workers.orphans WORKER_PID`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 10.0


def _processes() -> dict[int, tuple[int, str]]:
    """(parent pid, start time) of every process, by pid: /proc/PID/stat fields 4 and 22.
    The start time tells a process from a later one that reuses its pid."""
    found = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            found[int(entry.name)] = (int(fields[1]), fields[19].decode())
    return found


def descendants(pid: int, processes: dict[int, tuple[int, str]]) -> dict[int, str]:
    """`pid`'s descendants among `processes`: their start times, by pid."""
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(p)
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p not in found:
            found[p] = processes[p][1]
            todo += children.get(p, [])
    return found


def _alive(known: dict[int, str]) -> dict[int, str]:
    now = _processes()
    return {p: start for p, start in known.items() if p in now and now[p][1] == start}


def guard(worker: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> int:
    """Watch `worker` (this process's parent) until it is gone, then end what it left."""
    me = os.getpid()
    exempt = set(descendants(worker, _processes())) - {me}
    seen: dict[int, str] = {}
    while os.getppid() == worker:
        tree = descendants(worker, _processes())
        seen = {p: start for p, start in tree.items() if p != me and p not in exempt}
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


def start_guardian() -> subprocess.Popen:
    """The guardian of this process (see the module's docstring), started now: what this
    process has started so far is not its business."""
    guardian = subprocess.Popen([sys.executable, "-m", "agentfleet.workers.orphans",
                                 str(os.getpid())], stdin=subprocess.DEVNULL)
    _started.append(guardian)
    return guardian


def main() -> int:
    # Ctrl-C reaches the whole foreground group: the guardian outlives it to do its job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return guard(int(sys.argv[1]))


if __name__ == "__main__":
    sys.exit(main())
