"""Settings are checked when loaded (a range on every number, words among their values), and
the README's configuration table is checked against `Settings`, so the docs cannot drift."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import msgspec
import pytest

from agentfleet.schemas.errors import FatalConfigError, InvalidSettingError
from agentfleet.schemas.settings import (
    DEFAULT_MODEL,
    ENV_PREFIX,
    ModelSpec,
    Settings,
    _bounds,
    variable,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("env, allowed", [
    ({"AGENTFLEET_MAX_INFLIGHT": "-5"}, ">= 1"),
    ({"AGENTFLEET_READ_COUNT": "0"}, ">= 1"),
    ({"AGENTFLEET_BLOCK_MS": "0"}, ">= 1"),  # BLOCK 0 would wait forever
    ({"AGENTFLEET_BULK_MAX_SHARE": "0"}, "> 0 and <= 1"),
    ({"AGENTFLEET_BULK_MAX_SHARE": "1.01"}, "> 0 and <= 1"),
    ({"AGENTFLEET_METRICS_PORT": "65536"}, "0..65535"),
    ({"AGENTFLEET_RESULT_TTL_S": "0"}, ">= 1"),
    ({"AGENTFLEET_KPI_TTL_S": "-1"}, ">= 0"),
    ({"AGENTFLEET_TRIM_INTERVAL_S": "0"}, "> 0"),
    ({"AGENTFLEET_FAKE_DELAY_S": "-0.1"}, ">= 0"),
    ({"AGENTFLEET_ENGINE": "bogus"}, "one of 'vllm', 'fake'"),
    ({"AGENTFLEET_LOG_FORMAT": "xml"}, "one of 'auto', 'json', 'text'"),
    ({"AGENTFLEET_CRASH_AT": "later"}, "one of '', 'before_commit', 'after_commit'"),
    ({"REDIS_URL": "localhost:6379"}, "redis://"),
    ({"AGENTFLEET_READ_COUNT": "many"}, "a whole number"),
    ({"AGENTFLEET_WINDOW_MS": "soon"}, "a number"),
])
def test_a_value_out_of_range_names_the_variable_its_value_and_what_is_allowed(env, allowed):
    (name, raw), = env.items()
    with pytest.raises(InvalidSettingError) as caught:
        Settings.from_env(env)
    exc = caught.value
    assert exc.variable == name and allowed in exc.allowed
    assert str(exc).startswith(f"{name}=") and raw in str(exc)
    assert isinstance(exc, FatalConfigError)


def test_every_number_of_settings_and_model_spec_has_a_range():
    for cls in (Settings, ModelSpec):
        bounded = {name for name, _ in _bounds(cls)}
        numbers = {f.name for f in msgspec.structs.fields(cls)
                   if _base(f.type) in (int, float)}
        assert numbers <= bounded, f"{cls.__name__}: no range on {sorted(numbers - bounded)}"


def test_settings_made_in_code_are_checked_too():
    with pytest.raises(InvalidSettingError, match="AGENTFLEET_MAX_ATTEMPTS=0"):
        Settings(max_attempts=0)
    with pytest.raises(InvalidSettingError, match=r"\[models.m\] scheduling_policy='lifo'"):
        ModelSpec(name="m", scheduling_policy="lifo")
    with pytest.raises(InvalidSettingError, match=r"max_num_batched_tokens=0"):
        ModelSpec(name="m", max_num_batched_tokens=0)
    assert ModelSpec(name="m", max_num_batched_tokens=None).max_num_batched_tokens is None


def test_a_models_file_value_out_of_range_names_the_file_and_the_field(tmp_path):
    f = tmp_path / "models.toml"
    f.write_text("[models.big]\nmax_num_seqs = 0\n")
    with pytest.raises(InvalidSettingError) as caught:
        Settings.from_env({"AGENTFLEET_MODELS_FILE": str(f), "AGENTFLEET_DEFAULT_MODEL": "big"})
    assert str(caught.value) == f"[models.big] max_num_seqs in {f}=0: must be >= 1"
    f.write_text("[models.big]\ngpu_memory_utilization = 1.5\n")
    with pytest.raises(InvalidSettingError, match="gpu_memory_utilization"):
        Settings.from_env({"AGENTFLEET_MODELS_FILE": str(f), "AGENTFLEET_DEFAULT_MODEL": "big"})


# ---- the README's tables against the code ---------------------------------------------------

def _base(type_: object) -> object:
    args = getattr(type_, "__args__", None)
    if getattr(type_, "__metadata__", None):  # Annotated[int, Bound(...)]
        return args[0]
    if args and type(None) in args:  # Count | None
        return _base(next(a for a in args if a is not type(None)))
    return type_


def _table(text: str, header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def _documented_default_matches(field: str, default: object, cell: str) -> bool:
    if field == "home":
        return Path(_ticked(cell)[0]).expanduser() == Settings().home_path
    if field == "worker_id":
        return (_ticked(cell) == ["<host>-<pid>"]
                and Settings().resolved_worker_id() == f"{socket.gethostname()}-{os.getpid()}")
    if isinstance(default, bool):
        return cell.split()[0] == str(default).lower()
    if isinstance(default, int | float):
        return float(cell.split()[0].strip("`")) == default
    if default == "":
        return cell in ("unset", '`""`')
    if default == {}:
        return cell == "`{}`"
    return _ticked(cell)[:1] == [default]


def _other_value(field: str, default: object) -> str:
    """A valid value other than the default, as the environment would carry it."""
    bounds = dict(_bounds(Settings))
    if isinstance(default, bool):
        return str(not default).lower()
    if field in bounds and bounds[field].one_of:
        return next(v for v in bounds[field].one_of if v != default)
    if field == "redis_url":
        return "redis://doc:1/0"
    if field == "bulk_max_share":
        return "0.5"
    if isinstance(default, int | float):
        return str(default + 1)
    return "other"


def test_the_configuration_table_lists_every_setting_with_its_variable_and_default():
    rows = {r[0]: r for r in _table((ROOT / "README.md").read_text(),
                                    "| setting | variable | default | meaning |")}
    fields = {f.name: f for f in msgspec.structs.fields(Settings)}
    assert sorted(set(rows) - set(fields)) == [], "rows for settings that do not exist"
    assert sorted(set(fields) - set(rows)) == [], "settings missing from the README table"
    defaults = Settings()
    for name, (_, var_cell, default_cell, meaning) in rows.items():
        assert meaning, name
        if name == "models":
            assert _ticked(var_cell)[0] == f"{ENV_PREFIX}MODELS_FILE"
            assert _ticked(default_cell) == list(defaults.models) == [DEFAULT_MODEL]
            continue
        assert _ticked(var_cell)[0] == variable(name), (name, var_cell)
        default = getattr(defaults, name)
        assert _documented_default_matches(name, default, default_cell), (name, default_cell)
        # The documented variable (and its alternative name) is what from_env reads.
        for var in _ticked(var_cell):
            if name == "default_model":
                continue  # only the configured models are allowed; checked below
            value = Settings.from_env({var: _other_value(name, default)})
            assert getattr(value, name) != default, (name, var)
    assert Settings.from_env({"AGENTFLEET_DEFAULT_MODEL": DEFAULT_MODEL}).default_model \
        == DEFAULT_MODEL


def test_the_models_file_table_lists_every_model_field_with_its_default():
    rows = {r[0]: r for r in _table((ROOT / "README.md").read_text(),
                                    "| field | default | meaning |")}
    fields = {f.name: f for f in msgspec.structs.fields(ModelSpec) if f.name != "name"}
    assert sorted(set(rows) ^ set(fields)) == []
    default_model = Settings().models[DEFAULT_MODEL]
    for name, (_, cell, meaning) in rows.items():
        assert meaning, name
        field = fields[name]
        default = field.default_factory() if field.default is msgspec.NODEFAULT \
            else field.default
        assert _documented_default_matches(name, default, cell), (name, cell)
        # "(64 for the default CPU model)": what the default model's spec overrides
        own = re.search(r"\((\S+) for the default CPU model\)", cell)
        if own:
            assert _documented_default_matches(name, getattr(default_model, name),
                                               own.group(1)), (name, cell)
        else:
            assert getattr(default_model, name) == default, f"{name}: document the override"


def test_every_variable_the_docs_name_is_read_by_the_code():
    """A documented variable that nothing reads does nothing (AGENTFLEET_OTEL was one)."""
    read = {variable(f.name) for f in msgspec.structs.fields(Settings)}
    read |= {ENV_PREFIX + f.name.upper() for f in msgspec.structs.fields(Settings)}
    read.add(f"{ENV_PREFIX}MODELS_FILE")
    code = "\n".join(p.read_text()  # tests too: a variable for running them (not this file)
                     for d in ("schemas", "producer", "workers", "ops", "bench", "tests")
                     for p in (ROOT / d).rglob("*.py") if p.name != "test_settings.py")
    read |= set(re.findall(r"[\"'](AGENTFLEET_[A-Z0-9_]+)[\"']", code))
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "bench" / "README.md"]
    for doc in docs:
        named = set(re.findall(r"AGENTFLEET_[A-Z0-9_]+", doc.read_text()))
        assert named <= read, f"{doc.name} names variables nothing reads: {named - read}"
