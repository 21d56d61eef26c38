"""Affinity partitions (docs/affinity.md): routing by key, bounded load, stealing, owners
following the live workers; on real servers with the fake engine (a test double)."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from agentfleet.producer.affinity import derive_affinity_key
from agentfleet.schemas import keys
from agentfleet.schemas.errors import ValidationError
from agentfleet.schemas.wire import FollowUp, Message, Task
from agentfleet.workers.affinity import Ownership, assign, load_cap

PARTS = 8


@pytest.fixture
def settings(settings):
    return msgspec.structs.replace(settings, affinity_partitions=PARTS,
                                   affinity_steal_after_ms=60_000.0)


def ownership(worker) -> Ownership:
    return worker.runners[0].streams.ownership


async def see_each_other(*workers, timeout_s: float = 10.0) -> None:
    ids = {w.worker_id for w in workers}
    deadline = time.monotonic() + timeout_s
    while not all(ownership(w).live == ids for w in workers):
        assert time.monotonic() < deadline, [ownership(w).live for w in workers]
        await asyncio.sleep(0.05)


def rebalances(*workers) -> int:
    return sum(r.stats.affinity_rebalances for w in workers for r in w.runners)


def assert_one_worker_per_key(by_key: dict[str, set[str]], moved: int) -> None:
    """Each key's tasks ran on one worker, unless the partitions moved meanwhile (a worker
    that takes another for gone reads its partitions, as it should).  In CI a key once ran
    on two workers: a worker's first load report came a second late (workers/versions.py
    now reports at once)."""
    if moved:
        assert sum(len(w) > 1 for w in by_key.values()) <= len(by_key) // 2, by_key
    else:
        assert all(len(w) == 1 for w in by_key.values()), by_key


# ---- pure rules ----------------------------------------------------------------------------

def test_every_partition_has_one_owner_and_none_owns_more_than_the_bound():
    for n in (1, 2, 3, 5, 8):
        workers = [f"w{i}" for i in range(n)]
        for parts, e in ((8, 0.25), (64, 0.25), (64, 0.05), (256, 0.1)):
            owned = assign(parts, workers, e)
            flat = sorted(p for ps in owned.values() for p in ps)
            assert flat == list(range(parts))
            assert max(map(len, owned.values())) <= load_cap(parts, n, e)
            assert load_cap(parts, n, e) <= max((1 + e) * parts / n, -(-parts // n))


def test_a_worker_leaving_moves_only_its_own_partitions():
    before = assign(64, ["a", "b", "c", "d"], 0.25)
    after = assign(64, ["a", "b", "c"], 0.25)
    moved = [p for w in ("a", "b", "c") for p in before[w] if p not in after[w]]
    assert len(moved) <= 4  # the bound may shift a few; the rest stay where they were


def test_ownership_counts_rebalances_only_when_its_share_changes():
    own = Ownership(16, 0.25, "a")
    assert own.owned == tuple(range(16)) and own.others == ()
    assert own.update(["a", "b"]) and 0 < len(own.owned) < 16 and own.rebalances == 1
    assert not own.update(["b", "a"]) and own.rebalances == 1
    assert sorted(own.owned + own.others) == list(range(16))


def test_the_partition_is_stable_and_tasks_of_one_prompt_share_a_key():
    assert keys.affinity_partition("session-1", 64) == keys.affinity_partition("session-1", 64)
    assert keys.affinity_partition("", 64) is None and keys.affinity_partition("x", 0) is None
    system = Message(role="system", content="You are a refund agent. " * 50)
    one = Task(model="m1", messages=[system, Message(role="user", content="order 1")])
    two = Task(model="m1", messages=[system, Message(role="user", content="order 2")])
    other = Task(model="m1", messages=[Message(role="system", content="A poet."), system])
    assert derive_affinity_key(one, 2048) == derive_affinity_key(two, 2048)
    assert derive_affinity_key(one, 2048) != derive_affinity_key(other, 2048)
    assert keys.task_stream("m1", "acme", part=3) == "af:{m1}:tasks:acme#3"
    assert keys.bulk_stream("m1", part=0) == "af:{m1}:bulk#0"


# ---- on real servers -----------------------------------------------------------------------

async def test_an_affinity_key_too_long_is_refused_naming_the_field_and_limit(producer):
    with pytest.raises(ValidationError) as err:
        await producer.submit(model="m1", prompt="x", affinity_key="k" * 201)
    assert err.value.field == "affinity_key" and err.value.limit == 200
    with pytest.raises(ValidationError) as err:
        await producer.submit(model="m1", prompt="x", followups=[
            FollowUp(prompt="y", affinity_key="k" * 300)])
    assert err.value.field == "followups[0].affinity_key"


async def test_tasks_of_one_key_run_on_one_worker_and_follow_ups_stay_with_them(
        producer, start_worker, redis):
    w1 = await start_worker(["m1"])
    w2 = await start_worker(["m1"])
    await see_each_other(w1, w2)
    kinds = [f"You are agent kind {k}. " * 20 for k in range(12)]
    tasks = [Task(model="m1", messages=[Message(role="system", content=kinds[i % 12]),
                                        Message(role="user", content=f"task {i}")],
                  followups=[FollowUp(prompt="next: {output}", continue_conversation=True)])
             for i in range(96)]
    before = rebalances(w1, w2)
    roots = await producer.submit_many(tasks)
    assert all(t.affinity_key.startswith("h:") for t in tasks)
    results = await producer.wait_many(roots + [f"{r}.1" for r in roots], timeout_s=20)
    by_key: dict[str, set[str]] = {}
    for task, root, child in zip(tasks, results[:96], results[96:]):
        assert root.ok and child.ok
        by_key.setdefault(task.affinity_key, set()).update((root.worker_id, child.worker_id))
    assert_one_worker_per_key(by_key, rebalances(w1, w2) - before)
    assert {w for ws in by_key.values() for w in ws} == {"w1", "w2"}  # both had a share
    stats = [w.runners[0].stats for w in (w1, w2)]
    assert sum(s.affinity_hits for s in stats) == 192
    assert sum(s.affinity_steals + s.affinity_misses for s in stats) == 0
    # A follow-up went into its parent's partition.
    part = keys.affinity_partition(tasks[0].affinity_key, PARTS)
    assert await redis.xlen(keys.task_stream("m1", part=part)) >= 1


async def test_an_idle_worker_steals_from_a_saturated_owner(producer, start_worker, settings):
    quick = msgspec.structs.replace(settings, affinity_steal_after_ms=100.0, max_inflight=2)
    w1 = await start_worker(["m1"], worker_settings=quick)
    w2 = await start_worker(["m1"], worker_settings=quick)
    await see_each_other(w1, w2)
    # One session's tasks, each 0.1 s in the engine: its owner alone would take 3 s.
    ids = await producer.submit_many(
        [Task(model="m1", prompt=f"hot {i}", affinity_key="one-session",
              metadata={"fake_delay_s": "0.1"}) for i in range(60)])
    results = await producer.wait_many(ids, timeout_s=20)
    assert {r.worker_id for r in results} == {"w1", "w2"}
    stats = {w.worker_id: w.runners[0].stats for w in (w1, w2)}
    part = keys.affinity_partition("one-session", PARTS)
    owner = next(w.worker_id for w in (w1, w2) if part in ownership(w).owned)
    thief = ({"w1", "w2"} - {owner}).pop()
    assert stats[thief].affinity_steals > 0 and stats[thief].affinity_hits == 0
    assert stats[owner].affinity_hits > 0
    assert stats[owner].affinity_hits + stats[thief].affinity_steals == 60


async def test_a_dead_workers_partitions_move_within_the_claim_time(
        producer, start_worker, redis, settings):
    w1 = await start_worker(["m1"])
    # A worker that beat once, reported its runner's load, and died (SIGKILL leaves both
    # behind: workers/versions.py).
    await redis.hset(keys.workers_key("m1"), "ghost", time.time())
    await redis.hset(keys.version_load("m1"), "|ghost", f"{time.time():.3f} 0 1 0 serving")
    deadline = time.monotonic() + 5
    while "ghost" not in ownership(w1).live:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    died_at = time.monotonic()
    assert len(ownership(w1).owned) < PARTS
    rebalances = w1.runners[0].stats.affinity_rebalances
    while len(ownership(w1).owned) < PARTS:
        assert time.monotonic() - died_at < settings.claim_idle_ms / 1000, "not handed on"
        await asyncio.sleep(0.1)
    assert w1.runners[0].stats.affinity_rebalances == rebalances + 1
    ids = await producer.submit_many([Task(model="m1", prompt=f"p {i}", affinity_key=f"k{i}")
                                      for i in range(16)])
    assert all(r.ok for r in await producer.wait_many(ids, timeout_s=10))
    assert w1.runners[0].stats.affinity_hits == 16


async def test_a_drained_worker_hands_its_partitions_on_and_nothing_is_lost(
        producer, start_worker):
    w1 = await start_worker(["m1"])
    w2 = await start_worker(["m1"])
    await see_each_other(w1, w2)
    first = await producer.submit_many([Task(model="m1", prompt=f"a {i}", affinity_key=f"k{i}")
                                        for i in range(40)])
    w2.request_stop()
    second = await producer.submit_many([Task(model="m1", prompt=f"b {i}", affinity_key=f"k{i}")
                                         for i in range(40)])
    results = await producer.wait_many(first + second, timeout_s=30)
    assert all(r.ok for r in results)
    deadline = time.monotonic() + 10
    while len(ownership(w1).owned) < PARTS:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


# ---- multi-turn chains (issue 18, item 3) ------------------------------------------------

def test_a_continued_follow_ups_prompt_starts_with_its_parents_tokens_exactly():
    """Rendered with the default model's chat template and tokenizer (as the vLLM engine does:
    the template, then the tokens), a follow-up that continues its conversation starts with
    every token of its parent's prompt, then the parent's answer: its prefix is cached."""
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    from agentfleet.workers.outcomes import child

    root = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "models" / "smollm2"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"))
    template = (root / "chat_template.jinja").read_text()

    def tokens(task: Task) -> list[int]:
        text = tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in task.messages or
             [Message(role="user", content=task.prompt)]],
            chat_template=template, add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    first = Task(model="m1", id="t", affinity_key="session-9", messages=[
        Message(role="system", content="You are a refund agent. Be brief."),
        Message(role="user", content="Order 42 arrived broken.")],
        followups=[FollowUp(prompt="Draft the reply to: {output}", continue_conversation=True,
                            followups=[FollowUp(prompt="Shorter.",
                                                continue_conversation=True)])])
    answer = "Sorry to hear that: a refund is on its way."
    second = child(first, 1, first.followups[0], answer, 0.0, "")
    third = child(second, 1, second.followups[0], "Refund sent.", 0.0, "")
    for parent, kid, said in ((first, second, answer), (second, third, "Refund sent.")):
        before, after = tokens(parent), tokens(kid)
        assert after[:len(before)] == before
        assert tok.decode(after[len(before):]).startswith(said)
        assert kid.affinity_key == "session-9"
    assert first.messages[0] == third.messages[0] and len(third.messages) == 6


async def test_the_exporter_counts_every_partition_that_the_workers_announce(
        server, producer, start_worker, redis):
    from agentfleet.ops.exporter import read_queues
    from agentfleet.producer.connection import connect_sync

    w1 = await start_worker(["m1"])
    while await redis.hget(keys.affinity_config("m1"), "partitions") != str(PARTS).encode():
        await asyncio.sleep(0.05)
    w1.request_stop()  # nobody reads: what is queued stays
    while await redis.hlen(keys.workers_key("m1")):
        await asyncio.sleep(0.05)
    await producer.submit_many([Task(model="m1", prompt=f"p {i}", affinity_key=f"k{i}",
                                     tenant="acme" if i % 2 else "default")
                                for i in range(24)])
    client = connect_sync(server.url)
    try:
        (q,) = await asyncio.to_thread(read_queues, client, ["m1"])
    finally:
        client.close()
    assert q.interactive.lag == 24 and q.interactive.entries == 24
    assert q.tenants[("interactive", "acme")].lag == 12


async def test_a_retried_task_goes_back_to_its_partition_and_a_join_runs_once(
        producer, start_worker, redis):
    await start_worker(["m1"])
    flaky = await producer.submit(model="m1", prompt="flaky", affinity_key="s-1",
                                  metadata={"fake_fail_attempts": "2"})
    result = await producer.wait(flaky, timeout_s=10)
    assert result.ok and result.attempts == 3
    part = keys.affinity_partition("s-1", PARTS)
    assert await redis.xlen(keys.task_stream("m1", part=part)) >= 1
    assert await redis.zcard(keys.delayed_key("m1")) == 0
    fan = await producer.submit(model="m1", prompt="fan", affinity_key="s-2",
                                followups=[FollowUp(items=["a", "b", "c"], prompt="item {item}")],
                                join=FollowUp(prompt="all: {results}"))
    chain = await producer.wait_chain(fan, timeout_s=10)
    assert [r.ok for r in chain] == [True] * 5 and chain[-1].task_id == f"{fan}.join"


async def test_a_registered_versions_partitions_are_owned_by_the_workers_serving_it(
        producer, start_worker, redis, tmp_path):
    """With model versions (docs/versions.md), each version's streams have their partitions;
    the runners of one version share them out, follow-ups stay in their version and key."""
    from agentfleet.producer.models import ModelRegistry
    from versions_fleet import fake_factory, model_directory

    reg = ModelRegistry(redis)
    await reg.register("m1", "v1", path=str(model_directory(tmp_path)), check_engine=False)
    w1 = await start_worker(("m1",), engines={}, registry_models=["m1"],
                            engine_factory=fake_factory())
    w2 = await start_worker(("m1",), engines={}, registry_models=["m1"],
                            engine_factory=fake_factory())
    await see_each_other(w1, w2, timeout_s=15)
    assert [r.route_version for r in (*w1.runners, *w2.runners)] == ["v1", "v1"]
    tasks = [Task(model="m1", prompt=f"p {i}", affinity_key=f"k{i % 6}",
                  followups=[FollowUp(prompt="again: {output}")]) for i in range(36)]
    before = rebalances(w1, w2)
    roots = await producer.submit_many(tasks)
    results = await producer.wait_many(roots + [f"{r}.1" for r in roots], timeout_s=15)
    assert all(r.ok and r.model_version == "v1" for r in results)
    by_key: dict[str, set[str]] = {}
    for task, root, kid in zip(tasks, results[:36], results[36:]):
        by_key.setdefault(task.affinity_key, set()).update((root.worker_id, kid.worker_id))
    assert_one_worker_per_key(by_key, rebalances(w1, w2) - before)
    part = keys.affinity_partition("k0", PARTS)
    assert await redis.xlen(keys.task_stream("m1", version="v1", part=part)) >= 12
    assert await redis.xlen(keys.task_stream("m1")) == 0


async def test_a_follow_up_for_another_model_is_moved_into_its_partition(
        producer, start_worker, redis):
    await start_worker()
    root = await producer.submit(model="m1", prompt="one", affinity_key="s-7",
                                 followups=[FollowUp(model="m2", prompt="two: {output}")])
    first, second = await producer.wait_chain(root, timeout_s=10)
    assert first.ok and second.ok and second.model == "m2"
    part = keys.affinity_partition("s-7", PARTS)
    assert await redis.xlen(keys.task_stream("m2", part=part)) == 1


async def test_a_tenant_whose_streams_do_not_exist_yet_is_no_crash_for_the_reclaim_loop(
        start_worker, redis, settings):
    """The tenant's mark is there, its base stream is not (with partitions, producers write
    only to the partition streams; a purge deletes streams): the reclaim loop makes the group
    instead of stopping the worker on NOGROUP (found by the fault suite on a slow machine).
    Marked drained (score 0), so that only the reclaim loop looks at it, not the reader."""
    fast = msgspec.structs.replace(settings, claim_idle_ms=400)
    worker = await start_worker(["m1"], worker_settings=fast)
    await redis.zadd(keys.tenant_lanes("m1", "i"), {"newco": 0})
    base = keys.task_stream("m1", "newco")
    deadline = time.monotonic() + 5
    while not await redis.exists(base):  # the loop runs every claim_idle_ms / 4
        assert time.monotonic() < deadline, "the reclaim loop never reached the new tenant"
        assert worker.failure is None, worker.failure
        await asyncio.sleep(0.05)
    assert [g["name"] for g in await redis.xinfo_groups(base)] == [keys.GROUP.encode()]
    await asyncio.sleep(0.3)
    assert worker.failure is None and not worker.draining
