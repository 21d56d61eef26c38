"""The fault suite: real servers, real worker processes (fake engine), real signals.

Each test submits two-step chains (a task and its follow-up) and ends with an audit: every
task reached one terminal state its producer saw, and its effects (result, follow-up) were
written once, whatever was killed on the way.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentfleet.ops.embedded import ServerCluster, ServerProcess, redis_binary, valkey_binary
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.errors import BrokerError, ErrorCode, ResultTimeoutError
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import (
    FollowUp,
    Result,
    Sampling,
    Status,
    Task,
    decode_dead_letter,
    decode_task,
    encode,
)
from agentfleet.workers.worker import trim_stream

MODEL = "smollm2-135m"  # the default model's name; the workers run the fake engine
CLAIM_IDLE_MS = 1000
PARTITIONS = 0  # affinity partitions of workers and producer (tests/test_affinity_faults.py: 8)
pytestmark = pytest.mark.timeout(120)


@dataclass
class Fleet:
    server: ServerProcess
    logs: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def worker(self, name: str, **env: str) -> subprocess.Popen:
        full = {**os.environ, "REDIS_URL": self.server.url, "AGENTFLEET_ENGINE": "fake",
                "AGENTFLEET_WORKER_ID": name, "AGENTFLEET_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
                "AGENTFLEET_BLOCK_MS": "50", "AGENTFLEET_RETRY_BASE_S": "0.05",
                "AGENTFLEET_MAX_DELIVERIES": "3", "AGENTFLEET_TRIM_INTERVAL_S": "1",
                "AGENTFLEET_HOME": str(self.server.data_dir), "AGENTFLEET_METRICS_PORT": "0",
                "AGENTFLEET_AFFINITY_PARTITIONS": str(PARTITIONS), **env}
        # stderr to a file, never a pipe: a pipe nobody reads until teardown fills up (64 KiB
        # of retry warnings while the server restarts) and blocks the worker's event loop.
        log = self.logs / f"{name}-{len(self.procs)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "agentfleet", "worker"], env=full,
                                    stdout=subprocess.DEVNULL, stderr=err)
        proc.log = log
        self.procs.append(proc)
        return proc

    def report(self) -> str:
        """Each worker's state, and the end of its log where it exited or hit a traceback."""
        lines = []
        for proc in self.procs:
            code = proc.poll()
            text = proc.log.read_text(errors="replace")
            lines.append(f"worker {proc.log.stem}: {'running' if code is None else code}, "
                         f"{len(text)} bytes of log")
            if code is not None or "Traceback" in text:
                lines.append(text[-3000:])
        return "\n".join(lines)

    def restart_server(self) -> None:
        self.server.kill()
        self.server.start()  # same port, same append-only file


@pytest.fixture(params=["valkey", "redis7"])
def fleet(request, tmp_path):
    if request.param == "cluster":  # the session's cluster, flushed: no restart_server
        server = request.getfixturevalue("cluster_server")
        server.flushall()
    else:
        binary = valkey_binary() if request.param == "valkey" else redis_binary()
        server = ServerProcess(tmp_path / "server", binary=binary, appendfsync="always")
        server.start()
    global _fleet
    f = _fleet = Fleet(server, tmp_path)
    yield f
    _fleet = None
    _stop_workers(f)
    if request.param != "cluster":
        server.stop()


def _stop_workers(f: Fleet) -> None:
    for proc in f.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


# Also on a Redis Cluster of 3 primaries and 3 replicas (tests/conftest.py): the tests that
# kill, stop or crash workers; those that restart the server have their cluster form below.
on_cluster_too = pytest.mark.parametrize("fleet", ["valkey", "redis7", "cluster"], indirect=True)


@pytest.fixture
async def producer(fleet):
    p = Producer(connect(fleet.server.url), settings=Settings.from_env(
        {"AGENTFLEET_AFFINITY_PARTITIONS": str(PARTITIONS)}))
    yield p
    await p.close()


# The chains belong to three tenants: every guarantee holds across their streams.
TENANTS = ("default", "acme", "globex")


def chains(n: int, delay_s: float = 0.0, tag: str = "t",
           second_delay_s: float | None = None) -> list[Task]:
    """`n` two-step chains; the second step takes `delay_s` too unless `second_delay_s`."""
    meta = {"fake_delay_s": str(delay_s)} if delay_s else {}
    two = {} if second_delay_s is None else {"fake_delay_s": str(second_delay_s)}
    return [Task(model=MODEL, id=f"{tag}{i}", prompt=f"step one of {tag}{i}", metadata=meta,
                 idempotency_key=f"{tag}{i}",
                 followups=[FollowUp(prompt="two: {output}", metadata=two)],
                 tenant=TENANTS[i % len(TENANTS)])
            for i in range(n)]


def streams() -> list[str]:
    parts = [None, *range(PARTITIONS)]
    return [keys.task_stream(MODEL, t, part=p) for t in TENANTS for p in parts]


_fleet: Fleet | None = None  # the running test's, whose workers a failed wait describes


async def wait_until(predicate, timeout_s: float = 20.0, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, \
            f"condition not reached in time\n{_fleet.report() if _fleet else ''}"
        await asyncio.sleep(every_s)


async def pending(redis) -> int:
    total = 0
    for stream in streams():
        try:
            total += (await redis.xpending(stream, keys.GROUP))["pending"]
        except Exception:  # not created yet
            pass
    return total


async def audit(producer: Producer, roots: list[str], timeout_s: float = 30.0,
                others: int = 0) -> dict:
    """Every chain finished once: both results there, one follow-up per root, nothing pending."""
    try:
        results = await producer.wait_many(roots + [f"{r}.1" for r in roots],
                                           timeout_s=timeout_s)
    except ResultTimeoutError as exc:
        raise AssertionError(f"missing: {await _whereabouts(producer, exc.missing[:5])}") from exc
    assert all(r.status is Status.SUCCEEDED for r in results), [
        (r.task_id, r.status, r.error_message) for r in results if not r.ok][:5]
    redis = producer.redis
    stats = await lane_stats(redis)
    assert stats["written"] == 2 * len(roots) + others, stats  # each result written once
    assert stats.get("followups", 0) == len(roots), stats  # each follow-up enqueued once
    await wait_until(lambda: _zero(pending(redis)), 10)
    queued = await redis.hgetall(keys.queued_counts(MODEL))  # every task ended exactly once
    assert all(int(v) == 0 for v in queued.values()), queued
    return stats


async def lane_stats(redis) -> dict[str, int]:
    """The model's counters (af:{m}:stats): written, duplicates, followups, fenced, ..."""
    raw = await redis.hgetall(keys.stats_key(MODEL))
    return {k.decode(): int(v) for k, v in raw.items()}


async def _whereabouts(producer: Producer, task_ids: list[str]) -> dict:
    """Where a missing task is: result, pending, still in a stream, waiting for a retry."""
    redis = producer.redis
    pend, entries = [], []
    for stream in streams():
        pend += await redis.xpending_range(stream, keys.GROUP, "-", "+", 10_000)
        entries += await redis.xrange(stream)
    ids_in_stream = {}
    for eid, fields in entries:
        ids_in_stream[decode_task(fields[b"d"]).id] = eid
    pending_ids = {p["message_id"]: p for p in pend}
    found = {}
    for task_id in task_ids:
        eid = ids_in_stream.get(task_id)
        found[task_id] = {
            "result": bool(await redis.exists(keys.result_key(MODEL, task_id))),
            "entry": eid, "pending": pending_ids.get(eid) if eid else None,
            "delayed": await redis.zcard(keys.delayed_key(MODEL)),
            "group": await redis.xinfo_groups(stream)}
    return found


async def _zero(coro) -> bool:
    return await coro == 0


@on_cluster_too
async def test_sigkill_mid_batch_every_task_completes_once(fleet, producer):
    a = fleet.worker("a")
    # Long enough that `a` still holds them once `b` has started on a loaded machine (CI once
    # took over 4 s); the second steps are quick.
    roots = await producer.submit_many(chains(60, delay_s=10.0, second_delay_s=0.0))
    await wait_until(lambda: _has_pending(producer.redis, 60))  # a holds every task
    fleet.worker("b")
    await wait_until(lambda: _live_workers(producer.redis, 2))
    a.kill()  # SIGKILL with tasks in its engine
    killed_at = time.time()
    results = await producer.wait_many(roots, timeout_s=40)
    assert {r.worker_id for r in results} == {"b"}
    reclaim_s = min(r.timings.read for r in results) - killed_at
    # At most the idle time plus one reclaim window (a quarter of it), with a little slack.
    assert reclaim_s < CLAIM_IDLE_MS / 1000 * 1.25 + 0.3, reclaim_s
    stats = await audit(producer, roots)
    assert stats.get("duplicates", 0) == 0


async def _has_pending(redis, n: int) -> bool:
    return await pending(redis) >= n


async def _live_workers(redis, n: int) -> bool:
    return await redis.hlen(keys.workers_key(MODEL)) >= n


async def _positive(coro) -> bool:
    return await coro > 0


@on_cluster_too
async def test_crash_after_engine_before_result_write(fleet, producer):
    fleet.worker("a", AGENTFLEET_CRASH_AT="before_commit")
    roots = await producer.submit_many(chains(40))
    await wait_until(lambda: _positive(pending(producer.redis)))
    fleet.worker("b")
    stats = await audit(producer, roots)
    assert stats.get("duplicates", 0) == 0


@on_cluster_too
async def test_crash_after_the_commit(fleet, producer):
    a = fleet.worker("a", AGENTFLEET_CRASH_AT="after_commit")
    roots = await producer.submit_many(chains(40, delay_s=0.05))
    a.wait(20)
    fleet.worker("b")
    stats = await audit(producer, roots)
    assert stats.get("duplicates", 0) == 0


async def test_result_written_but_not_acknowledged_is_not_duplicated(fleet, producer):
    """The commit is one script, so a write without its XACK cannot happen; even if it did
    (here made by hand), the redelivered task's effects are dropped: the first write wins."""
    redis = producer.redis
    await redis.xgroup_create(keys.task_stream(MODEL), keys.GROUP, id="0", mkstream=True)
    roots = await producer.submit_many(chains(5))
    entries = await redis.xreadgroup(keys.GROUP, "ghost", {keys.task_stream(MODEL): ">"},
                                     count=1)
    task = decode_task(entries[0][1][0][1][b"d"])
    ghost = Result(task_id=task.id, status=Status.SUCCEEDED, text="the first write")
    await redis.set(keys.result_key(MODEL, task.id), encode(ghost))
    fleet.worker("b")
    await wait_until(lambda: _zero(pending(redis)), 15)
    stored = await producer.get_result(task.id, MODEL)
    assert stored.text == "the first write"
    stats = await lane_stats(redis)
    assert stats["duplicates"] == 1
    assert stats["followups"] == len(roots) - 1  # the ghost's task made none: no effects twice


@on_cluster_too
async def test_sigstop_past_idle_time_is_fenced(fleet, producer):
    a = fleet.worker("a")
    roots = await producer.submit_many(chains(30, delay_s=1.0))
    await wait_until(lambda: _positive(pending(producer.redis)))
    await asyncio.sleep(0.2)
    a.send_signal(signal.SIGSTOP)
    fleet.worker("b")
    await producer.wait_many(roots, timeout_s=30)  # b finished a's tasks
    a.send_signal(signal.SIGCONT)  # a wakes up and tries to commit what it had
    await asyncio.sleep(2.0)
    stats = await audit(producer, roots)
    assert stats.get("fenced", 0) + stats.get("duplicates", 0) >= 1
    results = await producer.wait_many(roots, timeout_s=5)
    assert {r.worker_id for r in results} == {"b"}  # a overwrote nothing


async def test_server_killed_and_restarted_under_load(fleet, producer):
    fleet.worker("a")
    fleet.worker("b")
    tasks = chains(300, delay_s=0.01)
    roots: list[str] = []
    for start in range(0, 300, 30):
        chunk = tasks[start:start + 30]
        if start == 150:
            fleet.restart_server()
        for attempt in range(100):  # a retried enqueue is safe: idempotency keys
            try:
                roots += await producer.submit_many(chunk)
                break
            except BrokerError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.05)
    assert len(set(roots)) == 300
    stats = await audit(producer, roots, timeout_s=60)
    assert stats.get("duplicates", 0) == 0
    await producer.redis.delete(keys.workers_key(MODEL))
    await wait_until(lambda: _live_workers(producer.redis, 2))  # both beat again


async def test_waits_ride_out_a_sigkilled_server_restarted_on_its_data(fleet, producer):
    """The server process itself is SIGKILLed while three producers wait on chains, stays
    down longer than a waiter's fallback poll period (1 s), and comes back on the same port
    and append-only file: every wait returns its chain, nothing lost, nothing done twice."""
    fleet.worker("a")
    fleet.worker("b")
    await wait_until(lambda: _live_workers(producer.redis, 2))
    producers = [producer] + [Producer(connect(fleet.server.url), settings=Settings.from_env({}))
                              for _ in range(2)]
    try:
        roots: list[str] = []
        waits = []
        for k, p in enumerate(producers):
            ids = await p.submit_many(chains(60, delay_s=1.0, tag=f"p{k}-"))
            roots += ids
            waits += [asyncio.ensure_future(p.wait_chain(i, timeout_s=60)) for i in ids]
        await wait_until(lambda: _has_pending(producer.redis, 100))  # in the engines
        server = fleet.server.proc
        os.kill(server.pid, signal.SIGKILL)  # the server process, not a wrapper
        server.wait()
        await asyncio.sleep(2.5)  # every waiter's fallback poll meets a refused connection
        assert not any(w.done() for w in waits), "a wait ended while the server was down"
        fleet.server.start()  # same port, same append-only file
        done = await asyncio.gather(*waits)
    finally:
        for p in producers[1:]:
            await p.close()
    assert [[r.task_id for r in chain] for chain in done] == [[r, f"{r}.1"] for r in roots]
    assert all(r.ok for chain in done for r in chain)
    await audit(producer, roots)  # each result and follow-up written once, nothing pending


async def test_a_wait_raises_the_broker_error_when_its_timeout_ends_with_the_server_down(
        fleet, producer):
    roots = await producer.submit_many(chains(3, delay_s=5.0))  # no worker: nothing finishes
    fleet.server.kill()
    started = time.monotonic()
    with pytest.raises(BrokerError, match="reading results failed"):
        await producer.wait_many(roots, timeout_s=2.5)
    assert time.monotonic() - started >= 2.5  # not before its timeout
    fleet.server.start()
    with pytest.raises(ResultTimeoutError):  # the server back, nobody serving: a timeout
        await producer.wait_many(roots, timeout_s=1.5)


async def test_a_bulk_job_wait_rides_out_a_server_restart(fleet, producer):
    from agentfleet.producer.batch import BatchClient

    batches = BatchClient(producer)
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": f"doc {i}", "max_tokens": 8}}
             for i in range(20)]
    report = await batches.submit(lines)
    waiting = asyncio.ensure_future(batches.wait(report.batch_id, timeout_s=60, poll_s=0.2))
    await asyncio.sleep(0.3)
    fleet.server.kill()
    await asyncio.sleep(1.5)
    assert not waiting.done()  # status reads fail: retried, not raised
    fleet.server.start()
    fleet.worker("a")  # served only now, after the restart
    st = await waiting
    assert (st.status, st.completed) == ("completed", 20)


@on_cluster_too
async def test_poison_task_is_dead_lettered_and_its_batch_completes(fleet, producer):
    poison = Task(model=MODEL, id="poison", prompt="boom", metadata={"fake_crash": "1"})
    roots = await producer.submit_many(chains(10, delay_s=0.05))
    await producer.submit(poison)
    restarts = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = [p for p in fleet.procs if p.poll() is None]
        if not live:
            restarts += 1
            fleet.worker(f"w{restarts}")
        if await producer.get_result("poison", MODEL) is not None and not await pending(
                producer.redis):
            break
        await asyncio.sleep(0.1)
    dead = await producer.get_result("poison", MODEL)
    assert dead.status is Status.DEAD_LETTERED and dead.error_code is ErrorCode.DELIVERY_LIMIT
    assert 3 <= restarts <= 6
    letters = await producer.redis.xrange(keys.dead_stream(MODEL))
    assert [decode_dead_letter(f[b"d"]).task_id for _, f in letters] == ["poison"]
    stats = await audit(producer, roots, others=1)  # the poison's own (dead-letter) result
    assert stats["dead_lettered"] == 1


async def test_trimming_keeps_pending_entries_and_reports_lost_ones(fleet, producer):
    redis = producer.redis
    a = fleet.worker("a")
    roots = await producer.submit_many(chains(20, delay_s=2.0))
    await wait_until(lambda: _positive(pending(redis)))
    await asyncio.sleep(0.3)
    a.send_signal(signal.SIGSTOP)
    before = await redis.xlen(keys.task_stream(MODEL))
    await trim_stream(redis, keys.task_stream(MODEL))
    pend = await redis.xpending_range(keys.task_stream(MODEL), keys.GROUP, "-", "+", 100)
    kept = {e["message_id"] for e in pend}
    in_stream = {eid for eid, _ in await redis.xrange(keys.task_stream(MODEL))}
    assert kept <= in_stream, "trimming removed a pending entry"
    assert before >= len(kept)
    victim = sorted(kept)[0]
    await redis.xdel(keys.task_stream(MODEL), victim)  # an operator deletes a pending entry
    fleet.worker("b")
    await wait_until(lambda: _zero(pending(redis)), 20)
    stats = await lane_stats(redis)
    assert stats["lost"] == 1
    letters = [decode_dead_letter(f[b"d"]) for _, f in await redis.xrange(
        keys.dead_stream(MODEL))]
    assert [d.error_code for d in letters] == [ErrorCode.LOST]
    assert letters[0].task_id == "entry-" + victim.decode()
    done = [r for r in await asyncio.gather(*(producer.get_result(t, MODEL) for t in roots))
            if r is not None]
    assert len(done) == len(roots) - 1


@on_cluster_too
async def test_sigterm_drains_in_flight_work_and_exits_0(fleet, producer):
    a = fleet.worker("a")
    roots = await producer.submit_many(chains(20, delay_s=1.0))
    await wait_until(lambda: _positive(pending(producer.redis)))
    await asyncio.sleep(0.2)
    a.send_signal(signal.SIGTERM)
    assert a.wait(15) == 0
    done = [r for r in await asyncio.gather(*(producer.get_result(t, MODEL) for t in roots))
            if r is not None]
    assert done and all(r.worker_id == "a" and r.ok for r in done)
    assert await pending(producer.redis) == 0  # all it read, it finished
    fleet.worker("b")
    await audit(producer, roots)


@on_cluster_too
async def test_second_sigterm_stops_at_once_leaving_work_claimable(fleet, producer):
    a = fleet.worker("a")
    roots = await producer.submit_many(chains(20, delay_s=5.0))
    await wait_until(lambda: _positive(pending(producer.redis)))
    await asyncio.sleep(0.3)
    a.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    a.send_signal(signal.SIGTERM)
    started = time.monotonic()
    a.wait(10)
    assert time.monotonic() - started < 3
    assert await pending(producer.redis) > 0  # handed back, not acknowledged
    fleet.worker("b")
    await audit(producer, roots, timeout_s=40)


@pytest.mark.timeout(180)
async def test_chaos_random_kills_and_a_server_restart(fleet, producer, request):
    if "redis7" in request.node.name:
        pytest.skip("the 60-second chaos run uses Valkey; every other fault test runs on both")
    rng = random.Random(7)
    # Random kills are not poison: a task may be unlucky three times, so no delivery limit here
    # (the poison test covers it).
    chaos_env = {"AGENTFLEET_MAX_DELIVERIES": "1000"}
    workers = [fleet.worker(f"c{i}", **chaos_env) for i in range(3)]
    roots: list[str] = []
    kills = 0
    started = time.monotonic()
    restarted = False
    batch = 0
    while time.monotonic() - started < 60:
        tasks = chains(20, delay_s=rng.choice([0.0, 0.05, 0.2]), tag=f"b{batch}-")
        batch += 1
        while True:
            try:
                roots += await producer.submit_many(tasks)
                break
            except BrokerError:
                await asyncio.sleep(0.1)
        if rng.random() < 0.15:
            victim = rng.randrange(len(workers))
            workers[victim].kill()
            workers[victim] = fleet.worker(f"c{victim}-{kills}", **chaos_env)
            kills += 1
        if not restarted and time.monotonic() - started > 30:
            fleet.restart_server()
            restarted = True
        await asyncio.sleep(0.1)
    stats = await audit(producer, roots, timeout_s=90)
    assert kills >= 5 and restarted
    assert len(set(roots)) == len(roots)
    print(f"chaos: {len(roots)} chains, {kills} worker kills, 1 server restart, "
          f"stats {stats}")


def _bench_fanout():
    """bench/fanout.py by its path: pytest puts the checkout's parent folder first on
    sys.path (the root is a package), where a sibling named `bench` may sit."""
    path = Path(__file__).resolve().parents[1] / "bench" / "fanout.py"
    spec = importlib.util.spec_from_file_location("agentfleet_bench_fanout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
async def test_fan_outs_join_exactly_once_while_workers_are_killed(fleet, producer, request):
    """Issue 16's target, smaller: 400 fan-outs of 20 children on Valkey (200 on Redis 7.0),
    three workers killed at random and replaced, the server killed and restarted once: every
    join fires once with all 20 children's results, nothing lost or doubled (bench/fanout.py's
    audit).  The full 1,000 took 37 to 71 s here, by the machine's load: `python -m
    bench.fanout` runs it."""
    bench = _bench_fanout()
    audit, fanout_tasks, joins_fired, submit_all = (bench.audit, bench.fanout_tasks,
                                                    bench.joins_fired, bench.submit_all)
    count = 200 if "redis7" in request.node.name else 400
    rng = random.Random(16)
    env = {"AGENTFLEET_MAX_DELIVERIES": "1000", "AGENTFLEET_KPI_TTL_S": "0"}
    workers = [fleet.worker(f"f{i}", **env) for i in range(3)]
    submit = asyncio.ensure_future(submit_all(producer, fanout_tasks(count, 20)))
    kills, restarted, started = 0, False, time.monotonic()
    # at least three kills even when the machine is fast enough to finish before them
    while kills < 3 or not submit.done() or await joins_fired(producer) < count:
        assert time.monotonic() - started < 180, f"{await joins_fired(producer)} joins fired"
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        victim = rng.randrange(len(workers))
        workers[victim].kill()
        workers[victim] = fleet.worker(f"f{victim}-{kills}", **env)
        kills += 1
        if not restarted and kills == 2:  # by progress, not by clock: a fast run ends in 5 s
            fleet.restart_server()
            restarted = True
    problems = await audit(producer, submit.result(), 20)
    assert not problems, problems[:10]
    assert kills >= 3 and restarted


# ---- on a Redis Cluster: follow-ups across nodes, a primary killed -------------------------

SECOND = "second"  # hashes to another primary than MODEL on a 3-primary cluster


def _two_models_file(folder) -> str:
    path = folder / "models.toml"
    path.write_text(f"[models.{MODEL}]\n[models.{SECOND}]\n")
    return str(path)


def cross_chains(n: int, tag: str, delay_s: float = 0.0) -> list[Task]:
    meta = {"fake_delay_s": str(delay_s)} if delay_s else {}
    return [Task(model=MODEL, id=f"{tag}{i}", prompt=f"one {tag}{i}", metadata=meta,
                 idempotency_key=f"{tag}{i}", tenant=TENANTS[i % len(TENANTS)],
                 followups=[FollowUp(model=SECOND, prompt="two: {output}")])
            for i in range(n)]


async def audit_across(producer: Producer, roots: list[str], timeout_s: float = 60.0) -> dict:
    """Every chain's two steps succeeded, each result written once on its own model, each
    follow-up moved out of the outbox, nothing pending or queued."""
    try:
        results = await producer.wait_many(roots + [f"{r}.1" for r in roots],
                                           timeout_s=timeout_s)
    except ResultTimeoutError as exc:
        raise AssertionError(f"missing {len(exc.missing)}: {exc.missing[:5]}") from exc
    assert all(r.status is Status.SUCCEEDED for r in results)
    assert {r.model for r in results[len(roots):]} == {SECOND}
    redis = producer.redis
    first = {k.decode(): int(v) for k, v in (await redis.hgetall(keys.stats_key(MODEL))).items()}
    second = {k.decode(): int(v) for k, v in
              (await redis.hgetall(keys.stats_key(SECOND))).items()}
    assert first["written"] == len(roots) and first["followups"] == len(roots), first
    assert second["written"] == len(roots) and second.get("duplicates", 0) == 0, second
    await wait_until(lambda: _zero(redis.xlen(keys.outbox_stream(MODEL))), 10)
    for model in (MODEL, SECOND):
        queued = await redis.hgetall(keys.queued_counts(model))
        assert all(int(v) == 0 for v in queued.values()), (model, queued)
    return {"first": first, "second": second}


@pytest.mark.parametrize("fleet", ["cluster"], indirect=True)
@pytest.mark.timeout(120)
async def test_worker_kills_with_follow_ups_across_cluster_nodes_lose_and_double_nothing(
        fleet, producer, tmp_path):
    rng = random.Random(11)
    env = {"AGENTFLEET_MODELS_FILE": _two_models_file(tmp_path),
           "AGENTFLEET_MAX_DELIVERIES": "1000"}
    producer.settings = Settings.from_env(env)
    workers = [fleet.worker(f"x{i}", **env) for i in range(3)]
    roots: list[str] = []
    kills = 0
    started = time.monotonic()
    batch = 0
    while time.monotonic() - started < 25:
        roots += await producer.submit_many(cross_chains(
            20, f"k{batch}-", delay_s=rng.choice([0.0, 0.05, 0.2])))
        batch += 1
        if rng.random() < 0.2:
            victim = rng.randrange(len(workers))
            workers[victim].kill()
            workers[victim] = fleet.worker(f"x{victim}-{kills}", **env)
            kills += 1
        await asyncio.sleep(0.1)
    stats = await audit_across(producer, roots)
    assert kills >= 3
    print(f"cluster: {len(roots)} chains across two nodes, {kills} worker kills: {stats}")


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of this test's own (3 primaries, 3 replicas), whose primaries may be
    killed: a replica takes over after 1 s of silence."""
    cluster = ServerCluster(tmp_path / "cluster", node_timeout_ms=1000)
    cluster.start()
    f = Fleet(cluster, tmp_path)
    yield f
    _stop_workers(f)
    cluster.stop()


@pytest.mark.timeout(150)
async def test_a_primary_killed_and_its_replica_promoted_loses_nothing_with_wait(own_cluster,
                                                                              tmp_path):
    """WAIT for one replica after every enqueue, commit and move: a submit that returned,
    and a commit that was confirmed, are on the replica that takes over."""
    fleet = own_cluster
    env = {"AGENTFLEET_MODELS_FILE": _two_models_file(tmp_path),
           "AGENTFLEET_WAIT_REPLICAS": "1", "AGENTFLEET_WAIT_TIMEOUT_MS": "500"}
    producer = Producer(connect(fleet.server.url), settings=Settings.from_env(env))
    try:
        for name in ("a", "b"):
            fleet.worker(name, **env)
        victim = fleet.server.node_for(keys.task_stream(MODEL))
        roots: list[str] = []
        retried = 0
        started = time.monotonic()
        failover = asyncio.ensure_future(_kill_and_rejoin(fleet, victim, after_s=4))
        batch = 0
        while time.monotonic() - started < 14:
            tasks = cross_chains(20, f"f{batch}-", delay_s=0.05)
            batch += 1
            while True:  # a retried submit is safe: idempotency keys
                try:
                    roots += await producer.submit_many(tasks)
                    break
                except BrokerError:  # the cluster down, or no replica yet (NotReplicated)
                    retried += 1
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.05)
        promoted_s = await failover
        stats = await audit_across(producer, roots, timeout_s=90)
        assert len(set(roots)) == len(roots) and retried > 0
        print(f"failover: replica promoted {promoted_s:.1f}s after the kill; {len(roots)} "
              f"chains, {retried} submits retried across it: {stats}")
    finally:
        await producer.close()


async def _kill_and_rejoin(fleet: Fleet, victim, after_s: float) -> float:
    """SIGKILL `victim` (a primary) after `after_s`; once its replica has taken over, start
    it again: it rejoins as the new primary's replica (until then WAIT 1 cannot be met on
    that slot, and its writes are refused with NotReplicatedError and retried).  Returns how
    long the promotion took."""
    await asyncio.sleep(after_s)
    victim.kill()  # whatever it had not sent its replica is gone
    killed_at = time.monotonic()
    while not await asyncio.to_thread(_promoted, fleet, victim):
        assert time.monotonic() - killed_at < 30, "no replica took over"
        await asyncio.sleep(0.1)
    promoted_s = time.monotonic() - killed_at
    fleet.server.restart(victim)  # from this thread: the server dies with its starter
    return promoted_s


def _promoted(fleet: Fleet, victim) -> bool:
    try:
        return fleet.server.node_for(keys.task_stream(MODEL)) is not victim
    except Exception:  # noqa: BLE001 - a node that is down or not yet agreed: not yet
        return False


def cross_fanouts(n: int, tag: str, children: int = 5) -> list[Task]:
    """Fan-outs across two primaries: the parent on MODEL, its children and join on SECOND
    (each child's place goes through SECOND's outbox to MODEL's slot, the join step through
    MODEL's outbox to SECOND)."""
    return [Task(model=MODEL, id=f"{tag}{i}", prompt=f"split {tag}{i}", idempotency_key=f"{tag}{i}",
                 tenant=TENANTS[i % len(TENANTS)],
                 followups=[FollowUp(items=list(range(children)), model=SECOND,
                                     prompt="part {item}", sampling=Sampling(max_tokens=8))],
                 join=FollowUp(model=SECOND, prompt="merge {results}",
                               sampling=Sampling(max_tokens=8),
                               metadata={"fake_output": "joined"}))
            for i in range(n)]


@pytest.mark.parametrize("fleet", ["cluster"], indirect=True)
@pytest.mark.timeout(150)
async def test_worker_kills_with_fan_outs_across_cluster_nodes_join_each_once(
        fleet, producer, tmp_path):
    rng = random.Random(16)
    env = {"AGENTFLEET_MODELS_FILE": _two_models_file(tmp_path),
           "AGENTFLEET_MAX_DELIVERIES": "1000"}
    producer.settings = Settings.from_env(env)
    workers = [fleet.worker(f"j{i}", **env) for i in range(3)]
    roots: list[str] = []
    kills, batch, started = 0, 0, time.monotonic()
    while time.monotonic() - started < 20 or kills < 3:
        roots += await producer.submit_many(cross_fanouts(10, f"j{batch}-"))
        batch += 1
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        victim = rng.randrange(len(workers))
        workers[victim].kill()
        workers[victim] = fleet.worker(f"j{victim}-{kills}", **env)
        kills += 1
    try:
        joins = await producer.wait_many([r + ".join" for r in roots], timeout_s=60)
    except ResultTimeoutError as exc:
        raise AssertionError(f"joins missing {len(exc.missing)}: {exc.missing[:5]}") from exc
    assert all(j.status is Status.SUCCEEDED and j.text == "joined" for j in joins)
    redis = producer.redis
    for root in roots:
        state = await redis.hgetall(keys.join_state(MODEL, root))
        assert (state[b"ended"], state[b"fired"]) == (b"5", b"1"), (root, state)
    first = await redis.hgetall(keys.stats_key(MODEL))
    second = await redis.hgetall(keys.stats_key(SECOND))
    assert int(first[b"joins"]) == len(roots), first  # each join fired once, on MODEL's slot
    # each child and join step written once on SECOND
    assert int(second[b"written"]) == 6 * len(roots) and b"duplicates" not in second, second
    await wait_until(lambda: _zero(redis.xlen(keys.outbox_stream(MODEL))), 10)
    await wait_until(lambda: _zero(redis.xlen(keys.outbox_stream(SECOND))), 10)
    print(f"cluster: {len(roots)} fan-outs of 5 across two nodes, {kills} worker kills, "
          f"join fills moved again: {int(first.get(b'join_missed', 0))}")
