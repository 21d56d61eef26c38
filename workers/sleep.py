"""Engines that share a GPU take turns: one awake, the others asleep (vLLM sleep mode).

Models and versions registered with the same `sleep_group` and served by one worker form a
`GpuShare`.  vLLM's sleep mode (level 1) moves an engine's weights to CPU memory and drops
its KV cache, so that another engine can have the GPU's memory; waking it copies the weights
back (seconds, not a cold start).  The rules, all here and tested on the fake engine
(tests/test_sleep.py):

  - one engine of a share is awake at a time; engines start one at a time, the awake one
    put to sleep first, so that each finds the memory free;
  - a runner whose engine sleeps keeps reading: what admission dispatches is held
    (`ModelRunner.held`) and the runner asks for a turn (`Sleeper.want_turn`);
  - a turn is granted at once when the awake engine is idle (nothing in its engine, nothing
    held or waiting in admission); when it is busy, after it has had the GPU for
    `sleep_turn_s`: it then stops dispatching, lets what runs in its engine finish (vLLM
    would abort it), and sleeps; the waiting engine wakes and starts what it held;
  - an awake engine idle for `sleep_idle_s` goes to sleep by itself, freeing the GPU.
Sleep and wake never run with a request in the engine, and never two at once in a share.
An engine that cannot sleep (vLLM's CPU platform) is not put in a share: it stays awake.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentfleet.workers.runner import ModelRunner

log = logging.getLogger("agentfleet.worker")

POLL_S = 0.01  # how often a switch looks whether the engine it waits on has emptied


class Sleeper:
    """One runner's engine in a share: awake or asleep, available to dispatch or not."""

    def __init__(self, runner: ModelRunner, share: GpuShare):
        self.runner = runner
        self.share = share
        self.awake = False  # the engine holds the GPU (weights and KV cache)
        self.available = False  # dispatches go to the engine (else they are held)
        self.turn_started = 0.0
        self.idle_since: float | None = None
        self.wake_times_s: list[float] = []
        self.sleeps = 0
        self._turn: asyncio.Task | None = None

    @property
    def name(self) -> str:
        r = self.runner
        return f"{r.model}@{r.route_version}" if r.route_version else r.model

    def idle(self) -> bool:
        r = self.runner
        return not r.in_engine and not r.held and not r.admission.waiting

    def want_turn(self) -> None:
        """Work is held for this engine: ask for the GPU (once; granted in the background)."""
        if self._turn is None or self._turn.done():
            self._turn = self.share.spawn(self._take_turn(), f"wake {self.name}")

    async def _take_turn(self) -> None:
        await self.share.acquire(self)
        self.runner.release_held()


class GpuShare:
    """The engines of one sleep group in one worker."""

    def __init__(self, name: str, *, turn_s: float, idle_s: float):
        self.name = name
        self.turn_s = turn_s
        self.idle_s = idle_s
        self.members: list[Sleeper] = []
        self.awake: Sleeper | None = None
        self.switches = 0
        self._lock = asyncio.Lock()  # one start, switch or sleep at a time
        self._jobs: set[asyncio.Task] = set()
        self.failure: BaseException | None = None  # a sleep or wake that failed: fatal

    def join(self, runner: ModelRunner) -> Sleeper:
        member = Sleeper(runner, self)
        self.members.append(member)
        runner.sleeper = member
        return member

    def leave(self, member: Sleeper) -> None:
        if member in self.members:
            self.members.remove(member)
        if self.awake is member:
            self.awake = None
        member.runner.sleeper = None

    def spawn(self, job: Awaitable[None], name: str) -> asyncio.Task:
        """Run a switch in the background, owned here: its failure stops the worker (the
        Worker watches `failure`), never vanishes."""
        task = asyncio.get_running_loop().create_task(self._owned(job), name=name)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    async def _owned(self, job: Awaitable[None]) -> None:
        try:
            await job
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("sleep group %s: a sleep or wake failed", self.name)
            self.failure = exc
            for member in self.members:
                member.runner.engine_dead.set()  # the Worker drains and exits non-zero

    async def start(self, member: Sleeper, start_engine: Callable[[], Awaitable[None]]) -> None:
        """Start a member's engine with the GPU to itself: the awake one sleeps first."""
        async with self._lock:
            if self.awake is not None and self.awake is not member:
                await self._put_to_sleep(self.awake)
            await start_engine()
            self._granted(member)

    async def acquire(self, member: Sleeper) -> None:
        """Give `member` the GPU: at once if the awake engine is idle, else after its turn."""
        async with self._lock:
            holder = self.awake
            if holder is member and member.awake:
                member.available = True
                return
            if holder is not None:
                while not holder.idle() and time.monotonic() - holder.turn_started < self.turn_s:
                    await asyncio.sleep(POLL_S * 5)
                await self._put_to_sleep(holder)
            if not member.awake:
                started = time.monotonic()
                await member.runner.engine.wake_up()
                took = time.monotonic() - started
                member.wake_times_s.append(took)
                log.info("sleep group %s: %s awake in %.2f s", self.name, member.name, took)
            self.switches += 1
            self._granted(member)

    def _granted(self, member: Sleeper) -> None:
        member.awake = member.available = True
        member.turn_started = time.monotonic()
        member.idle_since = None
        self.awake = member

    async def _put_to_sleep(self, member: Sleeper) -> None:
        """Stop dispatching to it, let its engine empty, then sleep (under the lock)."""
        member.available = False
        while member.runner.in_engine:
            await asyncio.sleep(POLL_S)
        if member.awake:
            await member.runner.engine.sleep()
            member.awake = False
            member.sleeps += 1
            log.info("sleep group %s: %s asleep", self.name, member.name)
        if self.awake is member:
            self.awake = None
        if member.runner.held or member.runner.admission.waiting:
            member.want_turn()  # it still has work: next in line

    async def idle_loop(self, every_s: float = 0.5) -> None:
        """Put the awake engine to sleep once it has been idle for `idle_s`."""
        while True:
            await asyncio.sleep(every_s)
            if self.failure is not None:
                return
            member = self.awake
            if member is None or self._lock.locked():
                continue
            now = time.monotonic()
            if not member.idle():
                member.idle_since = None
            elif member.idle_since is None:
                member.idle_since = now
            elif now - member.idle_since >= self.idle_s:
                async with self._lock:
                    if self.awake is member and member.idle():
                        await self._put_to_sleep(member)

    async def close(self) -> None:
        for job in list(self._jobs):
            job.cancel()
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)


__all__ = ["GpuShare", "Sleeper"]
