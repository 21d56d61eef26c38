"""Writes the JSON schemas of the custom resources ops/k8s/ uses, for the offline checks of
tests/test_k8s.py.  Not run by the tests: run it by hand when moving to newer CRDs.

    python -m venv /tmp/crd && /tmp/crd/bin/pip install \
        cloudcoil.models.keda==2.16.1.0 cloudcoil.models.prometheus-operator==0.80.1.0
    /tmp/crd/bin/python ops/k8s/schemas/generate.py

The source: the cloudcoil model packages on PyPI, generated from KEDA's (2.16.1) and
prometheus-operator's (0.80.1) CRDs, give each resource's OpenAPI v3 schema as a pydantic
model; this script writes `model_json_schema()` of each.  Two changes, both stricter than a
cluster: every object that lists its properties refuses others (kubectl's default
--validate=strict rejects unknown fields, which is the typo this check exists to catch), and
apiVersion and kind are pinned.
"""

import json
from pathlib import Path

from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring

HERE = Path(__file__).resolve().parent
RESOURCES = {
    "scaledobject-keda-v1alpha1.json": (keda.ScaledObject, "keda.sh/v1alpha1", "keda 2.16.1"),
    "servicemonitor-monitoring-v1.json": (monitoring.ServiceMonitor, "monitoring.coreos.com/v1",
                                          "prometheus-operator 0.80.1"),
    "prometheusrule-monitoring-v1.json": (monitoring.PrometheusRule, "monitoring.coreos.com/v1",
                                          "prometheus-operator 0.80.1"),
}


def strict(node):
    if isinstance(node, dict):
        node.pop("title", None)
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def main() -> None:
    for name, (model, api_version, source) in RESOURCES.items():
        schema = strict(model.model_json_schema(by_alias=True))
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$comment"] = (f"{model.__name__} of {source}, from the cloudcoil models on PyPI "
                              f"(ops/k8s/schemas/generate.py)")
        schema["properties"]["apiVersion"] = {"const": api_version}
        schema["properties"]["kind"] = {"const": model.__name__}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind",
                                     "metadata"})
        (HERE / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(HERE / name)


if __name__ == "__main__":
    main()
