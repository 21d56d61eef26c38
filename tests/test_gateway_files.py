"""Files and batches through the gateway with the official openai client: upload, list,
retrieve, content, delete; a batch from an uploaded file to its output file."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import msgspec
import openai
import pytest

from agentfleet.schemas import keys
from agentfleet.workers.fake_engine import FakeEngine


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def engines_with_slots() -> dict[str, FakeEngine]:
    """Fake engines with slots, as a real engine has: the runner gives a tenant's bulk lane a
    share of them (without, a bulk lane other than the default tenant's is not read)."""
    return {"m1": FakeEngine(slots=64), "m2": FakeEngine(slots=64)}


def chat_line(custom_id: str, content: str, **body) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m1", "messages": [{"role": "user",
                                                              "content": content}],
                                "max_tokens": 16, **body}}).encode() + b"\n"


async def test_files_upload_list_retrieve_content_delete(gateway, api_key, tmp_path):
    url, gw = await gateway()
    data = b"".join(chat_line(f"r{i}", f"question {i}") for i in range(50))
    async with client(url, await api_key()) as ai:
        made = await ai.files.create(file=("requests.jsonl", data), purpose="batch")
        assert made.bytes == len(data) and made.filename == "requests.jsonl"
        listed = await ai.files.list()
        assert [f.id for f in listed.data] == [made.id]
        assert (await ai.files.retrieve(made.id)).purpose == "batch"
        assert (await ai.files.content(made.id)).content == data
        assert (await ai.files.delete(made.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await ai.files.retrieve(made.id)
    assert list(gw.files.dir.iterdir()) == []  # the bytes are gone too


async def test_an_upload_over_the_limit_is_refused_and_nothing_is_kept(gateway, api_key,
                                                                      settings, tmp_path, redis):
    url, gw = await gateway(msgspec.structs.replace(
        settings, gateway_max_file_bytes=10_000, gateway_files_dir=str(tmp_path / "f")))
    async with client(url, await api_key()) as ai:
        with pytest.raises(openai.APIStatusError) as refused:
            await ai.files.create(file=("big.jsonl", b"x" * 20_000), purpose="batch")
        assert refused.value.status_code == 413
        with pytest.raises(openai.BadRequestError):
            await ai.files.create(file=("a.jsonl", b"{}"), purpose="fine-tune")
    assert list(gw.files.dir.iterdir()) == []
    assert not await redis.keys("af:file:*")


async def test_another_tenants_file_is_not_found(gateway, api_key):
    url, _ = await gateway()
    async with client(url, await api_key("a")) as a, client(url, await api_key("b")) as b:
        made = await a.files.create(file=("x.jsonl", chat_line("1", "hi")), purpose="batch")
        with pytest.raises(openai.NotFoundError):
            await b.files.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            await b.files.content(made.id)
        with pytest.raises(openai.NotFoundError):
            await b.files.delete(made.id)
        assert (await b.files.list()).data == []


async def wait_batch(ai: openai.AsyncOpenAI, batch_id: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = await ai.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, batch
        await asyncio.sleep(0.1)


async def test_a_batch_from_an_uploaded_file_to_its_output_file(gateway, api_key, start_worker,
                                                                redis):
    await start_worker(engines=engines_with_slots())
    url, _ = await gateway()
    lines = [chat_line(f"req-{i}", f"doc {i}") for i in range(200)]
    async with client(url, await api_key("acme")) as ai:
        upload = await ai.files.create(file=("in.jsonl", b"".join(lines)), purpose="batch")
        batch = await ai.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"job": "nightly"})
        assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
        done = await wait_batch(ai, batch.id)
        assert done.status == "completed", done
        assert done.request_counts.total == 200 and done.request_counts.completed == 200
        assert done.input_file_id == upload.id and done.error_file_id is None
        output = (await ai.files.content(done.output_file_id)).content
        listed = await ai.batches.list()
        assert [b.id for b in listed.data] == [batch.id]
    rows = [json.loads(line) for line in output.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == sorted(f"req-{i}" for i in range(200))
    by_id = {r["custom_id"]: r for r in rows}
    assert by_id["req-7"]["response"]["body"]["choices"][0]["message"]["content"] == "echo: doc 7"
    # the tasks carried the caller's tenant
    stored = await redis.get(keys.result_key("m1", f"{batch.id}:req-7"))
    assert msgspec.msgpack.decode(stored)["tenant"] == "acme"


async def test_requests_that_expire_go_to_the_error_file(gateway, api_key, start_worker):
    url, _ = await gateway()
    async with client(url, await api_key()) as ai:
        upload = await ai.files.create(file=("in.jsonl", b"".join(
            chat_line(f"r{i}", "late") for i in range(5))), purpose="batch")
        batch = await ai.batches.create(input_file_id=upload.id,
                                        endpoint="/v1/chat/completions", completion_window="1s")
        await asyncio.sleep(1.2)  # no worker yet: the window passes
        await start_worker(engines=engines_with_slots())
        done = await wait_batch(ai, batch.id)
        assert done.status == "expired" and done.output_file_id is None
        errors = (await ai.files.content(done.error_file_id)).content.splitlines()
    assert len(errors) == 5
    assert {json.loads(e)["error"]["code"] for e in errors} == {"batch_expired"}


async def test_a_batch_with_invalid_lines_fails_with_them_and_queues_nothing(gateway, api_key,
                                                                            redis):
    url, _ = await gateway()
    lines = [chat_line("a", "fine"), b"{not json\n", chat_line("b", "x", max_tokens=99999)]
    async with client(url, await api_key()) as ai:
        upload = await ai.files.create(file=("in.jsonl", b"".join(lines)), purpose="batch")
        batch = await ai.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        done = await wait_batch(ai, batch.id)
        with pytest.raises(openai.BadRequestError):
            await ai.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings",
                                    completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            await ai.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                    completion_window="24h")
    assert done.status == "failed"
    assert [e.line for e in done.errors.data] == [2, 3]
    assert await redis.xlen(keys.bulk_stream("m1", "acme")) == 0


async def test_cancel_a_batch_and_other_tenants_cannot_see_it(gateway, api_key, redis):
    url, _ = await gateway()
    async with client(url, await api_key("a")) as a, client(url, await api_key("b")) as b:
        upload = await a.files.create(file=("in.jsonl", b"".join(
            chat_line(f"r{i}", "x") for i in range(20))), purpose="batch")
        batch = await a.batches.create(input_file_id=upload.id,
                                       endpoint="/v1/chat/completions", completion_window="1h")
        with pytest.raises(openai.NotFoundError):
            await b.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await b.batches.cancel(batch.id)
        deadline = time.monotonic() + 10
        while (await a.batches.retrieve(batch.id)).status == "validating":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        cancelled = await a.batches.cancel(batch.id)
        assert cancelled.status == "cancelling"
        assert (await b.batches.list()).data == []
    async with httpx.AsyncClient(base_url=url) as http:
        reply = await http.get(f"/v1/batches/{batch.id}",
                               headers={"Authorization": f"Bearer {await api_key('a', 'read')}"})
    assert reply.json()["status"] == "cancelling"
