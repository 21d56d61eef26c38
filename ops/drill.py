"""`agentfleet drill --target staging`: a disaster drill on a running fleet, with tasks of its own.

    agentfleet drill --target staging --model M \\
        --kill-worker-cmd 'kubectl -n agentfleet delete pod "$AGENTFLEET_DRILL_WORKER"' \\
        --restart-server-cmd "kubectl -n agentfleet delete pod valkey-0"

What it does, in order, against the fleet at REDIS_URL:
  1. submits `--tasks` two-step chains (a task and its follow-up) of its own: producer and
     task ids `drill-<run>-...`, tenant `drill`, idempotency keys, so it never touches, reads
     or counts another task;
  2. once workers hold half of them, kills the worker holding the most tasks:
     `--kill-worker-cmd` (a shell command, e.g. kubectl; it gets the worker's id, the pod's
     name in ops/k8s, as $AGENTFLEET_DRILL_WORKER), or `--kill-local-worker` (SIGKILL to
     that worker if it runs on this host, found by its heartbeat id `<host>-<pid>`);
  3. restarts or fails over the server: `--restart-server-cmd`, then waits for it to answer;
  4. floods the model with `--flood-tasks` more chains at once;
  5. waits for every result until `--deadline-s` and reports, for its own tasks only:
       lost     no result by the deadline
       doubled  a result or a follow-up recorded twice in the chain's trace
       late     a result whose end-to-end time (enqueue to written) exceeded `--late-s`
     plus the fleet's own counters over the drill (duplicates prevented, fenced commits,
     entries lost while pending), which count every tenant's tasks.
Expected: nothing lost, doubled or late; the exit status is 1 otherwise, or when a hook
failed.  Chains are traced (traces on, the default), which is how doubles are seen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.errors import AgentFleetError, BrokerError, ResultTimeoutError
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import (
    Enqueued,
    Finished,
    FollowUp,
    Result,
    Sampling,
    Task,
    TraceEvent,
    decode_event,
)

log = logging.getLogger("agentfleet.drill")

TENANT = "drill"
HOOK_TIMEOUT_S = 300.0


class DrillConfig(msgspec.Struct, kw_only=True):
    target: str
    model: str
    tasks: int = 200
    flood_tasks: int = 2000
    max_tokens: int = 16
    metadata: dict[str, str] = {}  # added to every drill task (e.g. the fake engine's delay)
    kill_worker_cmd: str = ""
    kill_local_worker: bool = False
    restart_server_cmd: str = ""
    late_s: float = 300.0
    deadline_s: float = 900.0
    settle_s: float = 2.0  # after each fault, before the next step
    in_flight_wait_s: float = 30.0  # how long to wait for drill tasks to reach a worker


class Step(msgspec.Struct, kw_only=True):
    name: str
    ok: bool
    detail: str = ""
    at_s: float = 0.0  # seconds since the drill started


class DrillReport(msgspec.Struct, kw_only=True):
    run_id: str
    target: str
    model: str
    submitted: int  # tasks, follow-ups included
    completed: int
    lost: list[str]
    doubled: list[str]
    late: list[str]
    slowest_s: float
    steps: list[Step]
    fleet_counters: dict[str, int]  # deltas over the drill, every tenant's tasks
    duration_s: float

    @property
    def passed(self) -> bool:
        return not (self.lost or self.doubled or self.late) and all(s.ok for s in self.steps)


def audit_traces(events_by_chain: dict[str, list[TraceEvent]]) -> list[str]:
    """Task ids whose result or follow-up enqueue appears more than once in its trace."""
    doubled: set[str] = set()
    for events in events_by_chain.values():
        enqueued = Counter(e.task_id for e in events if isinstance(e, Enqueued))
        finished = Counter(e.result.task_id for e in events if isinstance(e, Finished))
        doubled.update(t for t, n in enqueued.items() if n > 1)
        doubled.update(t for t, n in finished.items() if n > 1)
    return sorted(doubled)


def end_to_end_s(result: Result) -> float:
    t = result.timings
    end = t.written or t.finished
    return end - t.enqueued if end and t.enqueued else 0.0


class Drill:
    def __init__(self, url: str, settings: Settings, config: DrillConfig):
        self.url = url
        self.settings = settings
        self.cfg = config
        self.run_id = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        self.steps: list[Step] = []
        self.started = time.monotonic()

    def _step(self, name: str, ok: bool, detail: str = "") -> None:
        step = Step(name=name, ok=ok, detail=detail, at_s=time.monotonic() - self.started)
        self.steps.append(step)
        print(f"[{step.at_s:7.1f}s] {'ok  ' if ok else 'FAIL'} {name}: {detail}",
              file=sys.stderr, flush=True)

    def _chains(self, phase: str, n: int) -> list[Task]:
        c = self.cfg
        tasks = []
        for i in range(n):
            task_id = f"drill-{self.run_id}-{phase}{i}"
            tasks.append(Task(
                model=c.model, id=task_id, idempotency_key=task_id, tenant=TENANT,
                prompt=f"Drill {self.run_id}: reply with the word ok ({phase}{i}).",
                sampling=Sampling(max_tokens=c.max_tokens),
                metadata={"drill": self.run_id, **c.metadata},
                followups=[FollowUp(prompt="Repeat: {output}")]))
        return tasks

    async def run(self) -> DrillReport:
        c = self.cfg
        redis = connect(self.url)
        producer = Producer(connect(self.url), settings=self.settings,
                            producer_id=f"drill-{self.run_id}")
        try:
            before = await self._counters(redis)
            live = await self._live_workers(redis)
            if not live:
                raise AgentFleetError(f"no live worker serves {c.model!r} on {self.cfg.target}:"
                                      f" a drill needs a running fleet")
            self._step("preflight", True, f"{len(live)} live worker(s) of {c.model}; run id "
                                          f"{self.run_id}")
            roots = await self._submit(producer, self._chains("t", c.tasks))
            self._step("submit", True, f"{len(roots)} chains")
            held = await self._wait_in_flight(redis, live)
            await self._kill_worker(live, held)
            await asyncio.sleep(c.settle_s)
            await self._restart_server(redis)
            await asyncio.sleep(c.settle_s)
            flood = await self._submit(producer, self._chains("f", c.flood_tasks))
            self._step("flood", True, f"{len(flood)} chains at once")
            roots += flood
            results, lost = await self._collect(producer, roots)
            doubled = audit_traces(await self._traces(redis, roots))
            late = sorted(r.task_id for r in results if end_to_end_s(r) > c.late_s)
            after = await self._counters(redis)
        finally:
            await producer.close()
            await redis.aclose()
        deltas = {k: after.get(k, 0) - before.get(k, 0) for k in sorted({*before, *after})}
        return DrillReport(
            run_id=self.run_id, target=c.target, model=c.model, submitted=2 * len(roots),
            completed=len(results), lost=lost, doubled=doubled, late=late,
            slowest_s=max((end_to_end_s(r) for r in results), default=0.0), steps=self.steps,
            fleet_counters=deltas, duration_s=time.monotonic() - self.started)

    async def _submit(self, producer: Producer, tasks: list[Task]) -> list[str]:
        deadline = time.monotonic() + 60
        while True:  # a retried chunk is safe: every task has an idempotency key
            try:
                return await producer.submit_many(tasks)
            except BrokerError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("drill: submitting failed (%s); retrying", exc)
                await asyncio.sleep(0.5)

    async def _wait_in_flight(self, redis: aioredis.Redis, live: list[str]) -> dict[str, int]:
        """Until the workers hold at least half the drill's chains (pending in the group of
        the drill tenant's stream), so a kill lands mid-task; at most `in_flight_wait_s`.
        Returns the pending count of each live worker, most first."""
        deadline = time.monotonic() + self.cfg.in_flight_wait_s
        held: dict[str, int] = {}
        while True:
            try:
                info = await redis.xpending(keys.task_stream(self.cfg.model, TENANT),
                                            keys.GROUP)
                held = {c["name"].decode(): int(c["pending"]) for c in info["consumers"]
                        if c["name"].decode() in live}
            except RedisError:
                held = {}
            if sum(held.values()) * 2 >= self.cfg.tasks or time.monotonic() > deadline:
                return dict(sorted(held.items(), key=lambda kv: -kv[1]))
            await asyncio.sleep(0.05)

    async def _kill_worker(self, live: list[str], held: dict[str, int]) -> None:
        """Kill the live worker holding the most tasks (its id is the pod's name in the
        manifests of ops/k8s: the hook gets it as $AGENTFLEET_DRILL_WORKER)."""
        c = self.cfg
        victim = next(iter(held), live[0] if live else "")
        holds = f"; it held {held.get(victim, 0)} pending task(s)"
        if c.kill_worker_cmd:
            ok, detail = run_hook(c.kill_worker_cmd, {"AGENTFLEET_DRILL_WORKER": victim})
            self._step("kill worker", ok, f"{victim}: {detail}{holds}")
        elif c.kill_local_worker:
            ok, detail = kill_local_worker([victim] + [w for w in live if w != victim])
            self._step("kill worker", ok, detail + (holds if victim in detail else ""))
        else:
            self._step("kill worker", True, "skipped (no --kill-worker-cmd or "
                                            "--kill-local-worker)")

    async def _restart_server(self, redis: aioredis.Redis) -> None:
        if not self.cfg.restart_server_cmd:
            self._step("restart server", True, "skipped (no --restart-server-cmd)")
            return
        ok, detail = run_hook(self.cfg.restart_server_cmd)
        deadline = time.monotonic() + 120
        while True:  # the server answers again (and has loaded its data: PING waits for it)
            try:
                await redis.ping()
                break
            except (RedisError, OSError):
                if time.monotonic() > deadline:
                    ok, detail = False, detail + "; the server did not answer within 120 s"
                    break
                await asyncio.sleep(0.2)
        self._step("restart server", ok, detail)

    async def _collect(self, producer: Producer, roots: list[str]
                       ) -> tuple[list[Result], list[str]]:
        wanted = roots + [f"{r}.1" for r in roots]
        results: list[Result] = []
        started = time.monotonic()
        lost: list[str] = []
        try:
            async for result in producer.as_completed(wanted, timeout_s=self.cfg.deadline_s):
                results.append(result)
        except ResultTimeoutError as exc:
            # The reply may have been missed across a restart: look for stored results.
            for task_id in exc.missing:
                found = await producer.get_result(task_id, self.cfg.model)
                if found is None:
                    lost.append(task_id)
                else:
                    results.append(found)
        self._step("results", not lost, f"{len(results)} of {len(wanted)} after "
                                        f"{time.monotonic() - started:.1f}s (deadline "
                                        f"{self.cfg.deadline_s:g}s)")
        return results, sorted(lost)

    async def _traces(self, redis: aioredis.Redis, roots: list[str]
                      ) -> dict[str, list[TraceEvent]]:
        out: dict[str, list[TraceEvent]] = {}
        for start in range(0, len(roots), 500):
            chunk = roots[start:start + 500]
            async with redis.pipeline(transaction=False) as pipe:
                for root in chunk:
                    pipe.lrange(keys.trace_key(self.cfg.model, root), 0, -1)
                lists = await pipe.execute()
            for root, raw in zip(chunk, lists):
                out[root] = [decode_event(e) for e in raw]
        return out

    async def _counters(self, redis: aioredis.Redis) -> dict[str, int]:
        raw = await redis.hgetall(keys.stats_key(self.cfg.model))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def _live_workers(self, redis: aioredis.Redis, within_s: float = 10.0) -> list[str]:
        beats = await redis.hgetall(keys.workers_key(self.cfg.model))
        now = time.time()
        return sorted(w.decode() for w, at in beats.items() if now - float(at) <= within_s)


def run_hook(command: str, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Run an operator's shell command (with `env` added); (succeeded, what it said)."""
    try:
        done = subprocess.run(command, shell=True, capture_output=True, text=True,
                              timeout=HOOK_TIMEOUT_S, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return False, f"{command!r} ran past {HOOK_TIMEOUT_S:g}s"
    said = (done.stdout + done.stderr).strip().replace("\n", " | ")[-300:]
    return done.returncode == 0, f"{command!r} exited {done.returncode}" + (
        f": {said}" if said else "")


def kill_local_worker(live: Sequence[str]) -> tuple[bool, str]:
    """SIGKILL one live worker of this host, found by its default id `<host>-<pid>`; only a
    process whose command line is an agentfleet worker."""
    host = socket.gethostname()
    for worker_id in live:
        name, _, pid = worker_id.rpartition("-")
        if name != host or not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not any(b"agentfleet" in part for part in cmdline) or b"worker" not in cmdline:
            continue
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError as exc:
            return False, f"SIGKILL to {worker_id} failed: {exc}"
        return True, f"SIGKILL to worker {worker_id}"
    return False, (f"no live worker of this host ({host}) with a default id <host>-<pid> among "
                   f"{list(live)}")


def render(report: DrillReport) -> str:
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"drill {report.run_id} on {report.target} ({report.model}): {verdict} in "
        f"{report.duration_s:.0f}s",
        f"  tasks: {report.submitted} submitted (chains and their follow-ups), "
        f"{report.completed} completed",
        f"  lost: {len(report.lost)}   doubled: {len(report.doubled)}   late (> the limit): "
        f"{len(report.late)}   slowest: {report.slowest_s:.1f}s",
    ]
    for name, ids in (("lost", report.lost), ("doubled", report.doubled),
                      ("late", report.late)):
        if ids:
            lines.append(f"  {name}: {', '.join(ids[:10])}" + (" ..." if len(ids) > 10 else ""))
    lines.append("  steps:")
    lines += [f"    {'ok  ' if s.ok else 'FAIL'} {s.name} at {s.at_s:.1f}s: {s.detail}"
              for s in report.steps]
    counters = ", ".join(f"{k} {v:+d}" for k, v in report.fleet_counters.items() if v)
    lines.append(f"  fleet counters over the drill (every tenant): {counters or 'no change'}")
    return "\n".join(lines)


def run_drill(url: str, settings: Settings, config: DrillConfig, *, as_json: bool) -> int:
    report = asyncio.run(Drill(url, settings, config).run())
    if as_json:
        out = msgspec.to_builtins(report)
        out["passed"] = report.passed
        print(json.dumps(out))
    else:
        print(render(report))
    return 0 if report.passed else 1
