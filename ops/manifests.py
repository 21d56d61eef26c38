"""Kubernetes manifests of a fleet, rendered from one TOML file (ops/k8s/fleet.toml).

    python -m agentfleet.ops.manifests [--fleet ops/k8s/fleet.toml] [--out ops/k8s]
    kubectl apply -k ops/k8s

Plain manifests plus a kustomization, rendered by this module, rather than a Helm chart:
every file the cluster gets is in the repository as it will be applied, so the test suite
validates exactly that, offline, against the Kubernetes schemas (kubernetes-validate) and the
CRDs' schemas (KEDA, prometheus-operator; vendored under ops/k8s/schemas), without a helm
binary or a cluster; and the parts generated from other files (the PrometheusRule from
ops/prometheus/alerts.yml, the dashboard ConfigMap from ops/grafana/agentfleet.json, the
models file from the fleet's engines) cannot drift, since a test renders them again and
compares.  Kustomize overlays (images, namespaces, patches) work on top, as with any YAML.

Per model: a Deployment of workers (GPU requests, probes on /readyz and /healthz, a grace
period longer than the drain), a PodDisruptionBudget and a KEDA ScaledObject scaling on each
lane's queued tasks and on backlog tokens, to zero for a bulk-only model.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import yaml

from agentfleet.schemas.errors import FatalConfigError
from agentfleet.schemas.keys import valid_model_name
from agentfleet.schemas.settings import ModelSpec

OPS = Path(__file__).resolve().parent
K8S = OPS / "k8s"
ALERTS = OPS / "prometheus" / "alerts.yml"
DASHBOARD = OPS / "grafana" / "agentfleet.json"
PART_OF = "agentfleet"
HOME = "/home/agentfleet"
UID = 10001  # the images' user (docker/Dockerfile.*)
METRICS_PORT = 9464
EXPORTER_PORT = 9465
GATEWAY_PORT = 8080
MODELS_FILE = "/etc/agentfleet/models.toml"
# KEDA and the HPA (the simulation in ops/autoscale.py replays these numbers).
POLLING_INTERVAL_S = 15
COOLDOWN_S = 300  # a bulk-only model's last worker goes this long after the queue emptied
SCALE_UP = {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
            "policies": [{"type": "Pods", "value": 4, "periodSeconds": 60},
                         {"type": "Percent", "value": 100, "periodSeconds": 60}]}
# Slow down: a worker that goes drains first, and a burst often comes back.
SCALE_DOWN = {"stabilizationWindowSeconds": 600, "selectPolicy": "Max",
              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]}


class ModelFleet(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How one model is served: its workers, their autoscaling, its engine (the models file)."""

    gpus: int = 1
    min_replicas: int = 1
    max_replicas: int = 4
    bulk_only: bool = False  # only bulk jobs: scaled to zero while nothing is queued
    interactive_tasks_per_worker: int = 256
    bulk_tasks_per_worker: int = 4096
    backlog_tokens_per_worker: int = 8_000_000
    cpu: str = "8"
    memory: str = "48Gi"
    engine: dict[str, Any] = {}  # a [models.NAME] table of the models file (ModelSpec)


class Fleet(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    namespace: str = "agentfleet"
    image: str
    worker_image: str
    default_model: str
    drain_timeout_s: int = 30
    drain_margin_s: int = 30
    gateway_replicas: int = 2
    prometheus_url: str
    monitoring_labels: dict[str, str] = {}
    dashboard_labels: dict[str, str] = msgspec.field(
        default_factory=lambda: {"grafana_dashboard": "1"})
    models_volume_size: str = "200Gi"
    models_storage_class: str = ""
    models: dict[str, ModelFleet] = {}

    @property
    def grace_period_s(self) -> int:
        return self.drain_timeout_s + self.drain_margin_s


def load_fleet(path: Path) -> Fleet:
    try:
        fleet = msgspec.convert(tomllib.loads(path.read_text()), Fleet)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise FatalConfigError(f"fleet file {path}: {exc}") from exc
    if not fleet.models:
        raise FatalConfigError(f"fleet file {path}: no [models.NAME] table")
    if fleet.default_model not in fleet.models:
        raise FatalConfigError(f"fleet file {path}: default_model {fleet.default_model!r} is "
                               f"not among the models {sorted(fleet.models)}")
    names: dict[str, str] = {}
    for name, m in fleet.models.items():
        if not valid_model_name(name):
            raise FatalConfigError(f"fleet file {path}: bad model name {name!r}")
        try:
            msgspec.convert({**m.engine, "name": name}, ModelSpec)
        except msgspec.ValidationError as exc:
            raise FatalConfigError(f"fleet file {path}: models.{name}.engine: {exc}") from exc
        if not 0 <= m.min_replicas <= m.max_replicas or m.max_replicas < 1:
            raise FatalConfigError(f"fleet file {path}: models.{name}: need 0 <= min_replicas "
                                   f"<= max_replicas, max_replicas >= 1")
        if m.min_replicas == 0 and not m.bulk_only:
            raise FatalConfigError(f"fleet file {path}: models.{name}: min_replicas 0 is for "
                                   f"bulk_only models (an interactive task would wait for a "
                                   f"cold start)")
        other = names.setdefault(k8s_name(name), name)
        if other != name:
            raise FatalConfigError(f"fleet file {path}: models {other!r} and {name!r} get the "
                                   f"same Kubernetes name {k8s_name(name)!r}")
    if fleet.drain_margin_s < 10:
        raise FatalConfigError(f"fleet file {path}: drain_margin_s {fleet.drain_margin_s} < 10: "
                               f"the engine's stop and the last commit need time after the drain")
    return fleet


def k8s_name(model: str) -> str:
    """A model's name as it appears in resource names (DNS-1123: lowercase, digits, '-')."""
    return re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")[:40].rstrip("-")


def _labels(component: str, **more: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "agentfleet", "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/component": component, **more}


def _meta(name: str, fleet: Fleet, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": fleet.namespace, "labels": labels, **extra}


_SECURITY = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
             "seccompProfile": {"type": "RuntimeDefault"}}
_CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# Every pod reads AGENTFLEET_MODELS_FILE (the settings refuse to start without it).
_CONFIG_MOUNT = {"name": "config", "mountPath": str(Path(MODELS_FILE).parent), "readOnly": True}
_CONFIG_VOLUME = {"name": "config", "configMap": {"name": "agentfleet-models"}}
_ENV_FROM = [{"configMapRef": {"name": "agentfleet-settings"}},
             {"secretRef": {"name": "agentfleet-secrets"}}]


def _probe(path: str, port: int | str, period_s: int, failures: int, timeout_s: int = 6
           ) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period_s,
            "timeoutSeconds": timeout_s, "failureThreshold": failures}


def worker_resources(fleet: Fleet, model: str) -> list[dict[str, Any]]:
    """A model's Deployment, PodDisruptionBudget and ScaledObject."""
    m = fleet.models[model]
    name = f"agentfleet-worker-{k8s_name(model)}"
    labels = _labels("worker", **{"agentfleet.dev/model": k8s_name(model)})
    selector = {"app.kubernetes.io/component": "worker",
                "agentfleet.dev/model": k8s_name(model)}
    container = {
        "name": "worker",
        "image": fleet.worker_image,
        "args": ["worker", "--models", model, "--drain-timeout-s", str(fleet.drain_timeout_s)],
        "envFrom": _ENV_FROM,
        # The pod's name: unique, so a replacement never takes over a dead pod's consumer.
        "env": [{"name": "AGENTFLEET_WORKER_ID",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        # Engines load (and compile) for minutes: liveness waits until /healthz first answers.
        "startupProbe": _probe("/healthz", "metrics", 10, 90),
        "livenessProbe": _probe("/healthz", "metrics", 10, 3),
        # /readyz is 503 while the engine loads and while draining.
        "readinessProbe": _probe("/readyz", "metrics", 5, 2),
        "resources": {
            "requests": {"cpu": m.cpu, "memory": m.memory, "nvidia.com/gpu": str(m.gpus)},
            "limits": {"memory": m.memory, "nvidia.com/gpu": str(m.gpus)},
        },
        "securityContext": _CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "vllm-cache", "mountPath": f"{HOME}/.cache/vllm"},
            {"name": "agentfleet-home", "mountPath": f"{HOME}/.cache/agentfleet"},
            _CONFIG_MOUNT,
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(name, fleet, labels),
        "spec": {
            # No `replicas`: KEDA's HPA owns the count; applying again must not reset it.
            "selector": {"matchLabels": selector},
            # A new worker first, then an old one drains: no capacity dip (needs one spare GPU;
            # docs/operations.md for the other way round).
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 5,
            "template": {
                "metadata": {"labels": labels, "annotations": {
                    "kubectl.kubernetes.io/default-container": "worker"}},
                "spec": {
                    # SIGTERM drains for --drain-timeout-s; then the engine stops, the last
                    # commit lands, the heartbeat is removed.  SIGKILL only after all that.
                    "terminationGracePeriodSeconds": fleet.grace_period_s,
                    "securityContext": _SECURITY,
                    "containers": [container],
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                     "effect": "NoSchedule"}],
                    "volumes": [
                        {"name": "models",
                         "persistentVolumeClaim": {"claimName": "agentfleet-models",
                                                   "readOnly": True}},
                        # Survives container restarts in the pod: a restarted engine skips
                        # compiling.  Point it at a volume to keep it across pods.
                        {"name": "vllm-cache", "emptyDir": {"sizeLimit": "20Gi"}},
                        {"name": "agentfleet-home", "emptyDir": {"sizeLimit": "1Gi"}},
                        _CONFIG_VOLUME,
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                    ],
                },
            },
        },
    }
    pdb = {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _meta(name, fleet, labels),
        # Node drains take workers one at a time: each drains its tasks before the next goes.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }
    return [deployment, pdb, scaled_object(fleet, model, name, labels)]


def lane_queries(model: str) -> dict[str, str]:
    """PromQL of what KEDA scales a model on: the exporter's gauges (ops/exporter.py)."""
    sel = f'model="{model}"'
    return {
        "interactive-queued": (f'sum(agentfleet_queue_lag_tasks{{{sel},lane="interactive"}} + '
                               f'agentfleet_queue_pending_tasks{{{sel},lane="interactive"}}) '
                               f'or vector(0)'),
        "bulk-queued": (f'sum(agentfleet_queue_lag_tasks{{{sel},lane="bulk"}} + '
                        f'agentfleet_queue_pending_tasks{{{sel},lane="bulk"}}) or vector(0)'),
        "backlog-tokens": f'sum(agentfleet_queue_backlog_tokens{{{sel}}}) or vector(0)',
    }


def scaled_object(fleet: Fleet, model: str, target: str, labels: dict[str, str]
                  ) -> dict[str, Any]:
    m = fleet.models[model]
    queries = lane_queries(model)
    thresholds = {"interactive-queued": m.interactive_tasks_per_worker,
                  "bulk-queued": m.bulk_tasks_per_worker,
                  "backlog-tokens": m.backlog_tokens_per_worker}
    names = ["bulk-queued", "backlog-tokens"] if m.bulk_only else list(queries)
    triggers = [{
        "type": "prometheus", "name": trigger, "metricType": "AverageValue",
        "metadata": {"serverAddress": fleet.prometheus_url, "query": queries[trigger],
                     "threshold": str(thresholds[trigger]),
                     # Any queued task is work: wake a scaled-to-zero model.
                     "activationThreshold": "0"},
    } for trigger in names]
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": _meta(target, fleet, labels),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "pollingInterval": POLLING_INTERVAL_S,
            "cooldownPeriod": COOLDOWN_S,
            "minReplicaCount": m.min_replicas,
            "maxReplicaCount": m.max_replicas,
            # Prometheus unreachable for 3 polls: hold at least one worker (or the minimum).
            "fallback": {"failureThreshold": 3, "replicas": max(1, m.min_replicas)},
            "advanced": {"horizontalPodAutoscalerConfig": {
                "behavior": {"scaleUp": SCALE_UP, "scaleDown": SCALE_DOWN}}},
            "triggers": triggers,
        },
    }


def _service(fleet: Fleet, name: str, component: str, port: int, port_name: str,
             headless: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"app.kubernetes.io/component": component,
                                         "app.kubernetes.io/part-of": PART_OF},
                            "ports": [{"name": port_name, "port": port,
                                       "targetPort": port_name}]}
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(name, fleet, _labels(component)), "spec": spec}


def gateway_resources(fleet: Fleet) -> list[dict[str, Any]]:
    labels = _labels("gateway")
    selector = {"app.kubernetes.io/component": "gateway", "app.kubernetes.io/part-of": PART_OF}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta("agentfleet-gateway", fleet, labels),
        "spec": {
            "replicas": fleet.gateway_replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": {
                "terminationGracePeriodSeconds": 30,
                "securityContext": _SECURITY,
                "containers": [{
                    "name": "gateway", "image": fleet.image, "args": ["gateway"],
                    "envFrom": _ENV_FROM,
                    "env": [{"name": "AGENTFLEET_GATEWAY_HOST", "value": "0.0.0.0"},
                            {"name": "AGENTFLEET_GATEWAY_PORT", "value": str(GATEWAY_PORT)}],
                    "ports": [{"name": "http", "containerPort": GATEWAY_PORT}],
                    "readinessProbe": _probe("/readyz", "http", 5, 2),
                    "livenessProbe": _probe("/healthz", "http", 10, 3),
                    "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                  "limits": {"memory": "1Gi"}},
                    "securityContext": _CONTAINER_SECURITY,
                    "volumeMounts": [_CONFIG_MOUNT],
                }],
                "volumes": [_CONFIG_VOLUME],
            }},
        },
    }
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
           "metadata": _meta("agentfleet-gateway", fleet, labels),
           "spec": {"minAvailable": 1, "selector": {"matchLabels": selector}}}
    return [deployment, pdb, _service(fleet, "agentfleet-gateway", "gateway", GATEWAY_PORT,
                                      "http")]


def exporter_resources(fleet: Fleet) -> list[dict[str, Any]]:
    labels = _labels("exporter")
    selector = {"app.kubernetes.io/component": "exporter", "app.kubernetes.io/part-of": PART_OF}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta("agentfleet-exporter", fleet, labels),
        "spec": {
            # One per fleet: the queue is one fact per model (ops/exporter.py).
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": {
                "securityContext": _SECURITY,
                "containers": [{
                    "name": "exporter", "image": fleet.image,
                    "args": ["exporter", "--port", str(EXPORTER_PORT)],
                    "envFrom": _ENV_FROM,
                    "ports": [{"name": "metrics", "containerPort": EXPORTER_PORT}],
                    "livenessProbe": _probe("/healthz", "metrics", 10, 3),
                    "readinessProbe": _probe("/healthz", "metrics", 10, 3),
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                  "limits": {"memory": "256Mi"}},
                    "securityContext": _CONTAINER_SECURITY,
                    "volumeMounts": [_CONFIG_MOUNT],
                }],
                "volumes": [_CONFIG_VOLUME],
            }},
        },
    }
    return [deployment, _service(fleet, "agentfleet-exporter", "exporter", EXPORTER_PORT,
                                 "metrics")]


def config_resources(fleet: Fleet) -> list[dict[str, Any]]:
    settings = {
        "AGENTFLEET_MODELS_FILE": MODELS_FILE,
        "AGENTFLEET_DEFAULT_MODEL": fleet.default_model,
        "AGENTFLEET_HOME": f"{HOME}/.cache/agentfleet",
        "AGENTFLEET_METRICS_PORT": str(METRICS_PORT),
        "AGENTFLEET_LOG_FORMAT": "json",
        "HF_HUB_OFFLINE": "1",
    }
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": fleet.namespace, "labels": _labels("namespace")}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": _meta("agentfleet-settings", fleet, _labels("config")), "data": settings},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": _meta("agentfleet-models", fleet, _labels("config")),
         "data": {Path(MODELS_FILE).name: models_toml(fleet)}},
        # Placeholders: replace them (kubectl create secret ..., or your secret manager).
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": _meta("agentfleet-secrets", fleet, _labels("config")),
         "type": "Opaque",
         "stringData": {"REDIS_URL": "redis://:CHANGE-ME@valkey.agentfleet.svc:6379/0",
                        "SENTRY_DSN": ""}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": _meta("agentfleet-models", fleet, _labels("models")),
         "spec": {"accessModes": ["ReadWriteMany"],
                  "resources": {"requests": {"storage": fleet.models_volume_size}},
                  **({"storageClassName": fleet.models_storage_class}
                     if fleet.models_storage_class else {})}},
    ]


def models_toml(fleet: Fleet) -> str:
    """The models file every pod reads (AGENTFLEET_MODELS_FILE), from the fleet's engines."""
    lines = ["# Rendered from the fleet file by agentfleet.ops.manifests: edit that one."]
    for name, m in fleet.models.items():
        lines.append(f'\n[models."{name}"]')
        for key, value in m.engine.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def monitoring_resources(fleet: Fleet) -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS.read_text())
    dashboard = DASHBOARD.read_text()
    json.loads(dashboard)  # refuse to ship a broken dashboard
    return [
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
         "metadata": _meta("agentfleet", fleet, {**_labels("monitoring"),
                                                 **fleet.monitoring_labels}),
         "spec": {"selector": {"matchLabels": {"app.kubernetes.io/part-of": PART_OF}},
                  "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"},
                                {"port": "http", "path": "/metrics", "interval": "15s"}]}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
         "metadata": _meta("agentfleet", fleet, {**_labels("monitoring"),
                                                 **fleet.monitoring_labels}),
         "spec": {"groups": rules["groups"]}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": _meta("agentfleet-dashboard", fleet, {**_labels("monitoring"),
                                                           **fleet.dashboard_labels}),
         "data": {"agentfleet.json": dashboard}},
    ]


def render(fleet: Fleet) -> dict[str, list[dict[str, Any]]]:
    """File name -> the resources it holds."""
    files = {"config.yaml": config_resources(fleet),
             "gateway.yaml": gateway_resources(fleet),
             "exporter.yaml": exporter_resources(fleet)}
    workers = [_service(fleet, "agentfleet-worker-metrics", "worker", METRICS_PORT, "metrics",
                        headless=True)]
    files["workers.yaml"] = workers
    for model in fleet.models:
        files[f"worker-{k8s_name(model)}.yaml"] = worker_resources(fleet, model)
    files["monitoring.yaml"] = monitoring_resources(fleet)
    return files


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # the same labels twice, written twice
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = ("# Rendered by `python -m agentfleet.ops.manifests` from {fleet}: edit that file (or "
          "the\n# generator) and render again; tests/test_k8s.py fails when this file differs.\n")


def dump(resources: list[dict[str, Any]], fleet_path: str) -> str:
    body = yaml.dump_all(resources, Dumper=_Dumper, sort_keys=False, width=100,
                         explicit_start=True, allow_unicode=True)
    return HEADER.format(fleet=fleet_path) + body


def kustomization(fleet: Fleet, files: list[str]) -> str:
    doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
           "namespace": fleet.namespace, "resources": files}
    return HEADER.format(fleet="the fleet file") + yaml.dump(doc, Dumper=_Dumper,
                                                             sort_keys=False)


def write(fleet_path: Path, out: Path) -> list[Path]:
    """Render `fleet_path` into `out`; returns the files written."""
    fleet = load_fleet(fleet_path)
    out.mkdir(parents=True, exist_ok=True)
    shown = fleet_path.name if fleet_path.parent == out else str(fleet_path)
    written = []
    files = render(fleet)
    for name, resources in files.items():
        (out / name).write_text(dump(resources, shown))
        written.append(out / name)
    (out / "kustomization.yaml").write_text(kustomization(fleet, list(files)))
    written.append(out / "kustomization.yaml")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agentfleet.ops.manifests",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--fleet", type=Path, default=K8S / "fleet.toml")
    p.add_argument("--out", type=Path, default=K8S)
    args = p.parse_args(argv)
    try:
        for path in write(args.fleet, args.out):
            print(path)
    except FatalConfigError as exc:
        print(f"manifests: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
