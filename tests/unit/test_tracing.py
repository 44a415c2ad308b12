"""Unit tests of neuron_client.tracing: metadata saved inside TorchScript files, read back without executing them."""
from __future__ import annotations

import copyreg
import io
import json
import os
import pickle
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from neuron_client.tracing import meta as trace_meta, trace as tracing


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


class Pair(torch.nn.Module):
    def forward(self, x, idx):
        return x * 2, idx + 1


def save_bytes(module, tmp_path, name="m.pt") -> bytes:
    path = tmp_path / name
    torch.jit.save(module, str(path))
    return path.read_bytes()


@pytest.fixture
def traced():
    torch.manual_seed(0)
    return tracing.trace_graph(Affine(), torch.randn(2, 4))


# ----------------------------------------------------------------------------------------------------------------
# trace / save / read back


def test_trace_records_input_specs(traced, tmp_path):
    expected = {"format": trace_meta.META_FORMAT, "inputs": [{"shape": [2, 4], "dtype": "float32"}],
                "lazy_load": False, "async_load": False}
    assert trace_meta.get_meta(traced) == expected
    data = save_bytes(traced, tmp_path)
    assert trace_meta.read_meta(data) == expected
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    assert trace_meta.get_meta(loaded) == expected
    assert loaded.neuron_meta == json.dumps(expected, sort_keys=True)


def test_traced_model_still_computes(traced, tmp_path):
    save_bytes(traced, tmp_path)
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(2, 4)
    assert torch.allclose(loaded(x), traced(x))


def test_trace_with_several_inputs_of_several_dtypes(tmp_path):
    x = torch.randn(3, 5, dtype=torch.float64)
    idx = torch.arange(7, dtype=torch.int32)
    t = tracing.trace_graph(Pair(), (x, idx))
    meta = trace_meta.read_meta(save_bytes(t, tmp_path))
    assert meta["inputs"] == [{"shape": [3, 5], "dtype": "float64"}, {"shape": [7], "dtype": "int32"}]


def test_trace_of_a_plain_function(tmp_path):
    """Regression (was a bug): trace() accepts any callable (it only calls .eval() on nn.Modules, like torch_neuronx.trace, whose
    ``func`` may be a Module or a callable), but torch.jit.trace of a function returns a ScriptFunction, which
    has no ``_c``: set_meta raises AttributeError."""

    def double(x):
        return x * 2

    t = tracing.trace_graph(double, torch.ones(1, dtype=torch.bfloat16))
    assert trace_meta.get_meta(t)["inputs"] == [{"shape": [1], "dtype": "bfloat16"}]
    assert torch.equal(t(torch.ones(1)), torch.full((1,), 2.0))


def test_trace_puts_the_module_in_eval_mode():
    m = torch.nn.Sequential(torch.nn.Dropout(0.5))
    m.train()
    t = tracing.trace_graph(m, torch.ones(100))
    assert torch.equal(t(torch.ones(100)), torch.ones(100))  # dropout off


@pytest.mark.parametrize("lazy, async_", [(True, False), (False, True), (True, True), (False, False)])
def test_lazy_and_async_flags_persist(traced, tmp_path, lazy, async_):
    tracing.lazy_load(traced, enable_lazy_load=lazy)
    tracing.async_load(traced, enable_async_load=async_)
    data = save_bytes(traced, tmp_path)
    meta = trace_meta.read_meta(data)
    assert meta["lazy_load"] is lazy and meta["async_load"] is async_
    assert meta["inputs"] == [{"shape": [2, 4], "dtype": "float32"}]
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    assert trace_meta.get_meta(loaded) == meta


def test_flags_default_to_true_and_can_be_turned_off(traced, tmp_path):
    tracing.lazy_load(traced)
    tracing.async_load(traced)
    assert trace_meta.read_meta(save_bytes(traced, tmp_path, "a.pt"))["lazy_load"] is True
    tracing.lazy_load(traced, enable_lazy_load=False)
    meta = trace_meta.read_meta(save_bytes(traced, tmp_path, "b.pt"))
    assert meta["lazy_load"] is False and meta["async_load"] is True


def test_flags_can_be_set_on_a_reloaded_model(traced, tmp_path):
    save_bytes(traced, tmp_path)
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    tracing.async_load(loaded)
    assert trace_meta.read_meta(save_bytes(loaded, tmp_path, "again.pt"))["async_load"] is True


def test_flags_on_a_script_module_without_meta(tmp_path):
    scripted = torch.jit.script(Affine())
    assert trace_meta.get_meta(scripted) == {}
    assert trace_meta.read_meta(save_bytes(scripted, tmp_path)) == {}
    tracing.lazy_load(scripted)
    assert trace_meta.read_meta(save_bytes(scripted, tmp_path, "s.pt")) == {"format": trace_meta.META_FORMAT,
                                                                        "lazy_load": True}


def test_update_meta_refuses_non_torchscript():
    with pytest.raises(TypeError, match="TorchScript"):
        tracing.lazy_load(Affine())
    with pytest.raises(TypeError):
        tracing.async_load(object())


def test_get_meta_of_non_json_attribute():
    scripted = torch.jit.script(Affine())
    scripted._c._register_attribute(trace_meta.META_ATTR, torch._C.StringType.get(), "{not json")
    assert trace_meta.get_meta(scripted) == {}
    assert trace_meta.get_meta(object()) == {}


def test_tensor_specs_nesting():
    a = torch.zeros(1, 2)
    b = torch.zeros((), dtype=torch.int64)
    c = torch.zeros(0, dtype=torch.bool)
    assert trace_meta.tensor_specs((a, [b, {"k": c}], 3, None)) == [
        {"shape": [1, 2], "dtype": "float32"}, {"shape": [], "dtype": "int64"}, {"shape": [0], "dtype": "bool"}]


# ----------------------------------------------------------------------------------------------------------------
# read_meta on hostile and broken input


def zip_with(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


class Evil:
    """Unpickling this calls os.system (or another callable) with a command that creates a marker file."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class MetaHolder:
    """Pickles like a TorchScript module: a class global, then BUILD with a state dict."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return MetaHolder, (), self.state


META = {"format": 1, "inputs": [], "lazy_load": True, "async_load": False}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "read_meta executed code from the file"


def hostile_pickles(marker):
    cmd = f"touch {marker}"
    yield pickle.dumps(Evil(os.system, cmd), protocol=0)  # GLOBAL opcode
    yield pickle.dumps(Evil(os.system, cmd), protocol=4)  # STACK_GLOBAL opcode
    yield pickle.dumps(Evil(eval, f"open({str(marker)!r}, 'w')"))
    yield pickle.dumps(Evil(open, str(marker), "w"))
    # the evil call hidden inside a plausible module state, next to a valid record
    yield pickle.dumps(MetaHolder({trace_meta.META_ATTR: json.dumps(META), "x": Evil(os.system, cmd)}))
    yield pickle.dumps([Evil(os.system, cmd), MetaHolder({trace_meta.META_ATTR: json.dumps(META)})])


def test_read_meta_never_executes_pickled_calls(marker):
    for blob in hostile_pickles(marker):
        for top in ("archive", "model"):
            meta = trace_meta.read_meta(zip_with({f"{top}/data.pkl": blob, f"{top}/version": b"3"}))
            assert isinstance(meta, dict)
            assert meta in ({}, META)
            assert not marker.exists()


def test_read_meta_never_executes_via_copyreg_extension_codes(marker):
    """EXT1/2/4 opcodes name a global by a registered code instead of GLOBAL; they must not bypass find_class."""
    code = 0x7FFF_FFF0
    copyreg.add_extension(os.system.__module__, os.system.__name__, code)
    try:
        blob = pickle.dumps(Evil(os.system, f"touch {marker}"), protocol=2)
        assert b"\x84" in blob and b"system" not in blob  # EXT4, no GLOBAL naming the function
        assert trace_meta.read_meta(zip_with({"archive/data.pkl": blob})) == {}
    finally:
        copyreg.remove_extension(os.system.__module__, os.system.__name__, code)


def test_read_meta_reads_a_state_dict_without_resolving_the_class():
    blob = pickle.dumps(MetaHolder({trace_meta.META_ATTR: json.dumps(META), "training": False}))
    assert b"MetaHolder" in blob
    assert trace_meta.read_meta(zip_with({"archive/data.pkl": blob})) == META


@pytest.mark.parametrize("state", [
    {trace_meta.META_ATTR: 5},
    {trace_meta.META_ATTR: None},
    {trace_meta.META_ATTR: "{not json"},
    {trace_meta.META_ATTR: "[1, 2]"},
    {trace_meta.META_ATTR: "\"text\""},
    {trace_meta.META_ATTR: "NaN"},
    {"other": json.dumps(META)},
    [("neuron_meta", json.dumps(META))],
    "neuron_meta",
])
def test_read_meta_ignores_malformed_records(state):
    blob = pickle.dumps(MetaHolder(state))
    assert trace_meta.read_meta(zip_with({"archive/data.pkl": blob})) == {}


def test_read_meta_top_level_not_an_object():
    for obj in ({trace_meta.META_ATTR: json.dumps(META)}, [1, 2], None, 5):
        assert trace_meta.read_meta(zip_with({"archive/data.pkl": pickle.dumps(obj)})) == {}


@pytest.mark.parametrize("members", [
    {},
    {"data.pkl": pickle.dumps(MetaHolder({trace_meta.META_ATTR: json.dumps(META)}))},  # not under a top folder
    {"a/b/data.pkl": pickle.dumps(MetaHolder({trace_meta.META_ATTR: json.dumps(META)}))},  # too deep
    {"archive/data.pkl": b""},
    {"archive/data.pkl": b"\x80\x05garbage"},
    {"archive/data.pkl": b"cposix\nsystem\n"},  # truncated GLOBAL
    {"archive/data.pkl": pickle.dumps(MetaHolder({}))[:-3]},  # truncated
    {"archive/data.pkl": b"(" * 100000 + b"."},  # many MARKs
])
def test_read_meta_on_broken_zips(members):
    assert trace_meta.read_meta(zip_with(members)) == {}


@pytest.mark.parametrize("data", [b"", b"PK", b"PK\x03\x04" + b"\x00" * 40, b"not a zip at all", b"\x00" * 1000])
def test_read_meta_on_garbage(data):
    assert trace_meta.read_meta(data) == {}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_read_meta_on_random_bytes(data):
    assert trace_meta.read_meta(data) == {}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_read_meta_on_random_pickle_bytes(blob):
    meta = trace_meta.read_meta(zip_with({"archive/data.pkl": blob}))
    assert isinstance(meta, dict)


def test_read_meta_of_a_real_file_with_one_byte_flipped(traced, tmp_path):
    data = bytearray(save_bytes(traced, tmp_path))
    for i in range(0, len(data), max(1, len(data) // 64)):
        broken = bytearray(data)
        broken[i] ^= 0xFF
        assert isinstance(trace_meta.read_meta(bytes(broken)), dict)


def test_read_meta_on_deeply_nested_json_returns_empty():
    """Regression (was a bug): json.loads raises RecursionError (not ValueError) on deeply nested JSON; read_meta only catches
    ValueError around it, so a hostile model file makes neuron_client.jit.load crash with RecursionError
    instead of being treated as a file without a record."""
    blob = pickle.dumps(MetaHolder({trace_meta.META_ATTR: "[" * 100000}))
    assert trace_meta.read_meta(zip_with({"archive/data.pkl": blob})) == {}
