"""Replay a bulk burst through KEDA's and the HPA's scaling rules: replicas, lag, completion.

    python -m agentfleet.ops.autoscale --burst-tasks 200000 --task-tokens 600 \\
        --tokens-per-s-per-worker 2500 --startup-s 180 --svg burst.svg
    (--scaled-object ops/k8s/worker-<model>.yaml: the ScaledObject whose rules are replayed)

What it replays, second by second (a fluid model: tokens drain at the ready workers' rate):
  - KEDA, every `pollingInterval`: a model at zero replicas with an active trigger (a value
    above its `activationThreshold`) goes to max(1, minReplicaCount); one whose triggers
    have all been inactive for `cooldownPeriod` goes back to zero (minReplicaCount 0 only).
  - The HPA, every 15 s (kube-controller-manager's sync period) while replicas > 0: per
    trigger (AverageValue) ceil(value / threshold), unchanged within the 10% tolerance; the
    largest wins; then the behaviour: stabilisation windows (the lowest recommendation of the
    scale-up window, the highest of the scale-down window), rate policies over their periods
    (selectPolicy), and min/max.
  - A new pod serves after `--startup-s`; a removed pod stops serving at once (not-ready pods
    go first), and its tasks stay queued (they are, in the real fleet: pending, reclaimed).
  - What KEDA sees is `--metrics-lag-s` old (the exporter's scrape interval, Prometheus).
Kubernetes' own code is the reference (pkg/controller/podautoscaler: replica_calculator.go,
horizontal.go); tests/test_plan_autoscale.py checks the arithmetic on a small case.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml

from agentfleet.schemas.errors import AgentFleetError

HPA_SYNC_S = 15
HPA_TOLERANCE = 0.1
# Kubernetes' defaults when a ScaledObject gives no behaviour.
DEFAULT_SCALE_UP = {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                    "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15},
                                 {"type": "Percent", "value": 100, "periodSeconds": 15}]}
DEFAULT_SCALE_DOWN = {"stabilizationWindowSeconds": 300, "selectPolicy": "Max",
                      "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]}
# What each trigger of ops/manifests.py measures, in the simulation's terms.
TRIGGER_SOURCES = {"interactive-queued": "interactive_tasks", "bulk-queued": "bulk_tasks",
                   "backlog-tokens": "backlog_tokens"}


class Policy(msgspec.Struct, kw_only=True, frozen=True):
    type: str  # Pods | Percent
    value: int
    period_s: int


class Behavior(msgspec.Struct, kw_only=True, frozen=True):
    stabilization_s: int
    select: str  # Max | Min | Disabled
    policies: tuple[Policy, ...]


class Trigger(msgspec.Struct, kw_only=True, frozen=True):
    name: str
    threshold: float
    activation: float = 0.0


class ScalingRules(msgspec.Struct, kw_only=True, frozen=True):
    polling_s: int = 30
    cooldown_s: int = 300
    min_replicas: int = 0
    max_replicas: int = 100
    triggers: tuple[Trigger, ...] = ()
    scale_up: Behavior = Behavior(stabilization_s=0, select="Max", policies=())
    scale_down: Behavior = Behavior(stabilization_s=300, select="Max", policies=())
    hpa_sync_s: int = HPA_SYNC_S
    tolerance: float = HPA_TOLERANCE


class Workload(msgspec.Struct, kw_only=True, frozen=True):
    bursts: tuple[tuple[float, int], ...]  # (at s, bulk tasks)
    task_tokens: float
    tokens_per_s_per_worker: float
    startup_s: float
    metrics_lag_s: float = 0.0


class Sample(msgspec.Struct, kw_only=True, gc=False, array_like=True):
    t: int
    replicas: int
    ready: int
    queued_tasks: float
    backlog_tokens: float


class Run(msgspec.Struct, kw_only=True):
    samples: list[Sample]
    completion_s: float | None  # when the last queued token was done; None: not in time
    replica_seconds: float  # what the run cost (replicas asked for, ready or not)
    peak_replicas: int
    rules: ScalingRules
    workload: Workload


def _behavior(raw: dict[str, Any] | None, default: dict[str, Any]) -> Behavior:
    raw = {**default, **(raw or {})}
    return Behavior(stabilization_s=int(raw["stabilizationWindowSeconds"]),
                    select=raw.get("selectPolicy", "Max"),
                    policies=tuple(Policy(type=p["type"], value=int(p["value"]),
                                          period_s=int(p["periodSeconds"]))
                                   for p in raw["policies"]))


def rules_from_scaled_object(doc: dict[str, Any]) -> ScalingRules:
    """The scaling rules of a KEDA ScaledObject (KEDA's defaults where it is silent)."""
    if doc.get("kind") != "ScaledObject":
        raise AgentFleetError(f"not a ScaledObject: {doc.get('kind')!r}")
    spec = doc["spec"]
    behavior = (spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
                .get("behavior", {}))
    triggers = []
    for t in spec["triggers"]:
        name = t.get("name", "")
        if name not in TRIGGER_SOURCES:
            raise AgentFleetError(f"trigger {name!r}: the simulation knows "
                                  f"{sorted(TRIGGER_SOURCES)}")
        triggers.append(Trigger(name=name, threshold=float(t["metadata"]["threshold"]),
                                activation=float(t["metadata"].get("activationThreshold", 0))))
    return ScalingRules(
        polling_s=int(spec.get("pollingInterval", 30)),
        cooldown_s=int(spec.get("cooldownPeriod", 300)),
        min_replicas=int(spec.get("minReplicaCount", 0)),
        max_replicas=int(spec.get("maxReplicaCount", 100)),
        triggers=tuple(triggers),
        scale_up=_behavior(behavior.get("scaleUp"), DEFAULT_SCALE_UP),
        scale_down=_behavior(behavior.get("scaleDown"), DEFAULT_SCALE_DOWN))


def load_scaled_object(path: Path) -> ScalingRules:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "ScaledObject":
            return rules_from_scaled_object(doc)
    raise AgentFleetError(f"{path}: no ScaledObject")


class _Hpa:
    """The HPA controller's state: past recommendations and scale events."""

    def __init__(self, rules: ScalingRules):
        self.rules = rules
        self.recommendations: list[tuple[int, int]] = []  # (t, desired before normalising)
        self.events: list[tuple[int, int]] = []  # (t, replica change the HPA made)

    def desired(self, t: int, current: int, metrics: dict[str, float]) -> int:
        r = self.rules
        wanted = 0
        for trig in r.triggers:
            value = metrics[TRIGGER_SOURCES[trig.name]]
            ratio = value / (trig.threshold * current)
            if abs(ratio - 1.0) <= r.tolerance:
                wanted = max(wanted, current)
            else:
                wanted = max(wanted, math.ceil(value / trig.threshold))
        stabilized = self._stabilize(t, current, wanted)
        self.recommendations.append((t, wanted))
        out = self._rate_limit(t, current, stabilized)
        if out != current:
            self.events.append((t, out - current))
        return out

    def _stabilize(self, t: int, current: int, wanted: int) -> int:
        up_cut = t - self.rules.scale_up.stabilization_s
        down_cut = t - self.rules.scale_down.stabilization_s
        up = down = wanted
        for at, rec in self.recommendations:
            if at > up_cut:
                up = min(up, rec)
            if at > down_cut:
                down = max(down, rec)
        recommendation = current
        if recommendation < up:
            recommendation = up
        if recommendation > down:
            recommendation = down
        return recommendation

    def _rate_limit(self, t: int, current: int, desired: int) -> int:
        r = self.rules
        low, high = max(1, r.min_replicas), r.max_replicas
        if desired > current:
            limit = self._limit(t, current, r.scale_up, up=True)
            high = min(high, max(limit, current))
        elif desired < current:
            limit = self._limit(t, current, r.scale_down, up=False)
            low = max(low, min(limit, current))
        return min(max(desired, low), high)

    def _limit(self, t: int, current: int, behavior: Behavior, *, up: bool) -> int:
        if behavior.select == "Disabled" or not behavior.policies:
            return current
        limits = []
        for p in behavior.policies:
            changed = sum(d for at, d in self.events if at > t - p.period_s and (d > 0) == up)
            start = current - changed  # replicas at the start of the policy's period
            if up:
                limits.append(start + p.value if p.type == "Pods"
                              else math.ceil(start * (1 + p.value / 100)))
            else:
                limits.append(start - p.value if p.type == "Pods"
                              else int(start * (1 - p.value / 100)))
        # Max: the policy allowing the largest change
        pick = max if (behavior.select == "Max") == up else min
        return pick(limits)


def simulate(rules: ScalingRules, work: Workload, *, horizon_s: int | None = None,
             initial_replicas: int | None = None) -> Run:
    """Second by second, from t = 0 until everything is done and the fleet is back at its
    minimum (or `horizon_s`)."""
    if work.tokens_per_s_per_worker <= 0 or work.task_tokens <= 0:
        raise AgentFleetError("--tokens-per-s-per-worker and --task-tokens must be > 0")
    if not rules.triggers:
        raise AgentFleetError("the ScaledObject has no trigger to scale on")
    total = sum(n for _, n in work.bursts) * work.task_tokens
    if horizon_s is None:  # long enough for one worker, plus a cool-down
        horizon_s = int(max(at for at, _ in work.bursts) + work.startup_s +
                        total / work.tokens_per_s_per_worker + rules.cooldown_s +
                        rules.scale_down.stabilization_s + 600)
    start = rules.min_replicas if initial_replicas is None else initial_replicas
    pods: list[float] = [0.0] * start  # when each pod serves (ready at)
    hpa = _Hpa(rules)
    tokens = 0.0
    history: list[float] = []  # backlog tokens at the start of each second
    bursts = sorted(work.bursts)
    last_active: float | None = None
    samples: list[Sample] = []
    completion: float | None = None
    replica_seconds = 0.0
    for t in range(horizon_s + 1):
        while bursts and bursts[0][0] <= t:
            tokens += bursts.pop(0)[1] * work.task_tokens
            completion = None
        history.append(tokens)
        lag_s = int(work.metrics_lag_s)
        seen_tokens = history[t - lag_s] if t >= lag_s else 0.0  # nothing queued before t=0
        metrics = {"interactive_tasks": 0.0, "bulk_tasks": seen_tokens / work.task_tokens,
                   "backlog_tokens": seen_tokens}
        activated = False
        if t % rules.polling_s == 0:  # KEDA: activation, and back to zero after the cool-down
            active = any(metrics[TRIGGER_SOURCES[trig.name]] > trig.activation
                         for trig in rules.triggers)
            if active:
                last_active = t
                if not pods:
                    pods = [t + work.startup_s] * max(1, rules.min_replicas)
                    activated = True  # the HPA sees the new scale at its next sync
            elif (pods and rules.min_replicas == 0 and last_active is not None
                  and t - last_active >= rules.cooldown_s):
                pods = []
        if pods and not activated and t % rules.hpa_sync_s == 0:
            want = hpa.desired(t, len(pods), metrics)
            if want > len(pods):
                pods += [t + work.startup_s] * (want - len(pods))
            elif want < len(pods):
                pods = sorted(pods)[:want]  # the latest to be ready go first
        ready = sum(1 for at in pods if at <= t)
        samples.append(Sample(t=t, replicas=len(pods), ready=ready,
                              queued_tasks=tokens / work.task_tokens, backlog_tokens=tokens))
        replica_seconds += len(pods)
        rate = ready * work.tokens_per_s_per_worker
        if tokens > 0 and rate > 0:
            if tokens <= rate:
                completion = t + tokens / rate
                tokens = 0.0
            else:
                tokens -= rate
        if (completion is not None and not bursts and len(pods) <= rules.min_replicas
                and t >= completion):
            break
    return Run(samples=samples, completion_s=completion, replica_seconds=replica_seconds,
               peak_replicas=max(s.replicas for s in samples), rules=rules, workload=work)


# ---- the picture ----------------------------------------------------------------------

def svg(run: Run, title: str = "") -> str:
    """Three panels over time: replicas (asked for, ready), queued tasks, done share."""
    width, panel_h, left, right, top, gap = 900, 170, 70, 20, 56, 45
    total_tokens = sum(n for _, n in run.workload.bursts) * run.workload.task_tokens
    t_max = max(run.samples[-1].t, 1)
    done = [(s.t, 1 - s.backlog_tokens / total_tokens if total_tokens else 1.0)
            for s in run.samples]
    panels = [
        ("replicas", [("asked for", "#1f77b4", [(s.t, s.replicas) for s in run.samples]),
                      ("ready", "#2ca02c", [(s.t, s.ready) for s in run.samples])]),
        ("queued tasks (lag + pending)",
         [("queued", "#d62728", [(s.t, s.queued_tasks) for s in run.samples])]),
        ("share of the burst done", [("done", "#9467bd", done)]),
    ]
    height = top + len(panels) * (panel_h + gap) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="15">{_esc(title or _caption(run))}</text>']
    plot_w = width - left - right
    for i, (label, series) in enumerate(panels):
        y0 = top + i * (panel_h + gap)
        y_max = max((v for _, _, pts in series for _, v in pts), default=1.0) or 1.0
        y_max = _nice(y_max)
        out.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel_h}" '
                   f'fill="none" stroke="#999"/>')
        out.append(f'<text x="{left}" y="{y0 - 6}">{_esc(label)}</text>')
        for k in range(5):
            v = y_max * k / 4
            y = y0 + panel_h - panel_h * k / 4
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                       f'{_num(v)}</text>')
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                       f'stroke="#eee"/>')
        for j, (name, color, pts) in enumerate(series):
            path = " ".join(f"{left + plot_w * t / t_max:.1f},"
                            f"{y0 + panel_h - panel_h * min(v, y_max) / y_max:.1f}"
                            for t, v in _thin(pts))
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" '
                       f'points="{path}"/>')
            out.append(f'<text x="{left + plot_w - 8}" y="{y0 + 16 + 14 * j}" '
                       f'text-anchor="end" fill="{color}">{_esc(name)}</text>')
        if run.completion_s is not None:
            x = left + plot_w * run.completion_s / t_max
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + panel_h}" '
                       f'stroke="#555" stroke-dasharray="4 3"/>')
    y_axis = top + len(panels) * (panel_h + gap) - gap + 16
    for k in range(6):
        t = t_max * k / 5
        out.append(f'<text x="{left + plot_w * k / 5:.1f}" y="{y_axis}" text-anchor="middle">'
                   f'{_clock(t)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _thin(points: list[tuple[int, float]], most: int = 1500) -> list[tuple[int, float]]:
    """Every point where the value changes (steps kept), at most about `most` of them."""
    kept = [p for i, p in enumerate(points)
            if i == 0 or i == len(points) - 1 or p[1] != points[i - 1][1]
            or p[1] != points[i + 1][1]]
    step = max(1, len(kept) // most)
    return kept[::step] + ([kept[-1]] if len(kept) % step else [])


def _nice(v: float) -> float:
    exp = 10 ** math.floor(math.log10(v)) if v > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return v


def _num(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _clock(t: float) -> str:
    t = int(t)
    return f"{t // 3600}h{t % 3600 // 60:02d}" if t >= 3600 else f"{t // 60}m{t % 60:02d}"


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _caption(run: Run) -> str:
    done = _clock(run.completion_s) if run.completion_s is not None else "not within the run"
    n = sum(n for _, n in run.workload.bursts)
    return (f"{n:,} tasks: done at {done}, peak {run.peak_replicas} replicas, "
            f"{run.replica_seconds / 3600:.1f} replica-hours")


def summary(run: Run) -> dict[str, Any]:
    return {"completion_s": run.completion_s, "peak_replicas": run.peak_replicas,
            "replica_hours": run.replica_seconds / 3600, "seconds": len(run.samples),
            "rules": msgspec.to_builtins(run.rules), "workload": msgspec.to_builtins(run.workload)}


def main(argv: Sequence[str] | None = None) -> int:
    here = Path(__file__).resolve().parent / "k8s"
    p = argparse.ArgumentParser(prog="python -m agentfleet.ops.autoscale",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--scaled-object", type=Path,
                   default=here / "worker-smollm2-135m-batch.yaml",
                   help="a manifest holding the ScaledObject whose rules are replayed")
    p.add_argument("--burst-tasks", type=int, default=200_000)
    p.add_argument("--task-tokens", type=float, default=600.0,
                   help="prompt + output tokens per task (agentfleet plan prints the mean)")
    p.add_argument("--tokens-per-s-per-worker", type=float, default=2500.0)
    p.add_argument("--startup-s", type=float, default=180.0)
    p.add_argument("--metrics-lag-s", type=float, default=30.0)
    p.add_argument("--svg", type=Path, help="write the plot here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    try:
        rules = load_scaled_object(args.scaled_object)
        run = simulate(rules, Workload(
            bursts=((0.0, args.burst_tasks),), task_tokens=args.task_tokens,
            tokens_per_s_per_worker=args.tokens_per_s_per_worker, startup_s=args.startup_s,
            metrics_lag_s=args.metrics_lag_s))
    except (AgentFleetError, OSError) as exc:
        print(f"autoscale: {exc}", file=sys.stderr)
        return 2
    if args.svg:
        args.svg.write_text(svg(run))
    print(json.dumps(summary(run)) if args.json else _caption(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
