"""`agentfleet acl`: least-privilege Redis users for each part of the fleet, as `ACL SETUSER`
lines (Redis 7.0+ and Valkey: key permissions %R~/%W~ and selectors).

    producer  submits through the enqueue script, reads its replies and results, cancels,
              runs bulk jobs, reads the tenant registry (quotas); cannot read a task stream,
              take tasks (XREADGROUP), acknowledge (XACK), claim, touch API keys, or change
              the tenant registry
    gateway   the producer's rights, plus reading API keys (HGET only), the files, bulk-job,
              webhook and approval records, and the partial output of streaming tasks
    worker    the consumer group's commands and the keys in models' slots, reads the tenant
              registry (weights); no API keys, no change to the registry, no FLUSH*, CONFIG
    exporter  reads queue gauges and KPI aggregates (exporter, status, report); writes nothing
    admin     everything (the CLI's dlq, keys, approvals, purge)

Every key pattern is built by the key functions of schemas/keys.py with `*` for their
arguments, so the rules follow the key layout.  Scripts run with the caller's permissions:
EVAL grants nothing the user could not do command by command.

`--tenant T` narrows a producer to what the key layout lets one tenant own: its own lane
streams (`af:{m}:tasks:T`, `af:{m}:bulk:T`), its results, traces, idempotency keys and reply
streams, when its task ids, correlation ids, idempotency keys and producer ids start with `T:`
(as the gateway's do), and its bulk jobs, when their ids start with `T`.  What stays shared
(the quota bookkeeping, cancellation marks, the job index) is in docs/gateway.md.
"""

from __future__ import annotations

import secrets

from agentfleet.schemas import keys

ROLES = ("producer", "gateway", "worker", "exporter", "admin")
_ANY = "*"

# Commands every user needs: liveness and MULTI (redis-py ignores a refused CLIENT SETINFO),
# WAIT (`wait_replicas`), and what a Redis Cluster client reads of the topology.
_BASE = ["+ping", "+multi", "+exec", "+discard", "+wait", "+command", "+cluster|slots",
         "+cluster|shards"]
_SCRIPTS = ["+evalsha", "+eval", "+script|load"]


def _perm(mode: str, patterns: list[str]) -> list[str]:
    return [f"%{mode}~{p}" if mode != "RW" else f"~{p}" for p in patterns]


def _selector(patterns: list[str], commands: list[str]) -> str:
    """A selector: these commands on these keys, together (Redis 7 ACL selectors)."""
    return "(" + " ".join([*(f"~{p}" for p in patterns), *commands]) + ")"


def _lanes(tenant: str | None) -> list[str]:
    """The lane streams a producer may queue into: every tenant's, or one tenant's; of the
    unversioned streams and of every registered model version's (docs/versions.md); with
    their affinity partitions (docs/affinity.md)."""
    if tenant:
        return [keys.task_stream(_ANY, tenant), keys.bulk_stream(_ANY, tenant),
                keys.task_stream(_ANY, tenant, _ANY), keys.bulk_stream(_ANY, tenant, _ANY),
                keys.task_stream(_ANY, tenant, part=_ANY),
                keys.bulk_stream(_ANY, tenant, part=_ANY),
                keys.task_stream(_ANY, tenant, _ANY, _ANY),
                keys.bulk_stream(_ANY, tenant, _ANY, _ANY)]
    return [keys.task_stream(_ANY), keys.task_stream(_ANY, _ANY),
            keys.bulk_stream(_ANY), keys.bulk_stream(_ANY, _ANY),
            keys.task_stream(_ANY, version=_ANY), keys.task_stream(_ANY, _ANY, _ANY),
            keys.bulk_stream(_ANY, version=_ANY), keys.bulk_stream(_ANY, _ANY, _ANY),
            keys.task_stream(_ANY, part=_ANY), keys.bulk_stream(_ANY, part=_ANY),
            keys.task_stream(_ANY, version=_ANY, part=_ANY),
            keys.bulk_stream(_ANY, version=_ANY, part=_ANY)]


# The tenant sets of every lane, unversioned and per model version.
_TENANT_LANES = [keys.tenant_lanes(_ANY, _ANY), keys.tenant_lanes(_ANY, _ANY, _ANY)]


# What the enqueue script (producer/lua/enqueue.lua) calls, and the quota reads before it;
# with the result cache (docs/result-cache.md), a hit's result, reply and trace event too.
_ENQUEUE = [*_SCRIPTS, "+xadd", "+set", "+hget", "+hincrby", "+exists", "+xgroup|create",
            "+zadd", "+expire", "+hmget", "+hsetnx", "+hset", "+rpush"]
# The tenant and model registries, read (quotas, weights, data rules, versions, templates);
# changing them is the admin's (and the canary guard's, which a worker runs).
_REGISTRY = (f"(%R~{keys.tenants()} %R~{keys.tenants_version()} %R~{keys.models()} "
             f"%R~{keys.templates()} %R~{keys.models_version()} "
             f"+get +hget +hgetall +multi +exec)")
# A producer's SLA estimate (producer/routing.py): the versions' load reports and queues'
# group lag, no entry of a stream.
_SLA = "(" + " ".join([f"%R~{keys.version_load(_ANY)}", *(f"%R~{p}" for p in _lanes(None)),
                       *(f"%R~{p}" for p in _TENANT_LANES), "+hgetall", "+zrange",
                       "+xinfo|groups"]) + ")"


def _producer(tenant: str | None) -> list[str]:
    own = f"{tenant}:{_ANY}" if tenant else _ANY
    job = f"{tenant}{_ANY}" if tenant else _ANY
    return [
        *_BASE, *_SCRIPTS,
        "+xread", "+xtrim", "+xrange", "+xlen", "+get", "+zadd", "+publish", "+hgetall",
        "+hget", "+hset", "+hsetnx", "+hmget", "+del", "+unlink", "+expire", "+zrange",
        "+zrevrange", "+zrem", "+lrange",
        # its results and traces (read), its reply streams (read, trim)
        *_perm("R", [keys.result_key(_ANY, own), keys.trace_key(_ANY, own)]),
        *_perm("RW", [keys.reply_stream(_ANY, own)]),
        # cancel: a mark, and a word to the workers
        *_perm("W", [keys.cancelled_key(_ANY)]), f"&{keys.cancel_channel(_ANY)}",
        # bulk jobs: their records, custom-id checks, outputs and counts (a tenant's: the
        # jobs whose id starts with its name); the index of every job is only added to
        *_perm("RW", [keys.batch_meta(job), keys.batch_seen(job, _ANY),
                      keys.batch_output(_ANY, job), keys.batch_counts(_ANY, job)]),
        *_perm("W" if tenant else "RW", [keys.batch_index()]),
        # queue tasks: only the enqueue script's commands on the lane streams and the quota
        # bookkeeping (EVAL needs read and write on the keys it declares; this selector grants
        # these commands alone, so a lane stream is never read)
        _selector([*_lanes(tenant), *_TENANT_LANES, keys.queued_counts(_ANY),
                   keys.tokens_minute(_ANY, _ANY), keys.quota_refusals(_ANY),
                   keys.idempotency_key(_ANY, own), keys.stats_key(_ANY),
                   # the result cache: its tenant's answers and inputs in flight, and what a
                   # hit writes (its own task's result, reply stream and trace list)
                   keys.result_cache(_ANY, tenant or _ANY, _ANY),
                   keys.result_cache_inflight(_ANY, tenant or _ANY, _ANY),
                   keys.result_key(_ANY, own), keys.reply_stream(_ANY, own),
                   keys.trace_key(_ANY, own)], _ENQUEUE),
        # a bulk job's backpressure: the length of its tenant's bulk lane, nothing else of it
        "(" + " ".join(f"%R~{p}" for p in _lanes(tenant) if ":bulk" in p) + " +xlen)",
        _REGISTRY, _SLA,
    ]


def _gateway() -> list[str]:
    return [
        *_producer(None),
        "+hdel", "+hexists", "+hvals", "+zrangebyscore", "+xrevrange", "+zcard",
        *_perm("RW", [keys.approvals_held(_ANY), keys.approvals_due(_ANY),
                      keys.approvals_log(_ANY), keys.partial_stream(_ANY, _ANY),
                      keys.file_meta(_ANY), keys.tenant_files(_ANY), keys.gateway_batch(_ANY),
                      keys.tenant_batches(_ANY), keys.webhooks(), keys.webhook_claim(_ANY)]),
        # holding and deciding (ops/approvals.py scripts): a held task's idempotency key, a
        # rejected or expired one's result, reply and trace event (an approval queues
        # through the enqueue script)
        _selector([keys.approvals_held(_ANY), keys.approvals_due(_ANY),
                   keys.approvals_log(_ANY), keys.idempotency_key(_ANY, _ANY),
                   keys.result_key(_ANY, _ANY), keys.reply_stream(_ANY, _ANY),
                   keys.trace_key(_ANY, _ANY)],
                  [*_SCRIPTS, "+hget", "+hset", "+hdel", "+zadd", "+zrem", "+xadd", "+set",
                   "+expire", "+rpush"]),
        # API keys: checking one is an HGET; creating and revoking them is the admin's
        f"(%R~{keys.api_keys()} +hget)",
    ]


def _worker() -> list[str]:
    return [
        *_BASE, *_SCRIPTS, "+info",
        "+xreadgroup", "+xack", "+xclaim", "+xautoclaim", "+xpending", "+xgroup|create",
        "+xinfo|groups", "+xtrim", "+xadd", "+xlen", "+xrange", "+set", "+get", "+hset",
        "+hget", "+hsetnx", "+hdel", "+hincrby", "+hincrbyfloat", "+hgetall", "+expire",
        "+hvals", "+hmget", "+zadd", "+zrange", "+zrangebyscore", "+zscore", "+zrem", "+rpush",
        "+exists", "+xinfo|stream", "+subscribe", "+unsubscribe", "+xdel",
        *_perm("RW", [
            *_lanes(None), *_TENANT_LANES, keys.queued_counts(_ANY),
            keys.tokens_minute(_ANY, _ANY), keys.result_key(_ANY, _ANY),
            keys.reply_stream(_ANY, _ANY), keys.trace_key(_ANY, _ANY), keys.stats_key(_ANY),
            keys.delayed_key(_ANY), keys.dead_stream(_ANY), keys.cancelled_key(_ANY),
            keys.workers_key(_ANY), keys.affinity_config(_ANY), keys.batch_output(_ANY, _ANY),
            keys.batch_counts(_ANY, _ANY), keys.kpi_key(_ANY, _ANY),
            keys.kpi_hour_key(_ANY, _ANY), keys.kpi_series_key(_ANY, _ANY),
            keys.partial_stream(_ANY, _ANY), keys.join_state(_ANY, _ANY),
            # follow-ups for other models, and the mover's marks (workers/mover.py)
            keys.outbox_stream(_ANY), keys.moved_key(_ANY, _ANY),
            # the commit script may hold a follow-up for approval (ops/approvals.py)
            keys.approvals_held(_ANY), keys.approvals_due(_ANY),
            keys.join_state(_ANY, _ANY),  # fan-outs' joins (docs/agent-steps.md)
            # the result cache's answers and inputs in flight (docs/result-cache.md)
            keys.result_cache(_ANY, _ANY, _ANY), keys.result_cache_inflight(_ANY, _ANY, _ANY),
            # model versions: load reports, and the canary guard's lease, registry changes
            # (promote, step, roll back) and their audit records (ops/canary.py)
            keys.version_load(_ANY), keys.canary_lease(), keys.models(),
            keys.models_version(), keys.audit_log()]),
        "+watch", "+unwatch", "+incr", "+pexpire", "+del",
        f"&{keys.cancel_channel(_ANY)}",
        _REGISTRY,
    ]


def _exporter() -> list[str]:
    return [
        *_BASE, "+info", "+xlen", "+xinfo|groups", "+xinfo|stream", "+xpending", "+hgetall",
        "+hget", "+zcard", "+zrange",
        *_perm("R", [*_lanes(None), *_TENANT_LANES, keys.queued_counts(_ANY),
                     keys.quota_refusals(_ANY), keys.workers_key(_ANY),
                     keys.affinity_config(_ANY), keys.stats_key(_ANY),
                     keys.delayed_key(_ANY), keys.dead_stream(_ANY), keys.kpi_key(_ANY, _ANY),
                     keys.kpi_hour_key(_ANY, _ANY), keys.kpi_series_key(_ANY, _ANY),
                     keys.version_load(_ANY)]),
        _REGISTRY,
    ]


def rules(role: str, tenant: str | None = None) -> list[str]:
    """The ACL rules of one role (without the user's name, state or password)."""
    if role == "producer":
        return _producer(tenant)
    if tenant is not None:
        raise ValueError(f"--tenant narrows the producer only, not the {role}")
    if role == "gateway":
        return _gateway()
    if role == "worker":
        return _worker()
    if role == "exporter":
        return _exporter()
    if role == "admin":
        return ["+@all", "~*", "&*"]
    raise ValueError(f"unknown role {role!r}; one of {ROLES}")


def setuser(name: str, role: str, password: str, tenant: str | None = None) -> list[str]:
    """The arguments of one `ACL SETUSER` (reset first: the line says everything)."""
    return ["ACL", "SETUSER", name, "reset", "on", f">{password}", "resetchannels",
            *rules(role, tenant)]


def lines(prefix: str = "agentfleet-", tenant: str | None = None,
          passwords: dict[str, str] | None = None) -> list[tuple[str, str, list[str]]]:
    """(user, password, SETUSER arguments) for every role, or for a tenant's producer."""
    passwords = passwords or {}
    out = []
    roles = ["producer"] if tenant else list(ROLES)
    for role in roles:
        name = f"{prefix}{role}" + (f"-{tenant}" if tenant else "")
        password = passwords.get(role) or secrets.token_urlsafe(24)
        out.append((name, password, setuser(name, role, password, tenant)))
    return out


def render(args: list[str]) -> str:
    """One line for redis-cli (rules with braces or spaces quoted)."""
    return " ".join(f'"{a}"' if any(c in a for c in " (){}") else a for a in args)
