"""Pure unit tests of the wire format, keys and settings (no server)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from agentfleet.schemas import keys
from agentfleet.schemas.errors import DecodeError, FatalConfigError, UnsupportedVersionError, ValidationError
from agentfleet.schemas.settings import ModelSpec, Settings, parse_bool
from agentfleet.schemas.validate import validate_task
from agentfleet.schemas.wire import SCHEMA_VERSION, Result, Sampling, Status, Task, decode_task, encode


def test_round_trip_and_defaults_left_off_the_wire():
    task = Task(model="m1", prompt="hi", id="t1")
    data = encode(task)
    assert decode_task(data) == task
    assert b"temperature" not in data  # defaults are omitted


def test_newer_payload_with_unknown_fields_still_decodes():
    newer = msgspec.msgpack.encode({"v": SCHEMA_VERSION, "id": "t", "model": "m1",
                                    "prompt": "x", "brand_new_field": {"a": 1}})
    task = decode_task(newer)
    assert task.id == "t" and task.prompt == "x"


def test_newer_major_version_is_named():
    newer = msgspec.msgpack.encode({"v": SCHEMA_VERSION + 1, "id": 5})
    with pytest.raises(UnsupportedVersionError, match="newer"):
        decode_task(newer)


def test_garbage_is_a_decode_error():
    with pytest.raises(DecodeError):
        decode_task(b"\xc1\x00")


@given(st.binary(max_size=200))
@hsettings(max_examples=300, deadline=None)
def test_decoder_raises_only_typed_errors(data):
    try:
        decode_task(data)
    except DecodeError:
        pass


@given(max_tokens=st.integers(-5, 5000), temperature=st.one_of(st.floats(-1, 5), st.just(float("nan"))),
       top_p=st.one_of(st.floats(-1, 2), st.just(float("nan"))), priority=st.integers(-3, 12))
@hsettings(max_examples=300, deadline=None)
def test_validator_accepts_exactly_the_bounds(max_tokens, temperature, top_p, priority):
    s = Settings(models={"m1": ModelSpec(name="m1", max_model_len=512)}, default_model="m1")
    task = Task(model="m1", prompt="x", priority=priority,
                sampling=Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p))
    ok = (1 <= max_tokens <= 512 and 0 <= temperature <= 2 and 0 < top_p <= 1
          and 0 <= priority <= 9)
    try:
        validate_task(task, s)
        assert ok
    except ValidationError as exc:
        assert not ok
        assert exc.field in ("sampling.max_tokens", "sampling.temperature", "sampling.top_p",
                             "priority")


def test_keys_share_one_hash_slot_per_model():
    from redis.crc import key_slot  # the slot a Redis Cluster gives a key

    model = "smollm2-135m"
    built = [keys.task_stream(model), keys.result_key(model, "t1"),
             keys.reply_stream(model, "p1"), keys.trace_key(model, "c1"),
             keys.stats_key(model), keys.idempotency_key(model, "k"), keys.workers_key(model),
             keys.bulk_stream(model), keys.dead_stream(model), keys.delayed_key(model)]
    assert {key_slot(k.encode()) for k in built} == {key_slot(model.encode())}


def test_settings_from_env_and_models_file(tmp_path):
    f = tmp_path / "models.toml"
    f.write_text('[models.small]\nmax_model_len = 1024\n[models.big]\npath = "/m"\n')
    s = Settings.from_env({"REDIS_URL": "redis://x:1/0", "AGENTFLEET_MODELS_FILE": str(f),
                           "AGENTFLEET_DEFAULT_MODEL": "small", "AGENTFLEET_BLOCK_MS": "7",
                           "AGENTFLEET_TRACE_ENABLED": "off", "AGENTFLEET_WINDOW_MS": "2.5"})
    assert s.redis_url == "redis://x:1/0"
    assert s.models["small"].max_model_len == 1024 and s.models["big"].path == "/m"
    assert (s.block_ms, s.trace_enabled, s.window_ms) == (7, False, 2.5)


@pytest.mark.parametrize("env", [{"AGENTFLEET_BLOCK_MS": "soon"},
                                 {"AGENTFLEET_TRACE_ENABLED": "maybe"},
                                 {"AGENTFLEET_DEFAULT_MODEL": "nope"}])
def test_bad_settings_are_fatal_and_named(env):
    with pytest.raises(FatalConfigError, match=list(env)[0]):
        Settings.from_env(env)


def test_parse_bool():
    assert parse_bool("x", "Yes") and not parse_bool("x", "0")


def test_result_ok():
    assert Result(task_id="t", status=Status.SUCCEEDED).ok
    assert not Result(task_id="t", status=Status.FAILED).ok

