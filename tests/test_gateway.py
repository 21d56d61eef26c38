"""The gateway's core through real HTTP: the official openai client for OpenAI's routes,
plain HTTP (httpx) for the task API, a real worker (fake engine) behind it, on both servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from agentfleet.ops import apikeys
from agentfleet.ops.gateway.quota import Quota
from agentfleet.schemas import keys
from agentfleet.workers.fake_engine import FakeEngine


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def queued(redis) -> int:
    """Tasks in every lane stream of every tenant (a tenant has its own streams)."""
    total = 0
    async for key in redis.scan_iter(match="af:{*}:*", count=1000):
        name = key.decode()
        if (":tasks" in name or ":bulk" in name) and await redis.type(key) == b"stream":
            total += await redis.xlen(key)
    return total


async def test_chat_completion_through_the_openai_client(gateway, api_key, start_worker):
    await start_worker()
    url, _ = await gateway()
    async with client(url, await api_key()) as ai:
        answer = await ai.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "why is the sky blue"}],
            max_tokens=16)
    assert answer.choices[0].message.content == "echo: why is the sky blue"
    assert answer.choices[0].finish_reason == "stop" and answer.model == "m1"
    assert answer.usage.prompt_tokens == 5 and answer.usage.completion_tokens == 6
    assert answer.id.startswith("chatcmpl-acme:") and answer.system_fingerprint == "fake-1"


async def test_text_completion_and_models(gateway, api_key, start_worker):
    await start_worker()
    url, _ = await gateway()
    async with client(url, await api_key(role="submit")) as ai:
        answer = await ai.completions.create(model="m2", prompt="one two three", max_tokens=8)
        models = await ai.models.list()
        one = await ai.models.retrieve("m2")
        with pytest.raises(openai.NotFoundError):
            await ai.models.retrieve("gpt-9")
    assert answer.choices[0].text == "echo: one two three" and answer.object == "text_completion"
    assert [m.id for m in models.data] == ["m1", "m2"] and one.id == "m2"


async def test_bad_input_gets_openai_errors_and_queues_nothing(gateway, api_key, redis,
                                                               settings, tmp_path):
    import msgspec

    small = msgspec.structs.replace(settings, gateway_max_body_bytes=4096,
                                    gateway_files_dir=str(tmp_path))
    url, _ = await gateway(small)
    key = await api_key()
    reader = await api_key(role="read")
    chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    async with client(url, key) as ai:
        cases = [
            (openai.BadRequestError, dict(n=2), "n"),
            (openai.NotFoundError, dict(model="gpt-9"), "model"),
            (openai.UnprocessableEntityError, dict(extra_body={"temprature": 0.5}), None),
            (openai.BadRequestError, dict(max_tokens=5000), "max_tokens"),
            (openai.BadRequestError, dict(tool_choice="required"), "tool_choice"),
        ]
        for error, change, param in cases:
            with pytest.raises(error) as caught:
                await ai.chat.completions.create(**{**chat, **change})
            assert caught.value.body["param"] == param, change
    async with client(url, "afk_000000000000_nope") as ai:
        with pytest.raises(openai.AuthenticationError):
            await ai.chat.completions.create(**chat)
    async with client(url, reader) as ai:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await ai.chat.completions.create(**chat)
        assert "read" in denied.value.message
    async with httpx.AsyncClient(base_url=url) as http:
        malformed = await http.post("/v1/chat/completions", content=b'{"model": "m1",',
                                    headers=auth(key))
        assert malformed.status_code == 400
        assert malformed.json()["error"]["code"] == "invalid_json"
        unknown = await http.post("/v1/chat/completions", json={**chat, "foo": 1},
                                  headers=auth(key))
        assert unknown.status_code == 422 and "foo" in unknown.json()["error"]["message"]
        huge = await http.post("/v1/chat/completions", headers=auth(key), json={
            **chat, "messages": [{"role": "user", "content": "x" * 10_000}]})
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
        no_key = await http.post("/v1/chat/completions", json=chat)
        assert no_key.status_code == 401
        assert set(no_key.json()["error"]) == {"message", "type", "param", "code"}
        nowhere = await http.get("/v1/nowhere", headers=auth(key))
        assert nowhere.status_code == 404 and "error" in nowhere.json()
    assert await queued(redis) == 0


async def test_unknown_field_error_names_the_field(gateway, api_key):
    url, _ = await gateway()
    key = await api_key()
    async with httpx.AsyncClient(base_url=url) as http:
        reply = await http.post("/v1/tasks", headers=auth(key), json={
            "model": "m1", "prompt": "hi", "sampling": {"max_token": 5}})
    assert reply.status_code == 422
    assert "max_token" in reply.json()["error"]["message"]
    assert reply.json()["error"]["param"] == "sampling"


async def test_task_api_follow_ups_correlation_id_and_trace(gateway, api_key, start_worker):
    await start_worker()
    url, _ = await gateway()
    key = await api_key()
    async with httpx.AsyncClient(base_url=url, headers=auth(key)) as http:
        made = await http.post("/v1/tasks", json={
            "model": "m1", "prompt": "plan the trip", "correlation_id": "order-7",
            "priority": 5, "sampling": {"max_tokens": 8},
            "followups": [{"model": "m2", "prompt": "check: {output}"}]})
        assert made.status_code == 202, made.text
        task = made.json()
        assert task["status"] == "queued" and task["correlation_id"] == "order-7"
        done = await _until_done(http, task["id"])
        assert done["status"] == "succeeded" and done["correlation_id"] == "order-7"
        child = await _until_done(http, done["result"]["followup_ids"][0])
        assert child["result"]["text"] == "echo: check: echo: plan the trip"
        trace = (await http.get("/v1/traces/order-7")).json()
    kinds = [e["type"] for e in trace["events"]]
    assert kinds.count("fin") == 2 and "enq" in kinds


async def _until_done(http: httpx.AsyncClient, task_id: str, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = (await http.get(f"/v1/tasks/{task_id}")).json()
        if view["status"] not in ("pending", "queued", "awaiting_approval"):
            return view
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish: {view}")


async def test_idempotency_keys_are_per_tenant(gateway, api_key, redis):
    url, _ = await gateway()
    body = {"model": "m1", "prompt": "charge the card", "idempotency_key": "pay-1"}
    async with httpx.AsyncClient(base_url=url) as http:
        a1 = (await http.post("/v1/tasks", json=body, headers=auth(await api_key("a")))).json()
        a2 = await http.post("/v1/tasks", json=body, headers=auth(await api_key("a")))
        b1 = (await http.post("/v1/tasks", json=body, headers=auth(await api_key("b")))).json()
    assert a2.status_code == 200 and a2.json()["status"] == "duplicate"
    assert a2.json()["id"] == a1["id"] and b1["id"] != a1["id"]
    assert await redis.xlen(keys.task_stream("m1", "a")) == 1  # a once, b once
    assert await redis.xlen(keys.task_stream("m1", "b")) == 1


async def test_one_tenant_cannot_read_or_cancel_another_tenants_work(gateway, api_key,
                                                                     start_worker):
    await start_worker()
    url, _ = await gateway()
    a, b, admin = await api_key("a"), await api_key("b", "read"), await api_key("ops", "admin")
    async with httpx.AsyncClient(base_url=url) as http:
        made = (await http.post("/v1/tasks", headers=auth(a), json={
            "model": "m1", "prompt": "secret plans", "correlation_id": "c1"})).json()
        http.headers.update(auth(a))
        await _until_done(http, made["id"])
        http.headers.clear()
        for path in (f"/v1/tasks/{made['id']}", "/v1/traces/c1"):
            assert (await http.get(path, headers=auth(b))).status_code == 404
        assert (await http.delete(f"/v1/tasks/{made['id']}",
                                  headers=auth(await api_key("b")))).status_code == 404
        seen = await http.get(f"/v1/tasks/{made['id']}", headers=auth(admin))
        assert seen.json()["result"]["text"] == "echo: secret plans"
        assert (await http.get("/v1/traces/a:c1", headers=auth(admin))).status_code == 200


async def test_cancelled_queued_task_never_runs(gateway, api_key, start_worker):
    url, _ = await gateway()
    async with httpx.AsyncClient(base_url=url, headers=auth(await api_key())) as http:
        made = (await http.post("/v1/tasks", json={"model": "m1", "prompt": "x"})).json()
        gone = await http.delete(f"/v1/tasks/{made['id']}")
        assert gone.status_code == 202 and gone.json()["status"] == "cancelling"
        engines = {"m1": FakeEngine(), "m2": FakeEngine()}
        await start_worker(engines=engines)
        done = await _until_done(http, made["id"])
    assert done["status"] == "cancelled" and engines["m1"].submitted == 0


async def test_client_that_disconnects_cancels_its_task(gateway, api_key, start_worker, redis):
    engines = {"m1": FakeEngine(delay_s=30), "m2": FakeEngine()}
    await start_worker(engines=engines)
    url, gw = await gateway()
    async with client(url, await api_key()) as ai:
        with pytest.raises(openai.APITimeoutError):
            await ai.with_options(timeout=0.5).chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "slow"}])
    deadline = time.monotonic() + 5
    while not await redis.zcard(keys.cancelled_key("m1")):
        assert time.monotonic() < deadline, "the task was not cancelled"
        await asyncio.sleep(0.05)
    task_id = (await redis.zrange(keys.cancelled_key("m1"), 0, 0))[0].decode()
    result = await gw.producer.wait(task_id, timeout_s=5)
    assert result.status.value == "cancelled"
    assert gw.metrics.disconnects._value.get() == 1


class _Closed(Quota):
    async def check(self, tenant: str, tasks: int) -> float | None:
        return 2.5 if tenant == "over" else None


async def test_quota_hook_answers_429_with_retry_after_and_queues_nothing(gateway, api_key,
                                                                          redis):
    url, _ = await gateway(quota=_Closed())
    async with client(url, await api_key("over")) as ai:
        with pytest.raises(openai.RateLimitError) as limited:
            await ai.chat.completions.create(model="m1", messages=[{"role": "user",
                                                                    "content": "hi"}])
    assert limited.value.response.headers["retry-after"] == "3"
    async with httpx.AsyncClient(base_url=url, headers=auth(await api_key("over"))) as http:
        assert (await http.post("/v1/tasks", json={"model": "m1",
                                                   "prompt": "x"})).status_code == 429
        http.headers.update(auth(await api_key("fine")))
        assert (await http.post("/v1/tasks", json={"model": "m1",
                                                   "prompt": "x"})).status_code == 202
    assert await queued(redis) == 1


async def test_a_registry_quota_is_a_429_with_retry_after(gateway, api_key, redis):
    from agentfleet.producer.tenants import TenantRegistry
    from agentfleet.schemas.wire import TenantConfig

    await TenantRegistry(redis).set("small", TenantConfig(max_queued=1), who="test")
    url, _ = await gateway()
    async with httpx.AsyncClient(base_url=url, headers=auth(await api_key("small"))) as http:
        first = await http.post("/v1/tasks", json={"model": "m1", "prompt": "one"})
        second = await http.post("/v1/tasks", json={"model": "m1", "prompt": "two"})
    assert first.status_code == 202
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert second.json()["error"]["code"] == "quota_exceeded"
    assert second.json()["error"]["param"] == "max_queued"
    assert await queued(redis) == 1


async def test_health_readiness_metrics_and_openapi(gateway, api_key):
    url, _ = await gateway()
    key = await api_key()
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).json() == {"status": "ready"}
        await http.get("/v1/models", headers=auth(key))
        await http.get("/v1/models", headers=auth("afk_000000000000_x"))
        await http.post("/v1/chat/completions", headers=auth(key), content=b"{")
        text = (await http.get("/metrics")).text
        doc = (await http.get("/openapi.json")).json()
    assert 'agentfleet_gateway_requests_total{code="200",route="models"} 1.0' in text
    assert 'agentfleet_gateway_requests_total{code="401",route="models"} 1.0' in text
    assert 'agentfleet_gateway_requests_total{code="400",route="chat"} 1.0' in text
    routes = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert ("/v1/chat/completions", "post") in routes and ("/v1/files/{file_id}/content",
                                                           "get") in routes
    assert served_routes() == routes
    assert "ChatRequest" in doc["components"]["schemas"]


def served_routes() -> set[tuple[str, str]]:
    """Every (path, method) the app serves (Litestar's and the fast routes), but Litestar's
    automatic OPTIONS and the document itself."""
    import re

    from agentfleet.ops.gateway import create_app
    from agentfleet.ops.gateway.fast import FAST_ROUTES
    from agentfleet.schemas.settings import Settings

    app = create_app(Settings(), "redis://unused").app
    return {(re.sub(r":\w+}", "}", path), method.lower())
            for route in app.routes for h in route.route_handlers for path in h.paths
            for method in h.http_methods if method != "OPTIONS" and h.name != "openapi"} | {
        (r.path, r.method.lower()) for r in FAST_ROUTES}


async def test_a_revoked_key_is_refused_once_the_cache_expires(gateway, api_key, redis,
                                                               settings, tmp_path):
    import msgspec

    url, _ = await gateway(msgspec.structs.replace(settings, gateway_key_cache_s=0.2,
                                                   gateway_files_dir=str(tmp_path)))
    key = await api_key()
    async with httpx.AsyncClient(base_url=url, headers=auth(key)) as http:
        assert (await http.get("/v1/models")).status_code == 200
        await apikeys.revoke(redis, key.split("_")[1])
        await asyncio.sleep(0.3)
        assert (await http.get("/v1/models")).status_code == 401


@pytest.mark.parametrize("http_server", ["granian", "uvicorn"])
async def test_agentfleet_gateway_serves(server, api_key, start_worker, tmp_path, http_server):
    await start_worker()
    key = await api_key()
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_GATEWAY_PORT": "0",
           "AGENTFLEET_HOME": str(tmp_path), "AGENTFLEET_MODELS_FILE": _models_file(tmp_path),
           "AGENTFLEET_DEFAULT_MODEL": "m1"}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "agentfleet", "gateway", "--port", str(port),
                             "--server", http_server],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(200):
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.stdout.read().decode()
                await asyncio.sleep(0.05)
        async with client(url, key) as ai:
            answer = await ai.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "over " + http_server}])
        assert answer.choices[0].message.content == "echo: over " + http_server
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    # uvicorn drains, then re-raises the SIGTERM it caught: its exit says what ended it
    assert proc.returncode == (0 if http_server == "granian" else -15), out.decode()
    assert b"Traceback" not in out


def _models_file(tmp_path) -> str:
    path = tmp_path / "models.toml"
    path.write_text("[models.m1]\nmax_model_len = 512\n[models.m2]\nmax_model_len = 256\n")
    return str(path)


async def test_prompt_cache_key_and_affinity_key_pick_the_affinity_partition(
        gateway, api_key, settings, tmp_path, redis):
    """OpenAI's `prompt_cache_key` (chat, completions) and the task API's `affinity_key` are
    the task's affinity key: with partitions on, it lands in that key's partition stream."""
    import msgspec

    s = msgspec.structs.replace(settings, affinity_partitions=8,
                                gateway_files_dir=str(tmp_path / "files"))
    url, _ = await gateway(s)
    key = await api_key()
    async with httpx.AsyncClient(base_url=url, headers=auth(key)) as http:
        for body in ({"model": "m1", "prompt": "a", "affinity_key": "session-7"},
                     {"model": "m1", "prompt": "b", "affinity_key": "x" * 201}):
            made = await http.post("/v1/tasks", json=body)
            assert made.status_code in (202, 400), made.text
        assert made.status_code == 400 and "affinity_key" in made.json()["error"]["message"]
        chat = asyncio.create_task(http.post("/v1/chat/completions", json={
            "model": "m1", "messages": [{"role": "user", "content": "c"}],
            "prompt_cache_key": "session-7"}))
        part = keys.task_stream("m1", "acme", part=keys.affinity_partition("session-7", 8))
        deadline = time.monotonic() + 10
        while await redis.xlen(part) < 2:  # no worker: both wait in session-7's partition
            assert time.monotonic() < deadline, await queued(redis)
            await asyncio.sleep(0.05)
        chat.cancel()
    assert await queued(redis) == 2  # the refused one queued nothing
