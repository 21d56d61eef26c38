"""`agentfleet report`: the aggregates it reads (three hash families, older hashes too), the
SLOs it judges, and the command's text, HTML and JSON.  The page in a browser:
tests/test_console_browser.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import msgspec
import pytest

from agentfleet.ops.report import (
    SloPolicy,
    Window,
    build_report,
    count_within,
    load_report,
    load_window,
)
from agentfleet.ops.report_render import render_html, render_text
from agentfleet.producer.batch import BatchClient
from agentfleet.producer.connection import connect_sync
from agentfleet.schemas import keys
from agentfleet.schemas.wire import Task
from agentfleet.workers.kpi import KpiBuffer, parse_field, series_fields, split_lane
from agentfleet.workers.metrics import LATENCY_BUCKETS_S

pytestmark = pytest.mark.timeout(90)

HOUR = 1_800_000_000 - 1_800_000_000 % 3600  # an hour start, in the future of any clock skew


def test_fold_keeps_first_token_wait_engine_version_window_and_an_example():
    buf = KpiBuffer(60, LATENCY_BUCKETS_S)
    # new-style group: ttft, wait, engine, version, tasks within their window
    buf.groups.append(("m1", 600, "bulk", ["acme", "acme"], [500.0, 800.0], [1, 2], [3, 4],
                       [0.2, 0.3], [0.01, 0.02], [1.0, 2.0], "v:2", 2))
    # an old-style group (seven elements) still folds
    buf.groups.append(("m1", 600, "interactive", ["acme"], [0.2], [1], [1]))
    buf.tasks.append(("m1", 600, "interactive", "acme", "failed", "engine_error", 0.5, 0, 0,
                      None, 0.1, 0.4, "v1", False, "corr-1"))
    buf.tasks.append(("m1", 600, "interactive", "acme", "failed", "engine_error", 0.5, 0, 0,
                      None, 0.1, 0.4, "v1", False, "corr-2"))
    out = buf.fold()[("m1", 600)]
    i_1s, i_10s = LATENCY_BUCKETS_S.index(1.0), LATENCY_BUCKETS_S.index(600.0)
    assert out["s:succeeded:bulk@v_2:acme"] == 2  # a colon in a version is written as '_'
    assert out["d:bulk@v_2:acme"] == 2
    assert out[f"b:{len(LATENCY_BUCKETS_S)}:bulk@v_2:acme"] == 1  # 800 s: above the last
    assert out[f"b:{i_10s}:bulk@v_2:acme"] == 1
    assert out[f"t:{LATENCY_BUCKETS_S.index(0.25)}:bulk@v_2:acme"] == 1
    assert out["w:bulk@v_2:acme"] == pytest.approx(0.03)
    assert out["g:bulk@v_2:acme"] == pytest.approx(3.0)
    assert out["s:succeeded:interactive:acme"] == 1  # no version: the old form
    assert out["s:failed:interactive@v1:acme"] == 2
    assert out["x:engine_error"] == "corr-1"  # the first one
    assert out[f"b:{i_1s - 1}:interactive@v1:acme"] == 2
    assert parse_field("d:bulk@v_2:acme") == ("d", "", "bulk@v_2", "acme")
    assert split_lane("bulk@v_2") == ("bulk", "v_2") and split_lane("bulk") == ("bulk", "")
    series = series_fields(out, 7)
    assert series["7/s:failed:interactive:"] == 2 and series["7/s:succeeded:bulk:"] == 2
    assert "7/x:engine_error" not in series
    assert not any(k.endswith("acme") for k in series)  # tenants dropped


def _feed(buf: KpiBuffer, minute: int, tenant: str, n: int, version: str = "v1") -> None:
    buf.groups.append(("m1", minute, "interactive", [tenant] * n, [0.02 * (i + 1) for i in range(n)],
                       [3] * n, [5] * n, [0.01] * n, [0.005] * n, [0.01] * n, version, 0))
    buf.tasks.append(("m1", minute, "interactive", tenant, "failed", "internal", 0.3, 0, 0,
                      None, 0.1, 0.2, version, False, f"c-{minute}"))
    buf.groups.append(("m1", minute, "bulk", [tenant] * 2, [900.0, 1000.0], [1, 1], [2, 2],
                       [0.5, 0.6], [100.0, 200.0], [1.0, 1.0], version, 2))


async def test_hours_and_series_read_the_same_figures_as_the_minutes_they_sum(redis, server):
    buf = KpiBuffer(3600, LATENCY_BUCKETS_S)
    # minutes at both edges of a 3-hour window and two whole hours between them
    minutes = [HOUR + 50 * 60, HOUR + 59 * 60, HOUR + 3600, HOUR + 3600 + 30 * 60,
               HOUR + 7200 + 59 * 60, HOUR + 3 * 3600 + 5 * 60]
    for i, minute in enumerate(minutes):
        _feed(buf, minute, "acme" if i % 2 else "globex", 5 + i, "v1" if i < 3 else "v2")
    await buf.flush(redis)
    client = connect_sync(server.url)
    try:
        now = HOUR + 3 * 3600 + 5 * 60 + 30
        fast = load_window(client, ["m1"], 3 * 3600 + 15 * 60, now)
        assert fast.resolution_s == 60
        for key in await redis.keys("af:{m1}:kpi[hm]:*"):
            await redis.delete(key)  # as older workers left it: minutes only
        slow = load_window(client, ["m1"], 3 * 3600 + 15 * 60, now)
    finally:
        client.close()
    assert msgspec.to_builtins(fast.rows) == msgspec.to_builtins(slow.rows)
    fast_slots, slow_slots = (msgspec.to_builtins(w.slots["m1"]) for w in (fast, slow))
    assert fast_slots.keys() == slow_slots.keys()
    for at, slot in fast_slots.items():
        assert slot == slow_slots[at], at
    rows = {(r.version, r.lane, r.tenant): r for r in fast.rows}
    assert rows[("v1", "interactive", "globex")].statuses == {"succeeded": 5 + 7, "failed": 2}
    assert rows[("v2", "bulk", "acme")].within_window == 4
    assert sum(r.ended for r in fast.rows) == sum(5 + i + 1 + 2 for i in range(6))
    assert fast.examples["m1"]["internal"].startswith("c-")
    at = minutes[3]
    assert fast.slots["m1"][at].lanes["interactive"].statuses == {"succeeded": 8, "failed": 1}


async def test_hashes_written_by_older_workers_still_read(redis, server):
    minute = HOUR + 120
    key = keys.kpi_key("m1", minute)
    b = LATENCY_BUCKETS_S.index(0.05)
    await redis.hset(key, mapping={"s:succeeded:interactive:acme": 9,
                                   "s:failed:interactive:acme": 1,
                                   "e:internal:interactive:acme": 1,
                                   f"b:{b}:interactive:acme": 10, "l:interactive:acme": 0.4,
                                   "p:interactive:acme": 30, "o:interactive:acme": 50,
                                   "s:succeeded:bulk:acme": 4, f"b:{b}:bulk:acme": 4})
    client = connect_sync(server.url)
    try:
        report = load_report(client, ["m1"], 600, now=minute + 30)
    finally:
        client.close()
    slos = {(s.lane, s.name): s for s in report.slos}
    assert set(slos) == {("interactive", "availability"), ("interactive", "end_to_end")}
    assert slos[("interactive", "availability")].attainment == pytest.approx(0.9)
    assert slos[("interactive", "end_to_end")].attainment == 1.0
    [kpi] = report.kpis
    assert (kpi.tasks, kpi.output_tokens, kpi.engine_hours) == (14, 50, None)
    assert report.series["m1"][-1].interactive == 10


def test_bulk_tasks_are_judged_on_their_window_and_budgets_add_up():
    buf = KpiBuffer(60, LATENCY_BUCKETS_S)
    # 100 bulk tasks took 15 to 20 minutes each, 99 within their job's window: no interactive
    # 30 s bound applies to them.
    buf.groups.append(("m1", HOUR, "bulk", ["t"] * 99, [1000.0] * 99, [1] * 99, [1] * 99,
                       [1.0] * 99, [900.0] * 99, [5.0] * 99, "", 99))
    buf.groups.append(("m1", HOUR, "bulk", ["t"], [1200.0], [1], [1], [1.0], [900.0], [5.0],
                       "", 0))
    # 1000 interactive tasks: 990 succeeded, 20 over 2.5 s to the first token
    buf.groups.append(("m1", HOUR, "interactive", ["t"] * 990, [0.1] * 980 + [40.0] * 10,
                       [1] * 990, [1] * 990, [0.2] * 970 + [3.0] * 20, [0.01] * 990,
                       [0.1] * 990, "", 0))
    for _ in range(10):
        buf.tasks.append(("m1", HOUR, "interactive", "t", "failed", "internal", 0.1, 0, 0,
                          None, 0.01, 0.05, "", False, "c"))
    buf.tasks.append(("m1", HOUR, "interactive", "t", "cancelled", "cancelled", 0.1, 0, 0,
                      None, None, None, "", False, "c"))
    from agentfleet.ops.report import _Reader

    reader = _Reader(None)
    reader.detail("m1", {k.encode(): str(v).encode() for k, v in buf.fold()[("m1", HOUR)].items()},
                  HOUR)
    window = Window(since=HOUR, until=HOUR + 60, models=["m1"],
                    rows=list(reader.rows.values()), slots=reader.slots)
    report = build_report(window, policy=SloPolicy())
    slos = {(s.lane, s.name): s for s in report.slos}
    bulk = slos[("bulk", "within_window")]
    assert (bulk.good, bulk.valid, bulk.attainment, bulk.met) == (99, 100, 0.99, True)
    assert bulk.budget_left == pytest.approx(0.0)
    avail = slos[("interactive", "availability")]
    assert (avail.good, avail.valid) == (990, 1000)  # the cancelled one left out
    assert avail.budget_left == pytest.approx(1 - 10 / 5)  # 10 bad of 5 allowed: -100%
    ttft = slos[("interactive", "ttft")]
    assert (ttft.good, ttft.valid, ttft.met) == (970, 990, False)
    e2e = slos[("interactive", "end_to_end")]
    # timed: all 1001 that ended, the failed and cancelled too; 10 took 40 s
    assert e2e.good == pytest.approx(991) and e2e.valid == 1001 and e2e.met is True
    assert count_within([0] * 14 + [10] + [0] * 5, 30.0) == 10
    assert ("bulk", "end_to_end") not in slos and ("bulk", "availability") not in slos
    [worst] = report.worst
    assert worst.bad == 10 + 10  # failed, and interactive over 30 s


async def _run_some_work(producer, start_worker, redis):
    """Tasks of two tenants (one failing), a bulk job with a window that has passed before
    a worker runs (its tasks expire: missed), then the worker stops and writes its last
    aggregates."""
    batches = BatchClient(producer)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m1", "messages": [{"role": "user", "content": f"hi {i}"}],
                       "max_tokens": 4}} for i in range(20)]
    late = await batches.submit(lines, completion_window="0.2s")
    await asyncio.sleep(0.4)
    worker = await start_worker()
    tasks = [Task(model="m1", prompt=f"a {i}", tenant="acme") for i in range(30)]
    tasks += [Task(model="m1", prompt=f"g {i}", tenant="globex") for i in range(10)]
    tasks.append(Task(model="m1", prompt="x", tenant="acme", metadata={"fake_error": "internal"}))
    tasks.append(Task(model="m2", prompt="other", tenant="acme"))
    results = await producer.wait_many(await producer.submit_many(tasks), timeout_s=10)
    assert sum(r.ok for r in results) == 41
    on_time = await batches.submit(lines, completion_window="1h")
    for job in (late, on_time):
        await batches.wait(job.batch_id, timeout_s=20)
    failed = next(r for r in results if not r.ok)
    worker.request_stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if await redis.exists(keys.kpi_hour_key("m1", int(time.time() // 3600) * 3600)):
            break
        await asyncio.sleep(0.1)
    return failed


@pytest.mark.cluster_too
async def test_report_command_text_html_and_json(producer, start_worker, redis, server,
                                                 tmp_path):
    failed = await _run_some_work(producer, start_worker, redis)
    await asyncio.sleep(1.5)  # the stopped worker's last flush
    models_file = tmp_path / "models.toml"
    models_file.write_text("[models.m1]\n[models.m2]\n")
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_HOME": str(tmp_path),
           "AGENTFLEET_MODELS_FILE": str(models_file), "AGENTFLEET_DEFAULT_MODEL": "m1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentfleet", "report", *args], env=env,
                              capture_output=True, text=True, timeout=30)

    text = await asyncio.to_thread(run, "--since", "1h", "--price-per-gpu-hour", "2.5")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "acme" in out and "globex" in out and "96.77%" in out  # acme on m1: 30 of 31
    assert f"internal 1 (1.23%), e.g. agentfleet trace {failed.correlation_id}" in out
    assert "deadline_exceeded 20" in out
    assert "within the job's window" in out and "missed" in out  # the late job's 20
    page = tmp_path / "report.html"
    data = tmp_path / "report.json"
    made = await asyncio.to_thread(run, "--since", "1h", "--html", str(page), "--json",
                                   str(data), "--price-per-gpu-hour", "2.5")
    assert made.returncode == 0, made.stderr
    body = page.read_text()
    assert body.startswith("<!doctype html>") and body.rstrip().endswith("</html>")
    assert "globex" in body  # (tenant names cannot hold markup: schemas.tenants.check_name)
    assert "<svg" in body and " src=" not in body and "<link" not in body  # nothing fetched
    assert "href=" not in body and "<script" not in body
    report = json.loads(data.read_bytes())
    slos = {(s["model"], s["lane"], s["name"]): s for s in report["slos"]}
    bulk = slos[("m1", "bulk", "within_window")]
    assert (bulk["good"], bulk["valid"], bulk["met"]) == (20, 40, False)
    assert slos[("m1", "interactive", "availability")]["valid"] == 41
    assert report["has_tenants"] and report["has_versions"]
    versions = {r["version"] for r in report["breakdown"] if not r["total"]}
    assert versions == {"fake-1"}
    errors = {e["code"]: e for e in report["top_errors"]}
    assert errors["internal"]["example_correlation_id"] == failed.correlation_id
    assert errors["deadline_exceeded"]["count"] == 20
    kpis = {k["model"]: k for k in report["kpis"]}
    assert kpis["m1"]["engine_hours"] > 0 and kpis["m1"]["cost"] == pytest.approx(
        kpis["m1"]["engine_hours"] * 2.5)
    assert report["series"]["m1"] and report["previous"]
    tenant = await asyncio.to_thread(run, "--since", "1h", "--tenant", "globex", "--json", "-")
    only = json.loads(tenant.stdout)
    assert {r["tenant"] for r in only["breakdown"] if not r["total"]} == {"globex"}
    assert only["top_errors"] == []
    bad = await asyncio.to_thread(run, "--since", "lately")
    assert bad.returncode == 2 and "since" in bad.stderr
    bad = await asyncio.to_thread(run, "--objective", "99")
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr


def test_an_empty_window_says_so():
    report = build_report(Window(since=0, until=60, models=["m1"], rows=[]))
    assert "No finished tasks in this window" in render_html(report)
    assert "No finished tasks in this window" in render_text(report)
