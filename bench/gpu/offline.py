"""The offline reference: `LLM.generate` on every prompt at once, in a process of its own.

    python -m bench.gpu.offline SPEC.json     (written by bench.gpu.run; writes SPEC's "out")
"""

from __future__ import annotations

import json
import os
import sys
import time

from bench.gpu.stacks import StackSampler
from bench.harness import TreeCpu


def prefix_counters(llm) -> dict[str, float]:
    """Prefix-cache queries and hits (tokens) from vLLM's metrics snapshot."""
    found = {"prefix_cache_queries": 0.0, "prefix_cache_hits": 0.0, "num_preemptions": 0.0}
    for metric in llm.get_metrics():
        name = metric.name.removeprefix("vllm:").removesuffix("_total")
        if name in found:
            found[name] += float(getattr(metric, "value", 0) or 0)
    return found


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if spec.get("kv_cache_space_gib"):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kv_cache_space_gib"]))
    from vllm import LLM, SamplingParams

    prompts = json.loads(open(spec["prompts"]).read())
    started = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["engine"], disable_log_stats=not spec["stats"])
    start_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up, as for the other paths
    before = prefix_counters(llm) if spec["stats"] else {}
    cpu = TreeCpu(os.getpid())
    sampler = StackSampler(spec.get("sample_ms", 0))
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - t0
    sampler.stop()
    after = prefix_counters(llm) if spec["stats"] else {}
    result = {
        "engine_start_s": start_s,
        "wall_s": wall_s,
        "tasks": len(outputs),
        "ok": sum(1 for o in outputs if o.outputs and o.outputs[0].finish_reason == "length"),
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "prompt_tokens": sum(len(o.prompt_token_ids or ()) for o in outputs),
        "cpu": cpu.delta(),
        "engine_counters": {k: after[k] - before[k] for k in after},
        "resolved": _resolved(llm),
        "stacks": sampler.report(),
    }
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    # Leave at once: the engine core process is torn down with us.
    sys.stdout.flush()
    os._exit(0)


def _resolved(llm) -> dict:
    """The scheduler settings vLLM settled on (defaults filled in)."""
    try:
        sched = llm.llm_engine.vllm_config.scheduler_config
        cache = llm.llm_engine.vllm_config.cache_config
        return {"max_num_seqs": sched.max_num_seqs,
                "max_num_batched_tokens": sched.max_num_batched_tokens,
                "num_gpu_blocks": getattr(cache, "num_gpu_blocks", None),
                "block_size": getattr(cache, "block_size", None)}
    except AttributeError:
        return {}


if __name__ == "__main__":
    main(sys.argv[1])
