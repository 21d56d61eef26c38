"""Engine processes, one process group each, so that stopping one also stops its engine core.

GPU memory is only free again once every process of the group is gone, and the next engine
must not start before that.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import IO

log = logging.getLogger("bench.procs")


class GroupProcess:
    """A child started in a new session; `stop` signals the whole group, then waits."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], log_file: IO,
                 cwd: str | None = None):
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, env=dict(env), stdout=log_file,
                                     stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        self.pid = self.proc.pid  # also the group id

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 60.0) -> None:
        """`sig` to the leader, SIGKILL to the group after `grace_s`, then wait until the
        group is empty (bounded: a zombie nobody reaps must not hang the run)."""
        if self.alive():
            self.send(sig)
            if self.wait(grace_s) is None:
                log.warning("pid %d did not stop in %.0f s: killing its group", self.pid, grace_s)
        self._kill_group()
        self.proc.wait()
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and self._group_alive():
            time.sleep(0.2)
            self._kill_group()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _group_alive(self) -> bool:
        """True while a live (not zombie) process of the group remains."""
        try:
            import psutil
        except ImportError:
            return False
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.pid) == self.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                continue
        return False
