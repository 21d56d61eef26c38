"""Worker metrics and the queue exporter, on real servers with the fake engine."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from bisect import bisect_right

import msgspec
import pytest
import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families

from agentfleet.ops.embedded import free_port
from agentfleet.ops.exporter import exporter_registry, read_queues
from agentfleet.producer.connection import connect_sync
from agentfleet.schemas import keys
from agentfleet.schemas.wire import Task, encode
from agentfleet.workers.fake_engine import FakeEngine
from agentfleet.workers.metrics import LATENCY_BUCKETS_S, NULL_LANE_METRICS, _Histogram

pytestmark = pytest.mark.timeout(60)


def samples(text: bytes | str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label pairs): value} of a /metrics text."""
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lv), v in found.items() if n == name and want <= lv)


async def eventually(check, timeout_s: float = 5.0):
    """The commit's observation lands right after the write: poll briefly for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


async def test_worker_counts_outcomes_latencies_tokens_and_windows(producer, start_worker):
    worker = await start_worker()
    tasks = [Task(model="m1", prompt=f"one two three {i}", priority=0 if i % 3 else 5)
             for i in range(60)]
    tasks.append(Task(model="m1", prompt="bad", metadata={"fake_error": "invalid_task"}))
    tasks.append(Task(model="m1", prompt="flaky", metadata={"fake_error": "engine_error"}))
    tasks.append(Task(model="m2", prompt="other model"))
    results = await producer.wait_many(await producer.submit_many(tasks), timeout_s=10)
    ok = [r for r in results if r.ok]
    assert len(ok) == 61

    def scraped():
        found = samples(worker.metrics.render())
        return found if value(found, "agentfleet_end_to_end_seconds_count") == 63 else None

    found = await eventually(scraped)
    assert found, worker.metrics.render().decode()
    m1 = {"model": "m1", "version": "fake-1"}
    assert value(found, "agentfleet_tasks_total", **m1, status="succeeded", priority="0") == 40
    assert value(found, "agentfleet_tasks_total", **m1, status="succeeded", priority="5") == 20
    assert value(found, "agentfleet_tasks_total", model="m2", status="succeeded") == 1
    assert value(found, "agentfleet_tasks_total", **m1, status="failed",
                 error_code="invalid_task") == 1
    assert value(found, "agentfleet_tasks_total", **m1, status="dead_lettered",
                 error_code="attempts_exhausted") == 1
    assert value(found, "agentfleet_task_retries_total", **m1) == 2  # 3 attempts, 2 retries
    assert value(found, "agentfleet_dead_letters_total", **m1) == 1
    assert value(found, "agentfleet_task_reclaims_total", **m1) == 0
    # every attempt was read: 60 + 1 + 3 attempts of the flaky one
    assert value(found, "agentfleet_queue_wait_seconds_count", **m1) == 64
    assert value(found, "agentfleet_read_window_tasks_sum", **m1) == 64
    assert value(found, "agentfleet_end_to_end_seconds_count", **m1, priority="5") == 20
    assert value(found, "agentfleet_engine_seconds_count", **m1) == 64  # the engine ran all
    assert value(found, "agentfleet_time_to_first_token_seconds_count", **m1) == 60
    m1_ok = [r for r in ok if r.model == "m1"]
    assert value(found, "agentfleet_task_prompt_tokens_sum", **m1) == sum(
        r.prompt_tokens for r in m1_ok)
    assert value(found, "agentfleet_task_output_tokens_sum", **m1) == sum(
        r.output_tokens for r in m1_ok)
    # end to end is at least what the result's own timings say
    slowest = max(r.timings.written - r.timings.enqueued for r in m1_ok)
    assert value(found, "agentfleet_end_to_end_seconds_sum", **m1) >= slowest
    assert value(found, "agentfleet_inflight_tasks", **m1) == 0
    # bounded labels only: never a task id, correlation id or tenant
    label_names = {name for (_, lv) in found for name, _ in lv}
    assert label_names <= {"model", "version", "status", "error_code", "priority", "le",
                           "state"}


async def test_bulk_job_tasks_are_their_own_priority_class(start_worker, redis):
    worker = await start_worker()
    now = time.time()
    for i in range(5):  # as a bulk job's tasks sit in the model's bulk lane
        task = Task(id=f"job-1.{i}", correlation_id=f"job-1.{i}", model="m1", prompt="x",
                    batch_id="job-1", priority=3, enqueued_at=now)
        await redis.xadd(keys.bulk_stream("m1"), {"d": encode(task)})

    def bulk_counted():
        found = samples(worker.metrics.render())
        return found if value(found, "agentfleet_tasks_total", priority="bulk") == 5 else None

    found = await eventually(bulk_counted)
    assert found, worker.metrics.render().decode()
    assert value(found, "agentfleet_end_to_end_seconds_count", model="m1", priority="bulk") == 5
    assert value(found, "agentfleet_tasks_total", priority="3") == 0


async def test_failures_are_logged_once_per_group_with_their_context(producer, start_worker,
                                                                     caplog):
    await start_worker()
    caplog.set_level(logging.WARNING, logger="agentfleet.worker")
    ids = await producer.submit_many([
        Task(model="m1", prompt="x", correlation_id="corr-7",
             metadata={"fake_error": "internal"}) for _ in range(3)])
    await producer.wait_many(ids, timeout_s=5)

    def logged():
        # The producer can read the reply before the worker's own loop sees the commit's
        # answer and logs: wait for every task's line.
        errors = [r for r in caplog.records if r.levelno == logging.ERROR
                  and getattr(r, "error_code", None) == "internal"]
        counted = sum(int(r.getMessage().split(" task(s)")[0].rsplit(" ", 1)[1])
                      for r in errors)
        return errors if counted >= 3 else None

    errors = await eventually(logged)
    assert errors, [r.getMessage() for r in caplog.records]
    assert sum(int(r.getMessage().split(" task(s)")[0].rsplit(" ", 1)[1]) for r in errors) == 3
    assert len(errors) <= 3  # one line per group, not one per task
    first = errors[0]
    assert (first.model, first.worker, first.correlation_id) == ("m1", "w1", "corr-7")
    assert first.task_id in ids and first.window_id.startswith("w1/m1/")


async def test_metrics_off_when_port_and_kpis_are_zero(start_worker, settings):
    off = msgspec.structs.replace(settings, metrics_port=0, kpi_ttl_s=0)
    worker = await start_worker(worker_settings=off)
    assert not worker.metrics.enabled
    assert all(lane.metrics is NULL_LANE_METRICS for lane in worker.runners)
    assert worker.metrics.serve(9464) is None
    assert b"agentfleet_tasks_total{" not in worker.metrics.render()


async def test_metrics_served_over_http_and_a_taken_port_is_not_fatal(producer, start_worker,
                                                                      caplog):
    worker = await start_worker()
    await producer.wait(await producer.submit(model="m1", prompt="hello"), timeout_s=5)
    server = worker.metrics.serve(free_port(), addr="127.0.0.1")
    assert server is not None
    try:
        body = await asyncio.to_thread(_get, server.url)
        assert value(samples(body), "agentfleet_tasks_total", model="m1") == 1
        # A second worker on the same port: an error line, and it goes on without serving.
        other = await start_worker(worker_id="w2")
        with caplog.at_level(logging.ERROR, logger="agentfleet.worker"):
            assert other.metrics.serve(server.port, addr="127.0.0.1") is None
        assert "cannot serve metrics" in caplog.text
    finally:
        worker.metrics.close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_histogram_fold_matches_direct_counting():
    rng = random.Random(4)
    hist = _Histogram(LATENCY_BUCKETS_S)
    values: list[float] = []
    for _ in range(7):  # several folds accumulate
        batch = [rng.expovariate(2.0) for _ in range(rng.randrange(0, 3000))]
        batch += [LATENCY_BUCKETS_S[3]] * 5  # a value on a bound counts as <= that bound
        hist.raw.extend(batch)
        values.extend(batch)
        hist.fold()
    buckets, total = hist.sample()
    direct = sorted(values)
    assert buckets[-1] == ("+Inf", len(values))
    for (le, count), bound in zip(buckets, LATENCY_BUCKETS_S):
        assert float(le) == bound
        assert count == bisect_right(direct, bound)
    assert total == pytest.approx(sum(values))


class _ReportingEngine(FakeEngine):
    """The fake engine plus the stats hook a real engine implements (a test double)."""

    def set_stats_sink(self, sink) -> None:
        self.sink = sink


async def test_engine_stats_hook_reaches_metrics(start_worker):
    engine = _ReportingEngine()
    worker = await start_worker(engines={"m1": engine})
    engine.sink(kv_cache_usage=0.5, running=1, waiting=0, prefix_cache_queries=10,
                prefix_cache_hits=4)
    engine.sink(kv_cache_usage=0.75, prefix_cache_queries=10, prefix_cache_hits=6)
    found = samples(worker.metrics.render())
    lv = {"model": "m1", "version": "fake-1"}
    assert value(found, "agentfleet_engine_kv_cache_usage_ratio", **lv) == 0.75
    assert value(found, "agentfleet_engine_requests", **lv, state="running") == 1
    assert value(found, "agentfleet_engine_prefix_cache_queries_total", **lv) == 20
    assert value(found, "agentfleet_engine_prefix_cache_hits_total", **lv) == 10
    # a lane whose engine reports nothing has no engine series at all
    assert not any(n.startswith("agentfleet_engine_") and ("model", "m2") in lv_
                   for n, lv_ in found)


@pytest.mark.engine  # imports vLLM (about 15 s), though it runs no engine
async def test_vllm_stat_logger_forwards_scheduler_stats(start_worker):
    with warnings.catch_warnings():  # torch's own deprecations at import time are not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        from vllm.v1.metrics.stats import IterationStats, PrefixCacheStats, SchedulerStats

        from agentfleet.workers.vllm_stats import stat_logger_factory

    engine = _ReportingEngine()
    worker = await start_worker(engines={"m1": engine})
    # What vLLM does with a factory given as AsyncLLM(stat_loggers=[...]): one per engine.
    logger = stat_logger_factory(engine.sink)(None, 0)
    iteration = IterationStats()
    iteration.num_preempted_reqs = 1
    for _ in range(2):
        logger.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.25,
                                     prefix_cache_stats=PrefixCacheStats(queries=100, hits=40)),
                      iteration)
    logger.record(None, None)  # steps without scheduler stats change nothing
    found = samples(worker.metrics.render())
    lv = {"model": "m1", "version": "fake-1"}
    assert value(found, "agentfleet_engine_kv_cache_usage_ratio", **lv) == 0.25
    assert value(found, "agentfleet_engine_requests", **lv, state="running") == 3
    assert value(found, "agentfleet_engine_requests", **lv, state="waiting") == 2
    assert value(found, "agentfleet_engine_prefix_cache_queries_total", **lv) == 200
    assert value(found, "agentfleet_engine_prefix_cache_hits_total", **lv) == 80
    assert value(found, "agentfleet_engine_preemptions_total", **lv) == 2


# ---- the exporter ----------------------------------------------------------------------


class _CountingRedis(redis_sync.Redis):
    """Counts commands sent one by one (a pipeline's execute is not one of them)."""

    single_commands = 0

    def execute_command(self, *args, **options):
        _CountingRedis.single_commands += 1
        return super().execute_command(*args, **options)


async def test_exporter_reads_every_queue_gauge_in_one_pipeline(server, redis, settings):
    stream = keys.task_stream("m1")
    for i in range(10):
        await redis.xadd(stream, {"d": b"x%d" % i})
    await redis.xgroup_create(stream, keys.GROUP, id="0")
    await redis.xreadgroup(keys.GROUP, "c1", {stream: ">"}, count=3)
    now = time.time()
    await redis.hset(keys.workers_key("m1"), mapping={"live": now - 1, "gone": now - 60})
    await redis.hset(keys.stats_key("m1"), mapping={"written": 5, "dead_lettered": 2})
    await redis.zadd(keys.delayed_key("m1"), {b"retry": now + 10})
    await redis.xadd(keys.dead_stream("m1"), {"d": b"dead"})
    for i in range(2):
        await redis.xadd(keys.bulk_stream("m1"), {"d": b"bulk%d" % i})
    client = _CountingRedis.from_url(server.url, protocol=2)
    try:
        _CountingRedis.single_commands = 0
        text = await asyncio.to_thread(lambda: _render(client, ["m1", "m2"]))
        assert _CountingRedis.single_commands == 0
    finally:
        client.close()
    found = samples(text)
    assert value(found, "agentfleet_exporter_redis_up") == 1
    m1 = {"model": "m1", "lane": "interactive"}
    assert value(found, "agentfleet_queue_stream_entries", **m1) == 10
    assert value(found, "agentfleet_queue_lag_tasks", **m1) == 7
    assert value(found, "agentfleet_queue_pending_tasks", **m1) == 3
    age = value(found, "agentfleet_queue_oldest_pending_age_seconds", **m1)
    assert 0 <= age < 5
    bulk = {"model": "m1", "lane": "bulk"}
    assert value(found, "agentfleet_queue_stream_entries", **bulk) == 2
    assert value(found, "agentfleet_queue_lag_tasks", **bulk) == 2  # no group yet: all undelivered
    assert value(found, "agentfleet_live_workers", model="m1") == 1
    assert value(found, "agentfleet_queue_delayed_tasks", model="m1") == 1
    assert value(found, "agentfleet_queue_dead_letter_entries", model="m1") == 1
    assert value(found, "agentfleet_fleet_results_written_total", model="m1") == 5
    assert value(found, "agentfleet_fleet_dead_letters_total", model="m1") == 2
    # a model nobody has used yet: zeros, not an error
    assert value(found, "agentfleet_queue_stream_entries", model="m2") == 0
    assert value(found, "agentfleet_queue_lag_tasks", model="m2") == 0


def _render(client, models) -> str:
    from prometheus_client import generate_latest

    return generate_latest(exporter_registry(client, models)).decode()


async def test_exporter_age_of_the_oldest_pending_task(server, redis):
    stream = keys.task_stream("m1")
    old_ms = int((time.time() - 120) * 1000)
    await redis.xadd(stream, {"d": b"old"}, id=f"{old_ms}-0")
    await redis.xadd(stream, {"d": b"new"})
    await redis.xgroup_create(stream, keys.GROUP, id="0")
    await redis.xreadgroup(keys.GROUP, "c1", {stream: ">"}, count=2)
    client = connect_sync(server.url)
    try:
        (q,) = await asyncio.to_thread(read_queues, client, ["m1"])
    finally:
        client.close()
    assert q.interactive.pending == 2 and q.interactive.lag == 0
    assert 119 < q.interactive.oldest_pending_age_s < 130
    assert q.bulk.pending == 0 and q.bulk.oldest_pending_age_s == 0 and not q.bulk.exists


def test_exporter_reports_redis_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    client = redis_sync.Redis(port=port, socket_connect_timeout=1)
    found = samples(_render(client, ["m1"]))
    assert value(found, "agentfleet_exporter_redis_up") == 0
    assert not any(n.startswith("agentfleet_queue_") for n, _ in found)


async def test_exporter_command_once(server, redis, producer, tmp_path):
    await producer.submit_many([Task(model="m1", prompt=f"p{i}") for i in range(4)])
    models = tmp_path / "models.toml"
    models.write_text("[models.m1]\n")
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_HOME": str(tmp_path),
           "AGENTFLEET_MODELS_FILE": str(models), "AGENTFLEET_DEFAULT_MODEL": "m1"}
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "agentfleet", "exporter", "--once", "--models", "m1"],
        env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    found = samples(out.stdout)
    assert value(found, "agentfleet_exporter_redis_up") == 1
    assert value(found, "agentfleet_queue_stream_entries", model="m1", lane="interactive") == 4
    assert value(found, "agentfleet_queue_lag_tasks", model="m1", lane="interactive") == 4
    assert value(found, "agentfleet_live_workers", model="m1") == 0


@pytest.mark.engine
@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning")
async def test_real_vllm_engine_reports_kv_cache_and_prefix_hits_to_our_logger():
    """What VllmEngine does once it passes the sink on: AsyncLLM(stat_loggers=[...])."""
    import gc

    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from agentfleet.schemas.settings import DEFAULT_MODEL, ModelSpec, Settings
    from agentfleet.workers.models import prepare_default_model
    from agentfleet.workers.vllm_engine import VllmEngine
    from agentfleet.workers.vllm_stats import stat_logger_factory

    calls: list[dict] = []
    spec = ModelSpec(name=DEFAULT_MODEL, max_model_len=512, max_num_seqs=4,
                     kv_cache_space_gib=1, enforce_eager=True)
    engine = VllmEngine(spec, prepare_default_model(Settings.from_env().home_path))
    llm = await asyncio.to_thread(AsyncLLM.from_engine_args, engine._engine_args(),
                                  stat_loggers=[stat_logger_factory(lambda **f: calls.append(f))])
    try:
        prompt = "You are a careful assistant. " * 30 + "Name a colour."
        params = SamplingParams(max_tokens=4, temperature=0.0)
        for i in range(2):  # the second run of the same prompt finds it in the prefix cache
            async for _ in llm.generate(prompt, params, request_id=f"stats-{i}"):
                pass
        await asyncio.sleep(0.5)  # stats of the last step arrive after its output
    finally:
        llm.shutdown()
        gc.collect()
    assert calls, "vLLM never called the stat logger"
    assert all(0.0 <= c["kv_cache_usage"] <= 1.0 for c in calls)
    assert any(c["kv_cache_usage"] > 0 for c in calls)
    assert any(c["running"] for c in calls)
    assert sum(c["prefix_cache_queries"] for c in calls) > 0
    assert sum(c["prefix_cache_hits"] for c in calls) > 0
