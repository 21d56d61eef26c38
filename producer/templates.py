"""Prompt templates as versioned objects: `summarise@3`, a prompt or chat messages with
`{variable}` places, rendered once at submit by the producer.

    await TemplateRegistry(redis).register("summarise", prompt="Summarise: {doc}", who="ops")
    await producer.submit(model="m", template="summarise", variables={"doc": text})

A template's versions never change once registered (a new text is a new version); the
registry keeps them in one hash (`keys.templates()`, "<name>@<n>" -> msgpack
PromptTemplate), bumps the model registry's version (producers reload both together) and
audits each registration (kind "template").  A task naming a template by name gets the
version its model version declares (`ModelVersion.templates`), else the newest; its result
records which one (`Result.template`), beside the model version that ran it.  Placeholders
are `{name}` (letters, digits, '_'); `{{` and `}}` are literal braces; nothing else is
evaluated.
"""

from __future__ import annotations

import re
import time

import msgspec
import redis.asyncio as aioredis

from agentfleet.producer.models import Write, watched_change
from agentfleet.schemas import keys
from agentfleet.schemas.errors import ValidationError
from agentfleet.schemas.validate import ROLES
from agentfleet.schemas.wire import AuditEntry, Message, PromptTemplate, decode_template

_PLACE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_TEMPLATE_CHARS = 1_000_000
MAX_VARIABLE_CHARS = 1_000_000


def placeholders(text: str) -> set[str]:
    return {m.group(1) for m in _PLACE.finditer(text) if m.group(1)}


def _fill(text: str, values: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1)
        if name is None:
            return m.group(0)[0]  # "{{" -> "{", "}}" -> "}"
        return values[name]

    return _PLACE.sub(one, text)


def render(template: PromptTemplate, variables: dict[str, str]
           ) -> tuple[str | None, list[Message] | None]:
    """The prompt or messages of `template` with `variables` filled in; a `ValidationError`
    names a variable that is missing or not the template's."""
    declared = set(template.variables)
    for name in sorted(declared - variables.keys()):
        raise ValidationError(f"variables.{name}", f"missing: {template.ref} needs "
                              f"{sorted(declared)}", limit=sorted(declared), value=None)
    for name in sorted(variables.keys() - declared):
        raise ValidationError(f"variables.{name}", f"not a variable of {template.ref} "
                              f"({sorted(declared)})", limit=sorted(declared), value=name)
    for name, value in variables.items():
        if not isinstance(value, str) or len(value) > MAX_VARIABLE_CHARS:
            raise ValidationError(f"variables.{name}", f"must be a string of at most "
                                  f"{MAX_VARIABLE_CHARS} characters", limit=MAX_VARIABLE_CHARS)
    if template.prompt is not None:
        return _fill(template.prompt, variables), None
    return None, [Message(role=m.role, content=_fill(m.content, variables))
                  for m in template.messages or ()]


class TemplateRegistry:
    """Registers and reads prompt templates; every registration is audited."""

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis

    async def get(self, ref: str) -> PromptTemplate | None:
        raw = await self.redis.hget(keys.templates(), ref)
        return decode_template(raw) if raw is not None else None

    async def list(self) -> list[PromptTemplate]:
        raw = await self.redis.hvals(keys.templates())
        return sorted((decode_template(v) for v in raw), key=lambda t: (t.name, t.version))

    async def register(self, name: str, *, prompt: str | None = None,
                       messages: list[Message] | None = None,
                       variables: list[str] | None = None, note: str = "", who: str = "",
                       why: str = "") -> PromptTemplate:
        """The next version of template `name` (1 for a new name).  Its variables are the
        placeholders it holds; `variables`, when given, must name the same ones."""
        if not keys.valid_model_name(name) or "@" in name:
            raise ValidationError("name", f"{name!r}: use letters, digits, '.', '_' or '-'",
                                  value=name)
        if (prompt is None) == (messages is None):
            raise ValidationError("prompt", "give a prompt or messages, not both nor neither")
        texts = [prompt] if prompt is not None else [m.content for m in messages or ()]
        if messages is not None:
            if not messages:
                raise ValidationError("messages", "is empty", limit=1, value=0)
            for i, m in enumerate(messages):
                if m.role not in ROLES:
                    raise ValidationError(f"messages[{i}].role", f"{m.role!r} is not one of "
                                          f"{sorted(ROLES)}", value=m.role)
        if sum(len(t) for t in texts) > MAX_TEMPLATE_CHARS or not any(t.strip() for t in texts):
            raise ValidationError("prompt", f"must hold 1..{MAX_TEMPLATE_CHARS} characters",
                                  limit=MAX_TEMPLATE_CHARS)
        found = set().union(*(placeholders(t) for t in texts))
        if variables is not None and set(variables) != found:
            raise ValidationError("variables", f"{sorted(variables)} are not the placeholders "
                                  f"of the text, {sorted(found)}", limit=sorted(found),
                                  value=sorted(variables))
        async def step(pipe) -> Write:
            raw = await pipe.hvals(keys.templates())
            versions = [t.version for t in map(decode_template, raw) if t.name == name]
            template = PromptTemplate(name=name, version=max(versions, default=0) + 1,
                                      prompt=prompt, messages=messages, variables=sorted(found),
                                      created_at=time.time(), note=note)
            return Write(keys.templates(), template.ref, template, AuditEntry(
                kind="template", subject=name, action="register", who=who, why=why,
                at=template.created_at, after=msgspec.to_builtins(template)))

        # WATCH the templates: a concurrent registration of the same name takes the next one
        return await watched_change(self.redis, keys.templates(), step,
                                    f"registering template {name}")


__all__ = ["TemplateRegistry", "placeholders", "render"]
