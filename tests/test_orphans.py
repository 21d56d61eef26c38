"""The worker's guardian (workers/orphans.py) without vLLM: a parent SIGKILLed with children
of three kinds, one that stops on SIGTERM, one that ignores it, and one it had before the
guardian started (the shared local server's place), which is left alone."""

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
before = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
guardian = subprocess.Popen([sys.executable, "-c",
    "import os, sys; from agentfleet.workers.orphans import guard; "
    "sys.exit(guard(os.getppid(), poll_s=0.1, grace_s=1.5))"])
time.sleep(0.5)  # the guardian's first look: `before` is exempt
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


def _wait_gone(pid: int, timeout_s: float) -> float:
    started = time.monotonic()
    while not _gone(pid):
        assert time.monotonic() - started < timeout_s, f"{pid} still alive"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_killed_parent_s_children_go_and_what_it_had_before_stays():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    before, guardian, polite, stubborn = map(int, parent.stdout.readline().split())
    try:
        time.sleep(0.5)  # the guardian has seen both new children
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone(polite, 5) < 1.5  # SIGTERM, at once
        assert _wait_gone(stubborn, 10) >= 1.0  # SIGKILL, after the grace period
        _wait_gone(guardian, 5)
        assert not _gone(before)  # not the guardian's to stop
    finally:
        for pid in (before, polite, stubborn, guardian):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
