"""A model's engine settings as vLLM's `AsyncEngineArgs` keywords, and their check.

`engine_kwargs` is the one place a `ModelSpec` becomes vLLM's keywords: the worker's engine
(workers/vllm_engine.py) starts with them, and the model registry checks a version with the
same ones at registration (`check_engine_args`), so that what vLLM would refuse at a worker's
start is refused before anything routes to the version.  vLLM is imported only by the check
(a client install has none).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from agentfleet.schemas.errors import ValidationError
from agentfleet.schemas.settings import ModelSpec


def engine_kwargs(spec: ModelSpec, model_path: Path | str, *, dtype: str | None = None,
                  sleep_mode: bool = False) -> dict[str, object]:
    """`AsyncEngineArgs` keywords of a model: its ModelSpec fields, then its `engine_args`
    (any other vLLM argument, or one of those overridden), and sleep mode when asked."""
    kwargs: dict[str, object] = dict(
        model=str(model_path),
        served_model_name=spec.name,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs + spec.spare_seqs,  # the spare: workers/admission.py
        max_num_batched_tokens=spec.max_num_batched_tokens,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        enable_prefix_caching=spec.enable_prefix_caching,
        enforce_eager=spec.enforce_eager,
        dtype=dtype or spec.dtype,
        scheduling_policy=spec.scheduling_policy,
        load_format=spec.load_format,
        seed=spec.seed,
        # Stats on: they carry each request's first-token time (RequestOutput.metrics).
        disable_log_stats=False,
        enable_log_requests=False,
    )
    kwargs.update(spec.engine_args)
    if sleep_mode:
        kwargs["enable_sleep_mode"] = True
    return kwargs


@functools.cache
def _vllm_fields() -> frozenset[str]:
    from vllm import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def sleep_mode_available() -> bool:
    """Whether this machine's vLLM platform has sleep mode (CUDA, ROCm, XPU: not the CPU)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def check_engine_args(spec: ModelSpec, model_path: Path) -> None:
    """Refuse engine settings vLLM would refuse: an unknown argument, a value out of its
    bounds, a combination its configuration rejects (checked by building vLLM's own engine
    configuration from the model's config.json, as a worker's start does; nothing is
    loaded).  Sleep mode is left out where the platform lacks it: a worker there runs the
    engine awake (docs/versions.md).  A typed `ValidationError` names the argument."""
    try:
        from vllm import AsyncEngineArgs
    except ImportError as exc:
        raise ValidationError(
            "engine_args", "vLLM is not installed here, so the engine settings cannot be "
            "checked: register from a worker's image, or skip the check (check_engine=False, "
            "`--no-engine-check`)") from exc
    for name in spec.engine_args:
        if name not in _vllm_fields():
            raise ValidationError(f"engine_args.{name}", "not an engine argument of this "
                                  "vLLM (AsyncEngineArgs)", value=name)
    kwargs = engine_kwargs(spec, model_path, sleep_mode=bool(spec.sleep_group))
    if kwargs.get("enable_sleep_mode") and not sleep_mode_available():
        kwargs["enable_sleep_mode"] = False
    try:
        AsyncEngineArgs(**kwargs).create_engine_config()
    except Exception as exc:  # pydantic's ValidationError, ValueError, TypeError, ...
        text = " ".join(str(exc).split())
        raise ValidationError("engine_args", f"vLLM refuses them: {type(exc).__name__}: "
                              f"{text[:600]}", value=spec.engine_args) from exc
