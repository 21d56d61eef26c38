"""Every Redis key and stream name agentfleet uses, built here and nowhere else.

All keys of one model share the hash tag `{<model>}`, so a Redis Cluster keeps a model's
stream, results, reply streams and traces in one slot and every script touches one slot: a
follow-up for another model goes into its parent model's outbox, in the commit, and a mover
takes it to its own model (docs/operations.md, "Redis Cluster").  Global keys are single
keys, or share a hash tag with the keys written beside them (`{registry}`, `{<batch id>}`).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

PREFIX = "af"
GROUP = "workers"  # one consumer group per model stream
MOVER_GROUP = "movers"  # the consumer group of each model's outbox (workers/mover.py)
DEFAULT_TENANT = "default"  # its streams keep the short names af:{m}:tasks and af:{m}:bulk
LANES = ("i", "b")  # interactive, bulk: the two lanes of a model, as their keys name them

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$")


def valid_model_name(model: str) -> bool:
    """Model names go into keys: letters, digits, '.', '_' and '-', 100 at most, no braces."""
    return bool(_MODEL_NAME.match(model))


_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")


def valid_tenant_name(tenant: str) -> bool:
    """Tenant names may go into keys: letters, digits, '.', '_' and '-', 64 at most."""
    return bool(_TENANT_NAME.match(tenant))


_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")


def valid_version_name(version: str) -> bool:
    """Model version names go into keys: letters, digits, '.', '_' and '-', 64 at most."""
    return bool(_VERSION_NAME.match(version))


def _tag(model: str) -> str:
    return f"{PREFIX}:{{{model}}}"


def hash_tag(key: str) -> str:
    """What a Redis Cluster hashes of `key`: the text between its first '{' and the next
    '}' (the model of a model's key), or the whole key when it has none."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else key


def _lanes_of(model: str, version: str) -> str:
    # A version's streams keep the model's hash tag: everything of one logical model stays in
    # one slot, so that moving a canary's queued tasks to the stable version is one script.
    return f"{_tag(model)}:v:{version}" if version else _tag(model)


def task_stream(model: str, tenant: str = DEFAULT_TENANT, version: str = "",
                part: int | str | None = None) -> str:
    """A tenant's interactive lane of a model: the stream its producers add tasks to and the
    model's consumer group reads.  Each tenant has its own, so that one tenant's backlog never
    sits in front of another's next task (workers read them by fair share: docs/tenants.md).
    A registered model version has its own (`af:{m}:v:<version>:tasks[:<tenant>]`,
    docs/versions.md); "" is the unversioned one a fleet without a model registry uses.

    `part`: one of the lane's affinity partitions (docs/affinity.md), `<stream>#<part>`
    ('#': no tenant or version name holds it); None is the unpartitioned stream, which every
    worker reads."""
    if tenant == DEFAULT_TENANT:
        base = f"{_lanes_of(model, version)}:tasks"
    else:
        base = f"{_lanes_of(model, version)}:tasks:{tenant}"
    return base if part is None else f"{base}#{part}"


def lane_stream(model: str, lane: str, tenant: str = DEFAULT_TENANT, version: str = "",
                part: int | str | None = None) -> str:
    """`task_stream` for lane "i", `bulk_stream` for lane "b"."""
    if lane == "b":
        return bulk_stream(model, tenant, version, part)
    return task_stream(model, tenant, version, part)


def affinity_partition(affinity_key: str, partitions: int) -> int | None:
    """The affinity partition of a task's key among a lane's `partitions` (docs/affinity.md):
    a stable hash (CRC-32, the same in every process and version), so producers and workers
    agree without asking each other.  None when affinity is off (0 partitions) or the task
    has no key: it goes to the unpartitioned stream."""
    if partitions <= 0 or not affinity_key:
        return None
    return zlib.crc32(affinity_key.encode()) % partitions


def tenant_lanes(model: str, lane: str, version: str = "") -> str:
    """The tenants that have a stream in one lane of a model (a sorted set: tenant -> 1 while
    its stream holds undelivered tasks, 0 once a worker found it drained).  Producers set 1
    with every enqueue; workers read the streams of the tenants at 1.  Each model version has
    its own."""
    return f"{_lanes_of(model, version)}:tenants:{lane}"


def queued_counts(model: str) -> str:
    """Tasks of each tenant queued on a model and not yet ended (a hash: tenant -> count),
    kept by the enqueue and commit scripts: the `max_queued` quota reads it."""
    return f"{_tag(model)}:queued"


def tokens_minute(model: str, minute: int) -> str:
    """Tokens each tenant enqueued on a model in one minute (a hash: tenant -> tokens, TTL two
    minutes; `minute` is epoch seconds of its start): the `tokens_per_minute` quota."""
    return f"{_tag(model)}:tpm:{minute}"


def quota_refusals(model: str) -> str:
    """Submits refused by a quota, by tenant and quota (a hash: "<tenant>|<quota>" -> count)."""
    return f"{_tag(model)}:refused"


def result_key(model: str, task_id: str) -> str:
    """The stored result of one task (a string holding the msgpack Result, with a TTL)."""
    return f"{_tag(model)}:result:{task_id}"


def result_prefix(model: str) -> str:
    """What every result key of a model starts with: result_key(m, id) == prefix + id."""
    return result_key(model, "")


def reply_stream(model: str, producer_id: str) -> str:
    """Where workers push results of one producer's tasks, so it waits without polling."""
    return f"{_tag(model)}:reply:{producer_id}"


def trace_key(model: str, correlation_id: str) -> str:
    """The trace events of one correlation id that happened on this model (a list)."""
    return f"{_tag(model)}:trace:{correlation_id}"


def join_state(model: str, parent_id: str) -> str:
    """One fan-out's join (a hash, kept with the parent's model): `n` children expected, the
    join step's `task`, the parent's result `parent`, `ended`, `fired`, and `r:<child id>`
    each child's result.  Written by commit.lua only: the parent's commit opens it, each
    child's first result adds itself, the one that completes it enqueues the join; children
    on other models add themselves through their outboxes (workers/lua/join.lua), so every
    script stays in one slot (docs/agent-steps.md)."""
    return f"{_tag(model)}:join:{parent_id}"


def result_cache(model: str, tenant: str, digest: str) -> str:
    """A tenant's cached answer to one input (schemas/resultcache.py's digest) on a model (a
    hash with a TTL: `r` the result's shared fields, `t` the same without content, for
    traces).  Written by commit.lua when the task that ran succeeds; read by enqueue.lua."""
    return f"{_tag(model)}:rc:{tenant}:{digest}"


def result_cache_inflight(model: str, tenant: str, digest: str) -> str:
    """The task of a tenant running one input now, and the identical tasks joined to it (a
    hash: `leader` its id, `w:<id>` each joiner's record).  Opened by enqueue.lua, resolved
    by the leader's commit (commit.lua): results for the joiners, or one of them queued."""
    return f"{_tag(model)}:rcrun:{tenant}:{digest}"


def stats_key(model: str) -> str:
    """Counters of one model (a hash): written, duplicates, ..., cache_hits, cache_joins."""
    return f"{_tag(model)}:stats"


def idempotency_key(model: str, key: str) -> str:
    """Holds the id of the task first enqueued under a producer's idempotency key."""
    return f"{_tag(model)}:idem:{key}"


def workers_key(model: str) -> str:
    """Live workers of a model (a hash: worker id -> epoch seconds of its last heartbeat)."""
    return f"{_tag(model)}:workers"


def affinity_config(model: str) -> str:
    """What a model's workers say of affinity (a hash: `partitions`, their
    affinity_partitions, written with each heartbeat), so that the exporter and `status`
    count every partition stream without being configured (docs/affinity.md)."""
    return f"{_tag(model)}:affinity"


HEARTBEAT_S = 2.0  # how often a worker writes its heartbeat into workers_key
LIVE_WITHIN_S = 10.0  # a worker whose last heartbeat is older (five missed) is gone


def live_workers(beats: Iterable[bytes | str | float], now: float,
                 within_s: float = LIVE_WITHIN_S) -> int:
    """How many of a workers_key hash's heartbeat values are recent enough to be live."""
    return sum(now - float(beat) <= within_s for beat in beats)


def delayed_key(model: str) -> str:
    """Tasks waiting for a retry (a sorted set: payload scored by the epoch second it is due)."""
    return f"{_tag(model)}:delayed"


def dead_stream(model: str) -> str:
    """Dead letters of a model (a stream of msgpack DeadLetter under field 'd')."""
    return f"{_tag(model)}:dead"


def cancelled_key(model: str) -> str:
    """Cancelled task ids (a sorted set scored by when the mark expires)."""
    return f"{_tag(model)}:cancelled"


def cancel_channel(model: str) -> str:
    """Pub/sub channel telling workers to abort a running task."""
    return f"{_tag(model)}:cancel"


def bulk_stream(model: str, tenant: str = DEFAULT_TENANT, version: str = "",
                part: int | str | None = None) -> str:
    """A tenant's bulk lane of a model (of one of its versions): tasks of bulk jobs, run when
    interactive work leaves room.  `part`: an affinity partition, as in `task_stream`."""
    if tenant == DEFAULT_TENANT:
        base = f"{_lanes_of(model, version)}:bulk"
    else:
        base = f"{_lanes_of(model, version)}:bulk:{tenant}"
    return base if part is None else f"{base}#{part}"


def batch_output(model: str, batch_id: str) -> str:
    """Results of one bulk job's tasks on this model, in completion order (a stream)."""
    return f"{_tag(model)}:batch:{batch_id}:out"


def batch_counts(model: str, batch_id: str) -> str:
    """Counts of one bulk job's finished tasks on this model, by status (a hash)."""
    return f"{_tag(model)}:batch:{batch_id}:counts"


def outbox_stream(model: str) -> str:
    """What this model's commits made for other slots (a stream), emptied by the model's
    movers: follow-ups and join steps for other models (fields: s target stream, l its
    lane's tenant set, q its model's queued counts, t tenant, d the task), and children's
    places in joins kept on other models (j the join's state, m the child's id, r its
    result, e the join's trace event, k the join model's trace list, x result ttl, and s, l,
    q, t of the join step)."""
    return f"{_tag(model)}:outbox"


def moved_key(model: str, task_id: str) -> str:
    """Marks a follow-up moved into this model's streams (a string holding its id, with a
    TTL): a second move of the same follow-up adds nothing (enqueue.lua's idempotency)."""
    return f"{_tag(model)}:moved:{task_id}"


def kpi_key(model: str, minute: int) -> str:
    """Per-minute aggregates of finished tasks by tenant (a hash; `minute` is epoch seconds of
    the minute's start), for `agentfleet report` and `status`.  Fields: workers/kpi.py."""
    return f"{_tag(model)}:kpi:{minute}"


def kpi_hour_key(model: str, hour: int) -> str:
    """The per-minute aggregates' fields summed over one hour (a hash; `hour` is epoch seconds
    of the hour's start): long reports read these instead of 60 minute hashes each."""
    return f"{_tag(model)}:kpih:{hour}"


def kpi_series_key(model: str, hour: int) -> str:
    """One hour's per-minute aggregates without tenant and version (a hash, fields
    `<minute of the hour>/<field>`): the series a report plots."""
    return f"{_tag(model)}:kpim:{hour}"


# Bulk jobs in the OpenAI Batch format (producer/batch.py).  A job can span models, so its
# own keys are global, outside every model's slot: their hash tag is the batch id.  Its tasks'
# results and counts stay per model (batch_output, batch_counts above).

def batch_meta(batch_id: str) -> str:
    """The record of one bulk job (a hash: status, created_at, totals per model, ...)."""
    return f"{PREFIX}:batch:{{{batch_id}}}:meta"


def batch_seen(batch_id: str, pass_id: str) -> str:
    """The custom ids one validation pass has seen (a hash: custom id -> line number)."""
    return f"{PREFIX}:batch:{{{batch_id}}}:seen:{pass_id}"


def batch_index() -> str:
    """Every bulk job's id (a sorted set scored by its creation time, epoch seconds)."""
    return f"{PREFIX}:batches"


# API keys of the gateway and the console (ops/apikeys.py): global, outside every model's slot.

def api_keys() -> str:
    """Every API key (a hash: key id -> msgpack ApiKeyRecord, holding the secret's digest)."""
    return f"{PREFIX}:apikeys"


# The tenant registry (producer/tenants.py) and the audit record: global keys sharing the
# hash tag {registry}, so that a change, its version bump and its audit entry stay one
# transaction on a Redis Cluster too.
_REGISTRY = f"{PREFIX}:{{registry}}"


def tenants() -> str:
    """Every configured tenant (a hash: tenant -> msgpack TenantConfig); "default" holds the
    settings of tenants without an entry of their own."""
    return f"{_REGISTRY}:tenants"


def tenants_version() -> str:
    """A counter bumped by every registry change: running processes reload when it moves."""
    return f"{_REGISTRY}:tenants:version"


def audit_log() -> str:
    """Every change to the registries (tenants, models, routing, canaries): an append-only
    stream of msgpack AuditEntry under field 'd'."""
    return f"{_REGISTRY}:audit"


# Streaming (workers/streaming.py publishes, the gateway reads): in the model's slot.

def partial_stream(model: str, task_id: str) -> str:
    """Partial output of one streaming task (a stream with a TTL): entries `d` (text delta),
    `n` (output tokens so far), `t` (epoch seconds the engine produced it); the last entry
    holds `f`, the finish reason."""
    return f"{_tag(model)}:partial:{task_id}"


# Approval gates (ops/approvals.py): per model, in its slot, so that the worker's commit
# script can hold a follow-up there atomically with its parent's result.

def approvals_held(model: str) -> str:
    """Tasks waiting for an admin's decision (a hash: task id -> msgpack Task)."""
    return f"{_tag(model)}:approvals"


def approvals_due(model: str) -> str:
    """The held tasks by deadline (a sorted set: task id scored by epoch seconds, +inf for
    none), so that overdue ones are found without reading every task."""
    return f"{_tag(model)}:approvals:due"


def approvals_log(model: str) -> str:
    """Every decision on a held task of this model (an append-only stream)."""
    return f"{_tag(model)}:approvals:log"


# The gateway (ops/gateway/): files, its record of bulk jobs, webhooks.  Global keys.

def file_meta(file_id: str) -> str:
    """One uploaded or generated file's record (a hash: tenant, filename, purpose, bytes...)."""
    return f"{PREFIX}:file:{{{file_id}}}"


def tenant_files(tenant: str) -> str:
    """A tenant's files (a sorted set: file id scored by creation time)."""
    return f"{PREFIX}:files:{{{tenant}}}"


def gateway_batch(batch_id: str) -> str:
    """What the gateway knows of a bulk job beyond producer/batch.py's record (a hash: tenant,
    input, output and error file ids, metadata); in the job's slot."""
    return f"{PREFIX}:batch:{{{batch_id}}}:gateway"


def tenant_batches(tenant: str) -> str:
    """A tenant's bulk jobs made through the gateway (a sorted set scored by creation time)."""
    return f"{PREFIX}:batches:{{{tenant}}}"


def webhooks() -> str:
    """Completion webhooks not yet delivered (a hash: task id -> msgpack webhook record)."""
    return f"{PREFIX}:webhooks"


def webhook_claim(task_id: str) -> str:
    """Held (SET NX with a TTL) by the gateway delivering one task's webhook."""
    return f"{PREFIX}:webhook:{{{task_id}}}:claim"


def purge_log() -> str:
    """Every `agentfleet purge`: who erased which tenant's data, when, and how much (an
    append-only stream)."""
    return f"{PREFIX}:purges"


# The model registry (producer/models.py, docs/versions.md): under {registry}, like the
# tenants', so that a change, its version bump and its audit entry are one transaction.

def models() -> str:
    """Every registered logical model (a hash: model -> msgpack ModelEntry: its versions,
    weights, states, stable version, fallback, canary)."""
    return f"{_REGISTRY}:models"


def templates() -> str:
    """Every prompt template version (a hash: "<name>@<version>" -> msgpack PromptTemplate)."""
    return f"{_REGISTRY}:templates"


def models_version() -> str:
    """A counter bumped by every change to the model or template registry: running processes
    reload when it moves."""
    return f"{_REGISTRY}:models:version"


def canary_lease() -> str:
    """Who runs the canary guard and the drain of retired versions (a string: holder id,
    with a TTL the holder renews): one process at a time, a worker or `canary watch`."""
    return f"{_REGISTRY}:canary:lease"


def version_load(model: str) -> str:
    """What each worker's runner of a model version reports once a second (a hash:
    "<version>|<worker>" -> "<epoch s> <completions/s> <engine slots> <mean engine s per
    task> <state>"): what the producers' SLA estimate divides the backlog by."""
    return f"{_tag(model)}:vload"
