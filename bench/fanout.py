"""Fan-out and fan-in under faults (issue 16's target): 1,000 fan-outs of 20 children each,
worker processes (fake engine) killed with SIGKILL at random and the server killed and
restarted once; every join fires exactly once with all 20 children's results, and nothing is
lost or doubled.

    python -m bench.fanout [--fanouts 1000] [--children 20] [--workers 3] [--json out.json]

Each fan-out is a root task whose JSON-schema output lists `children` parts, a child per part
(`for_each`) and a join step: 22 tasks.  The audit (`audit`, shared with
tests/test_faults.py) checks every join's state (all children ended, each result in its
place, fired once), every task's result written once, each child and join enqueued once,
each trace event recorded once, nothing pending, no queued count left.  Prints PASS or FAIL
and exits 1 on a FAIL; a worker or the server dying without being killed stops the run at
once (bench.harness).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from agentfleet.ops.embedded import ServerProcess
from agentfleet.producer.client import Producer
from agentfleet.producer.connection import connect
from agentfleet.schemas import keys
from agentfleet.schemas.errors import BrokerError
from agentfleet.schemas.settings import DEFAULT_MODEL, Settings
from agentfleet.schemas.wire import (
    Enqueued,
    Finished,
    FollowUp,
    JsonSchema,
    ResponseFormat,
    Sampling,
    Status,
    Task,
    decode_event,
    decode_result,
)

MODEL = DEFAULT_MODEL  # the workers run the fake engine under the default model's name


def fanout_tasks(count: int, children: int, tag: str = "f") -> list[Task]:
    """`count` fan-outs: a root listing `children` parts, a child per part, a join."""
    schema = {"type": "object", "required": ["parts"], "properties": {"parts": {
        "type": "array", "minItems": children, "maxItems": children,
        "items": {"type": "string", "maxLength": 24}}}}
    return [Task(model=MODEL, id=f"{tag}{i}", correlation_id=f"{tag}{i}", idempotency_key=f"{tag}{i}",
                 prompt=f"split document {tag}{i}", sampling=Sampling(max_tokens=1024),
                 response_format=ResponseFormat(type="json_schema",
                                                json_schema=JsonSchema(schema=schema)),
                 followups=[FollowUp(for_each="parts", prompt="summarise {item}",
                                     sampling=Sampling(max_tokens=16))],
                 join=FollowUp(prompt="merge {results}", sampling=Sampling(max_tokens=16)))
            for i in range(count)]


async def audit(producer: Producer, roots: list[str], children: int,
                timeout_s: float = 120.0) -> list[str]:
    """Every problem found with these fan-outs (empty: all joined once, nothing lost or
    doubled).  Waits up to `timeout_s` for the joins' results first."""
    problems: list[str] = []
    redis = producer.redis
    joins = [r + ".join" for r in roots]
    try:
        results = await producer.wait_many(joins, timeout_s=timeout_s)
    except Exception as exc:  # ResultTimeoutError: name a few of the missing
        return [f"joins missing after {timeout_s}s: {getattr(exc, 'missing', [])[:5]}"]
    problems += [f"{r.task_id}: {r.status.value} {r.error_message}" for r in results
                 if r.status is not Status.SUCCEEDED][:5]
    async with redis.pipeline(transaction=False) as pipe:
        for root in roots:
            pipe.hgetall(keys.join_state(MODEL, root))
        states = await pipe.execute()
    for root, state in zip(roots, states):
        expected = [f"{root}.1-{k}" for k in range(1, children + 1)]
        places = {k.decode()[2:]: v for k, v in state.items() if k.startswith(b"r:")}
        if sorted(places) != sorted(expected):
            problems.append(f"{root}: join waited for {sorted(places)[:3]}..., not its "
                            f"{children} children")
            continue
        filled = [decode_result(v) for v in places.values() if v]
        if (len(filled) != children or state.get(b"ended") != str(children).encode()
                or state.get(b"fired") != b"1"
                or any(r.task_id not in expected or not r.ok for r in filled)):
            problems.append(f"{root}: join state ended={state.get(b'ended')} "
                            f"fired={state.get(b'fired')} with {len(filled)} results")
    tasks = len(roots) * (children + 2)
    stats = {k.decode(): int(v) for k, v in (await redis.hgetall(keys.stats_key(MODEL))).items()}
    if stats.get("written") != tasks:
        problems.append(f"{stats.get('written')} results written, not {tasks}: {stats}")
    if stats.get("followups") != len(roots) * children:
        problems.append(f"{stats.get('followups')} children enqueued, not "
                        f"{len(roots) * children}")
    if stats.get("joins") != len(roots) or stats.get("join_missed"):
        problems.append(f"{stats.get('joins')} joins fired (not {len(roots)}), "
                        f"{stats.get('join_missed', 0)} missed")
    problems += await _traces(redis, roots, children)
    pending = 0
    for stream in (keys.task_stream(MODEL),):
        pending += (await redis.xpending(stream, keys.GROUP))["pending"]
    if pending:
        problems.append(f"{pending} tasks still pending")
    queued = await redis.hgetall(keys.queued_counts(MODEL))
    if any(int(v) for v in queued.values()):
        problems.append(f"queued counts left: {queued}")
    return problems


async def _traces(redis, roots: list[str], children: int) -> list[str]:
    """Each task of each fan-out enqueued (children, join) and finished once in its trace.
    (When a join fires is not read from the trace's times: each is taken as its record is
    built, before the script runs, so two workers' commits can land in the other order.
    tests/test_agent_steps.py checks it record by record.)"""
    problems = []
    async with redis.pipeline(transaction=False) as pipe:
        for root in roots:
            pipe.lrange(keys.trace_key(MODEL, root), 0, -1)
        lists = await pipe.execute()
    for root, raw in zip(roots, lists):
        events = [decode_event(e) for e in raw]
        enq = Counter(e.task_id for e in events if isinstance(e, Enqueued))
        fin = Counter(e.result.task_id for e in events if isinstance(e, Finished))
        if len(enq) != children + 1 or max(enq.values(), default=0) != 1:
            problems.append(f"{root}: enqueue events {dict(enq.most_common(2))} "
                            f"({len(enq)} tasks)")
        if len(fin) != children + 2 or max(fin.values(), default=0) != 1:
            problems.append(f"{root}: finish events {dict(fin.most_common(2))} ({len(fin)})")
        if len(problems) > 10:
            break
    return problems


class Workers:
    """Fake-engine worker processes (bench.harness children), killed and replaced at random:
    a worker that dies without being killed stops the benchmark (harness.ChildDied)."""

    def __init__(self, procs: harness.Processes, url: str, home: Path, count: int,
                 claim_idle_ms: int):
        self.procs, self.url, self.home, self.claim_idle_ms = procs, url, home, claim_idle_ms
        self.live: list[harness.Child] = []
        self.started = 0
        for _ in range(count):
            self.start()

    def start(self) -> None:
        self.started += 1
        env = {**os.environ, "REDIS_URL": self.url, "AGENTFLEET_ENGINE": "fake",
               "AGENTFLEET_WORKER_ID": f"fan{self.started}",
               "AGENTFLEET_CLAIM_IDLE_MS": str(self.claim_idle_ms),
               "AGENTFLEET_BLOCK_MS": "50", "AGENTFLEET_MAX_DELIVERIES": "1000",
               "AGENTFLEET_HOME": str(self.home), "AGENTFLEET_METRICS_PORT": "0",
               "AGENTFLEET_KPI_TTL_S": "0", "AGENTFLEET_LOG_FORMAT": "text"}
        self.live.append(self.procs.command(
            [sys.executable, "-m", "agentfleet", "worker"], name=f"worker{self.started}",
            env=env))

    def kill_one(self, rng: random.Random) -> None:
        victim = self.live.pop(rng.randrange(len(self.live)))
        victim.stop(signal.SIGKILL, grace_s=0.0)  # marked as stopping: not a death
        self.start()


async def submit_all(producer: Producer, tasks: list[Task], chunk: int = 100) -> list[str]:
    """Submit in chunks; a chunk refused while the server restarts is sent again (its
    idempotency keys make that safe)."""
    roots: list[str] = []
    for start in range(0, len(tasks), chunk):
        while True:
            try:
                roots += await producer.submit_many(tasks[start:start + chunk])
                break
            except BrokerError:
                await asyncio.sleep(0.1)
    return roots


async def run(args: argparse.Namespace, procs: harness.Processes, tmp: Path) -> dict:
    rng = random.Random(args.seed)
    server = ServerProcess(tmp / "server", appendfsync="always")
    url = server.start()
    watched = procs.adopt("server", server.proc, log_path=tmp / "server" / "server.log")
    workers = Workers(procs, url, tmp, args.workers, args.claim_idle_ms)
    producer = Producer(connect(url), settings=Settings.from_env({}))
    try:
        started = time.monotonic()
        submit = asyncio.ensure_future(submit_all(producer, fanout_tasks(args.fanouts,
                                                                         args.children)))
        kills, restarted, fired = 0, False, 0
        while not submit.done() or (fired := await joins_fired(producer)) < args.fanouts:
            if time.monotonic() - started > args.timeout_s:
                raise TimeoutError(f"not done in {args.timeout_s}s: {fired} joins fired")
            await asyncio.sleep(rng.uniform(0.2, 2 * args.kill_every_s))
            workers.kill_one(rng)
            kills += 1
            if not restarted and time.monotonic() - started > args.restart_after_s:
                watched.stopping = True
                server.kill()
                server.start()  # same port and append-only file
                watched = procs.adopt("server", server.proc,
                                      log_path=tmp / "server" / "server.log")
                restarted = True
        run_s = time.monotonic() - started
        problems = await audit(producer, submit.result(), args.children, timeout_s=60)
        return {"fanouts": args.fanouts, "children": args.children, "workers": args.workers,
                "tasks": args.fanouts * (args.children + 2), "kills": kills,
                "server_restarted": restarted, "run_s": round(run_s, 1),
                "tasks_per_s": round(args.fanouts * (args.children + 2) / run_s, 1),
                "problems": problems}
    finally:
        await producer.close()
        watched.stopping = True
        server.stop()


async def joins_fired(producer: Producer) -> int:
    """Joins fired so far (0 while the server restarts: ask again)."""
    try:
        return int(await producer.redis.hget(keys.stats_key(MODEL), "joins") or 0)
    except Exception:  # the server is restarting
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fanouts", type=int, default=1000)
    parser.add_argument("--children", type=int, default=20)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every-s", type=float, default=1.0,
                        help="mean time between two SIGKILLs of a random worker")
    parser.add_argument("--restart-after-s", type=float, default=5.0,
                        help="kill and restart the server once, this long after the start")
    parser.add_argument("--claim-idle-ms", type=int, default=1000)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--json", help="write the result file here")
    args = parser.parse_args(argv)
    from bench import harness  # here: tests load this file by its path for `audit` alone

    machine = harness.machine(packages=("redis", "msgspec"))
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp, \
            harness.Processes(Path(tmp) / "logs") as procs:
        (Path(tmp) / "logs").mkdir()
        report = procs.run(run(args, procs, Path(tmp)))
    print(json.dumps({k: v for k, v in report.items() if k != "problems"}), flush=True)
    for problem in report["problems"][:20]:
        print("  " + problem)
    checks = [harness.Check(
        f"{args.fanouts} fan-outs x {args.children} children, {report['kills']} worker "
        f"kills, server restarted {'once' if report['server_restarted'] else 'never'}: every "
        f"join fired once with all children's results, nothing lost or doubled",
        not report["problems"], f"{len(report['problems'])} problems")]
    status = harness.print_checks(checks)
    harness.write_result(args.json, benchmark="fanout", checks=checks, machine_info=machine,
                         **report)
    return status


if __name__ == "__main__":
    from bench.harness import entry

    sys.exit(entry(main))
