"""Model versions: the registry and its audit, routing by weight (sticky) and by pin, prompt
templates, follow-ups keeping their version, SLA classes with a fallback or a typed refusal,
and workers following registry changes (a hot swap under load loses nothing).  On the fake
engine; the real one: tests/test_versions_engine.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from agentfleet.producer.models import ModelRegistry
from agentfleet.producer.routing import BUDGET_SHARE
from agentfleet.producer.templates import TemplateRegistry, render
from agentfleet.schemas import keys
from agentfleet.schemas.errors import (
    RegistryError,
    RetiredVersionError,
    SlaExceededError,
    UnknownVersionError,
    ValidationError,
)
from agentfleet.schemas.registry import ModelTable, TableCache, parse_guard
from agentfleet.schemas.wire import (
    FollowUp,
    Message,
    ModelEntry,
    ModelVersion,
    Sampling,
    Task,
    VersionState,
)
from agentfleet.workers.fake_engine import FakeEngine
from versions_fleet import fake_factory, model_directory, wait_until


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return model_directory(tmp_path)


async def fresh(producer) -> None:
    """The producer's registry cache reads again at the next submit."""
    producer.models._checked_at = 0.0


# ---- the registry ----------------------------------------------------------------------------

async def test_registry_changes_are_checked_versioned_and_audited(redis, model_dir, tmp_path):
    reg = ModelRegistry(redis)
    v1 = await reg.register("m", "v1", path=str(model_dir), check_engine=False, who="ops",
                            why="first weights")
    assert v1.weight == 100  # a model's first version takes all the traffic
    v2 = await reg.register("m", "v2", path=str(model_dir), check_engine=False, who="ops")
    assert v2.weight == 0  # a later one none, until weights, a canary or promote say so
    with pytest.raises(RegistryError):
        await reg.register("m", "v2", path=str(model_dir), check_engine=False)
    with pytest.raises(ValidationError) as err:
        await reg.register("m", "v3", path=str(tmp_path / "missing"), check_engine=False)
    assert err.value.field == "path"
    with pytest.raises(ValidationError) as err:
        await reg.register("m", "bad name", path=str(model_dir), check_engine=False)
    assert err.value.field == "version"
    with pytest.raises(ValidationError) as err:
        await reg.set_weights("m", {"v1": 0, "v2": 0})
    assert err.value.field == "weights"
    with pytest.raises(ValidationError):
        await reg.set_weights("m", {"v1": -1})
    with pytest.raises(RegistryError):
        await reg.set_weights("m", {"v9": 1})
    assert await reg.set_weights("m", {"v1": 90, "v2": 10}, who="ops") == {"v1": 90, "v2": 10}
    with pytest.raises(RegistryError):
        await reg.retire("m", "v1")  # the stable one
    await reg.promote("m", "v2", who="ops", why="better")
    entry = await reg.get("m")
    assert entry.stable == "v2" and entry.versions["v2"].weight == 100
    assert entry.versions["v1"].weight == 0 and entry.versions["v1"].state is VersionState.ACTIVE
    await reg.retire("m", "v1", who="ops", why="done")
    assert (await reg.get("m")).versions["v1"].state is VersionState.RETIRED
    with pytest.raises(RegistryError):
        await reg.set_weights("m", {"v1": 5})  # a retired version serves nothing
    await reg.set_route("m", fallback="@v2", budgets={"interactive": 1.5}, who="ops")
    with pytest.raises(ValidationError):
        await reg.set_route("m", fallback="@nope")
    with pytest.raises(ValidationError):
        await reg.set_route("m", budgets={"urgent": 1})
    table = await reg.table()
    assert table.version == 6 and table.entries["m"].sla_budget_s == {"interactive": 1.5}
    trail = [(e.kind, e.action) for e in reversed(await _audit(redis))]
    assert trail == [("model", "register"), ("model", "register"), ("model", "set-weights"),
                     ("model", "promote"), ("model", "retire"), ("route", "set")]
    newest = (await _audit(redis))[1]
    assert newest.who == "ops" and newest.why == "done"
    assert newest.before == {"state": "active", "weight": 0.0}


async def _audit(redis):
    from agentfleet.producer.tenants import TenantRegistry

    return await TenantRegistry(redis).audit(50)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_vllm_refuses_bad_engine_arguments_at_registration(tmp_path):
    """The check builds vLLM's own engine configuration from the model's config.json (the
    135M model's files the GPU benchmark ships), as a worker's start would."""
    from agentfleet.schemas.engine_args import check_engine_args
    from agentfleet.schemas.settings import ModelSpec
    from bench.gpu.versions import model_dir

    model = model_dir("135m", tmp_path)
    base = dict(name="m", max_model_len=512, enforce_eager=True)
    check_engine_args(ModelSpec(**base, engine_args={"max_logprobs": 5}), model)
    with pytest.raises(ValidationError) as err:
        check_engine_args(ModelSpec(**base, engine_args={"no_such_argument": 1}), model)
    assert err.value.field == "engine_args.no_such_argument"
    for bad in ({"gpu_memory_utilization": 1.5}, {"dtype": "float7"},
                {"max_model_len": 10**7}, {"tensor_parallel_size": 2}):
        spec = ModelSpec(**{**base, **{k: v for k, v in bad.items() if k in base}},
                         engine_args={k: v for k, v in bad.items() if k not in base})
        with pytest.raises(ValidationError) as err:
            check_engine_args(spec, model)
        assert err.value.field == "engine_args" and "vLLM refuses" in str(err.value), bad


async def test_a_registry_change_reaches_a_cached_table_within_its_refresh(redis, model_dir):
    cache = TableCache(redis, refresh_s=0.2)
    assert (await cache.current()).entries == {}
    await ModelRegistry(redis).register("m", "v1", path=str(model_dir), check_engine=False)
    assert (await cache.current()).entries == {}  # within refresh_s: the cached table
    await asyncio.sleep(0.25)
    assert "m" in (await cache.current()).entries


# ---- routing --------------------------------------------------------------------------------

def _table(**weights: float) -> ModelTable:
    versions = {v: ModelVersion(version=v, weight=w) for v, w in weights.items()}
    return ModelTable({"m": ModelEntry(name="m", stable=next(iter(weights)),
                                       versions=versions)})


def test_routing_follows_the_weights_and_sticks_to_a_correlation_id():
    table = _table(v1=90, v2=10)
    picks = [table.pick("m", f"p-{i:x}") for i in range(20_000)]
    assert picks.count("v2") / len(picks) == pytest.approx(0.10, abs=0.01)
    assert all(table.pick("m", f"p-{i:x}") == picks[i] for i in range(0, 20_000, 97))


def test_raising_a_canarys_weight_only_moves_ids_to_it():
    small = _table(v1=95, v2=5)
    small.entries["m"].versions["v2"].state = VersionState.CANARY
    big = _table(v1=75, v2=25)
    big.entries["m"].versions["v2"].state = VersionState.CANARY
    small, big = ModelTable(small.entries), ModelTable(big.entries)
    ids = [f"c-{i}" for i in range(5000)]
    assert all(big.pick("m", i) == "v2" for i in ids if small.pick("m", i) == "v2")


def test_guard_expressions_parse_or_name_what_is_wrong():
    rules = parse_guard("error_ratio<1%, p99<2x,p50<=300ms")
    assert [(r.metric, r.limit, r.relative) for r in rules] == [
        ("error_ratio", 0.01, False), ("p99", 2.0, True), ("p50", 0.3, False)]
    for bad in ("error_ratio<2x", "p99<5%", "latency<1s", "p99>2x", "error_ratio<150%"):
        with pytest.raises(ValidationError) as err:
            parse_guard(bad)
        assert err.value.field == "guard"


async def test_pinned_unknown_and_retired_versions_are_refused_at_submit(
        redis, producer, model_dir):
    reg = ModelRegistry(redis)
    await reg.register("m1", "v1", path=str(model_dir), check_engine=False)
    await reg.register("m1", "v2", path=str(model_dir), check_engine=False)
    await reg.retire("m1", "v2")
    with pytest.raises(RetiredVersionError) as err:
        await producer.submit(model="m1", prompt="hi", version="v2")
    assert err.value.field == "version" and err.value.limit == ["v1"]
    with pytest.raises(UnknownVersionError):
        await producer.submit(model="m1", prompt="hi", version="v7")
    with pytest.raises(UnknownVersionError):
        await producer.submit(model="m2", prompt="hi", version="v1")  # not registered
    assert await redis.xlen(keys.task_stream("m1", version="v2")) == 0


# ---- through workers ------------------------------------------------------------------------

async def test_results_record_version_and_template_and_chains_keep_their_version(
        redis, producer, start_worker, model_dir):
    reg = ModelRegistry(redis)
    await TemplateRegistry(redis).register("greet", prompt="Say hi to {name}.")
    await TemplateRegistry(redis).register("greet", prompt="Say hello to {name}!")
    await reg.register("m1", "v1", path=str(model_dir), check_engine=False,
                       templates={"greet": 1})
    await reg.register("m1", "v2", path=str(model_dir), check_engine=False,
                       templates={"greet": 2})
    await reg.set_weights("m1", {"v1": 50, "v2": 50})
    factory = fake_factory()
    worker = await start_worker(("m1",), engines={}, registry_models=["m1"], engine_factory=factory)
    assert sorted(r.route_version for r in worker.runners) == ["v1", "v2"]
    tasks = [Task(model="m1", template="greet", variables={"name": f"n{i}"},
                  followups=[FollowUp(prompt="again: {output}")]) for i in range(40)]
    ids = await producer.submit_many(tasks)
    chains = [await producer.wait_chain(i, timeout_s=10) for i in ids]
    by_version = {}
    for first, second in chains:
        assert first.ok and second.ok
        assert second.model_version == first.model_version  # the chain kept its version
        by_version.setdefault(first.model_version, []).append(first)
    assert set(by_version) == {"v1", "v2"}
    for version, results in by_version.items():  # each rendered its version's template
        assert {r.template for r in results} == {"greet@1" if version == "v1" else "greet@2"}
        text = "Say hi to" if version == "v1" else "Say hello to"
        assert all(text[-10:] in r.text for r in results), results[0].text
    pinned = await producer.wait(await producer.submit(model="m1", prompt="x", version="v2"))
    assert pinned.model_version == "v2"
    assert await redis.xlen(keys.task_stream("m1")) == 0  # nothing on unversioned streams


async def test_template_variables_are_checked_and_rendered_once(redis, producer):
    made = await TemplateRegistry(redis).register(
        "ask", messages=[Message(role="system", content="Be brief {{really}}."),
                         Message(role="user", content="{question}")])
    assert made.ref == "ask@1" and made.variables == ["question"]
    prompt, messages = render(made, {"question": "Why?"})
    assert prompt is None and messages[0].content == "Be brief {really}."
    with pytest.raises(ValidationError) as err:
        await producer.submit(model="m1", template="ask", variables={})
    assert err.value.field == "variables.question"
    with pytest.raises(ValidationError) as err:
        await producer.submit(model="m1", template="ask",
                              variables={"question": "a", "extra": "b"})
    assert err.value.field == "variables.extra"
    with pytest.raises(ValidationError):
        await producer.submit(model="m1", template="nope@3", variables={})
    with pytest.raises(ValidationError):
        await TemplateRegistry(redis).register("ask", prompt="{a}", variables=["b"])
    task = Task(model="m1", template="ask", variables={"question": "Why?"})
    await producer.submit(task)
    assert task.variables == {} and task.template == "ask@1"  # the payload holds the text
    assert task.messages[1].content == "Why?"


async def test_a_hot_swap_under_steady_load_loses_nothing(redis, producer, start_worker,
                                                          model_dir, settings):
    """Register v2, promote it, retire v1, while tasks keep coming: every task gets exactly
    one result; v1's runner drains and stops; what v1's streams held moves to v2."""
    reg = ModelRegistry(redis)
    await reg.register("m1", "v1", path=str(model_dir), check_engine=False)
    factory = fake_factory(v1={"delay_s": 0.02, "slots": 4}, v2={"delay_s": 0.01})
    s = msgspec.structs.replace(settings, max_inflight=16, read_count=16)
    worker = await start_worker(("m1",), engines={}, registry_models=["m1"], engine_factory=factory,
                                worker_settings=s, side_loops=[("guard", _guard(redis, s))])
    ids: list[str] = []
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set():
            ids.extend(await producer.submit_many(
                [Task(model="m1", prompt=f"t{i}-{j}") for j in range(10)]))
            i += 1
            await asyncio.sleep(0.02)

    loader = asyncio.create_task(load())
    await asyncio.sleep(0.5)
    await reg.register("m1", "v2", path=str(model_dir), check_engine=False)
    await wait_until(lambda: any(r.route_version == "v2" for r in worker.runners),
                     what="v2's runner")
    await reg.promote("m1", "v2")
    await asyncio.sleep(0.5)
    await reg.retire("m1", "v1")
    await wait_until(lambda: all(r.route_version != "v1" for r in worker.runners),
                     what="v1's runner to drain and stop")
    await asyncio.sleep(0.5)
    stop.set()
    await loader
    results = await producer.wait_many(ids, timeout_s=30)
    assert len({r.task_id for r in results}) == len(ids) > 300
    assert all(r.ok for r in results)
    versions = {r.model_version for r in results}
    assert versions == {"v1", "v2"}
    stats = await redis.hgetall(keys.stats_key("m1"))
    assert int(stats.get(b"duplicates", 0)) == 0
    assert int(stats[b"written"]) == len(ids)
    assert await redis.xlen(keys.task_stream("m1", version="v1")) == 0  # drained, emptied
    assert int(await redis.hget(keys.queued_counts("m1"), "default")) == 0


def _guard(redis, settings):
    from agentfleet.ops.canary import Guard

    return Guard(redis, settings, holder="test", every_s=0.2).run


async def test_a_model_registered_while_served_moves_off_its_unversioned_streams(
        redis, producer, start_worker, model_dir, settings):
    """A fleet adopts the registry: tasks queued on the old streams move to the first
    version, the unversioned runner drains and stops, nothing is lost."""
    s = msgspec.structs.replace(settings, max_inflight=8, read_count=8)  # most stay queued
    worker = await start_worker(("m1",), engines={"m1": FakeEngine(delay_s=0.01, slots=2)},
                                engine_factory=fake_factory(), worker_settings=s,
                                side_loops=[("guard", _guard(redis, s))])
    before = await producer.submit_many([Task(model="m1", prompt=f"old {i}") for i in range(300)])
    await ModelRegistry(redis).register("m1", "v1", path=str(model_dir), check_engine=False)
    await wait_until(lambda: [r.route_version for r in worker.runners] == ["v1"], 15,
                     "the unversioned runner to give way to v1")
    await fresh(producer)
    after = await producer.submit_many([Task(model="m1", prompt=f"new {i}") for i in range(20)])
    results = await producer.wait_many(before + after, timeout_s=30)
    assert all(r.ok for r in results)
    assert {r.model_version for r in results[-20:]} == {"v1"}
    assert {r.model_version for r in results[:300]} == {"fake-1", "v1"}  # some moved
    assert int((await redis.hgetall(keys.stats_key("m1")))[b"moved"]) > 0


# ---- SLA classes ----------------------------------------------------------------------------

async def test_over_budget_tasks_spill_to_the_fallback_or_are_refused(
        redis, producer, start_worker, model_dir, settings):
    """The primary runs 2 at a time for 0.2 s (10 tasks/s): its queue passes a 0.5 s budget
    after a few tasks; then interactive tasks go to the fallback model; without one, they are
    refused with SlaExceededError, and nothing of theirs is queued."""
    reg = ModelRegistry(redis)
    await reg.register("m1", "v1", path=str(model_dir), check_engine=False)
    await reg.set_route("m1", budgets={"interactive": 0.5})
    s = msgspec.structs.replace(settings, sla_refresh_s=0.05)
    producer.router.settings = s
    await start_worker(("m1", "m2"), engines={"m2": FakeEngine()}, registry_models=["m1"],
                       engine_factory=fake_factory(v1={"delay_s": 0.2, "slots": 2}))
    warm = await producer.submit_many([Task(model="m1", prompt=f"w{i}") for i in range(4)])
    await producer.wait_many(warm, timeout_s=10)  # the version's completion rate is known
    await asyncio.sleep(2.2)  # reported
    ids = []
    with pytest.raises(SlaExceededError) as err:
        for i in range(40):
            ids.append(await producer.submit(model="m1", prompt=f"q{i}", sla="interactive"))
    # refused once the wait plus a task's service time (0.2 s here: the warm-up measured
    # it) passes 90% of the budget (producer/routing.py)
    service_s = producer.router._margin("m1", "v1", False)
    assert 0.15 < service_s < 0.5, service_s
    assert err.value.budget_s == 0.5
    assert err.value.estimated_wait_s + service_s > 0.5 * BUDGET_SHARE
    assert err.value.version == "v1" and "no fallback" in str(err.value)
    assert 2 <= len(ids) < 20
    await reg.set_route("m1", fallback="m2")
    await fresh(producer)
    more = [await producer.submit(model="m1", prompt=f"s{i}", sla="interactive")
            for i in range(20)]
    results = await producer.wait_many(ids + more, timeout_s=20)
    spilled = [r for r in results if r.model == "m2"]
    assert len(spilled) >= 15 and producer.router.spilled == len(spilled)
    assert all(r.ok for r in results)
    # within its budget on the primary (the estimate is conservative by a service time)
    waits = [r.timings.engine_start - r.timings.enqueued for r in results if r.model == "m1"]
    assert max(waits) < 0.5 + 0.3, waits
    unclassed = await producer.submit(model="m1", prompt="no class")  # never refused
    assert (await producer.wait(unclassed, timeout_s=20)).ok


# ---- the command line ----------------------------------------------------------------------

def test_cli_registers_weighs_shows_and_audits_versions(server, model_dir):
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ACTOR": "bob"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentfleet", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    import redis as sync_redis

    sync_redis.Redis.from_url(server.url).flushall()
    made = cli("models", "register", "m1", "v1", "--path", str(model_dir),
               "--engine-arg", "max_num_seqs=32", "--no-engine-check", "--why", "first")
    assert made.returncode == 0, made.stderr
    assert cli("models", "register", "m1", "v2", "--path", str(model_dir),
               "--no-engine-check").returncode == 0
    weights = cli("models", "set-weights", "m1", "v1=90", "v2=10")
    assert weights.returncode == 0 and "v2 10.0%" in weights.stdout, weights.stderr
    listed = cli("models", "list").stdout
    assert "v1" in listed and "90.0%" in listed and "(stable)" in listed
    shown = json.loads(cli("models", "show", "m1", "--json").stdout)
    assert shown["versions"]["v1"]["engine_args"] == {"max_num_seqs": 32}
    bad = cli("models", "set-weights", "m1", "v1=0", "v2=0")
    assert bad.returncode == 2 and "weights" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli("models", "register", "m1", "v3", "--path", "/nonexistent",
                  "--no-engine-check")
    assert missing.returncode == 2 and "config.json" in missing.stderr
    canary = cli("canary", "start", "m1", "v2", "--weight", "5%", "--guard",
                 "error_ratio<1%,p99<2x")
    assert canary.returncode == 0 and "5%" in canary.stdout, canary.stderr
    assert "canary v2 running" in cli("canary", "status", "m1").stdout
    back = cli("canary", "rollback", "m1", "--why", "drill")
    assert back.returncode == 0 and "rolled back" in back.stdout, back.stderr
    audit = cli("audit").stdout
    assert "bob" in audit and "model m1 register" in audit and "canary m1 rollback" in audit
    assert "why: first" in audit


async def test_the_exporter_sums_every_versions_streams_and_shows_each(redis, producer,
                                                                        model_dir, server):
    """Autoscaling reads the lanes' lag: a registered model's tasks sit in its versions'
    streams, which the lanes' gauges sum; per version gauges show each."""
    from prometheus_client import generate_latest

    from agentfleet.ops.exporter import exporter_registry, read_queues
    from agentfleet.producer.connection import connect_sync

    reg = ModelRegistry(redis)
    await reg.register("m1", "v1", path=str(model_dir), check_engine=False)
    await reg.register("m1", "v2", path=str(model_dir), check_engine=False)
    await reg.set_weights("m1", {"v1": 75, "v2": 25})
    await producer.submit_many([Task(model="m1", prompt=f"p{i}", version="v1", tenant="acme")
                                for i in range(7)])
    await producer.submit_many([Task(model="m1", prompt=f"q{i}", version="v2")
                                for i in range(3)])
    await producer.submit_many([Task(model="m1", prompt="b", version="v2", batch_id="job")])
    client = connect_sync(server.url)
    try:
        (q,) = await asyncio.to_thread(read_queues, client, ["m1"])
        assert (q.interactive.lag, q.bulk.lag) == (10, 1)
        assert q.versions[("v1", "interactive")].lag == 7
        assert q.versions[("v2", "interactive")].lag == 3
        assert q.tenants[("interactive", "acme")].lag == 7
        assert q.weights == {"v1": 0.75, "v2": 0.25}
        text = (await asyncio.to_thread(generate_latest, exporter_registry(
            client, [], registered=True))).decode()
    finally:
        client.close()
    assert 'agentfleet_queue_lag_tasks{lane="interactive",model="m1"} 10.0' in text
    assert 'agentfleet_version_queue_lag_tasks{lane="bulk",model="m1",version="v2"} 1.0' in text
    assert 'agentfleet_version_weight_ratio{model="m1",version="v2"} 0.25' in text
