"""Every benchmark module imports: a benchmark is run by hand, rarely, so a helper it imports
that was moved or removed would otherwise surface only on the next run (bench/gateway.py
imported bench._child for a day after that module was folded into bench.harness)."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                 for p in (ROOT / "bench").rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("module", MODULES)
def test_benchmark_module_imports(module: str) -> None:
    importlib.import_module(module)


@pytest.mark.parametrize("module", MODULES)
def test_a_module_its_docstring_runs_has_a_main(module: str) -> None:
    """`python -m bench.x` in a module's own docstring runs something (bench/gpu's
    structured_offline lost its main guard for an hour and ran nothing, silently)."""
    source = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
    if f"python -m {module} " in source or f"python -m {module}\n" in source:
        assert 'if __name__ == "__main__":' in source, module
