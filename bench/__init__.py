"""Benchmarks: each module prints PASS or FAIL per target; results in docs/benchmarks.md.

A checkout that was not pip-installed (the GPU machines carry the working tree only) has no
`agentfleet` package on its path: the repository root is that package, so register it here,
before any benchmark module imports it.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("agentfleet") is None:
    _root = Path(__file__).resolve().parent.parent
    _spec = importlib.util.spec_from_file_location(
        "agentfleet", _root / "__init__.py", submodule_search_locations=[str(_root)])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["agentfleet"] = _module
    _spec.loader.exec_module(_module)
