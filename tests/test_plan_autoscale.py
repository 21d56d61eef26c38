"""The KEDA/HPA replay (ops/autoscale.py): its arithmetic on small cases worked out by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from agentfleet.ops.autoscale import (
    Behavior,
    Policy,
    ScalingRules,
    Trigger,
    Workload,
    _Hpa,
    load_scaled_object,
    simulate,
    svg,
)
from agentfleet.schemas.errors import AgentFleetError

K8S = Path(__file__).resolve().parent.parent / "ops" / "k8s"

RULES = ScalingRules(
    polling_s=15, cooldown_s=300, min_replicas=0, max_replicas=4,
    triggers=(Trigger(name="backlog-tokens", threshold=1000),),
    scale_up=Behavior(stabilization_s=0, select="Max",
                      policies=(Policy(type="Pods", value=4, period_s=60),)),
    scale_down=Behavior(stabilization_s=600, select="Max",
                        policies=(Policy(type="Pods", value=1, period_s=60),)))


def test_a_small_burst_by_hand():
    # 80 tasks x 100 tokens; a worker does 10 tokens/s and serves 30 s after it is asked for.
    run = simulate(RULES, Workload(bursts=((0, 80),), task_tokens=100,
                                   tokens_per_s_per_worker=10, startup_s=30))
    at = {s.t: s for s in run.samples}
    # t=0: KEDA sees 8,000 tokens and wakes the model: one pod (ready at 30 s).
    assert (at[0].replicas, at[14].replicas) == (1, 1)
    # t=15: the HPA wants ceil(8000/1000) = 8, capped at maxReplicaCount 4 (ready at 45 s).
    assert (at[15].replicas, at[29].ready, at[30].ready, at[44].ready, at[45].ready) == \
        (4, 0, 1, 1, 4)
    # 30..45 s: one worker, 150 tokens; then four: 7,850 / 40 = 196.25 s more.
    assert at[45].backlog_tokens == pytest.approx(7850)
    assert run.completion_s == pytest.approx(45 + 196.25)
    # The scale-down window (600 s) keeps the 4 until KEDA's cool-down: the last active poll
    # saw 50 tokens at t=240; 300 s later (t=540) the model goes back to zero.
    assert at[539].replicas == 4 and at[540].replicas == 0
    assert run.samples[-1].t == 540
    assert run.replica_seconds == 15 * 1 + (540 - 15) * 4
    assert run.peak_replicas == 4


def test_metrics_seen_late_delay_the_wake_up():
    run = simulate(RULES, Workload(bursts=((0, 80),), task_tokens=100,
                                   tokens_per_s_per_worker=10, startup_s=30,
                                   metrics_lag_s=20))
    at = {s.t: s for s in run.samples}
    # KEDA polls at 0 and 15 and sees nothing yet (20 s behind); at 30 it sees the burst.
    assert (at[29].replicas, at[30].replicas, at[45].replicas) == (0, 1, 4)


def test_hpa_rate_policies_tolerance_and_stabilization():
    rules = ScalingRules(
        min_replicas=1, max_replicas=50, triggers=(Trigger(name="bulk-queued", threshold=100),),
        scale_up=Behavior(stabilization_s=0, select="Max",
                          policies=(Policy(type="Percent", value=100, period_s=60),
                                    Policy(type="Pods", value=1, period_s=60))),
        scale_down=Behavior(stabilization_s=30, select="Max",
                            policies=(Policy(type="Pods", value=1, period_s=60),)))
    hpa = _Hpa(rules)
    want = {"bulk_tasks": 1000.0}
    assert hpa.desired(0, 2, want) == 4  # 10 wanted; doubling from 2 allows 4
    assert hpa.desired(15, 4, want) == 4  # the period began at 2: still 4
    assert hpa.desired(60, 4, want) == 8  # a new period: double again
    # within 10% of the target per replica: no change
    assert _Hpa(rules).desired(0, 10, {"bulk_tasks": 1050.0}) == 10
    # scale-down: the highest recommendation of the last 30 s holds it up...
    assert hpa.desired(75, 8, {"bulk_tasks": 200.0}) == 8
    # ...then one pod per minute
    assert hpa.desired(120, 8, {"bulk_tasks": 200.0}) == 7
    assert hpa.desired(135, 7, {"bulk_tasks": 200.0}) == 7
    assert hpa.desired(181, 7, {"bulk_tasks": 200.0}) == 6
    assert _Hpa(rules).desired(0, 3, {"bulk_tasks": 0.0}) == 2  # never below min (1) ...
    # ... and the first step down is one pod


def test_rules_come_from_the_rendered_scaled_object():
    rules = load_scaled_object(K8S / "worker-smollm2-135m-batch.yaml")
    assert rules.min_replicas == 0 and rules.polling_s == 15 and rules.cooldown_s == 300
    assert {t.name for t in rules.triggers} == {"bulk-queued", "backlog-tokens"}
    assert rules.scale_down.stabilization_s == 600
    with pytest.raises(AgentFleetError, match="no ScaledObject"):
        load_scaled_object(K8S / "gateway.yaml")


def test_command_writes_an_svg_of_replicas_lag_and_completion(tmp_path):
    out = tmp_path / "burst.svg"
    run = subprocess.run([sys.executable, "-m", "agentfleet.ops.autoscale", "--burst-tasks",
                          "20000", "--task-tokens", "500", "--tokens-per-s-per-worker", "2000",
                          "--svg", str(out), "--json"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["completion_s"] > 0 and 1 <= summary["peak_replicas"] <= 4
    root = ElementTree.fromstring(out.read_text())  # well-formed SVG
    assert root.tag.endswith("svg")
    text = out.read_text()
    for label in ("replicas", "queued tasks", "share of the burst done", "done at"):
        assert label in text


def test_svg_marks_the_completion_time():
    run = simulate(RULES, Workload(bursts=((0, 80),), task_tokens=100,
                                   tokens_per_s_per_worker=10, startup_s=30))
    picture = svg(run)
    assert picture.count('stroke-dasharray="4 3"') == 3  # one line per panel
    assert "done at 4m01" in picture  # 241.25 s
