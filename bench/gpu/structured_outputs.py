"""The schema phase: the bulk workload with and without a JSON schema, on one engine.

    python -m bench.gpu.run --phase schema                 # fleet@t512 on the GPU
    python -m bench.gpu.run --tiny --phase schema=fleet@same   # the CPU smoke run

One fleet (one engine start) runs the bulk prompts four times in ABBA order (plain, schema,
schema, plain), so that a slow drift of the machine weighs on both alike.  The schema runs
send every task with the same JSON schema (a triage-like object: an enum, an integer, a long
summary, a list of tags) through vLLM's structured outputs (xgrammar), and the worker reads
each output back against it.  Sampling is the bulk phase's (greedy, ignore_eos, dummy
weights), so both kinds make the same tokens per task; tokens after a JSON ends are
unconstrained, as the engine runs them, and such outputs fail their format (trailing text).
`constrained_to_end` counts the outputs still inside their JSON at max_tokens (cut: the
grammar applied to every token).  Target (issue 16): schema tokens/s >= 0.9 x plain.
"""

from __future__ import annotations

import os
import time

from bench.gpu.common import cpu_seconds, engine_cores, py_spy, summary
from bench.gpu.workload import PromptSet
from bench.harness import Check, percentiles
from agentfleet.schemas.wire import JsonSchema, ResponseFormat, Task

TARGET = 0.9  # schema tokens/s at least this share of plain tokens/s
ORDER = ("plain", "schema", "schema", "plain")  # ABBA
SCHEMA = {
    "type": "object",
    "required": ["category", "priority", "summary", "tags"],
    "additionalProperties": False,
    "properties": {
        "category": {"type": "string", "enum": ["billing", "bug", "account", "other"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 1000},
        "tags": {"type": "array", "maxItems": 8, "items": {"type": "string", "maxLength": 40}},
    },
}
# The same object without length bounds: what the bounds cost a grammar backend.
UNBOUNDED = {**SCHEMA, "properties": {
    **SCHEMA["properties"],
    "summary": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
}}


def with_schema(tasks: list[Task]) -> list[Task]:
    fmt = ResponseFormat(type="json_schema", json_schema=JsonSchema(name="triage", schema=SCHEMA))
    for task in tasks:
        task.response_format = fmt
    return tasks


async def alternate(ctx, producer, work: PromptSet) -> dict:
    """The phase's body inside `run_fleet`: the ABBA runs, their figures and the ratio."""
    from bench.gpu.fleet_path import _collect, _tasks

    runs: dict[str, list[dict]] = {"plain": [], "schema": []}
    # The grammar compiles once per schema: compile it before the clock starts.
    warm = PromptSet(name="warm-up", prompts=work.prompts[:2],
                     prompt_tokens=work.prompt_tokens[:2], max_tokens=work.max_tokens)
    await producer.wait_many(await producer.submit_many(with_schema(_tasks(warm))),
                             timeout_s=ctx.run_timeout_s)
    profile_s = float(os.environ.get("BENCH_PROFILE_S") or 0)  # py-spy the first schema run
    for kind in ORDER:
        tasks = _tasks(work)
        if kind == "schema":
            with_schema(tasks)
            if profile_s:
                py_spy(ctx.out_dir, profile_s)
                profile_s = 0
        cores = engine_cores()  # the engine core's CPU and its worker's, beside the wall time
        workers = set(cores.values())
        cpu0, t0 = (cpu_seconds(cores), cpu_seconds(workers)), time.perf_counter()
        ids = await producer.submit_many(tasks)
        results, wall_s = await _collect(producer, ids, ctx.run_timeout_s, t0)
        run = summary(wall_s=wall_s, tasks=len(results),
                      ok=sum(r.output_tokens == work.max_tokens for r in results),
                      output_tokens=sum(r.output_tokens for r in results),
                      prompt_tokens=sum(r.prompt_tokens for r in results))
        run["latency_s"] = percentiles([r.timings.finished - r.timings.enqueued
                                        for r in results if r.timings.finished])
        run["engine_core_cpu_s"] = round(cpu_seconds(cores) - cpu0[0], 1)
        run["worker_cpu_s"] = round(cpu_seconds(workers) - cpu0[1], 1)
        if kind == "schema":
            run["parsed"] = sum(r.ok for r in results)
            run["constrained_to_end"] = sum("cut by max_tokens" in r.error_message
                                            for r in results)
        runs[kind].append(run)
    plain, schema = _total(runs["plain"]), _total(runs["schema"])
    result = dict(schema)  # the phase's row: the schema runs, with plain's beside them
    result["plain"] = plain
    result["runs"] = runs
    result["vs_plain"] = round(schema["tokens_per_s"] / plain["tokens_per_s"], 3) \
        if plain["tokens_per_s"] else None
    result["constrained_to_end"] = sum(r["constrained_to_end"] for r in runs["schema"])
    return result


def _total(runs: list[dict]) -> dict:
    """Runs of one kind as one: their tokens over their summed wall time."""
    return summary(wall_s=sum(r["wall_s"] for r in runs), tasks=sum(r["tasks"] for r in runs),
                   ok=sum(r["ok"] for r in runs),
                   output_tokens=sum(r["output_tokens"] for r in runs),
                   prompt_tokens=sum(r["prompt_tokens"] for r in runs))


def targets(results: list[dict]) -> list[Check]:
    """Issue 16's GPU target, from the schema phase's row (n/a when it did not run)."""
    rows = [r for r in results if r.get("phase") == "schema" and "vs_plain" in r]
    value = rows[0]["vs_plain"] if rows else None
    label = rows[0]["label"] if rows else "fleet"
    return [Check(f"schema {label}: JSON-schema tasks >= {TARGET} x the same without "
                  f"(tokens/s)", None if value is None else value >= TARGET,
                  "" if value is None else value)]
