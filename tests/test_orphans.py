"""The worker's guardian (workers/orphans.py) without vLLM: a parent SIGKILLed with children
of three kinds, one that stops on SIGTERM, one that ignores it, and one it had before the
guardian started (the shared local server's place), which is left alone with its own child.
The children come at once after the guardian's start: CI once showed that an exemption the
guardian decided itself, on its first look, took them in on a loaded machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

PARENT = r"""
import subprocess, sys, time
from agentfleet.workers import orphans
before = subprocess.Popen([sys.executable, "-c",  # a child of its own later (a server's save)
    "import subprocess, sys, time; time.sleep(1.5); "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"])
guardian = orphans.start_guardian(poll_s=0.1, grace_s=3.0)  # `before` is exempt
polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
stubborn = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print(before.pid, guardian.pid, polite.pid, stubborn.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, since: float, timeout_s: float = 15) -> float:
    """Seconds from `since` until `pid` is gone."""
    while not _gone(pid):
        assert time.monotonic() - since < timeout_s, f"{pid} still alive"
        time.sleep(0.05)
    return time.monotonic() - since


def test_a_killed_parent_s_children_go_and_what_it_had_before_stays():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    before, guardian, polite, stubborn = map(int, parent.stdout.readline().split())
    try:
        while not psutil.Process(before).children():
            time.sleep(0.05)
        (before_child,) = psutil.Process(before).children()
        time.sleep(1.0)  # the guardian has seen the new children (it looks every 0.1 s)
        parent.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        parent.wait(10)
        assert _wait_gone(polite, killed) < 3.0  # SIGTERM, at once
        assert _wait_gone(stubborn, killed) >= 3.0  # SIGKILL, after the grace period
        _wait_gone(guardian, killed)
        assert not _gone(before) and not _gone(before_child.pid)  # not the guardian's
    finally:
        kids = [] if _gone(before) else [p.pid for p in psutil.Process(before).children()]
        for pid in [*kids, before, polite, stubborn, guardian]:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
