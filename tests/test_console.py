"""`agentfleet console` over HTTP (a real server from the CLI, httpx): login, tenants, roles,
pages, downloads and the one write.  In a browser: tests/test_console_browser.py."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator

import httpx
import pytest
from console_fleet import ConsoleProcess, Fleet, populated

from agentfleet.producer.connection import connect
from agentfleet.schemas import keys

pytestmark = [pytest.mark.timeout(120), pytest.mark.cluster_too]


@pytest.fixture(scope="module")
def fleet(server, tmp_path_factory):
    """One populated server and one console per module (and per server kind)."""
    data = populated(server.url)
    console = ConsoleProcess(server.url, tmp_path_factory.mktemp("console"))
    yield data, console
    console.stop()


@contextlib.contextmanager
def _client(console: ConsoleProcess, key: str | None = None) -> Iterator[httpx.Client]:
    """A browser-like client (cookies, Accept: text/html), logged in with `key` if given."""
    with httpx.Client(base_url=console.url, timeout=10, follow_redirects=False,
                      headers={"Accept": "text/html"}) as client:
        if key is not None:
            reply = client.post("/login", data={"key": key})
            assert reply.status_code == 303, reply.text
        yield client


def _text(page: str) -> str:
    page = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def test_login_refuses_a_bad_key_and_pages_need_one(fleet):
    data, console = fleet
    with _client(console) as c:
        assert c.get("/").status_code == 303 and "/login" in c.get("/").headers["location"]
        assert c.get("/", headers={"Accept": "application/json"}).status_code == 401
        for bad in ("nonsense", "afk_000000000000_wrong", data.admin_key + "x"):
            reply = c.post("/login", data={"key": bad})
            assert reply.status_code == 401 and "unknown, revoked or malformed" in reply.text
            assert "set-cookie" not in reply.headers
        reply = c.post("/login", data={"key": data.acme_key, "next": "https://evil.example/"})
        assert reply.status_code == 303 and reply.headers["location"] == "/"  # no open redirect
        cookie = reply.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
    with httpx.Client(base_url=console.url, timeout=10) as api:  # a script, by header
        assert api.get("/", headers={"Authorization": f"Bearer {data.admin_key}"}).status_code \
            == 200


def test_models_page_shows_queues_workers_and_recent_work(fleet):
    data, console = fleet
    with _client(console, data.acme_key) as c:
        page = c.get("/")
        assert page.status_code == 200, page.text
        text = _text(page.text)
        assert "Models and lanes" in text and "m1" in text and "m2" in text
        assert "No worker is registered for this model" in text  # it stopped
        assert " 3 2 m2 " in text  # m1's errors (a failed task, two dead letters), dead letters
        assert "Fleet counters: dead_lettered 2" in text
        assert "tenant acme (read)" in text
        assert "white-space:nowrap" in page.text


def test_a_tenant_sees_its_batches_only_and_downloads_the_output(fleet):
    data, console = fleet
    with _client(console, data.acme_key) as c:
        listing = c.get("/batches").text
        assert data.acme_batch in listing and data.globex_batch not in listing
        page = c.get(f"/batches/{data.acme_batch}")
        assert page.status_code == 200 and "completed" in page.text
        assert "40 / 40" in _text(page.text)
        out = c.get(f"/batches/{data.acme_batch}/output.jsonl")
        assert out.status_code == 200 and out.headers["content-type"].startswith(
            "application/jsonl")
        lines = out.text.splitlines()
        assert len(lines) == data.acme_batch_ok and '"custom_id": "a0"' in out.text.replace(
            '":"', '": "')
        assert c.get(f"/batches/{data.acme_batch}/errors.jsonl").text == ""
        assert c.get(f"/batches/{data.globex_batch}").status_code == 404
        assert c.get(f"/batches/{data.globex_batch}/output.jsonl").status_code == 404
    with _client(console, data.admin_key) as c:
        listing = c.get("/batches").text
        assert data.acme_batch in listing and data.globex_batch in listing


def test_dead_letters_by_tenant_and_replay_only_for_admins(fleet, server):
    data, console = fleet
    acme_entry, globex_entry = data.dead["acme"], data.dead["globex"]
    with _client(console, data.acme_key) as c:
        listing = c.get("/dead-letters?model=m1").text
        assert acme_entry in listing and globex_entry not in listing
        page = c.get(f"/dead-letters/m1/{acme_entry}")
        assert page.status_code == 200 and "attempts_exhausted" in page.text
        assert "engine_error" in page.text  # its history, one line per attempt
        assert "<button" not in page.text.split("<main>")[1] and "takes an admin key" in page.text
        assert c.get(f"/dead-letters/m1/{globex_entry}").status_code == 404
        csrf = re.search(r'name=csrf value="([0-9a-f]+)"', page.text).group(1)
        refused = c.post(f"/dead-letters/m1/{acme_entry}/replay", data={"csrf": csrf})
        assert refused.status_code == 403 and "admin" in refused.text
    with _client(console, data.admin_key) as c:
        listing = c.get("/dead-letters?model=m1").text
        assert acme_entry in listing and globex_entry in listing
        page = c.get(f"/dead-letters/m1/{globex_entry}").text
        assert "Replay: queue the task again</button>" in page
        stale = c.post(f"/dead-letters/m1/{globex_entry}/replay", data={"csrf": "0" * 32})
        assert stale.status_code == 403  # a form from elsewhere
        redis = connect(server.url)
        try:
            before = asyncio.run(_xlen(server.url, keys.task_stream("m1", "globex")))
            csrf = re.search(r'name=csrf value="([0-9a-f]+)"', page).group(1)
            done = c.post(f"/dead-letters/m1/{globex_entry}/replay", data={"csrf": csrf})
            assert done.status_code == 303
            assert "Replayed" in c.get(done.headers["location"]).text
            assert asyncio.run(_xlen(server.url, keys.task_stream("m1", "globex"))) == before + 1
            assert c.get(f"/dead-letters/m1/{globex_entry}").status_code == 404
        finally:
            asyncio.run(redis.aclose())
        assert c.get("/dead-letters?model=nope").status_code == 404
        assert c.get("/dead-letters?model=m1&before=x").status_code == 404


async def _xlen(url: str, stream: str) -> int:
    redis = connect(url)
    try:
        return await redis.xlen(stream)
    finally:
        await redis.aclose()


def test_trace_of_a_chain_with_its_follow_ups_for_its_tenant_only(fleet):
    data, console = fleet
    with _client(console, data.acme_key) as c:
        page = c.get(f"/trace/{data.acme_chain}")
        assert page.status_code == 200, page.text
        text = _text(page.text)
        assert "4 task(s), 4 finished" in text  # the task, two follow-ups, one of theirs
        assert f"{data.acme_chain}.1.1" in text and "└" in page.text  # drawn under its parent
        assert page.text.count("<rect") >= 4 and "first token" in text
        assert c.get(f"/trace/{data.globex_task}").status_code == 404
        assert c.get(f"/trace?id={data.acme_chain}").headers["location"].endswith(
            data.acme_chain)
    with _client(console, data.globex_key) as c:
        assert c.get(f"/trace/{data.globex_task}").status_code == 200
        assert c.get(f"/trace/{data.acme_chain}").status_code == 404


def test_report_page_per_tenant_and_for_admins(fleet):
    data, console = fleet
    with _client(console, data.acme_key) as c:
        page = c.get("/report?since=1h")
        assert page.status_code == 200, page.text
        text = _text(page.text)
        assert "Service level objectives" in text and "tenants: acme" in text
        assert "globex" not in text and '<svg class="chart"' in page.text
        assert c.get("/report?since=forever").status_code == 404
    with _client(console, data.admin_key) as c:
        page = c.get("/report?since=1h").text
        assert "globex" in page and "acme" in page
        link = f'/trace/{data.failed_corr}'
        assert link in page  # the example of its error code links to its trace
        assert c.get(link).status_code == 200
