"""What a failover loses: a primary of a Redis Cluster killed under load, its replica promoted.

    python -m bench.failover [--repeats 3] [--rate 1000] [--duration-s 8] [--kill-after-s 3]
                             [--modes 0,1] [--quick] [--json out.json]

An embedded cluster of 3 primaries with one replica each (`ops.embedded.ServerCluster`, a
replica takes over after 1 s of silence).  Per repetition, on a flushed cluster, one model:

  worker    one Worker process on a FakeEngine taking 20 ms a task, which appends the id of
            every task it hands the engine to a file (so a task run twice is seen);
            `claim_idle_ms` 1000, so that what a lost XACK leaves pending comes back soon.
            A Worker that stops on an error (WorkerCrashedError) is started again in the same
            process after 0.5 s, as a supervisor would restart it; the restarts are counted.
  producer  one process calling `submit` at `--rate` per second for `--duration-s`, each with
            its own id and idempotency key; a submit that returned is *acknowledged*, one that
            raised is *refused* (the producer knows); each acknowledged task is waited for.
  failover  `--kill-after-s` into the run, SIGKILL to the primary serving the model's slot;
            once its replica is promoted, the old primary is started again (it rejoins as the
            new primary's replica, so that WAIT 1 can be met again).

Afterwards, on the promoted primary: every acknowledged task's result key.  Counted:

  lost tasks       acknowledged, and no result ever: the task is gone from the stream.
  lost results     a result the worker committed and the producer received, gone from the
                   server at the end (its task gone too, or it would have run again).
  run twice        tasks the engine ran more than once: the commit (result and XACK) or the
                   read was lost, and the task was read or reclaimed again.  Not a loss (one
                   result is kept: the commit script writes a result once), but work done twice
                   and possibly a second reply.

Each with `wait_replicas` 0 (the default: asynchronous replication) and 1 (WAIT 1 after every
enqueue, commit and move; a submit returns only once one replica has it).  The target: with
WAIT 1, nothing acknowledged is lost (no lost task, no lost result).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from bench import harness
from bench.harness import Check, Processes, Report

MODEL = "failover"
ENGINE_DELAY_S = 0.02
CLAIM_IDLE_MS = 1000
WAIT_TIMEOUT_MS = 500
NODE_TIMEOUT_MS = 1000
SETTLE_S = 30.0  # after the last submit: how long the producer waits for every result
READY_TIMEOUT_S = 60.0


def _settings(wait_replicas: int):
    from agentfleet.schemas.settings import ModelSpec, Settings

    return Settings(models={MODEL: ModelSpec(name=MODEL)}, default_model=MODEL, engine="fake",
                    wait_replicas=wait_replicas, wait_timeout_ms=WAIT_TIMEOUT_MS,
                    claim_idle_ms=CLAIM_IDLE_MS)


# ---- children ----------------------------------------------------------------------------


async def counting_worker(report: Report, url: str, wait_replicas: int, runs_path: str) -> None:
    """A Worker whose FakeEngine writes the id of every task it runs to `runs_path`."""
    import asyncio

    from agentfleet.producer.connection import connect
    from agentfleet.schemas.errors import WorkerCrashedError
    from agentfleet.workers.fake_engine import FakeEngine
    from agentfleet.workers.worker import Worker

    runs = open(runs_path, "a", buffering=1)

    class CountingEngine(FakeEngine):
        """The fake engine, keeping a list of what it ran: a test double."""

        def submit(self, requests, on_done, **kwargs):
            runs.write("".join(f"{task.id}\n" for _, task in requests))
            super().submit(requests, on_done, **kwargs)

    def start() -> tuple[Worker, asyncio.Future]:
        worker = Worker(_settings(wait_replicas), connect(url),
                        {MODEL: CountingEngine(delay_s=ENGINE_DELAY_S)}, worker_id="failover-w1")
        return worker, asyncio.ensure_future(worker.run(drain_timeout_s=5))

    worker, run = start()
    ready = asyncio.ensure_future(worker.ready.wait())
    await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        run.result()
    report("ready", {})
    while True:  # a worker that stops on an error is started again, as a supervisor would
        try:
            await run
            return
        except WorkerCrashedError as exc:
            runs.write(f"#restart {exc}\n".replace("\n", " ").rstrip() + "\n")
            await asyncio.sleep(0.5)
            worker, run = start()


async def steady_producer(report: Report, url: str, wait_replicas: int, tag: str, rate: float,
                          duration_s: float) -> None:
    """`submit` at `rate` per second; each acknowledged task waited for."""
    import asyncio

    from agentfleet.producer.client import Producer
    from agentfleet.producer.connection import connect
    from agentfleet.schemas.wire import Task

    acked: dict[str, float] = {}  # id -> when submit returned (monotonic)
    refused: dict[str, str] = {}  # id -> the error
    received: dict[str, float] = {}  # id -> when its result arrived
    async with Producer(connect(url), settings=_settings(wait_replicas)) as producer:
        await producer.wait(await producer.submit(model=MODEL, prompt="warm up"), timeout_s=30)
        report("ready", {})

        async def one(i: int) -> None:
            task_id = f"{tag}-{i}"
            task = Task(model=MODEL, id=task_id, idempotency_key=task_id, prompt=f"p {i}")
            try:
                await producer.submit(task)
            except Exception as exc:  # noqa: BLE001 - counted: the producer was told
                refused[task_id] = type(exc).__name__
                return
            acked[task_id] = time.monotonic()
            try:
                await producer.wait(task_id, timeout_s=duration_s + SETTLE_S)
                received[task_id] = time.monotonic()
            except Exception:  # noqa: BLE001 - not received: the parent looks on the server
                pass

        n = int(rate * duration_s)
        fired = []
        start = time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(start + i / rate - time.monotonic(), 0.001))
            fired.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*fired)
    report("done", {"acked": acked, "refused": refused, "received": received})


# ---- parent side -------------------------------------------------------------------------


def _promoted(cluster, victim) -> bool:
    from agentfleet.schemas import keys

    try:
        return cluster.node_for(keys.task_stream(MODEL)) is not victim
    except Exception:  # noqa: BLE001 - a node down or the cluster not yet agreed: not yet
        return False


def _results_present(cluster, ids: list[str]) -> set[str]:
    """The ids whose result key the cluster holds now."""
    from agentfleet.producer.connection import connect_sync
    from agentfleet.schemas import keys

    client = connect_sync(cluster.url)
    try:
        present = set()
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            pipe = client.pipeline(transaction=False)
            for task_id in chunk:
                pipe.exists(keys.result_key(MODEL, task_id))
            present |= {t for t, e in zip(chunk, pipe.execute()) if e}
        return present
    finally:
        client.close()


def repetition(procs: Processes, cluster, wait_replicas: int, tag: str,
               args: argparse.Namespace) -> dict:
    cluster.wait_healthy(60)
    cluster.flushall()
    runs_path = procs.log_dir / f"runs-{tag}.txt"
    with procs.scope() as scope:
        worker = scope.spawn(counting_worker, cluster.url, wait_replicas, str(runs_path),
                             serving=True, name=f"worker-{tag}")
        scope.expect(worker, "ready", READY_TIMEOUT_S)
        producer = scope.spawn(steady_producer, cluster.url, wait_replicas, tag, args.rate,
                               args.duration_s, name=f"producer-{tag}")
        scope.expect(producer, "ready", READY_TIMEOUT_S)
        from agentfleet.schemas import keys

        victim = cluster.node_for(keys.task_stream(MODEL))
        scope.sleep(args.kill_after_s)
        victim.kill()  # whatever it had not sent its replica is gone
        killed_at = time.monotonic()
        while not _promoted(cluster, victim):
            if time.monotonic() - killed_at > 60:
                raise TimeoutError("no replica took over within 60 s")
            scope.sleep(0.1)
        promoted_s = time.monotonic() - killed_at
        cluster.restart(victim)  # it rejoins as the new primary's replica
        got = scope.expect(producer, "done", args.duration_s + SETTLE_S + 120)
    acked, received = got["acked"], got["received"]
    present = _results_present(cluster, list(acked))
    lines = Path(runs_path).read_text().splitlines()
    restarts = [line[len("#restart "):] for line in lines if line.startswith("#restart")]
    runs = collections.Counter(line for line in lines if not line.startswith("#"))
    lost_tasks = sorted(t for t in acked if t not in present and t not in received)
    lost_results = sorted(t for t in received if t not in present)
    twice = sorted(t for t, c in runs.items() if c > 1 and t in acked)
    acked_before = sum(1 for t in acked.values() if t < killed_at)
    figures = {
        "wait_replicas": wait_replicas, "promoted_s": round(promoted_s, 2),
        "acked": len(acked), "acked_before_kill": acked_before, "refused": len(got["refused"]),
        "refused_by_error": dict(collections.Counter(got["refused"].values())),
        "received": len(received), "lost_tasks": len(lost_tasks),
        "lost_results": len(lost_results), "run_twice": len(twice),
        "worker_restarts": len(restarts), "worker_stopped_by": restarts[:3],
        "examples": {"lost_tasks": lost_tasks[:5], "lost_results": lost_results[:5],
                     "run_twice": twice[:5]},
    }
    return figures


def _one_line(f: dict) -> str:
    return (f"WAIT {f['wait_replicas']}: promoted in {f['promoted_s']:.1f}s; acked "
            f"{f['acked']:,} ({f['acked_before_kill']:,} before the kill), refused "
            f"{f['refused']} {f['refused_by_error']}; lost tasks {f['lost_tasks']}, lost "
            f"results {f['lost_results']}, run twice {f['run_twice']}; worker restarts "
            f"{f['worker_restarts']}")


def main(argv: list[str] | None = None) -> int:
    from agentfleet.ops.embedded import ServerCluster

    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per mode")
    parser.add_argument("--rate", type=float, default=1000.0, help="submits per second")
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--kill-after-s", type=float, default=3.0)
    parser.add_argument("--modes", default="0,1", help="wait_replicas values to measure")
    parser.add_argument("--quick", action="store_true",
                        help="one repetition per mode, 4 s of submits (the test's run)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.duration_s, args.kill_after_s = 1, 4.0, 1.5
    modes = [int(m) for m in args.modes.split(",")]

    machine = harness.machine(packages=("redis", "hiredis"))
    print(f"{machine}; {args.repeats} repetitions per mode, {args.rate:g} submits/s for "
          f"{args.duration_s:g}s, kill after {args.kill_after_s:g}s", flush=True)
    results: dict[int, list[dict]] = {m: [] for m in modes}
    with Processes() as procs, tempfile.TemporaryDirectory(prefix="af-failover-") as data_dir:
        cluster = ServerCluster(Path(data_dir), primaries=3, replicas=1,
                                node_timeout_ms=NODE_TIMEOUT_MS)
        try:
            cluster.start()
            for r in range(args.repeats):
                for m in (modes if r % 2 == 0 else modes[::-1]):
                    started = time.monotonic()
                    f = repetition(procs, cluster, m, f"w{m}r{r}", args)
                    results[m].append(f)
                    print(f"rep {r + 1} {_one_line(f)}  ({time.monotonic() - started:.1f}s)",
                          flush=True)
        finally:
            cluster.stop()
    totals = {m: {k: sum(f[k] for f in rs) for k in
                  ("acked", "refused", "lost_tasks", "lost_results", "run_twice",
                   "worker_restarts")}
              for m, rs in results.items()}
    print()
    for m, t in totals.items():
        print(f"WAIT {m}, {len(results[m])} failovers: {t}")
    checks = []
    if 1 in totals:
        t = totals[1]
        checks.append(Check("WAIT 1 loses nothing acknowledged",
                            t["lost_tasks"] == 0 and t["lost_results"] == 0,
                            f"{t['lost_tasks']} lost tasks, {t['lost_results']} lost results "
                            f"of {t['acked']:,} acknowledged"))
    if 0 in totals:  # measured, not a target: asynchronous replication may lose some
        t = totals[0]
        checks.append(Check("WAIT 0 (measured, no target)", None,
                            f"{t['lost_tasks']} lost tasks, {t['lost_results']} lost results"))
    status = harness.print_checks(checks, show_na=True)
    harness.write_result(args.json, benchmark="failover", checks=checks, machine_info=machine,
                         args={k: v for k, v in vars(args).items() if k != "json"},
                         totals=totals, runs=results)
    return status


if __name__ == "__main__":
    sys.exit(harness.entry(main))
