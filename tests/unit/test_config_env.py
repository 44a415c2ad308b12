"""Every environment variable of the runtime is checked when first read (neuron_client.wire.config): a bad value
raises an error naming the variable, the value and an example; good values are parsed once and cached."""
from __future__ import annotations

import pytest

from neuron_client.wire import config
from neuron_client.wire.errors import ConfigError, NeuronCoreSpecError


@pytest.mark.parametrize("text, seconds", [("10", 10.0), ("2.5", 2.5), ("10s", 10.0), ("500ms", 0.5), (" 7 ", 7.0)])
def test_call_timeout_takes_seconds_with_or_without_a_unit(monkeypatch, text, seconds):
    monkeypatch.setenv(config.ENV_CALL_TIMEOUT, text)
    assert config.call_timeout_s() == seconds


@pytest.mark.parametrize("name, text, accessor, example", [
    (config.ENV_CALL_TIMEOUT, "ten", config.call_timeout_s, "NEURON_CALL_TIMEOUT=30"),
    (config.ENV_CALL_TIMEOUT, "0", config.call_timeout_s, "NEURON_CALL_TIMEOUT=30"),
    (config.ENV_CALL_TIMEOUT, "-1s", config.call_timeout_s, "NEURON_CALL_TIMEOUT=30"),
    (config.ENV_SHM_THRESHOLD, "64 apples", config.shm_threshold_bytes, "NEURON_SHM_THRESHOLD_BYTES=65536"),
    (config.ENV_SHM_THRESHOLD, "-5", config.shm_threshold_bytes, "NEURON_SHM_THRESHOLD_BYTES=65536"),
    (config.ENV_SHM_THRESHOLD, "1.5", config.shm_threshold_bytes, "NEURON_SHM_THRESHOLD_BYTES=65536"),
    (config.ENV_AUTOSTART, "maybe", config.autostart_enabled, "NEURON_BROKER_AUTOSTART=0"),
    (config.ENV_BROKER_ADDRESS, "localhost:7700", config.broker_address, "NEURON_BROKER_ADDRESS=tcp://"),
])
def test_a_bad_value_names_the_variable_the_value_and_an_example(monkeypatch, name, text, accessor, example):
    monkeypatch.setenv(name, text)
    with pytest.raises(ConfigError) as info:
        accessor()
    message = str(info.value)
    assert message.startswith(f"{name}={text.strip()!r} is not ") and example in message, message
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError):  # every process start checks them all
        config.validate_env()


def test_acquire_timeout_is_part_of_the_core_request(monkeypatch):
    monkeypatch.setenv(config.ENV_ACQUIRE_TIMEOUT, "soon")
    with pytest.raises(NeuronCoreSpecError, match=r"NEURON_RT_ACQUIRE_TIMEOUT='soon' is not a number of seconds"):
        config.acquire_timeout_s()
    assert config.acquire_timeout_s({config.ENV_ACQUIRE_TIMEOUT: "1.5s"}) == 1.5  # another environment, uncached
    monkeypatch.delenv(config.ENV_ACQUIRE_TIMEOUT)
    assert config.acquire_timeout_s() == 0.0


@pytest.mark.parametrize("text, size", [("65536", 65536), ("64k", 65536), ("64KiB", 65536), ("1M", 1 << 20),
                                        ("16 kb", 16384), ("0", 0)])
def test_shm_threshold_takes_units(monkeypatch, text, size):
    monkeypatch.setenv(config.ENV_SHM_THRESHOLD, text)
    assert config.shm_threshold_bytes() == size


def test_flags_and_defaults(monkeypatch):
    for text, value in (("0", False), ("off", False), ("YES", True), ("1", True)):
        monkeypatch.setenv(config.ENV_AUTOSTART, text)
        assert config.autostart_enabled() is value
    for name in (config.ENV_AUTOSTART, config.ENV_CALL_TIMEOUT, config.ENV_SHM_THRESHOLD):
        monkeypatch.delenv(name, raising=False)
    assert config.autostart_enabled() is True
    assert config.call_timeout_s() == config.DEFAULT_CALL_TIMEOUT_S
    assert config.shm_threshold_bytes() == config.SHM_THRESHOLD_BYTES


def test_parsed_once_per_value_and_again_when_it_changes(monkeypatch):
    calls = []
    parse = config.parse_seconds

    def counting(*args, **kwargs):
        calls.append(args[1])
        return parse(*args, **kwargs)

    monkeypatch.setattr(config, "parse_seconds", counting)
    monkeypatch.setenv(config.ENV_CALL_TIMEOUT, "12")
    assert [config.call_timeout_s() for _ in range(100)] == [12.0] * 100
    monkeypatch.setenv(config.ENV_CALL_TIMEOUT, "13")
    assert config.call_timeout_s() == 13.0
    assert calls == ["12", "13"]


def test_fast_path_variables_are_checked(monkeypatch):
    monkeypatch.setenv("NEURON_FAST_PATH", "0")
    assert config.fast_path_enabled() is False
    monkeypatch.setenv("NEURON_FAST_PATH", "maybe")
    with pytest.raises(ConfigError, match="NEURON_FAST_PATH='maybe'"):
        config.fast_path_enabled()
    monkeypatch.setenv("NEURON_FAST_PATH_SPIN_US", "50us")
    assert config.fast_path_spin_us() == 50
    monkeypatch.setenv("NEURON_FAST_PATH_SPIN_US", "-3")
    with pytest.raises(ConfigError, match="NEURON_FAST_PATH_SPIN_US='-3'.*0: never spin"):
        config.fast_path_spin_us()
    monkeypatch.delenv("NEURON_FAST_PATH_SPIN_US")
    assert config.fast_path_spin_us() is None
