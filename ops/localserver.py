"""One local server per AGENTFLEET_HOME, shared by every command that runs without REDIS_URL.

    agentfleet worker                  # terminal 1: starts the local server, or finds it
    agentfleet submit --prompt hi      # terminal 2: finds the same server
    agentfleet server stop             # stops it now, whoever uses it

The first command that needs a server starts a keeper (`python -m agentfleet.ops.localserver`),
detached from the terminal, which runs valkey-server on 127.0.0.1: on the port it had last
time, else 6399, else any free port.  The keeper stops it when the last command using it has
ended; the next command starts it again on the same append-only file.  Its files, in
$AGENTFLEET_HOME/valkey:

    appendonlydir/, server.log   the server's data and log
    local.json                   {"url", "port", "pid"}: the running server and its keeper
    port                         the port it last had, tried first on the next start
    users.lock                   every command using the server holds a shared flock on it;
                                 the kernel drops it when the command ends, even on SIGKILL
    start.lock                   held while a command finds or starts the server, so that
                                 two commands racing start one server
    keeper.log                   the keeper's own log

The keeper looks five times a second whether anybody still holds users.lock; when nobody
does, it takes it exclusively (so no command starts using a server on its way out), stops
the server (SIGTERM: the append-only file is flushed) and exits.  A command that ends
normally and finds itself the last user stops the server at once.  The server dies with its
keeper (PR_SET_PDEATHSIG); the keeper is in a session of its own, so Ctrl-C in one terminal
does not take the server away from a command in another.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import redis
from redis.exceptions import RedisError

from agentfleet.ops.embedded import ServerProcess, port_free, valkey_binary
from agentfleet.schemas.errors import FatalConfigError
from agentfleet.workers.orphans import start_time

log = logging.getLogger("agentfleet.localserver")

DEFAULT_PORT = 6399
POLL_S = 0.2  # how often the keeper looks for users
START_TIMEOUT_S = 60.0  # a long append-only file takes a while to load
STOP_TIMEOUT_S = 15.0


class Record(msgspec.Struct, frozen=True):
    """local.json: where the running local server listens, and its keeper's pid."""

    url: str
    port: int
    pid: int


def data_dir(home: Path) -> Path:
    return Path(home) / "valkey"


def read_record(folder: Path) -> Record | None:
    try:
        return msgspec.json.decode((folder / "local.json").read_bytes(), type=Record)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def running(home: Path) -> Record | None:
    """The local server of `home` if it runs (and serves this home's data), else None."""
    folder = data_dir(home)
    record = read_record(folder)
    return record if record is not None and _serves(record, folder) else None


@contextlib.contextmanager
def local_server(home: Path, *, port: int = 0) -> Iterator[str]:
    """Use the local server of `home` for the block: find it, or start it; its URL.

    With `port`, a server started here listens there (and one already running elsewhere is
    an error).  When the block ends and nobody else uses the server, it stops.
    """
    folder = data_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    users = os.open(folder / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(users, fcntl.LOCK_SH)  # waits while a keeper is stopping its server
        yield _find_or_start(folder, port)
    finally:
        try:
            _leave(users, folder)
        finally:
            os.close(users)


def stop(home: Path) -> str | None:
    """Stop the local server of `home` now, whoever uses it; its URL, or None if none ran."""
    folder = data_dir(home)
    if not folder.is_dir():
        return None
    with _locked(folder / "start.lock"):
        record = read_record(folder)
        if record is None:
            return None
        if not _alive(record.pid):
            (folder / "local.json").unlink(missing_ok=True)  # its keeper was killed
            return None
        _stop_keeper(record)
        return record.url


# ---- the users' side ------------------------------------------------------------------------

_keepers: dict[int, subprocess.Popen] = {}  # keepers this process started (reaped here)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _find_or_start(folder: Path, port: int) -> str:
    with _locked(folder / "start.lock"):
        record = read_record(folder)
        if record is not None and _serves(record, folder):
            if port and record.port != port:
                raise FatalConfigError(
                    f"the local server of {folder.parent} already runs at {record.url}, not on "
                    f"port {port}: use it, or stop it first (agentfleet server stop)")
            return record.url
        if port and not port_free(port):
            raise FatalConfigError(f"port {port} is in use: pick another, or leave --port out")
        valkey_binary()  # not installed: say so here rather than through the keeper's log
        return _start_keeper(folder, port)


def _serves(record: Record, folder: Path) -> bool:
    """Does a server answer at the record's port with this folder as its data directory?
    (After a crash the port may have gone to another home's server.)"""
    try:
        client = redis.Redis(host="127.0.0.1", port=record.port, socket_timeout=2,
                             socket_connect_timeout=1, decode_responses=True)
        try:
            where = client.config_get("dir").get("dir")
        finally:
            client.close()
    except RedisError:
        return False
    return where is not None and os.path.realpath(where) == os.path.realpath(folder)


def _start_keeper(folder: Path, port: int) -> str:
    with open(folder / "keeper.log", "ab") as keeper_log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentfleet.ops.localserver", str(folder), str(port)],
            stdin=subprocess.DEVNULL, stdout=keeper_log, stderr=keeper_log,
            start_new_session=True)  # Ctrl-C in this terminal must not reach it
    _keepers[proc.pid] = proc
    deadline = time.monotonic() + START_TIMEOUT_S + 10
    while True:
        record = read_record(folder)
        if record is not None and record.pid == proc.pid:  # written once the server answers
            log.info("local server started at %s (data in %s; it stops with its last user, "
                     "or `agentfleet server stop`)", record.url, folder)
            return record.url
        if proc.poll() is not None:
            raise FatalConfigError(f"the local server did not start: {_last_line(folder)}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise FatalConfigError(f"the local server did not start within "
                                   f"{START_TIMEOUT_S:g}s: see {folder / 'keeper.log'}")
        time.sleep(0.02)


def _last_line(folder: Path) -> str:
    try:
        lines = (folder / "keeper.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1] if lines else f"see {folder / 'keeper.log'}"


def _leave(users: int, folder: Path) -> None:
    """Stop using the server; the last user stops it rather than wait for the keeper."""
    before = read_record(folder)
    fcntl.flock(users, fcntl.LOCK_UN)
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Others still use it, or the keeper saw nobody first and is stopping it: then wait
        # for that, so that a command ends with its server stopped either way.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                fcntl.flock(users, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            if before is not None and read_record(folder) is None:
                # The keeper stopped it and let go of the lock: its process is on its way
                # out (a loaded machine took it a while after the lock: the test saw it).
                while _alive(before.pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
            return
        return
    record = read_record(folder)
    if record is not None and _alive(record.pid):
        _stop_keeper(record)  # holding the lock: nobody starts using it on its way out


def _stop_keeper(record: Record) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    proc = _keepers.get(pid)
    if proc is not None:  # our own child: poll() reaps it, a zombie would look alive
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) is gone; without /proc, alive
    return start_time(pid) is not None or not os.path.isdir("/proc")


# ---- the keeper -----------------------------------------------------------------------------

def keep(folder: Path, port: int) -> int:
    """Run the server until nobody uses it (or SIGTERM); the keeper process's main."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    server = _start_server(folder, port)
    record = Record(url=server.url, port=server.port, pid=os.getpid())
    users = os.open(folder / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        (folder / "port").write_text(f"{server.port}\n")
        tmp = folder / f"local.json.{os.getpid()}"
        tmp.write_bytes(msgspec.json.encode(record))
        tmp.replace(folder / "local.json")  # users wait for this: the server answers
        log.info("serving %s (pid %d) for the commands of %s", server.url, server.proc.pid,
                 folder.parent)
        while not stopping.wait(POLL_S):
            if server.proc.poll() is not None:
                log.error("the server exited with code %s; see %s", server.proc.returncode,
                          folder / "server.log")
                return 1
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            log.info("no command uses the server any more: stopping it")
            break
        return 0
    finally:
        server.stop()
        if read_record(folder) == record:
            (folder / "local.json").unlink(missing_ok=True)
        os.close(users)  # only now may a new user start another server


def _start_server(folder: Path, port: int) -> ServerProcess:
    if port:  # asked for: that port or nothing
        if not port_free(port):
            raise FatalConfigError(f"port {port} is in use")
        server = ServerProcess(folder, port=port, start_timeout_s=START_TIMEOUT_S)
        server.start()
        return server
    for candidate in [p for p in (_recorded_port(folder), DEFAULT_PORT) if p] + [0]:
        if candidate and not port_free(candidate):
            continue
        server = ServerProcess(folder, port=candidate, start_timeout_s=START_TIMEOUT_S)
        try:
            server.start()
            return server
        except FatalConfigError:
            if candidate == 0:
                raise
    raise AssertionError("unreachable: port 0 either starts or raises")


def _recorded_port(folder: Path) -> int:
    try:
        return int((folder / "port").read_text().strip())
    except (OSError, ValueError):
        return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s keeper %(process)d %(levelname)s %(message)s")
    try:
        sys.exit(keep(Path(sys.argv[1]), int(sys.argv[2])))
    except FatalConfigError as exc:
        print(exc, file=sys.stderr, flush=True)  # the last line: the starting command shows it
        sys.exit(2)
