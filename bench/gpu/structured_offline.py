"""vLLM's own price of structured outputs, without the fleet: the schema phase's workload
through offline `LLM.generate`, plain and with the same JSON schema, in ABBA order.

    python -m bench.gpu.structured_offline --out DIR          # on the GPU machine
    python -m bench.gpu.structured_offline --tiny --out DIR   # the CPU smoke run

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

from bench.gpu.common import TOKENIZER_DIR, assemble_model
from bench.gpu.engines import GPU_CONFIGS, TINY_CONFIGS, llm_kwargs
from bench.gpu.run import GPU_SIZES, TINY_SIZES
from bench.gpu.structured_outputs import ORDER, SCHEMA
from bench.gpu.workload import Tokens, bulk_prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--config", default="t512")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="so-")))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    cfg = (TINY_CONFIGS if args.tiny else GPU_CONFIGS)[args.config]
    work = bulk_prompts(Tokens(TOKENIZER_DIR), name="bulk", count=sizes.bulk,
                        prompt_tokens=sizes.prompt_tokens, max_tokens=sizes.max_tokens, seed=1)
    args.out.mkdir(parents=True, exist_ok=True)
    model = assemble_model("135m" if args.tiny else "1.7b", args.out)
    llm = LLM(model=str(model), **llm_kwargs(cfg))
    plain = SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
    schema = SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.generate(work.prompts[:8], [schema] * 8, use_tqdm=False)  # the grammar compiles once
    runs: dict[str, list[dict]] = {"plain": [], "schema": []}
    for kind in ORDER:
        params = schema if kind == "schema" else plain
        t0 = time.perf_counter()
        outputs = llm.generate(work.prompts, params, use_tqdm=False)
        wall_s = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        runs[kind].append({"wall_s": round(wall_s, 3), "output_tokens": tokens,
                           "tokens_per_s": round(tokens / wall_s, 1)})
        print(f"{kind}: {tokens / wall_s:,.0f} tok/s ({wall_s:.1f} s)", flush=True)
    rate = {k: sum(r["output_tokens"] for r in v) / sum(r["wall_s"] for r in v)
            for k, v in runs.items()}
    report = {"config": args.config, "tiny": args.tiny, "tasks": len(work.prompts),
              "max_tokens": work.max_tokens, "runs": runs,
              "plain_tokens_per_s": round(rate["plain"], 1),
              "schema_tokens_per_s": round(rate["schema"], 1),
              "vs_plain": round(rate["schema"] / rate["plain"], 3),
              "commit": os.environ.get("BENCH_COMMIT", "")}
    (args.out / "structured_offline.json").write_text(json.dumps(report, indent=1))
    print(f"offline vLLM: schema tokens/s = {report['vs_plain']} x plain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
