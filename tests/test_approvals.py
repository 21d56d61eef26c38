"""Approval gates: held durably with the deadline, queued when an admin approves, finished
with a typed result when one rejects, the decision recorded with who and why."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import pytest

from agentfleet.ops import approvals
from agentfleet.schemas import keys
from agentfleet.schemas.errors import ErrorCode
from agentfleet.schemas.wire import Status, Task, encode


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def until_done(http: httpx.AsyncClient, task_id: str, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        view = (await http.get(f"/v1/tasks/{task_id}")).json()
        if view["status"] not in ("pending", "awaiting_approval"):
            return view
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.05)


async def test_a_held_task_waits_until_an_admin_approves_it(gateway, api_key, start_worker,
                                                            redis, settings):
    await start_worker()
    url, _ = await gateway()
    admin = await api_key("ops", "admin", name="alice")
    async with httpx.AsyncClient(base_url=url, headers=auth(await api_key())) as http:
        made = await http.post("/v1/tasks", json={"model": "m1", "prompt": "wire 1M to X",
                                                  "needs_approval": True})
        assert made.status_code == 202 and made.json()["status"] == "awaiting_approval"
        task_id = made.json()["id"]
        await asyncio.sleep(0.2)  # a worker is running: nothing reaches it
        assert (await http.get(f"/v1/tasks/{task_id}")).json()["status"] == "awaiting_approval"
        assert await redis.xlen(keys.task_stream("m1", "acme")) == 0
        listed = (await http.get("/v1/approvals")).json()["data"]
        assert [a["id"] for a in listed] == [task_id] and listed[0]["prompt"] == "wire 1M to X"
        assert (await http.post(f"/v1/approvals/{task_id}/approve")).status_code == 403
        ok = await http.post(f"/v1/approvals/{task_id}/approve", headers=auth(admin),
                             json={"reason": "checked with finance"})
        assert ok.status_code == 200 and ok.json()["status"] == "queued"
        done = await until_done(http, task_id)
    assert done["status"] == "succeeded" and done["result"]["text"] == "echo: wire 1M to X"
    [decision] = await approvals.decisions(redis, settings)
    assert (decision.decision, decision.reason, decision.tenant) == (
        "approved", "checked with finance", "acme")
    assert decision.by.endswith("(alice)") and decision.by.startswith("key ")


async def test_a_rejected_task_gets_a_typed_result_and_its_waiter_hears(producer, redis,
                                                                        settings):
    task = Task(id="t-reject", model="m1", prompt="delete prod", tenant="acme")
    await approvals.hold(redis, task, settings, reply_to=producer.id)
    waiting = asyncio.ensure_future(producer.wait("t-reject", timeout_s=10))
    await asyncio.sleep(0.05)
    await approvals.reject(redis, settings, "t-reject", by="bob", reason="too risky")
    result = await waiting
    assert result.status is Status.FAILED and result.error_code is ErrorCode.REJECTED
    assert result.error_message == "rejected by bob: too risky" and result.tenant == "acme"
    assert await approvals.list_held(redis, settings) == []
    with pytest.raises(approvals.NotHeldError):
        await approvals.approve(producer, settings, "t-reject", by="bob")


async def test_a_held_task_expires_when_its_deadline_passes(producer, redis, settings):
    task = Task(id="t-late", model="m2", prompt="x", deadline=time.time() + 0.2)
    await approvals.hold(redis, task, settings)
    assert await approvals.expire_overdue(redis, settings) == 0
    await asyncio.sleep(0.3)
    assert await approvals.expire_overdue(redis, settings) == 1
    result = await producer.get_result("t-late")
    assert result.status is Status.EXPIRED and result.error_code is ErrorCode.DEADLINE_EXCEEDED
    [decision] = await approvals.decisions(redis, settings)
    assert (decision.decision, decision.by) == ("expired", "deadline")
    assert await redis.zcard(keys.approvals_due("m2")) == 0


async def test_two_decisions_at_once_one_wins(producer, redis, settings):
    await approvals.hold(redis, Task(id="t-race", model="m1", prompt="x"), settings)
    outcomes = await asyncio.gather(
        approvals.approve(producer, settings, "t-race", by="a"),
        approvals.reject(redis, settings, "t-race", by="b"), return_exceptions=True)
    assert sum(isinstance(o, approvals.NotHeldError) for o in outcomes) == 1
    [decision] = await approvals.decisions(redis, settings)
    stored = await redis.get(keys.result_key("m1", "t-race"))
    if decision.decision == "rejected":  # the copy the approval queued is cancelled
        assert stored is not None and b"rejected" in stored
        queued = await redis.xlen(keys.task_stream("m1"))
        assert not queued or await redis.zscore(keys.cancelled_key("m1"), "t-race")
    else:
        assert stored is None and await redis.xlen(keys.task_stream("m1")) == 1


async def test_an_idempotency_key_holds_once(gateway, api_key, redis):
    url, _ = await gateway()
    body = {"model": "m1", "prompt": "x", "needs_approval": True, "idempotency_key": "k1"}
    async with httpx.AsyncClient(base_url=url, headers=auth(await api_key())) as http:
        first = (await http.post("/v1/tasks", json=body)).json()
        again = (await http.post("/v1/tasks", json=body)).json()
    assert again == {**again, "id": first["id"], "status": "duplicate"}
    assert await redis.hlen(keys.approvals_held("m1")) == 1


async def test_a_read_key_lists_only_its_tenants_held_tasks(gateway, api_key, redis, settings):
    url, _ = await gateway()
    await approvals.hold(redis, Task(id="a:1", tenant="a", model="m1", prompt="x"), settings)
    await approvals.hold(redis, Task(id="b:1", tenant="b", model="m2", prompt="y"), settings)
    async with httpx.AsyncClient(base_url=url) as http:
        mine = (await http.get("/v1/approvals", headers=auth(await api_key("a", "read")))).json()
        every = (await http.get("/v1/approvals",
                                headers=auth(await api_key("ops", "admin")))).json()
        other = await http.get("/v1/tasks/b:1", headers=auth(await api_key("a", "read")))
    assert [t["id"] for t in mine["data"]] == ["a:1"]
    assert sorted(t["id"] for t in every["data"]) == ["a:1", "b:1"]
    assert other.status_code == 404


async def test_a_script_can_hold_a_follow_up_as_the_commit_script_will(redis, settings,
                                                                       start_worker, producer):
    """The contract for the worker's commit script: a held follow-up is its msgpack Task in
    the model's held hash and its deadline in the due set, written in the model's slot."""
    child = Task(id="p.1", parent_id="p", correlation_id="p", model="m1", prompt="step two",
                 needs_approval=True, reply_to=producer.id, enqueued_at=time.time())
    await redis.eval("redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) "
                     "redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])", 2,
                     keys.approvals_held("m1"), keys.approvals_due("m1"), child.id,
                     encode(child), "+inf")
    [held] = await approvals.list_held(redis, settings)
    assert held.id == "p.1" and held.parent_id == "p"
    await start_worker()
    waiting = asyncio.ensure_future(producer.wait("p.1", timeout_s=10))
    await approvals.approve(producer, settings, "p.1", by="carol")
    assert (await waiting).text == "echo: step two"


def test_cli_lists_approves_and_rejects(server, redis, settings):
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_MODELS_FILE": "",
           "AGENTFLEET_DEFAULT_MODEL": "smollm2-135m"}
    model = "smollm2-135m"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentfleet", "approvals", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    async def hold(task_id: str) -> None:
        from agentfleet.producer.connection import connect
        from agentfleet.schemas.settings import Settings

        client = connect(server.url)
        try:
            await approvals.hold(client, Task(id=task_id, model=model, prompt="cli " + task_id),
                                 Settings())
        finally:
            await client.aclose()

    asyncio.run(hold("c1"))
    asyncio.run(hold("c2"))
    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    assert "c1" in listed.stdout and "'cli c2'" in listed.stdout
    assert cli("approve", "c1", "--reason", "fine", "--by", "dave").returncode == 0
    assert cli("reject", "c2", "--reason", "no").returncode == 0
    log = cli("list", "--decisions", "5").stdout
    assert "approved c1  by dave: fine" in log and "rejected c2" in log
    missing = cli("approve", "c1")
    assert missing.returncode == 2 and "not waiting for approval" in missing.stderr
