"""Completion webhooks: signed per tenant, retried with backoff, delivered to a real local
HTTP receiver; resumed by a gateway that restarts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import msgspec

from agentfleet.ops.gateway.webhooks import WebhookRecord, tenant_secret, verify
from agentfleet.schemas import keys
from agentfleet.schemas.wire import Task

SECRET = "gateway-master-secret"


class Receiver:
    """An ASGI app that records every delivery and fails the first `failures` of them."""

    def __init__(self, failures: int):
        self.failures = failures
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.got.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))
        status = 500 if len(self.got) <= self.failures else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        if status == 200:
            self.arrived.set()


def webhook_settings(settings, tmp_path, **kw):
    return msgspec.structs.replace(settings, webhook_secret=SECRET, webhook_retry_base_s=0.05,
                                   webhook_retry_max_s=0.2, webhook_max_attempts=4,
                                   gateway_files_dir=str(tmp_path), **kw)


async def test_a_webhook_is_signed_retried_and_delivered(gateway, serve_app, api_key,
                                                         start_worker, settings, tmp_path,
                                                         redis):
    await start_worker()
    receiver = Receiver(failures=2)
    hook_url = await serve_app(receiver)
    url, gw = await gateway(webhook_settings(settings, tmp_path))
    async with httpx.AsyncClient(base_url=url,
                                 headers={"Authorization": f"Bearer {await api_key('acme')}"}) \
            as http:
        made = (await http.post("/v1/tasks", json={"model": "m1", "prompt": "notify me",
                                                   "webhook_url": hook_url + "/done"})).json()
    await asyncio.wait_for(receiver.arrived.wait(), 10)
    assert len(receiver.got) == 3
    secret = tenant_secret(SECRET, "acme")
    for headers, body in receiver.got:
        assert headers["webhook-id"] == made["id"] and verify(secret, headers, body)
        assert not verify(tenant_secret(SECRET, "other"), headers, body)
    payload = json.loads(receiver.got[-1][1])
    assert payload["type"] == "task.completed" and payload["data"]["status"] == "succeeded"
    assert payload["data"]["result"]["text"] == "echo: notify me"
    for _ in range(100):
        if not await redis.hlen(keys.webhooks()):
            break
        await asyncio.sleep(0.02)
    assert await redis.hlen(keys.webhooks()) == 0
    counts = {s.labels["outcome"]: s.value for s in gw.metrics.webhooks.collect()[0].samples
              if s.name.endswith("_total")}
    assert counts == {"delivered": 1.0, "retried": 2.0}


async def test_a_webhook_is_dropped_after_its_last_attempt(gateway, serve_app, api_key,
                                                           start_worker, settings, tmp_path,
                                                           redis):
    await start_worker()
    receiver = Receiver(failures=100)
    hook_url = await serve_app(receiver)
    url, gw = await gateway(webhook_settings(settings, tmp_path))
    async with httpx.AsyncClient(base_url=url,
                                 headers={"Authorization": f"Bearer {await api_key()}"}) as http:
        await http.post("/v1/tasks", json={"model": "m1", "prompt": "x",
                                           "webhook_url": hook_url})
    deadline = time.monotonic() + 10
    while len(receiver.got) < 4 or await redis.hlen(keys.webhooks()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert len(receiver.got) == 4  # webhook_max_attempts, then no more


async def test_webhooks_are_refused_when_off_and_nothing_is_queued(gateway, api_key, redis):
    url, _ = await gateway()
    async with httpx.AsyncClient(base_url=url,
                                 headers={"Authorization": f"Bearer {await api_key()}"}) as http:
        off = await http.post("/v1/tasks", json={"model": "m1", "prompt": "x",
                                                 "webhook_url": "http://127.0.0.1:1/x"})
    assert off.status_code == 400 and off.json()["error"]["param"] == "webhook_url"
    assert await redis.xlen(keys.task_stream("m1", "acme")) == 0


async def test_a_restarted_gateway_resumes_pending_webhooks(gateway, serve_app, producer,
                                                            start_worker, settings, tmp_path,
                                                            redis):
    await start_worker()
    task_id = await producer.submit(Task(model="m1", prompt="left behind", tenant="acme"))
    await producer.wait(task_id, timeout_s=10)
    receiver = Receiver(failures=0)
    hook_url = await serve_app(receiver)
    # what a gateway that stopped before delivering leaves in Redis
    await redis.hset(keys.webhooks(), task_id, msgspec.msgpack.encode(WebhookRecord(
        task_id=task_id, model="m1", tenant="acme", url=hook_url)))
    await gateway(webhook_settings(settings, tmp_path))
    await asyncio.wait_for(receiver.arrived.wait(), 10)
    assert json.loads(receiver.got[0][1])["data"]["result"]["text"] == "echo: left behind"


def test_cli_prints_a_tenants_webhook_secret():
    env = {**os.environ, "AGENTFLEET_WEBHOOK_SECRET": SECRET}
    out = subprocess.run([sys.executable, "-m", "agentfleet", "gateway", "--webhook-secret",
                          "acme"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == tenant_secret(SECRET, "acme").hex()
