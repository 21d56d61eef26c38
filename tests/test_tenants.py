"""Tenants: the registry and its audit, quotas at submit, a stream per tenant, fair shares in
tokens (workers/admission.py) and registry changes reaching running workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import msgspec
import pytest

from agentfleet.producer.tenants import TenantRegistry, UnknownTenantError
from agentfleet.schemas import keys
from agentfleet.schemas.errors import QuotaExceededError, ValidationError
from agentfleet.schemas.tenants import TenantTable, estimate_tokens
from agentfleet.schemas.wire import FollowUp, Sampling, Task, TenantConfig
from agentfleet.workers.admission import Admission
from agentfleet.workers.fake_engine import FakeEngine

# ---- the registry ----------------------------------------------------------------------


@pytest.mark.cluster_too
async def test_registry_changes_are_checked_versioned_and_audited(redis):
    reg = TenantRegistry(redis)
    await reg.set("acme", TenantConfig(weight=2, max_queued=100), who="ops", why="contract")
    await reg.update("acme", who="ops", max_queued=50)
    table = await reg.table()
    assert table.version == 2 and table.get("acme").max_queued == 50
    assert table.get("acme").weight == 2
    assert table.get("nobody") == TenantConfig()  # unknown: the default's settings
    await reg.set("default", TenantConfig(weight=3))
    assert (await reg.table()).get("nobody").weight == 3
    removed = await reg.remove("acme", who="ops", why="left")
    assert removed.max_queued == 50
    with pytest.raises(UnknownTenantError):
        await reg.remove("acme")
    trail = await reg.audit()
    assert [(e.subject, e.action) for e in trail] == [
        ("acme", "remove"), ("default", "set"), ("acme", "set"), ("acme", "set")]
    assert trail[0].before["max_queued"] == 50 and trail[0].after is None
    assert trail[-1].who == "ops" and trail[-1].why == "contract" and trail[-1].before is None
    assert trail[2].before["max_queued"] == 100 and trail[2].after["max_queued"] == 50


@pytest.mark.parametrize("field, value", [
    ("weight", 0), ("weight", -1), ("weight", float("inf")), ("max_queued", -5),
    ("tokens_per_minute", -1), ("max_running", 10**13), ("cache_group", "a b")])
async def test_impossible_settings_are_refused_naming_the_field(redis, field, value):
    with pytest.raises(ValidationError) as err:
        await TenantRegistry(redis).set("acme", TenantConfig(**{field: value}))
    assert err.value.field == field
    assert await redis.hlen(keys.tenants()) == 0


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "{acme}", "-dash"])
async def test_malformed_tenant_names_are_refused_at_submit_and_in_the_registry(
        redis, producer, name):
    with pytest.raises(ValidationError) as err:
        await producer.submit(model="m1", prompt="hi", tenant=name)
    assert err.value.field == "tenant"
    with pytest.raises(ValidationError):
        await TenantRegistry(redis).set(name, TenantConfig())


# ---- a stream per tenant ---------------------------------------------------------------


@pytest.mark.cluster_too
async def test_each_tenant_has_its_own_streams_and_follow_ups_stay_in_them(
        redis, producer, start_worker):
    await start_worker()
    chain = await producer.submit(model="m1", prompt="hi", tenant="acme",
                                  followups=[FollowUp(model="m2", prompt="then {output}")])
    bulk = await producer.submit(model="m1", prompt="bulk", tenant="acme", batch_id="job1")
    first, second = await producer.wait_chain(chain, timeout_s=10)
    assert (first.tenant, second.tenant, second.model) == ("acme", "acme", "m2")
    assert (await producer.wait(bulk, timeout_s=10)).ok
    for stream in (keys.task_stream("m1", "acme"), keys.bulk_stream("m1", "acme"),
                   keys.task_stream("m2", "acme")):
        assert await redis.xlen(stream) >= 1, stream
    assert await redis.xlen(keys.task_stream("m1")) == 0  # the default tenant's: untouched
    # every task ended: nothing counts as queued any more
    assert int(await redis.hget(keys.queued_counts("m1"), "acme")) == 0
    assert int(await redis.hget(keys.queued_counts("m2"), "acme")) == 0


async def test_a_retry_goes_back_into_its_tenants_stream(redis, producer, start_worker,
                                                          settings):
    await start_worker(("m1",))
    task_id = await producer.submit(model="m1", prompt="flaky", tenant="acme",
                                    metadata={"fake_fail_attempts": "1"})
    result = await producer.wait(task_id, timeout_s=10)
    assert result.ok and result.attempts == 2
    entries = await redis.xrange(keys.task_stream("m1", "acme"))
    assert len(entries) == 2  # the first attempt, and the promoted retry
    assert int(await redis.hget(keys.queued_counts("m1"), "acme")) == 0


# ---- quotas ----------------------------------------------------------------------------


@pytest.mark.cluster_too
async def test_over_max_queued_nothing_is_queued_and_retry_after_is_given(redis, producer):
    await TenantRegistry(redis).set("small", TenantConfig(max_queued=3))
    await asyncio.sleep(1.1)  # the producer's registry cache refreshes within a second
    ids = await producer.submit_many([Task(model="m1", prompt=f"p{i}", tenant="small")
                                      for i in range(3)])
    assert len(ids) == 3
    with pytest.raises(QuotaExceededError) as err:
        await producer.submit(model="m1", prompt="one more", tenant="small")
    assert (err.value.quota, err.value.limit, err.value.tenant) == ("max_queued", 3, "small")
    assert err.value.retry_after_s > 0 and err.value.queued_ids == []
    with pytest.raises(QuotaExceededError):
        await producer.submit_many([Task(model="m1", prompt="x", tenant="small")] * 2)
    assert await redis.xlen(keys.task_stream("m1", "small")) == 3  # nothing more went in
    assert await redis.hget(keys.quota_refusals("m1"), "small|max_queued") == b"1"
    # another tenant and another model are not held back
    await producer.submit(model="m1", prompt="fine", tenant="other")
    await producer.submit(model="m2", prompt="fine", tenant="small")


async def test_tokens_per_minute_counts_prompt_and_max_tokens(redis, producer):
    task = Task(model="m1", prompt="x" * 400, tenant="tpm", sampling=Sampling(max_tokens=100))
    cost = estimate_tokens(task)  # 400 / 4 + 1 + 100
    assert cost == 201
    await TenantRegistry(redis).set("tpm", TenantConfig(tokens_per_minute=2 * cost))
    await asyncio.sleep(1.1)
    await producer.submit_many([msgspec.structs.replace(task) for _ in range(2)])
    with pytest.raises(QuotaExceededError) as err:
        await producer.submit(msgspec.structs.replace(task))
    assert err.value.quota == "tokens_per_minute"
    assert 0 < err.value.retry_after_s <= 60.1


async def test_a_bulk_job_over_quota_is_held_back_not_refused(redis, producer, start_worker,
                                                              settings):
    await TenantRegistry(redis).set("bulky", TenantConfig(max_queued=20))
    await asyncio.sleep(1.1)
    s = msgspec.structs.replace(settings, max_inflight=8)
    await start_worker(("m1",), engines={"m1": FakeEngine(delay_s=0.02)}, worker_settings=s)
    tasks = [Task(model="m1", prompt=f"line {i}", tenant="bulky", batch_id="big")
             for i in range(100)]
    started = time.monotonic()
    ids = await producer.submit_many(tasks, on_quota="wait")  # returns once all are queued
    assert len(ids) == 100 and time.monotonic() - started > 0.1  # it had to wait
    results = await producer.wait_many(ids, timeout_s=30)
    assert all(r.ok for r in results)
    assert int(await redis.hget(keys.queued_counts("m1"), "bulky")) == 0


# ---- fair shares (admission, no server) -------------------------------------------------


def _admission(slots: int, weights: dict[str, float], fair: bool = True) -> Admission:
    return Admission(slots=slots, bulk_cap=slots, fair=fair,
                     policy=lambda t: (weights.get(t, 1.0), 0))


def _run(adm: Admission, rounds: int, actual: dict[str, int],
         running: list | None = None) -> dict[str, int]:
    """Finish one running task at a time (oldest first), charging its real token count."""
    served: dict[str, int] = {}
    running = running if running is not None else []
    for _ in range(rounds):
        running += adm.dispatch()
        request_id, task = running.pop(0)
        tokens = actual[task.tenant]
        served[task.tenant] = served.get(task.tenant, 0) + tokens
        adm.done(request_id, tokens - task.sampling.max_tokens, task.sampling.max_tokens)
    return served


def test_backlogged_tenants_get_token_shares_in_proportion_to_their_weights():
    weights = {"a": 1, "b": 2, "c": 5}
    prompt = {"a": 10, "b": 200, "c": 40}  # words: different prompt lengths
    adm = _admission(4, weights)
    running = []
    for tenant in weights:
        running += adm.offer([(f"{tenant}{i}", Task(model="m", tenant=tenant,
                                                    prompt="x " * prompt[tenant],
                                                    sampling=Sampling(max_tokens=16)), False)
                              for i in range(3000)])
    actual = {t: prompt[t] * 2 // 4 + 1 + 16 for t in weights}
    served = _run(adm, 3000, actual, running)
    total = sum(served.values())
    for tenant, weight in weights.items():
        assert served[tenant] / total == pytest.approx(weight / 8, abs=0.02), served


def test_priority_orders_a_tenants_own_tasks_and_interactive_goes_before_bulk():
    adm = _admission(1, {})
    low = Task(model="m", tenant="a", prompt="x", priority=0)
    high = Task(model="m", tenant="a", prompt="x", priority=9)
    assert adm.offer([("first", low, False)]) == [("first", low)]  # a free slot: at once
    adm.offer([("bulk", low, True), ("low", low, False), ("high", high, False)])
    order = []
    for _ in range(3):
        adm.done(order[-1] if order else "first", 1, 1)
        (rid, _), = adm.dispatch()
        order.append(rid)
    assert order == ["high", "low", "bulk"]


def test_an_idle_tenant_banks_no_credit_and_a_busy_one_is_not_starved():
    adm = _admission(1, {})
    task = Task(model="m", tenant="a", prompt="x", sampling=Sampling(max_tokens=10))
    running = adm.offer([(f"a{i}", task, False) for i in range(200)])
    _run(adm, 100, {"a": 11}, running)  # "a" alone ran 100 tasks: its counter is far ahead
    late = Task(model="m", tenant="b", prompt="x", sampling=Sampling(max_tokens=10))
    running += adm.offer([(f"b{i}", late, False) for i in range(200)])
    served = _run(adm, 100, {"a": 11, "b": 11}, running)
    assert served["a"] == pytest.approx(served["b"], rel=0.1)  # lifted: equal from now on


def test_max_running_caps_a_tenant_and_frees_its_slots_for_others():
    adm = Admission(slots=4, bulk_cap=4, policy=lambda t: (1.0, 1 if t == "capped" else 0))
    adm.offer([(f"c{i}", Task(model="m", tenant="capped", prompt="x"), False)
               for i in range(5)])
    adm.offer([(f"o{i}", Task(model="m", tenant="other", prompt="x"), False)
               for i in range(5)])
    running = adm.dispatch()
    assert sum(t.tenant == "capped" for _, t in running) <= 1 and adm.running == 4


def test_bulk_holds_at_most_its_share_of_slots():
    adm = Admission(slots=8, bulk_cap=2)
    bulk = Task(model="m", tenant="a", prompt="x", batch_id="j")
    assert len(adm.offer([(f"b{i}", bulk, True) for i in range(10)])) == 2
    interactive = Task(model="m", tenant="a", prompt="x")
    assert len(adm.offer([(f"i{i}", interactive, False) for i in range(10)])) == 6


def test_a_newcomer_starts_in_a_spare_slot_while_a_flood_holds_every_slot():
    """A flood of equal tasks ends in waves: without the spare slots tenant B's first task
    would wait for a whole wave.  B takes spare slots up to its fair share (half of 8 at
    equal weights, so the 2 spare cap it); the flood takes none and pays back the borrowed
    slots: it starts again only when fewer than 8 run."""
    adm = Admission(slots=8, bulk_cap=8, spare=2)
    flood = adm.offer([(f"a{i}", Task(model="m", tenant="a", prompt="x"), False)
                       for i in range(100)])
    assert len(flood) == 8 and adm.offer([("a100", flood[0][1], False)]) == []
    came = adm.offer([(f"b{i}", Task(model="m", tenant="b", prompt="x"), False)
                      for i in range(5)])
    assert [rid for rid, _ in came] == ["b0", "b1"] and adm.running == 10
    adm.done("a0", 1, 1)
    adm.done("a1", 1, 1)
    assert adm.dispatch() == []  # 8 run: the borrowed slots are paid back first
    adm.done("a2", 1, 1)
    assert len(adm.dispatch()) == 1 and adm.running == 8  # then by the token counters


def test_a_lone_tenant_never_takes_spare_slots():
    adm = Admission(slots=4, bulk_cap=4, spare=2)
    assert len(adm.offer([(f"a{i}", Task(model="m", tenant="a", prompt="x"), False)
                          for i in range(10)])) == 4
    assert adm.offer([("a10", Task(model="m", tenant="a", prompt="x"), False)]) == []
    assert Admission(slots=4, bulk_cap=4, spare=2, fair=False).spare == 0


def test_fairness_off_serves_first_come_first_served():
    adm = _admission(1, {"a": 1, "b": 100}, fair=False)
    adm.offer([("a0", Task(model="m", tenant="a", prompt="x"), False)])
    adm.offer([(f"a{i}", Task(model="m", tenant="a", prompt="x"), False) for i in (1, 2)])
    adm.offer([("b0", Task(model="m", tenant="b", prompt="x"), False)])
    order = []
    last = "a0"
    for _ in range(3):
        adm.done(last, 1, 1)
        (last, _), = adm.dispatch()
        order.append(last)
    assert order == ["a1", "a2", "b0"]


# ---- fairness through a worker ---------------------------------------------------------


async def test_a_flooding_tenant_does_not_hold_back_a_steady_one(redis, producer,
                                                                 start_worker, settings):
    """A's backlog of 600 tasks sits in its own stream; B's tasks start at the next free
    engine slot, not after A's backlog."""
    s = msgspec.structs.replace(settings, max_inflight=64, read_count=64)
    engine = FakeEngine(delay_s=0.05, slots=8)  # 160 tasks/s: the engine is the bottleneck
    await start_worker(("m1",), engines={"m1": engine}, worker_settings=s)
    flood = await producer.submit_many([Task(model="m1", prompt=f"a{i}", tenant="flood")
                                        for i in range(600)])
    await asyncio.sleep(0.3)
    waits = []
    for i in range(10):
        result = await producer.wait(await producer.submit(model="m1", prompt=f"b{i}",
                                                           tenant="steady"), timeout_s=10)
        waits.append(result.timings.first_token - result.timings.enqueued)
        await asyncio.sleep(0.05)
    # A alone needs ~3.7 s for its backlog; B waits about one engine slot (<= 50 ms) + a read.
    # The bound leaves room for CI's loaded cores (a 0.6 s test bound once failed at 0.74).
    assert max(waits) < 1.0, waits
    done = await producer.wait_many(flood, timeout_s=30)
    assert all(r.ok for r in done)


async def test_a_newcomer_is_not_held_for_a_wave_of_a_flood_that_filled_the_read_ahead(
        redis, producer, start_worker, settings):
    """The GPU shape (bench/gpu, fairness phase): a flood of equal tasks came first, holds
    most of the read-ahead (8 running, the rest waiting in admission) and ends in waves of 8
    every 2 s.  B's tasks are read within REFRESH_S and start in spare engine slots: well
    within a wave, not after it (without spare slots they waited 1.1 and 3.1 s).  The
    read-ahead reserve kept for tenants holding less has its own proof (test_slots.py)."""
    s = msgspec.structs.replace(settings, max_inflight=16, read_count=16)
    engine = FakeEngine(delay_s=2.0, slots=8, spare_slots=4)
    await start_worker(("m1",), engines={"m1": engine}, worker_settings=s)
    flood = await producer.submit_many([Task(model="m1", prompt=f"a{i}", tenant="flood")
                                        for i in range(32)])
    await asyncio.sleep(1.0)  # mid-wave
    ids = await producer.submit_many([Task(model="m1", prompt=f"b{i}", tenant="steady")
                                      for i in range(3)])
    newcomers = await producer.wait_many(ids, timeout_s=10)
    floods = await producer.wait_many(flood, timeout_s=30)
    assert all(r.ok for r in floods + newcomers)
    # Judged against the wave itself, not a clock: alone B waits 0.01 to 0.14 s, but CI's
    # loaded cores once took 0.74 s, still well inside the wave's remaining second.
    enqueued = min(r.timings.enqueued for r in newcomers)
    wave_end = min(r.timings.finished for r in floods if r.timings.engine_start < enqueued)
    starts = [r.timings.engine_start for r in newcomers]
    assert max(starts) < wave_end, (starts, wave_end)


@pytest.mark.cluster_too
async def test_registry_changes_reach_a_running_worker(redis, producer, start_worker):
    worker = await start_worker(("m1",))
    runner = worker.runners[0]
    await TenantRegistry(redis).set("acme", TenantConfig(weight=7, max_running=4))
    deadline = time.monotonic() + 5
    while runner.tenants.get("acme").weight != 7 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert runner.tenants.get("acme").weight == 7
    assert runner._policy("acme") == (7, 4)  # one live worker: the whole limit


def test_cache_salts_keep_tenants_apart_unless_grouped():
    table = TenantTable({"a": TenantConfig(cache_group="shared"),
                         "b": TenantConfig(cache_group="shared")})
    assert table.cache_salt("a") == table.cache_salt("b") == "g:shared"
    assert table.cache_salt("c") != table.cache_salt("d")


def test_cli_sets_shows_lists_and_audits_tenants(server):
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ACTOR": "alice"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentfleet", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    made = cli("tenants", "set", "acme", "--weight", "2", "--max-queued", "10",
               "--why", "trial")
    assert made.returncode == 0, made.stderr
    assert "weight=2.0" in made.stdout
    assert "acme" in cli("tenants", "list").stdout
    shown = cli("tenants", "show", "acme").stdout
    assert "max_queued: 10" in shown
    bad = cli("tenants", "set", "acme", "--weight", "0")
    assert bad.returncode == 2 and "weight" in bad.stderr and "Traceback" not in bad.stderr
    assert cli("tenants", "remove", "acme", "--why", "done").returncode == 0
    audit = cli("audit", "--kind", "tenant").stdout
    assert "alice" in audit and "why: trial" in audit and "removed" in audit
