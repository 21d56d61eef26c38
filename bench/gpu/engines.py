"""Engine settings, written once and rendered for each path: `LLM(...)` keywords, `vllm serve`
flags, and the fleet's models file.  A setting left out (None) is the path's own default, so
"defaults" means what each path does when nobody tunes it.
"""

from __future__ import annotations

import msgspec


class EngineConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The engine settings a run uses; None: the path's own default."""

    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool | None = None
    dtype: str | None = None
    load_format: str | None = None
    seed: int | None = None
    scheduling_policy: str | None = None  # "fcfs" | "priority" (the fleet's default)
    kv_cache_space_gib: int | None = None  # CPU engine only (VLLM_CPU_KVCACHE_SPACE)
    # the fleet's worker (ignored by the other paths)
    max_inflight: int | None = None
    read_count: int | None = None


_COMMON = dict(gpu_memory_utilization=0.45, load_format="dummy")
_PINNED = dict(_COMMON, max_model_len=2048, enable_prefix_caching=True, dtype="bfloat16", seed=0)

# "same": what the fleet runs with when nobody tunes it (ModelSpec's defaults, and the
# token budget AsyncLLM then picks: 2048), pinned for all three paths so that they match.
# "tNNN": the tuned candidates.  "defaults": each path's own defaults (`vllm serve` on an
# H100: max_num_seqs 1024, max_num_batched_tokens 8192, max_model_len from config.json).
GPU_CONFIGS: dict[str, EngineConfig] = {
    "same": EngineConfig(**_PINNED, max_num_seqs=256, max_num_batched_tokens=2048),
    "t512": EngineConfig(**_PINNED, max_num_seqs=512, max_num_batched_tokens=8192,
                         max_inflight=1024, read_count=512),
    "t1024": EngineConfig(**_PINNED, max_num_seqs=1024, max_num_batched_tokens=16384,
                          max_inflight=2048, read_count=1024),
    "t1024b8k": EngineConfig(**_PINNED, max_num_seqs=1024, max_num_batched_tokens=8192,
                             max_inflight=2048, read_count=1024),
    "defaults": EngineConfig(**_COMMON),
}

# The CPU smoke run (--tiny): small and eager, so that each engine starts in about 30 s.
_TINY = dict(load_format="dummy", max_model_len=512, enable_prefix_caching=True,
             dtype="bfloat16", seed=0, enforce_eager=True, kv_cache_space_gib=1)
TINY_CONFIGS: dict[str, EngineConfig] = {
    "same": EngineConfig(**_TINY, max_num_seqs=8, max_num_batched_tokens=2048),
    "t512": EngineConfig(**_TINY, max_num_seqs=16, max_num_batched_tokens=2048,
                         max_inflight=32, read_count=16),
    "t1024": EngineConfig(**_TINY, max_num_seqs=16, max_num_batched_tokens=4096,
                          max_inflight=32, read_count=16),
    "t1024b8k": EngineConfig(**_TINY, max_num_seqs=16, max_num_batched_tokens=2048,
                             max_inflight=32, read_count=16),
    "defaults": EngineConfig(load_format="dummy", enforce_eager=True, max_model_len=512,
                             kv_cache_space_gib=1),
}

# a512: t512 with room for the affinity phase's conversations (a 2,000-token system prompt
# and four turns).
GPU_CONFIGS["a512"] = msgspec.structs.replace(GPU_CONFIGS["t512"], max_model_len=4096)
TINY_CONFIGS["a512"] = msgspec.structs.replace(TINY_CONFIGS["t512"], max_model_len=1024)

# t512f, t512p: t512 with one of vLLM's two schedulers pinned on every path (the fleet's
# default is priority).
for _configs in (GPU_CONFIGS, TINY_CONFIGS):
    for _policy in ("fcfs", "priority"):
        _configs["t512" + _policy[0]] = msgspec.structs.replace(_configs["t512"],
                                                                scheduling_policy=_policy)

_ENGINE_FIELDS = ("max_model_len", "max_num_seqs", "max_num_batched_tokens",
                  "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager", "dtype",
                  "load_format", "seed", "scheduling_policy")


def llm_kwargs(cfg: EngineConfig) -> dict:
    """Keywords for `vllm.LLM` / `EngineArgs`: only the settings that are set."""
    return {f: getattr(cfg, f) for f in _ENGINE_FIELDS if getattr(cfg, f) is not None}


def serve_flags(cfg: EngineConfig) -> list[str]:
    """`vllm serve` flags for the settings that are set."""
    flags: list[str] = []
    for name, value in llm_kwargs(cfg).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def models_toml(cfg: EngineConfig, *, name: str, path: str) -> str:
    """The fleet's models file: one `[models.NAME]` table (ModelSpec fields)."""
    lines = [f"[models.{name}]", f'path = "{path}"', 'version = "dummy-weights"']
    values = llm_kwargs(cfg)
    if cfg.kv_cache_space_gib is not None:
        values["kv_cache_space_gib"] = cfg.kv_cache_space_gib
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"
