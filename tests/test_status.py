"""Per-minute aggregates in Redis and `agentfleet status` (the report: tests/test_report.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from agentfleet.ops.report import Row, bucket_quantile, load_window, parse_duration
from agentfleet.ops.status import snapshot
from agentfleet.producer.connection import connect_sync
from agentfleet.schemas import keys
from agentfleet.schemas.wire import Task
from agentfleet.workers.kpi import KpiBuffer, parse_field
from agentfleet.workers.metrics import LATENCY_BUCKETS_S

pytestmark = pytest.mark.timeout(90)


def test_kpi_buffer_folds_groups_and_tasks_by_minute_lane_and_tenant():
    buf = KpiBuffer(60, LATENCY_BUCKETS_S)
    buf.groups.append(("m1", 600, "interactive", ["acme", "acme", "glob:ex"],
                       [0.004, 0.2, 45.0], [3, 4, 5], [7, 8, 9]))
    buf.tasks.append(("m1", 600, "interactive", "acme", "failed", "engine_error", 0.02, 0, 0))
    buf.tasks.append(("m1", 660, "bulk", "acme", "succeeded", "", 700.0, 1, 2))
    # A group of one tenant (summed whole) adds up as the same tasks one by one do.
    buf.groups.append(("m1", 600, "interactive", ["solo"] * 3, [0.004, 0.004, 45.0],
                       [1, 2, 3], [4, 5, 6]))
    buf.groups.append(("m1", 600, "interactive", ["solo"], [0.2], [1], [1]))
    out = buf.fold()
    assert buf.groups == [] and buf.tasks == []
    minute = out[("m1", 600)]
    assert minute["s:succeeded:interactive:acme"] == 2
    assert minute["s:failed:interactive:acme"] == 1
    assert minute["e:engine_error:interactive:acme"] == 1
    assert minute["s:succeeded:interactive:glob:ex"] == 1  # a colon in a tenant survives
    i_4ms, i_200ms = LATENCY_BUCKETS_S.index(0.005), LATENCY_BUCKETS_S.index(0.25)
    assert minute[f"b:{i_4ms}:interactive:acme"] == 1
    assert minute[f"b:{i_200ms}:interactive:acme"] == 1
    assert minute["l:interactive:acme"] == pytest.approx(0.224)
    assert minute["p:interactive:acme"] == 7 and minute["o:interactive:acme"] == 15
    assert out[("m1", 660)][f"b:{len(LATENCY_BUCKETS_S)}:bulk:acme"] == 1  # above 600 s
    assert minute["s:succeeded:interactive:solo"] == 4
    assert minute[f"b:{i_4ms}:interactive:solo"] == 2
    assert minute[f"b:{i_200ms}:interactive:solo"] == 1
    assert minute["l:interactive:solo"] == pytest.approx(45.208)
    assert minute["p:interactive:solo"] == 7 and minute["o:interactive:solo"] == 16
    assert parse_field("s:succeeded:interactive:glob:ex") == ("s", "succeeded", "interactive",
                                                              "glob:ex")
    assert parse_field("l:bulk:t") == ("l", "", "bulk", "t")
    assert parse_field("zz:1") is None


def test_bucket_quantile_interpolates_like_histogram_quantile():
    buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
    i = LATENCY_BUCKETS_S.index(0.1)  # (0.05, 0.1]
    buckets[i] = 100
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.075)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.0995)
    buckets[-1] = 100  # above the last bound: the last bound, as Prometheus answers
    assert bucket_quantile(0.99, buckets) == LATENCY_BUCKETS_S[-1]
    assert bucket_quantile(0.5, [0] * len(buckets)) is None
    row = Row(model="m", lane="interactive", tenant="t", statuses={"succeeded": 9,
                                                                   "cancelled": 2, "failed": 1})
    assert row.success_rate == 0.9


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400),
                                               ("7d", 604800), ("2w", 1209600), ("30", 30)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("yesterday")


async def _run_some_work(producer, start_worker):
    """Tasks of two tenants (one failing), a bulk job's task; the worker is stopped after,
    which writes its last aggregates."""
    worker = await start_worker()
    tasks = [Task(model="m1", prompt=f"a {i}", tenant="acme") for i in range(30)]
    tasks += [Task(model="m1", prompt=f"g {i}", tenant="globex") for i in range(10)]
    tasks.append(Task(model="m1", prompt="x", tenant="acme", metadata={"fake_error": "internal"}))
    tasks.append(Task(model="m2", prompt="other", tenant="acme"))
    results = await producer.wait_many(await producer.submit_many(tasks), timeout_s=10)
    assert sum(r.ok for r in results) == 41
    return worker


async def _aggregated(server, ended: int = 42):
    """The window of the last 10 minutes once the workers' flush (once a second) shows
    `ended` tasks, or what it shows after 10 s."""
    deadline = time.monotonic() + 10
    client = connect_sync(server.url)
    try:
        while True:
            window = await asyncio.to_thread(load_window, client, ["m1", "m2"], 600)
            if sum(r.ended for r in window.rows) >= ended or time.monotonic() > deadline:
                return window
            await asyncio.sleep(0.1)
    finally:
        client.close()


@pytest.mark.cluster_too
async def test_workers_keep_per_minute_aggregates_in_redis(producer, start_worker, redis,
                                                           server):
    worker = await _run_some_work(producer, start_worker)
    window = await _aggregated(server)
    rows = {(r.model, r.lane, r.tenant): r for r in window.rows}
    acme = rows[("m1", "interactive", "acme")]
    assert acme.statuses == {"succeeded": 30, "failed": 1}
    assert acme.error_codes == {"internal": 1}
    assert acme.timed == 31 and 0 < acme.quantile(0.5) < 5 and acme.within_slo == 1.0
    assert acme.prompt_tokens == sum(len(f"a {i}".split()) for i in range(30))
    assert rows[("m1", "interactive", "globex")].statuses == {"succeeded": 10}
    assert rows[("m2", "interactive", "acme")].statuses == {"succeeded": 1}
    kpi_keys = [k async for k in redis.scan_iter(match=keys.kpi_key("m1", 0).replace(":0", ":*"))]
    assert kpi_keys
    for key in kpi_keys:
        assert 0 < await redis.ttl(key) <= 8 * 86400
    assert worker.metrics.kpi is not None


@pytest.mark.cluster_too
async def test_status_snapshot_and_json_command(producer, start_worker, server, tmp_path):
    await _run_some_work(producer, start_worker)
    await producer.submit_many([Task(model="m2", prompt=f"queued {i}") for i in range(3)])
    await _aggregated(server)
    client = connect_sync(server.url)
    try:
        statuses = {s.model: s for s in await asyncio.to_thread(snapshot, client, ["m1", "m2"])}
    finally:
        client.close()
    m1 = statuses["m1"]
    assert m1.live_workers == 1 and m1.lag == 0 and m1.pending == 0
    assert m1.tasks_per_s > 0 and m1.errors == 1 and m1.p50_s is not None
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_HOME": str(tmp_path)}
    models_file = tmp_path / "models.toml"
    models_file.write_text("[models.m1]\n[models.m2]\n")
    env.update(AGENTFLEET_MODELS_FILE=str(models_file), AGENTFLEET_DEFAULT_MODEL="m1")
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agentfleet", "status",
                                                   "--json"], env=env, capture_output=True,
                                  text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    snap = {m["model"]: m for m in json.loads(out.stdout)["models"]}
    assert snap["m1"]["errors"] == 1 and snap["m1"]["tasks_per_s"] > 0
    assert snap["m2"]["depth"] >= 0 and "p99_s" in snap["m2"]


async def test_status_live_view_refreshes_until_interrupted(server, redis, tmp_path):
    await redis.hset(keys.workers_key("smollm2-135m"), "w-live", time.time())
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_HOME": str(tmp_path),
           "COLUMNS": "200"}
    # faulthandler on SIGUSR1: if the view ever ignores Ctrl-C, the failure shows its stack.
    code = ("import faulthandler, runpy, signal; faulthandler.register(signal.SIGUSR1); "
            "runpy.run_module('agentfleet', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code, "status", "--interval-s", "0.2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await asyncio.sleep(3)
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(1)
            proc.kill()
            _, stack = proc.communicate()
            pytest.fail(f"status ignored Ctrl-C for 20 s; its stack:\n{stack[-4000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()  # closes the pipes
    assert proc.returncode == 0, stderr
    assert "smollm2-135m" in stdout and "tasks/s" in stdout
