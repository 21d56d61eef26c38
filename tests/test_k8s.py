"""ops/k8s/: the manifests are what the generator renders, and every one is valid, offline.

Core kinds are validated against Kubernetes' own OpenAPI schemas (kubernetes-validate, strict:
unknown fields refused); KEDA's ScaledObject and prometheus-operator's ServiceMonitor and
PrometheusRule against their CRDs' schemas vendored in ops/k8s/schemas (generate.py says
where from).  The PrometheusRule and the dashboard ConfigMap are compared with the files
they come from, and the rule's PromQL and KEDA's queries go through promtool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from agentfleet.ops import manifests
from agentfleet.ops.exporter import QueueStats, backlog_family, queue_families
from agentfleet.schemas.errors import FatalConfigError
from agentfleet.schemas.settings import load_models_file

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "ops" / "k8s"
SCHEMAS = K8S / "schemas"
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")  # the oldest and a recent release we support
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def resources() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in manifest_files()
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in resources() if doc["kind"] == kind]


def validate(doc: dict) -> None:
    """Raise if `doc` is not a valid resource (jsonschema or kubernetes-validate errors)."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[key]).read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_manifests_are_what_the_fleet_file_renders(tmp_path):
    shutil.copy(K8S / "fleet.toml", tmp_path / "fleet.toml")
    written = manifests.write(tmp_path / "fleet.toml", tmp_path)
    rendered = {p.name for p in written}
    committed = {p.name for p in K8S.glob("*.yaml")}
    assert rendered == committed, "render again: python -m agentfleet.ops.manifests"
    for name in rendered:
        assert (tmp_path / name).read_text() == (K8S / name).read_text(), (
            f"ops/k8s/{name} differs from what ops/k8s/fleet.toml renders: run "
            f"`python -m agentfleet.ops.manifests` (never edit it by hand)")


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == [p.name for p in manifest_files()]


def test_every_resource_is_valid_against_its_schema():
    seen = set()
    for name, doc in resources():
        try:
            validate(doc)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{name}: no schema for {doc['apiVersion']} {doc['kind']}: vendor "
                        f"its CRD's schema in ops/k8s/schemas")
        seen.add(doc["kind"])
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget",
            "ScaledObject", "ServiceMonitor", "PrometheusRule", "Namespace"} <= seen


def _first(kind: str) -> dict:
    return json.loads(json.dumps(by_kind(kind)[0]))  # a deep copy to break


@pytest.mark.parametrize("kind, path, bad", [
    ("Deployment", ["spec", "template", "spec", "terminationGracePeriod"], 60),  # a typo
    ("Deployment", ["spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"],
     "9464"),
    ("ScaledObject", ["spec", "minReplicas"], 0),  # KEDA's field is minReplicaCount
    ("ScaledObject", ["spec", "triggers", 0, "metadata", "threshold"], 256),  # must be a string
    ("ServiceMonitor", ["spec", "endpoints", 0, "scrapeInterval"], "15s"),
    ("PrometheusRule", ["spec", "groups", 0, "rules"], "not a list"),
    ("PodDisruptionBudget", ["spec", "maxUnavailable"], [1]),
])
def test_the_validation_refuses_a_broken_resource(kind, path, bad):
    doc = _first(kind)
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = bad
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


def _drain_timeout_s(container: dict) -> float:
    args = container["args"]
    return float(args[args.index("--drain-timeout-s") + 1])


def test_workers_drain_inside_their_grace_period_and_probe_the_worker():
    fleet = manifests.load_fleet(K8S / "fleet.toml")
    settings = by_kind("ConfigMap")
    env = next(c for c in settings if c["metadata"]["name"] == "agentfleet-settings")["data"]
    workers = [d for d in by_kind("Deployment")
               if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
    assert len(workers) == len(fleet.models)
    for deployment in workers:
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        model = container["args"][container["args"].index("--models") + 1]
        assert model in fleet.models
        # SIGTERM drains for --drain-timeout-s; SIGKILL comes only after the grace period.
        assert pod["terminationGracePeriodSeconds"] >= _drain_timeout_s(container) + 10
        port = next(p for p in container["ports"] if p["name"] == "metrics")
        assert port["containerPort"] == int(env["AGENTFLEET_METRICS_PORT"])
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        # /healthz waits up to 5 s for the event loop: the probe must wait longer.
        assert container["livenessProbe"]["timeoutSeconds"] > 5
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) == fleet.models[model].gpus >= 1
        assert "replicas" not in deployment["spec"]  # KEDA's HPA owns the count
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"]
        ids = [e for e in container["env"] if e["name"] == "AGENTFLEET_WORKER_ID"]
        assert ids[0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_each_worker_has_a_disruption_budget_and_a_scaled_object():
    fleet = manifests.load_fleet(K8S / "fleet.toml")
    workers = {d["metadata"]["name"]: d for d in by_kind("Deployment")
               if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"}
    pdbs = {p["metadata"]["name"]: p for p in by_kind("PodDisruptionBudget")}
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in by_kind("ScaledObject")}
    assert set(scaled) == set(workers)
    for name, deployment in workers.items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = pdbs[name]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        # no other Deployment's pods match this budget's selector
        others = [d for n, d in workers.items() if n != name and
                  selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert not others
        spec = scaled[name]["spec"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        model = fleet.models[container["args"][container["args"].index("--models") + 1]]
        assert spec["minReplicaCount"] == model.min_replicas
        assert spec["maxReplicaCount"] == model.max_replicas
        names = {t["name"] for t in spec["triggers"]}
        if model.bulk_only:
            assert spec["minReplicaCount"] == 0  # to zero while nothing is queued
            assert names == {"bulk-queued", "backlog-tokens"}
        else:
            assert spec["minReplicaCount"] >= 1
            assert names == {"interactive-queued", "bulk-queued", "backlog-tokens"}
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            assert float(trigger["metadata"]["activationThreshold"]) == 0


def _exported_metric_names() -> set[str]:
    families = [*queue_families([QueueStats(model="m")]),
                backlog_family({"m": {"interactive": 0.0, "bulk": 0.0}})]
    return {f.name for f in families}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `make prometheus` installs Debian's "
                    "prometheus package")
    return path


def test_keda_queries_are_promql_over_metrics_the_exporter_serves(tmp_path):
    exported = _exported_metric_names()
    rules = []
    for scaled in by_kind("ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            query = trigger["metadata"]["query"]
            used = set(re.findall(r"\b(agentfleet_[a-z_]+)\{", query))
            assert used and used <= exported, (query, used - exported)
            rules.append({"record": f"keda:{trigger['name'].replace('-', '_')}", "expr": query})
    (tmp_path / "keda.yml").write_text(yaml.safe_dump({"groups": [{"name": "keda",
                                                                   "rules": rules}]}))
    check = subprocess.run([_promtool(), "check", "rules", str(tmp_path / "keda.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_rule_is_alerts_yml_and_every_alert_has_a_runbook(tmp_path):
    (rule,) = by_kind("PrometheusRule")
    alerts = yaml.safe_load((ROOT / "ops" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    (tmp_path / "rule.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = subprocess.run([_promtool(), "check", "rules", str(tmp_path / "rule.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    operations = (ROOT / "docs" / "operations.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", operations, re.M)}
    for group in alerts["groups"]:
        for r in group["rules"]:
            if "alert" not in r:
                continue
            url = r["annotations"].get("runbook_url", "")
            base, _, anchor = url.partition("#")
            assert base.endswith("/docs/operations.md"), (r["alert"], url)
            assert anchor in anchors, f"{r['alert']}: no section #{anchor} in docs/operations.md"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_dashboard_config_map_is_the_grafana_json():
    (dash,) = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "agentfleet-dashboard"]
    assert dash["data"]["agentfleet.json"] == (ROOT / "ops" / "grafana" /
                                               "agentfleet.json").read_text()
    assert dash["metadata"]["labels"].get("grafana_dashboard") == "1"


def test_models_config_map_is_a_models_file_the_worker_loads(tmp_path):
    fleet = manifests.load_fleet(K8S / "fleet.toml")
    (models,) = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "agentfleet-models"]
    (tmp_path / "models.toml").write_text(models["data"]["models.toml"])
    specs = load_models_file(tmp_path / "models.toml")
    assert set(specs) == set(fleet.models)
    for name, m in fleet.models.items():
        for key, value in m.engine.items():
            assert getattr(specs[name], key) == value
    (settings,) = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] ==
                   "agentfleet-settings"]
    assert settings["data"]["AGENTFLEET_DEFAULT_MODEL"] in specs
    assert settings["data"]["AGENTFLEET_MODELS_FILE"] == manifests.MODELS_FILE
    (secret,) = by_kind("Secret")
    assert set(secret["stringData"]) == {"REDIS_URL", "SENTRY_DSN"}


def test_every_pod_reading_the_settings_mounts_the_models_file():
    models_dir = str(Path(manifests.MODELS_FILE).parent)
    for deployment in by_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            refs = [e.get("configMapRef", {}).get("name") for e in container["envFrom"]]
            assert "agentfleet-settings" in refs
            mounts = [m for m in container.get("volumeMounts", [])
                      if m["mountPath"] == models_dir]
            assert mounts, f"{deployment['metadata']['name']}: no {models_dir} mount"
            assert volumes[mounts[0]["name"]]["configMap"]["name"] == "agentfleet-models"


def test_services_select_pods_and_the_service_monitor_scrapes_their_ports():
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in by_kind("Deployment")]
    (monitor,) = by_kind("ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for service in by_kind("Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pods), service
        assert wanted.items() <= service["metadata"]["labels"].items()
        assert {p["name"] for p in service["spec"]["ports"]} & ports, service


def test_fleet_file_errors_name_the_field(tmp_path):
    text = (K8S / "fleet.toml").read_text()
    bad = tmp_path / "fleet.toml"
    bad.write_text(text.replace("min_replicas = 1", "min_replicas = 0"))
    with pytest.raises(FatalConfigError, match="min_replicas 0 is for bulk_only"):
        manifests.load_fleet(bad)
    bad.write_text(text.replace("gpus = 1", "gpu = 1", 1))
    with pytest.raises(FatalConfigError, match="gpu"):
        manifests.load_fleet(bad)
    bad.write_text(text.replace("max_model_len = 4096", "max_model_len = 'long'"))
    with pytest.raises(FatalConfigError, match="engine"):
        manifests.load_fleet(bad)
    assert manifests.main(["--fleet", str(bad), "--out", str(tmp_path / "out")]) == 2
