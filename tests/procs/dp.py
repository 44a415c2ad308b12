"""Commands for DataParallel (``python -m tests.procs.dp``), with those of :mod:`tests.procs.owner`: the models of
seed 002's examples, DataParallel over them, and calls whose every request to a worker is recorded (core index and
tensor shapes), so that a test can check that a worker only ever saw the traced shapes.

* ``dp_model`` (``name`` of :data:`SAVED`, ``directory``; ``spy_loads``) -> the saved model (traced once per
  process), loaded with ``neuron_client.jit.load``: ``model`` (a handle), ``replicas``, ``state``; ``nested_traced``
  -> the traced nested model itself, not loaded (the seed hands it to DataParallel as it is);
* ``data_parallel`` (``model``; ``device_ids``, ``dim``, ``dynamic``) -> ``dp`` (a handle), ``device_ids``,
  ``replicas`` and ``cores`` of the model now, ``dynamic``, the runtime's ``models_per_core``;
* ``dp_call`` (``dp``, ``args``; ``ref``: the eager model's name, ``split``/``dim``: the reference applied to each
  slice, concatenated) -> ``same``, ``shape``, ``kinds``, ``calls`` (the requests this call sent);
* ``recorded`` (``model``) -> every request sent for the model so far, and the cores each load went to.
"""
from __future__ import annotations

import os
from concurrent.futures import Future

import torch

import neuron_client
from neuron_client.wire import tensors
from tests.procs import harness, owner


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


_eager: dict = {}


def eager(name: str) -> torch.nn.Module:
    """The eager model ``name``, made once per process with a fixed seed; the reference of the same name."""
    if name not in _eager:
        torch.manual_seed(0)
        _eager[name] = {"conv": ConvNet, "dim": DimModel, "nested": NestedModel, "lookup": Lookup,
                        "total": Total}[name]().eval()
        owner.reference(name, _eager[name])
    return _eager[name]


owner.reference("row_sums", lambda x: x.sum(1))  # a scalar per item: what DataParallel makes of Total's scalars

# saved name -> (eager model, example input, lazy)
SAVED = {
    "conv": ("conv", lambda: torch.rand(1, 3, 16, 16), False),
    "conv_lazy": ("conv", lambda: torch.rand(1, 3, 16, 16), True),
    "conv4": ("conv", lambda: torch.rand(4, 3, 16, 16), False),
    "dim2": ("dim", lambda: torch.rand(1, 3, 8, 8), False),
    "lookup": ("lookup", lambda: torch.zeros(1, 2, dtype=torch.int64), False),
    "total": ("total", lambda: torch.rand(1, 3), False),
}
_saved: dict = {}
_recorded: dict = {}  # model handle -> {"calls": [...], "loads": [...]}


def saved(name: str, directory: str) -> str:
    if (name, directory) not in _saved:
        model, example, lazy = SAVED[name]
        traced = neuron_client.trace(eager(model), example())
        if lazy:
            neuron_client.lazy_load(traced)
        path = os.path.join(directory, f"{name}.pt")
        torch.jit.save(traced, path)
        _saved[name, directory] = path
    return _saved[name, directory]


def record(handle: int, model) -> None:
    """Record (core index, tensor shapes) of every request the model sends to a worker."""
    log = _recorded.setdefault(handle, {"calls": [], "loads": []})
    run = model.run

    def recording_run(args, replica=None):
        log["calls"].append([replica.nc if replica else None, [list(t.shape) for t in tensors.walk_tensors(args)]])
        return run(args, replica=replica)

    model.run = recording_run


@harness.on_reset
def _forget() -> None:
    _recorded.clear()


@harness.command
def dp_model(name: str, directory: str = "", spy_loads: bool = False) -> dict:
    if name == "nested_traced":
        m = neuron_client.trace(eager("nested"), (torch.rand(2, 3), {"a": torch.rand(2, 3)}), strict=False)
        return {"model": harness.keep(m)}
    m = neuron_client.jit.load(saved(name, directory))
    handle = harness.keep(m)
    record(handle, m)
    if spy_loads:
        start, loads = m._start, _recorded[handle]["loads"]
        m._start = lambda *a, **k: (loads.append(list(a[1])), start(*a, **k))[1]
    return {"model": handle, **owner.describe_model(m)}


@harness.command
def data_parallel(model: int, device_ids=None, dim: int = 0, dynamic: bool = True) -> dict:
    m = harness.get(model)
    dp = neuron_client.DataParallel(m, device_ids=device_ids, dim=dim)
    if not dynamic:
        dp.disable_dynamic_batching()
    if model not in _recorded:  # a traced module: DataParallel made the NeuronModel
        record(model, dp.module)
    handle = harness.keep(dp)
    _recorded[handle] = _recorded[model]
    return {"dp": handle, "device_ids": dp.device_ids, "replicas": [r.nc for r in dp.module.replicas],
            "cores": dp.module.cores, "dynamic": dp.dynamic_batching,
            "models_per_core": neuron_client.get_runtime().models_per_core}


@harness.command
def dp_call(dp: int, args, ref: str | None = None, split: int | None = None, dim: int = 0,
            atol: float = 1e-5) -> dict:
    x = owner.arguments(args)
    log = _recorded[dp]["calls"]
    before = len(log)
    y = harness.get(dp)(*x)
    doc = {"kinds": harness.kinds(y), "calls": log[before:]}
    if isinstance(y, torch.Tensor):
        doc["shape"] = list(y.shape)
    if ref is not None:
        fn = owner.REFERENCES[ref]
        with torch.no_grad():
            want = fn(*x) if split is None else torch.cat([fn(c) for c in x[0].split(split, dim=dim)], dim)
        doc["same"] = harness.close(y, want, atol)
    return doc


@harness.command
def dp_submit(dp: int, shapes: list, ref: str, atol: float = 1e-5) -> dict:
    """Submit a batch of each shape in ``shapes`` at once (a window in flight), then check each result; a batch
    refused at submit (a bad shape) is reported by its index."""
    d = harness.get(dp)
    futures, refused = [], {}
    xs = [torch.rand(*shape) for shape in shapes]
    for i, x in enumerate(xs):
        try:
            futures.append((i, d.submit(x)))
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            refused[str(i)] = type(exc).__name__
    fn = owner.REFERENCES[ref]
    with torch.no_grad():
        same = {str(i): harness.close(f.result(60), fn(xs[i]), atol) for i, f in futures}
    return {"same": same, "refused": refused, "is_future": all(isinstance(f, Future) for _, f in futures)}


@harness.command
def recorded(model: int) -> dict:
    return _recorded[model]


if __name__ == "__main__":
    harness.serve()
