"""The Lua scripts that write the queue's state, read once from their `.lua` files.

Each script lives beside the package that runs it (`producer/lua/`, `workers/lua/`) and opens
with its KEYS/ARGV contract; the Python function that builds its arguments sits in the same
package and names the file.  Installed, the files are package data (pyproject.toml).
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def lua(package: str, name: str, prelude: str = "") -> str:
    """The source of `<package>/lua/<name>.lua`, e.g. lua("agentfleet.workers", "commit"),
    after `schemas/lua/<prelude>.lua` when one is named (functions two scripts share)."""
    source = resources.files(package).joinpath("lua", f"{name}.lua").read_text()
    if prelude:
        source = resources.files("agentfleet.schemas").joinpath(
            "lua", f"{prelude}.lua").read_text() + source
    return source
