"""What the model-version tests share: fake engines per version, a model directory the
registry accepts, and waiting for a condition."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agentfleet.workers.fake_engine import FakeEngine


def model_directory(path: Path) -> Path:
    """A directory that passes the registry's check (config.json); the fake engine loads
    nothing from it."""
    (path / "config.json").write_text("{}")
    return path


def fake_factory(**by_version):
    """An engine factory: FakeEngine(model_version=<version>, **by_version[<version>]); the
    engines made are kept in `.made` by version."""
    made: dict[str, FakeEngine] = {}

    def make(spec):
        engine = FakeEngine(model_version=spec.version or "fake-1",
                            **by_version.get(spec.version, {}))
        made[spec.version] = engine
        return engine

    make.made = made
    return make


async def wait_until(check, timeout_s: float = 10.0, what: str = ""):
    """Poll `check` (sync or async) every 50 ms until it returns something true."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check() if asyncio.iscoroutinefunction(check) else check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(0.05)
