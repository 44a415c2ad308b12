"""DataParallel client programs that tests run as real processes: ``python tests/dp_apps.py SCENARIO ARGS...``.

``seed002`` runs every example of seed 002 (and the edge cases around them) in one process, so torch is imported once;
it prints one JSON line per example: ``{"example": name, ...}``. Each model's calls are recorded on the way to the
workers (core index and tensor shapes), so the test can check that a worker only ever saw the traced shapes.
"""
from __future__ import annotations

import json
import io
import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import neuron_client  # noqa: E402
from neuron_client.tracing import script  # noqa: E402
from neuron_client.wire import tensors  # noqa: E402


class ConvNet(torch.nn.Module):
    """A small CPU-bound stand-in for the seed's resnet50: conv, relu, pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class DimModel(torch.nn.Module):
    """The seed's dim=2 example: Conv2d(3, 3, 3) + 1."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return self.conv(x) + 1


class NestedModel(torch.nn.Module):
    def forward(self, x, d: dict[str, torch.Tensor]):
        return x * 2 + d["a"], {"s": x.sum(1), "m": d["a"] - 1}, [x.relu()]


class Lookup(torch.nn.Module):
    """Raises inside the worker for an index past the table: an error that depends on one item of the batch."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(4, 2)

    def forward(self, idx):
        return self.table(idx)


class Total(torch.nn.Module):
    def forward(self, x):
        return x.sum()


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def save(directory: str, name: str, module, example, lazy: bool = False) -> str:
    module.eval()
    traced = neuron_client.trace(module, example)
    if lazy:
        neuron_client.lazy_load(traced)
    path = os.path.join(directory, f"{name}.pt")
    torch.jit.save(traced, path)
    return path


def record(model: neuron_client.NeuronModel) -> list:
    """Record (core index, tensor shapes) of every call the model sends to a worker."""
    calls: list = []
    run = model.run

    def recording_run(args, replica=None):
        calls.append([replica.nc if replica else None,
                      [list(t.shape) for t in tensors.walk_tensors(args)]])
        return run(args, replica=replica)

    model.run = recording_run
    return calls


def close(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.allclose(a, b, atol=1e-5))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


def caught(fn):
    """(result, warnings' messages) of ``fn()``, warnings recorded whatever PYTHONWARNINGS says."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in ws]


def error_of(fn) -> dict:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": type(exc).__name__, "message": str(exc), "is_value_error": isinstance(exc, ValueError)}
    return {"error": None}


def scenario_seed002(directory: str) -> None:
    torch.manual_seed(0)
    # Trace and save every model first; once the process owns cores, the examples only load, place and call.
    conv = ConvNet().eval()
    conv_path = save(directory, "conv", conv, torch.rand(1, 3, 16, 16))
    conv_lazy = save(directory, "conv_lazy", conv, torch.rand(1, 3, 16, 16), lazy=True)
    conv4_path = save(directory, "conv4", conv, torch.rand(4, 3, 16, 16))
    dim_model = DimModel().eval()
    dim2_path = save(directory, "dim2", dim_model, torch.rand(1, 3, 8, 8))
    nested_model = NestedModel().eval()
    nested_traced = neuron_client.trace(nested_model, (torch.rand(2, 3), {"a": torch.rand(2, 3)}), strict=False)
    lookup_path = save(directory, "lookup", Lookup(), torch.zeros(1, 2, dtype=torch.int64))
    # the reference runs in this process: the file's graph itself (torch.jit.load of the file would place it)
    lookup_cpu = torch.jit.load(io.BytesIO(script.unwrap(open(lookup_path, 'rb').read())[0]))
    total_path = save(directory, "total", Total(), torch.rand(1, 3))

    rt = neuron_client.get_runtime()
    emit(example="runtime", owned=rt.cores)

    def example(name, fn):
        try:
            emit(example=name, **fn())
        except Exception:  # noqa: BLE001 - the test shows it
            emit(example=name, crashed=traceback.format_exc())

    # Default usage: a replica on every owned core; batch 5 over 4 cores (uneven: a warning).
    def default():
        model = neuron_client.jit.load(conv_path)
        before = [r.nc for r in model.replicas]
        dp = neuron_client.DataParallel(model)
        calls = record(model)
        x = torch.rand(5, 3, 16, 16)
        y, ws = caught(lambda: dp(x))
        return {"before": before, "device_ids": dp.device_ids, "replicas": [r.nc for r in model.replicas],
                    "replica_cores": model.cores, "ok": close(y, conv(x)), "shape": list(y.shape), "calls": calls, "warnings": ws,
                    "models_per_core": rt.models_per_core}

    # Specifying NeuronCores with 'nc:#' strings.
    def nc_strings():
        model = neuron_client.jit.load(conv_path)
        dp = neuron_client.DataParallel(model, device_ids=["nc:2", "nc:0", "nc:1"])
        calls = record(model)
        x = torch.rand(5, 3, 16, 16)
        y, ws = caught(lambda: dp(x))
        return {"device_ids": dp.device_ids, "replicas": [r.nc for r in model.replicas], "ok": close(y, conv(x)),
                    "calls": calls, "warnings": ws}

    # dim != 0: Conv2d(3, 3, 3) + 1 traced on [1, 3, 8, 8], four cores, dim=2, input [1, 3, 32, 8].
    def dim2():
        m = dim_model
        model = neuron_client.jit.load(dim2_path)
        dp, built = caught(lambda: neuron_client.DataParallel(model, device_ids=[0, 1, 2, 3], dim=2))
        calls = record(model)
        x = torch.rand(1, 3, 32, 8)
        y = dp(x)
        expected = torch.cat([m(c) for c in x.split(8, dim=2)], 2)  # the model on each core's slice
        bad = error_of(lambda: dp(torch.rand(1, 3, 24, 8)))
        return {"ok": close(y, expected), "shape": list(y.shape), "dynamic": dp.dynamic_batching, "warnings": built,
                    "calls": calls, "bad": bad}

    # Dynamic batching: batch sizes 2..6 through a model traced with batch 1; a lazy model loads straight there.
    def dynamic():
        model = neuron_client.jit.load(conv_lazy)
        state = model.state
        starts = []
        start = model._start
        model._start = lambda *a, **k: (starts.append(a[1]), start(*a, **k))[1]
        dp = neuron_client.DataParallel(model)
        calls = record(model)
        oks = {}
        for n in [2, 3, 4, 5, 6]:
            x = torch.rand(n, 3, 16, 16)
            oks[n] = close(dp(x), conv(x))
        return {"state_before": state, "loads": starts, "replicas": [r.nc for r in model.replicas], "oks": oks, "calls": calls}

    # Dynamic batching with padding: a model traced with batch 4; chunks 1..13 items are padded to pieces of 4.
    def padded():
        model = neuron_client.jit.load(conv4_path)
        dp = neuron_client.DataParallel(model, device_ids=[1, 3])
        calls = record(model)
        oks = {}
        for n in [1, 3, 7, 13, 0]:
            x = torch.rand(n, 3, 16, 16)
            y = dp(x)
            oks[n] = close(y, conv(x)) if n else list(y.shape) == [0, 10]
        return {"oks": oks, "calls": calls, "replicas": [r.nc for r in model.replicas]}

    # Dynamic batching disabled on four cores: batch 8 fails clearly, batch 4 works.
    def disabled():
        model = neuron_client.jit.load(conv_path)
        dp = neuron_client.DataParallel(model, device_ids=[0, 1, 2, 3], dim=0)
        dp.disable_dynamic_batching()
        calls = record(model)
        bad = error_of(lambda: dp(torch.rand(8, 3, 16, 16)))
        sent_after_bad = len(calls)
        x = torch.rand(4, 3, 16, 16)
        return {"bad": bad, "sent_after_bad": sent_after_bad, "ok": close(dp(x), conv(x)), "calls": calls,
                    "other_shape": error_of(lambda: dp(torch.rand(4, 3, 8, 8)))}

    # The seed's own spelling: the traced module itself handed to DataParallel; nested inputs and outputs.
    def nested():
        m = nested_model
        dp = neuron_client.DataParallel(nested_traced, device_ids=[0, 1, 2])
        calls = record(dp.module)
        x, a = torch.rand(5, 3), torch.rand(5, 3)
        y = dp(x, {"a": a})
        return {"ok": close(y, m(x, {"a": a})), "kinds": [type(y).__name__, type(y[1]).__name__, type(y[2]).__name__],
                    "calls": calls}

    # An error on one core names that core (process-relative) and keeps the model's message.
    def core_error():
        model = neuron_client.jit.load(lookup_path)
        dp = neuron_client.DataParallel(model, device_ids=[0, 1, 2, 3])
        idx = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 9]])
        err = error_of(lambda: dp(idx))
        good = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
        return {"err": err, "after_ok": close(dp(good), lookup_cpu(good))}

    # A scalar output is unsqueezed, with a warning.
    def scalar():
        dp = neuron_client.DataParallel(neuron_client.jit.load(total_path), device_ids=[0, 1])
        x = torch.rand(2, 3)
        y, ws = caught(lambda: dp(x))
        return {"ok": close(y, x.sum(1)), "warnings": ws}

    # Bad device ids.
    def bad_ids():
        model = neuron_client.jit.load(conv_path)
        return {"string": error_of(lambda: neuron_client.DataParallel(model, device_ids=["gpu:0"])),
                    "beyond": error_of(lambda: neuron_client.DataParallel(model, device_ids=[0, len(rt.cores)]))}

    for name, fn in [("default", default), ("nc_strings", nc_strings), ("dim2", dim2), ("dynamic", dynamic),
                     ("padded", padded), ("disabled", disabled), ("nested", nested), ("core_error", core_error),
                     ("scalar", scalar), ("bad_ids", bad_ids)]:
        example(name, fn)


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    globals()[f"scenario_{name}"](*args)
