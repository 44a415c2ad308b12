"""The self-placing saved form (neuron_client.tracing.script), in-process: structures, records, lifetime, and what
torch.jit.load says without neuron_client. Placing on cores is tests/integration/test_torch_jit_load.py's."""
from __future__ import annotations

import gc
import io
import os
import subprocess
import sys

import pytest
import torch

import neuron_client
from neuron_client import experimental
from neuron_client.models.neuron_model import NeuronModel, as_neuron_model
from neuron_client.tracing import meta as trace_meta, script, trace as tracing
from tests.unit.test_tracing import Affine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Structured(torch.nn.Module):
    """Nested inputs and outputs: a tuple argument, a dict and a list among the outputs."""

    def forward(self, x, pair):
        a, b = pair
        return {"sum": x + a, "prod": x * b}, [x.mean(0), b], x - a


def saved(module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def test_trace_returns_a_placed_module_that_runs_here_until_it_is_saved_and_loaded():
    m = Affine().eval()
    x = torch.randn(2, 4)
    t = neuron_client.trace(m, x)
    assert isinstance(t, torch.jit.ScriptModule) and script.is_placed_script(t)
    assert torch.allclose(t(x), m(x))
    assert script.model_of(t) is None  # nothing placed: it runs in this process


def test_the_record_and_the_graph_travel_in_the_file_and_are_read_without_running_it():
    x = torch.randn(2, 4)
    t = neuron_client.trace(Affine(), x)
    neuron_client.lazy_load(t)
    data = saved(t)
    meta = trace_meta.read_meta(data)
    assert meta["lazy_load"] is True and meta["inputs"] == [{"shape": [2, 4], "dtype": "float32"}]
    assert meta[script.SCRIPT_KEY] == {"inputs": ["t"], "outputs": "t", "name": "Affine.pt"}
    graph, meta2 = script.unwrap(data)
    assert meta2 == meta
    plain = torch.jit.load(io.BytesIO(graph))  # the graph a worker runs: a plain traced module
    assert torch.allclose(plain(x), t(x))
    assert trace_meta.read_meta(graph)["inputs"] == meta["inputs"]


def test_a_plain_traced_file_is_not_taken_for_a_placed_one():
    graph = tracing.trace_graph(Affine(), torch.randn(2, 4))
    assert script.unwrap(saved(graph)) is None
    assert script.unwrap(b"not a zip") is None


def test_nested_inputs_and_outputs_keep_their_structure():
    m = Structured()
    x, pair = torch.randn(3), (torch.randn(3), torch.randn(3))
    t = neuron_client.trace(m, (x, pair), strict=False)  # torch's tracer wants strict=False for dict outputs
    got, want = t(x, pair), m(x, pair)
    assert isinstance(got, tuple) and isinstance(got[0], dict) and isinstance(got[1], list)
    assert torch.allclose(got[0]["sum"], want[0]["sum"]) and torch.allclose(got[0]["prod"], want[0]["prod"])
    assert torch.allclose(got[1][0], want[1][0]) and torch.allclose(got[2], want[2])
    meta = trace_meta.read_meta(saved(t))[script.SCRIPT_KEY]
    assert meta["inputs"] == ["t", ["tuple", ["t", "t"]]]


def test_an_identity_model_returns_a_tensor_of_its_own():
    t = neuron_client.trace(lambda x: x, torch.ones(2))
    x = torch.ones(2)
    y = t(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_values_that_are_not_tensors_are_refused_with_the_reason():
    with pytest.raises(TypeError, match="outputs must be tensors, tuples, lists and str-keyed dicts of them; got int"):
        script.flatten((torch.ones(1), 3), "outputs")
    with pytest.raises(TypeError, match="a list whose items differ"):
        script._type(["list", ["t", ["tuple", ["t"]]]])


def test_structures_flatten_and_rebuild():
    value = ({"a": torch.ones(1), "b": [torch.zeros(2), torch.ones(3)]}, torch.ones(4))
    flat, spec = script.flatten(value)
    assert len(flat) == 4
    back = script.unflatten(flat, spec)
    assert torch.equal(back[0]["b"][1], torch.ones(3)) and isinstance(back, tuple)
    with pytest.raises(ValueError, match="more tensors"):
        script.unflatten(flat + [torch.ones(1)], spec)


def test_a_collected_module_releases_its_placement():
    before = len(script._registry)
    t = neuron_client.trace(Affine(), torch.randn(2, 4))
    assert len(script._registry) == before + 1
    del t
    gc.collect()
    assert len(script._registry) == before


def test_the_placement_apis_say_to_load_a_module_that_runs_here_first():
    t = neuron_client.trace(Affine(), torch.randn(2, 4))
    with pytest.raises(TypeError, match="torch.jit.load"):
        experimental.set_neuron_cores(t, 0, 1)
    with pytest.raises(TypeError, match="torch.jit.load"):
        experimental.set_multicore(t)
    lazy = as_neuron_model(t)  # DataParallel's way: a lazy model of the graph, placed by DataParallel
    assert isinstance(lazy, NeuronModel) and lazy.state == "lazy" and lazy.name == "Affine.pt"
    with pytest.raises(TypeError, match="got int"):
        as_neuron_model(3)


def test_without_import_neuron_client_torch_jit_load_fails_naming_it(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.save(neuron_client.trace(Affine(), torch.randn(2, 4)), str(path))
    code = ("import sys, torch\n"
            "try:\n"
            "    torch.jit.load(sys.argv[1])\n"
            "except RuntimeError as exc:\n"
            "    print(exc)\n"
            "    sys.exit(3)\n"
            "sys.exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 3, out.stdout + out.stderr
    assert "Unknown builtin op: neuron_client::" in out.stdout and "import_neuron_client" in out.stdout
