"""What KEDA would read: the ScaledObjects' queries, run by a real Prometheus scraping a real
exporter over a real queue, give each lane's queued tasks and the backlog tokens."""

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
import yaml

from agentfleet.ops import manifests
from agentfleet.ops.capacity import DEFAULT_TASK_TOKENS
from agentfleet.ops.embedded import free_port
from agentfleet.schemas.wire import Task

K8S = Path(__file__).resolve().parent.parent / "ops" / "k8s"
pytestmark = pytest.mark.timeout(120)


def test_rendered_scaled_objects_use_the_tested_queries():
    for path in K8S.glob("worker-*.yaml"):
        docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}
        args = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
        queries = manifests.lane_queries(args[args.index("--models") + 1])
        for trigger in docs["ScaledObject"]["spec"]["triggers"]:
            assert trigger["metadata"]["query"] == queries[trigger["name"]]


def _query(base: str, expr: str) -> float | None:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        result = json.loads(resp.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.parametrize("server", ["valkey"], indirect=True)
async def test_keda_queries_read_the_exporters_gauges_through_prometheus(server, redis,
                                                                         producer, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is not installed: `make prometheus` installs Debian's package")
    await producer.submit_many([Task(model="m1", prompt=f"i{i}") for i in range(5)])
    await producer.submit_many([Task(model="m1", prompt=f"b{i}", batch_id="job")
                                for i in range(7)])
    exporter_port, prom_port = free_port(), free_port()
    models_file = tmp_path / "models.toml"
    models_file.write_text("[models.m1]\nmax_model_len = 512\n[models.m2]\nmax_model_len = 256\n")
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_HOME": str(tmp_path),
           "AGENTFLEET_MODELS_FILE": str(models_file), "AGENTFLEET_DEFAULT_MODEL": "m1"}
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: agentfleet-exporter\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_port}']\n")
    procs = [
        subprocess.Popen([sys.executable, "-m", "agentfleet", "exporter", "--port",
                          str(exporter_port), "--addr", "127.0.0.1"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    base = f"http://127.0.0.1:{prom_port}"
    try:
        want = {"interactive-queued": 5.0, "bulk-queued": 7.0,
                # no task has finished: every queued task costs the default
                "backlog-tokens": 12 * DEFAULT_TASK_TOKENS}
        queries = manifests.lane_queries("m1")
        deadline = time.monotonic() + 40
        got: dict[str, float | None] = {}
        while time.monotonic() < deadline:
            try:
                got = {name: await asyncio.to_thread(_query, base, q)
                       for name, q in queries.items()}
            except (urllib.error.URLError, ConnectionError, OSError):
                got = {}
            if got == want:
                break
            await asyncio.sleep(0.5)
        assert got == want
        # A model with nothing queued, and one the exporter does not know: 0, not "no data"
        # (KEDA treats an empty result as an error and falls back).
        for model in ("m2", "never-configured"):
            for name, q in manifests.lane_queries(model).items():
                assert await asyncio.to_thread(_query, base, q) == 0.0, (model, name)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
