"""ops/: alert rules through promtool, and a real Prometheus scraping a worker and the exporter.

Prometheus and promtool are Debian's `prometheus` package (`make prometheus` installs it);
without them these tests fail, naming the fix, rather than skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from agentfleet.ops.embedded import free_port
from agentfleet.schemas.wire import Task

pytestmark = pytest.mark.timeout(120)

OPS = Path(__file__).resolve().parent.parent / "ops"
RULES = OPS / "prometheus" / "alerts.yml"
DASHBOARD = OPS / "grafana" / "agentfleet.json"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make prometheus` installs Debian's prometheus "
                    f"package (apt-get install -y prometheus)")
    return path


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    promtool = _binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    unit = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=RULES.parent,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_dashboard_is_grafana_json_with_a_query_per_panel():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "agentfleet"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("tasks finished", "end to end", "lag", "pending", "failed", "dead letters",
                  "window size", "kv-cache"):
        assert topic in titles, topic
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _query(base: str, expr: str) -> dict:
    return _get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")


async def _until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = await asyncio.to_thread(check)
        except (urllib.error.URLError, ConnectionError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


@pytest.fixture
def fleet_processes(server, tmp_path):
    """Start processes in the background; stopped (SIGTERM, then kill) after the test."""
    procs: list[subprocess.Popen] = []
    models_file = tmp_path / "models.toml"
    models_file.write_text("[models.m1]\nmax_model_len = 512\n[models.m2]\nmax_model_len = 256\n")
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_ENGINE": "fake",
           "AGENTFLEET_HOME": str(tmp_path), "AGENTFLEET_MODELS_FILE": str(models_file),
           "AGENTFLEET_DEFAULT_MODEL": "m1", "AGENTFLEET_BLOCK_MS": "20"}

    def start(*argv: str, **extra_env: str) -> subprocess.Popen:
        log = open(tmp_path / f"proc-{len(procs)}.log", "wb")
        proc = subprocess.Popen(list(argv), env={**env, **extra_env}, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for i, proc in enumerate(procs):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -signal.SIGTERM):  # shown with a failing test
            print((tmp_path / f"proc-{i}.log").read_text(errors="replace")[-3000:])


@pytest.mark.cluster_too
async def test_prometheus_scrapes_a_worker_and_the_exporter(fleet_processes, producer,
                                                           tmp_path):
    prometheus = _binary("prometheus")
    worker_port, exporter_port, prom_port = free_port(), free_port(), free_port()
    fleet_processes(sys.executable, "-m", "agentfleet", "worker", AGENTFLEET_WORKER_ID="prom-w",
                    AGENTFLEET_METRICS_PORT=str(worker_port))
    fleet_processes(sys.executable, "-m", "agentfleet", "exporter", "--port", str(exporter_port),
                    "--addr", "127.0.0.1")
    shutil.copy(RULES, tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - alerts.yml\n"
        "scrape_configs:\n"
        f"  - job_name: agentfleet-worker\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{worker_port}']\n"
        f"  - job_name: agentfleet-exporter\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_port}']\n")
    fleet_processes(prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn")
    base = f"http://127.0.0.1:{prom_port}"
    await _until(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200,
                 30, "Prometheus to be ready")

    ids = await producer.submit_many([Task(model="m1", prompt=f"task {i}", priority=i % 2)
                                      for i in range(40)])
    ids += await producer.submit_many([Task(model="m2", prompt="boom",
                                            metadata={"fake_error": "invalid_task"})])
    await producer.wait_many(ids, timeout_s=30)

    def tasks_seen():
        res = _query(base, 'sum by (model, status) (agentfleet_tasks_total{job='
                           '"agentfleet-worker"})')["data"]["result"]
        got = {(r["metric"]["model"], r["metric"]["status"]): float(r["value"][1]) for r in res}
        return got if got.get(("m1", "succeeded")) == 40 and got.get(("m2", "failed")) else None

    got = await _until(tasks_seen, 30, "the worker's task counters in Prometheus")
    assert got == {("m1", "succeeded"): 40, ("m2", "failed"): 1}

    def queue_seen():
        res = _query(base, "agentfleet_live_workers")["data"]["result"]
        live = {r["metric"]["model"]: float(r["value"][1]) for r in res}
        return live if live.get("m1") == 1 and live.get("m2") == 1 else None

    await _until(queue_seen, 30, "the exporter's live-worker gauge")
    lag = _query(base, 'agentfleet_queue_lag_tasks{model="m1"}')["data"]["result"]
    assert lag and float(lag[0]["value"][1]) == 0
    assert lag[0]["metric"]["job"] == "agentfleet-exporter"
    p99 = _query(base, 'histogram_quantile(0.99, sum by (le) (agentfleet_end_to_end_seconds_bucket'
                       '{model="m1"}))')["data"]["result"]
    assert p99 and 0 < float(p99[0]["value"][1]) < 30

    # Both targets up, and every rule loaded and evaluated without error.
    targets = _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets} == {
        "agentfleet-worker": "up", "agentfleet-exporter": "up"}

    def rules_evaluated():
        groups = _get_json(f"{base}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None

    rules = await _until(rules_evaluated, 30, "the alert rules to be evaluated")
    assert {r["name"] for r in rules if r["type"] == "alerting"} >= {
        "AgentfleetNoLiveWorker", "AgentfleetLagGrowing", "AgentfleetErrorRatioHigh",
        "AgentfleetLatencySLOBurnFast", "AgentfleetDeadLettersGrowing"}
    assert not [r for r in rules if r["type"] == "alerting" and r["state"] != "inactive"]

    # Every dashboard query is valid PromQL for this Prometheus.
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$model", ".*").replace("$__rate_interval", "1m")
            assert _query(base, expr)["status"] == "success", (panel["title"], expr)
