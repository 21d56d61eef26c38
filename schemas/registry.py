"""The model registry as every process sees it: its entries checked, routed by weight, turned
into engine settings, and kept fresh.

Producers route with it, workers serve its versions, the exporter and the CLI show it, and
producers and workers may not import each other: so its reader (`load_table`, `TableCache`:
a GET and, when the version moved, two HGETALLs) is here, beside the pure rules; changing it
is producer/models.py's job (`ModelRegistry`, audited).  docs/versions.md says how it is used.

Routing is sticky: a task's correlation id hashes (CRC-32, the same in every process) to a
point in [0, 1); the serving versions with a weight own consecutive ranges of it in
proportion to their weights, canaries first, so that raising a canary's weight moves ids from
the other versions to it and never back.  A chain keeps its version because a follow-up
carries its parent's (`Task.version`), whatever the weights have become since.
"""

from __future__ import annotations

import bisect
import math
import re
import time
import zlib

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentfleet.schemas import keys, tenants
from agentfleet.schemas.errors import BrokerError, ValidationError
from agentfleet.schemas.settings import ModelSpec, Settings
from agentfleet.schemas.wire import (
    ModelEntry,
    ModelVersion,
    PromptTemplate,
    VersionState,
    decode_model_entry,
    decode_template,
)

SLA_CLASSES = ("interactive", "standard", "batch")
SERVING = frozenset((VersionState.ACTIVE, VersionState.CANARY))
MAX_WEIGHT = 1_000_000.0
_SPEC_FIELDS = frozenset(f.name for f in msgspec.structs.fields(ModelSpec)) - {
    "name", "path", "version", "engine_args"}


def check_version_name(version: str, field: str = "version") -> None:
    if not keys.valid_version_name(version):
        raise ValidationError(field, f"{version!r}: use 1..64 letters, digits, '.', '_' or "
                              "'-', starting with a letter or digit", limit=64, value=version)


def check_model_name(model: str, field: str = "model") -> None:
    if not keys.valid_model_name(model):
        raise ValidationError(field, f"{model!r}: use 1..100 letters, digits, '.', '_' or '-'",
                              limit=100, value=model)


def check_weights(weights: dict[str, float], field: str = "weights") -> None:
    """Each weight in [0, MAX_WEIGHT], finite, and their sum above zero."""
    for version, weight in weights.items():
        if not (math.isfinite(weight) and 0 <= weight <= MAX_WEIGHT):
            raise ValidationError(f"{field}.{version}", f"{weight} is outside 0..{MAX_WEIGHT:g}",
                                  limit=(0, MAX_WEIGHT), value=weight)
    if not sum(weights.values()) > 0:
        raise ValidationError(field, "the weights of the serving versions add up to 0: "
                              "nothing could be routed", limit="> 0", value=0)


def parse_target(target: str, model: str) -> tuple[str, str]:
    """A fallback "<model>", "<model>@<version>" or "@<version>" as (model, version)."""
    name, _, version = target.partition("@")
    name = name or model
    check_model_name(name, "fallback")
    if version:
        check_version_name(version, "fallback")
    return name, version


def serving_weights(entry: ModelEntry) -> dict[str, float]:
    return {v.version: v.weight for v in entry.versions.values() if v.state in SERVING}


# ---- the guard of a canary ------------------------------------------------------------------

class GuardRule(msgspec.Struct, frozen=True):
    """One condition of a canary guard: `metric` must stay below `limit` (a ratio for
    error_ratio; seconds, or a multiple of the stable version's figure when `relative`)."""

    metric: str  # error_ratio, p50, p90, p99 (end-to-end latency)
    limit: float
    relative: bool = False

    def __str__(self) -> str:
        if self.metric == "error_ratio":
            return f"error_ratio<{self.limit * 100:g}%"
        return f"{self.metric}<{self.limit:g}{'x' if self.relative else 's'}"


_RULE = re.compile(r"^\s*(error_ratio|p50|p90|p99)\s*<=?\s*([0-9]*\.?[0-9]+)\s*(%|x|s|ms)?\s*$")


def parse_guard(text: str) -> list[GuardRule]:
    """"error_ratio<1%,p99<2x" as rules; a typed error names the condition it cannot read."""
    rules = []
    for part in text.split(","):
        m = _RULE.match(part)
        if m is None:
            raise ValidationError("guard", f"{part.strip()!r}: write METRIC<LIMIT, METRIC one of "
                                  "error_ratio (LIMIT in % or a fraction), p50, p90, p99 "
                                  "(LIMIT in s, ms, or x times the stable version's)",
                                  value=part.strip())
        metric, number, unit = m.group(1), float(m.group(2)), m.group(3) or ""
        if metric == "error_ratio":
            if unit not in ("", "%"):
                raise ValidationError("guard", f"{part.strip()!r}: error_ratio takes % or a "
                                      "fraction", value=part.strip())
            limit = number / 100 if unit == "%" else number
            if not 0 < limit <= 1:
                raise ValidationError("guard", f"{part.strip()!r}: outside (0, 100%]",
                                      limit=(0, 1), value=limit)
            rules.append(GuardRule(metric, limit))
            continue
        if unit in ("", "%"):
            raise ValidationError("guard", f"{part.strip()!r}: a latency takes s, ms or x",
                                  value=part.strip())
        if number <= 0:
            raise ValidationError("guard", f"{part.strip()!r}: must be above 0", value=number)
        rules.append(GuardRule(metric, number / 1000 if unit == "ms" else number, unit == "x"))
    return rules


# ---- the registry at one version -----------------------------------------------------------

class _Routes:
    __slots__ = ("names", "cumulative", "total")

    def __init__(self, entry: ModelEntry):
        order = sorted((v for v in entry.versions.values()
                        if v.state in SERVING and v.weight > 0),
                       key=lambda v: (v.state is not VersionState.CANARY, v.version))
        self.names = [v.version for v in order]
        self.cumulative: list[float] = []
        total = 0.0
        for v in order:
            total += v.weight
            self.cumulative.append(total)
        self.total = total


def route_point(correlation_id: str) -> float:
    """Where a correlation id falls in [0, 1): the same in every process (CRC-32)."""
    return zlib.crc32(correlation_id.encode()) / 4294967296.0


class ModelTable:
    """The registry at one version: entries, templates, and the routing of each model."""

    __slots__ = ("version", "entries", "templates", "latest", "_routes", "_settings")

    def __init__(self, entries: dict[str, ModelEntry] | None = None,
                 templates: dict[str, PromptTemplate] | None = None, version: int = 0):
        self.version = version
        self.entries = entries or {}
        self.templates = templates or {}
        self.latest: dict[str, int] = {}  # template name -> its newest version
        for t in self.templates.values():
            if t.version > self.latest.get(t.name, 0):
                self.latest[t.name] = t.version
        self._routes = {name: _Routes(e) for name, e in self.entries.items()}
        self._settings: tuple[Settings, Settings] | None = None

    def pick(self, model: str, correlation_id: str) -> str:
        """The version a task of `model` with this correlation id goes to (registered models
        only): by weight, sticky."""
        routes = self._routes[model]
        if not routes.names:
            return self.entries[model].stable
        i = bisect.bisect_right(routes.cumulative, route_point(correlation_id) * routes.total)
        return routes.names[min(i, len(routes.names) - 1)]

    def serving(self, model: str) -> list[str]:
        entry = self.entries.get(model)
        if entry is None:
            return []
        return sorted(v.version for v in entry.versions.values() if v.state in SERVING)

    def carry_version(self, model: str, version: str, correlation_id: str) -> str:
        """Where a task that ran (or would run) on `version` of `model` goes next: a
        follow-up of the same model keeps a serving version; one of a retired version goes to
        the stable version; a model without an entry has no versions ("")."""
        entry = self.entries.get(model)
        if entry is None:
            return ""
        v = entry.versions.get(version)
        if v is not None and v.state in SERVING:
            return version
        if version:
            return entry.stable
        return self.pick(model, correlation_id)

    def retry_version(self, model: str, version: str) -> str:
        """Where a retry goes: back to its version if that is active with a share of the
        traffic; a canary's (or a standby's at weight 0, which a canary is just before it
        starts, or a retired one's) to the stable version, where its failures are retried."""
        entry = self.entries.get(model)
        if entry is None:
            return ""
        v = entry.versions.get(version)
        if v is not None and v.state is VersionState.ACTIVE and v.weight > 0:
            return version
        return entry.stable

    def spec(self, model: str, version: str, base: ModelSpec | None = None) -> ModelSpec:
        """The engine settings of one version: the model's (`base`, from the settings' models
        when it has an entry there), overridden by the version's directory, name and engine
        arguments (those ModelSpec knows become its fields, the rest stay engine_args)."""
        v = self.entries[model].versions[version]
        fields = {k: val for k, val in v.engine_args.items() if k in _SPEC_FIELDS}
        extra = {k: val for k, val in v.engine_args.items() if k not in _SPEC_FIELDS}
        base = base or ModelSpec(name=model)
        values = {**msgspec.structs.asdict(base), **fields, "name": model, "path": v.path,
                  "version": version, "engine_args": {**base.engine_args, **extra},
                  "sleep_group": v.sleep_group or base.sleep_group}
        return msgspec.convert(values, ModelSpec)

    def model_spec(self, model: str, base: ModelSpec | None = None) -> ModelSpec:
        """What the producer checks a task of a registered model against, before it knows the
        version: the tightest limits of the versions it serves."""
        specs = [self.spec(model, v, base) for v in self.serving(model)]
        if not specs:
            return base or ModelSpec(name=model)
        tight = min(specs, key=lambda s: s.max_model_len)
        return msgspec.structs.replace(
            tight, version="", max_prompt_chars=min(s.prompt_chars_limit for s in specs))

    def settings_with(self, settings: Settings) -> Settings:
        """`settings` whose models also hold every registered model (its tightest limits):
        what a task is checked against.  Built once per table and settings object."""
        cached = self._settings
        if cached is not None and cached[0] is settings:
            return cached[1]
        if not self.entries:
            merged = settings
        else:
            models = dict(settings.models)
            for name in self.entries:
                models[name] = self.model_spec(name, settings.models.get(name))
            merged = msgspec.structs.replace(settings, models=models)
        self._settings = (settings, merged)
        return merged

    def template(self, ref: str, model: str = "", version: str = "") -> PromptTemplate | None:
        """A template by "<name>@<n>", or by name: the version the model version names in
        its `templates`, else the newest."""
        found = self.templates.get(ref)
        if found is not None or "@" in ref:
            return found
        n = 0
        entry = self.entries.get(model)
        if entry is not None and version in entry.versions:
            n = entry.versions[version].templates.get(ref, 0)
        n = n or self.latest.get(ref, 0)
        return self.templates.get(f"{ref}@{n}") if n else None


async def load_table(redis: aioredis.Redis) -> ModelTable:
    """Every entry and template of the registry and its version, in one round trip."""
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.get(keys.models_version())
            pipe.hgetall(keys.models())
            pipe.hgetall(keys.templates())
            version, raw, raw_templates = await pipe.execute()
    except RedisError as exc:
        raise BrokerError(f"reading the model registry failed: {exc}") from exc
    entries = {name.decode(): decode_model_entry(value) for name, value in raw.items()}
    templates = {ref.decode(): decode_template(value) for ref, value in raw_templates.items()}
    return ModelTable(entries, templates, int(version or 0))


class TableCache(tenants.TableCache):
    """A `ModelTable` kept fresh, as the tenants' table is: `current()` checks the version at
    most every `refresh_s` (one GET) and reloads only when it moved; `fresh` tells whether
    `table` may be used without asking (the producer's hot path awaits nothing then)."""

    version_key = staticmethod(keys.models_version)
    loader = staticmethod(load_table)
    empty = ModelTable
    what = "the model registry"


def new_version(version: str, *, path: str, engine_args: dict | None = None,
                templates: dict[str, int] | None = None, weight: float = 0.0,
                sleep_group: str = "", note: str = "") -> ModelVersion:
    """A version as registered (checked by the registry: names, weight, directory)."""
    return ModelVersion(version=version, path=path, engine_args=dict(engine_args or {}),
                        templates=dict(templates or {}), weight=weight,
                        sleep_group=sleep_group, created_at=time.time(), note=note)


__all__ = ["SERVING", "SLA_CLASSES", "GuardRule", "ModelTable", "TableCache", "check_weights",
           "load_table", "parse_guard", "parse_target", "route_point", "serving_weights"]
