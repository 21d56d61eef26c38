"""vLLM's own price of structured outputs, without the fleet: the schema phase's workload
through offline `LLM.generate`, plain and with the same JSON schema, in ABBA order.

    python -m bench.gpu.structured_offline --out DIR          # on the GPU machine
    python -m bench.gpu.structured_offline --tiny --out DIR   # the CPU smoke run
    python -m bench.gpu.structured_offline --backend guidance --order plain,schema,unbounded

Runs: `plain`, `schema` (the schema phase's SCHEMA), `unbounded` (the same without length
bounds).  Each run records the CPU seconds of the engine core process beside its wall time;
`--profile-s N` samples the engine core with py-spy for N s of the first constrained run.

The schema phase (bench/gpu/structured_outputs.py) asks the fleet for schema tokens/s >= 0.9 x
plain.  This run measures the same ratio for vLLM alone (same model, engine settings t512,
prompts, sampling and schema), so that the fleet's share of any shortfall is the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.gpu.common import TOKENIZER_DIR, assemble_model, cpu_seconds, engine_cores, py_spy
from bench.gpu.engines import GPU_CONFIGS, TINY_CONFIGS, llm_kwargs
from bench.gpu.run import GPU_SIZES, TINY_SIZES
from bench.gpu.structured_outputs import ORDER, SCHEMA, UNBOUNDED
from bench.gpu.workload import Tokens, bulk_prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--config", default="t512")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="so-")))
    parser.add_argument("--backend", default="auto",
                        choices=("auto", "xgrammar", "guidance", "outlines"))
    parser.add_argument("--order", default=",".join(ORDER),
                        help="runs in turn: plain, schema, unbounded")
    parser.add_argument("--count", type=int, default=0, help="prompts a run (0: the phase's)")
    parser.add_argument("--profile-s", type=float, default=0.0)
    parser.add_argument("--compact", action="store_true",
                        help="JSON without optional whitespace (disable_any_whitespace)")
    args = parser.parse_args(argv)
    order = args.order.split(",")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    cfg = (TINY_CONFIGS if args.tiny else GPU_CONFIGS)[args.config]
    work = bulk_prompts(Tokens(TOKENIZER_DIR), name="bulk", count=args.count or sizes.bulk,
                        prompt_tokens=sizes.prompt_tokens, max_tokens=sizes.max_tokens, seed=1)
    args.out.mkdir(parents=True, exist_ok=True)
    model = assemble_model("135m" if args.tiny else "1.7b", args.out)
    kwargs = llm_kwargs(cfg)
    if args.backend != "auto" or args.compact:
        kwargs["structured_outputs_config"] = {"backend": args.backend,
                                               "disable_any_whitespace": args.compact}
    llm = LLM(model=str(model), **kwargs)
    params = {"plain": SamplingParams(max_tokens=work.max_tokens, temperature=0.0,
                                      ignore_eos=True)}
    for kind, schema in (("schema", SCHEMA), ("unbounded", UNBOUNDED)):
        params[kind] = SamplingParams(max_tokens=work.max_tokens, temperature=0.0,
                                      ignore_eos=True,
                                      structured_outputs=StructuredOutputsParams(json=schema))
        if kind in order:  # each grammar compiles once, before the clock starts
            llm.generate(work.prompts[:8], [params[kind]] * 8, use_tqdm=False)
    runs: dict[str, list[dict]] = {kind: [] for kind in dict.fromkeys(order)}
    profiled = False
    for kind in order:
        spies = []
        if args.profile_s and kind != "plain" and not profiled:
            spies, profiled = py_spy(args.out, args.profile_s, parents=False), True
        cpu0, t0 = cpu_seconds(engine_cores()), time.perf_counter()
        outputs = llm.generate(work.prompts, params[kind], use_tqdm=False)
        wall_s, cpu_s = time.perf_counter() - t0, cpu_seconds(engine_cores()) - cpu0
        for spy in spies:
            spy.wait()
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        runs[kind].append({"wall_s": round(wall_s, 3), "output_tokens": tokens,
                           "tokens_per_s": round(tokens / wall_s, 1),
                           "engine_core_cpu_s": round(cpu_s, 1)})
        print(f"{args.backend}{' compact' * args.compact} {kind}: {tokens / wall_s:,.0f} "
              f"tok/s ({wall_s:.1f} s, engine core {cpu_s / wall_s:.2f} cores)", flush=True)
    rate = {k: sum(r["output_tokens"] for r in v) / sum(r["wall_s"] for r in v)
            for k, v in runs.items()}
    report = {"config": args.config, "tiny": args.tiny, "backend": args.backend,
              "tasks": len(work.prompts), "max_tokens": work.max_tokens, "runs": runs,
              "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
              "commit": os.environ.get("BENCH_COMMIT", "")}
    if "plain" in rate:
        report["vs_plain"] = {k: round(v / rate["plain"], 3) for k, v in rate.items()
                              if k != "plain"}
    name = "structured_offline" + ("" if args.backend == "auto" else "_" + args.backend) \
        + ("_compact" if args.compact else "") + ".json"
    (args.out / name).write_text(json.dumps(report, indent=1))
    print(f"offline vLLM ({args.backend}): tokens/s against plain {report.get('vs_plain')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
