"""What every spawned benchmark child runs: one of its module's child coroutines, under uvloop.

Each benchmark module keeps a top-level `_child(name, out, *args)` (spawn needs a function
it can import by name) that hands its own `_CHILDREN` table to `run_child`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping


def run_child(children: Mapping[str, Callable], name: str, out, *args) -> None:
    """Run `children[name](out.put, *args)`; any failure reaches the parent as ("error", text)."""
    try:
        import uvloop

        uvloop.install()
        import asyncio

        asyncio.run(children[name](out.put, *args))
    except BaseException:  # noqa: BLE001 - the parent must hear about any failure
        out.put(("error", f"{name}: {traceback.format_exc()}"))
        raise SystemExit(1) from None
