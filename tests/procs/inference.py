"""Commands for inference, placement and faults (``python -m tests.procs.inference``), with those of
:mod:`tests.procs.owner`; and the models the tests use (:func:`model_zoo`, saved by the ``models_dir`` fixture).

* ``save`` (``name`` of :data:`MODULES`, ``directory``; ``lazy``, ``asynchronous``) -> ``path`` of the traced model;
  the eager module is the reference ``name`` for ``call(ref=...)``; ``broken_copy`` (``path``) -> a copy of a saved
  model without its program; ``save_lstm`` -> seed 004's forked ensemble, its reference ``lstm_plain``; ``save_hog``;
* ``place`` (``model``; ``start_nc``/``nc_count``, or ``multicore``) re-places a model -> ``cores``;
  ``context`` (``start_nc``, ``nc_count``) opens and closes a ``neuron_cores_context``;
* ``thread_contexts`` (``path``), ``concurrency`` (``path`` of a slow model), ``submit`` (``model``, ``n``): what
  only threads inside the process can show;
* ``output_device`` (``model``, ``device``); ``gpu_memory``.
"""
from __future__ import annotations

import os
import threading
import time
import zipfile
from typing import Dict, List

import torch

import neuron_client
from neuron_client.examples.lstm_ensemble import LSTMEnsemble
from neuron_client.examples.matmul_chain import MatmulChain
from tests.procs import harness, owner  # noqa: F401 - owner: the runtime commands


class Affine(torch.nn.Module):
    def forward(self, x):
        return x * 2 + 1


class Nested(torch.nn.Module):
    def forward(self, x: torch.Tensor, d: Dict[str, torch.Tensor], items: List[torch.Tensor]):
        return x + d["a"], {"double": d["a"] * 2}, [items[0] * 3, items[1].to(torch.int64) - 1], x > 0


class Gather(torch.nn.Module):
    """Raises inside the worker for an out-of-range index: a model error that depends on the input."""

    def forward(self, x, idx):
        return x.index_select(0, idx)


class Expand(torch.nn.Module):
    """A small input, a large output (512 KiB for a [1, 64] input)."""

    def forward(self, x):
        return x.repeat(2048, 1)


class Wide(torch.nn.Module):
    """Heavy to load (about 16 MB of weights), light to run."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2048, 2048)

    def forward(self, x):
        return self.fc(x)


class Hog(torch.nn.Module):
    """Allocates ``n`` floats on the model's device: more than a core's share of the GPU runs out of memory."""

    def forward(self, x, n):
        return x + torch.zeros(int(n.item()), device=x.device).sum()


def model_zoo():
    """The saved models of the ``models_dir`` fixture: name -> (module, example input)."""
    return {
        "affine": (Affine(), torch.rand(2, 4)),
        "nested": (Nested(), (torch.rand(3), {"a": torch.rand(3)},
                              [torch.rand(2, 2), torch.ones(5, dtype=torch.int32)])),
        "gather": (Gather(), (torch.rand(4, 3), torch.tensor([0, 1]))),
        "big": (Affine(), torch.rand(1024, 1024)),
    }


for _name, (_module, _example) in model_zoo().items():
    owner.reference(_name, _module)

_modules: dict = {}


def module(name: str):
    """The eager module ``name`` (made once per process, so that a saved copy and the reference agree)."""
    if name not in _modules:
        makers = {
            "affine": lambda: (Affine(), torch.rand(2, 4)),
            "slow": lambda: (MatmulChain(150, 256), torch.rand(64, 256)),  # ~0.1 s a call: overlaps are visible
            "slower": lambda: (MatmulChain(400, 256), torch.rand(256, 256)),  # long calls to be killed under
            "slowest": lambda: (MatmulChain(16, 1024), torch.rand(1024, 1024)),  # ~0.4 s: calls outlast a liveness poll
            "wide": lambda: (Wide(), torch.rand(1, 2048)),
            "expand": lambda: (Expand(), torch.rand(1, 64)),
        }
        _modules[name] = makers[name]()
        owner.reference(name, _modules[name][0])
    return _modules[name]


MODULES = ("affine", "slow", "slower", "slowest", "wide", "expand")


@harness.command
def save(name: str, directory: str, lazy: bool = False, asynchronous: bool = False, graph: bool = False) -> dict:
    """``torch.jit.save`` of ``neuron_client.trace`` of a module of :data:`MODULES`; with ``graph``, of the plain
    traced graph instead (``tracing.trace_graph``: a file whose program is the module's own, not the self-placing
    wrapper's, as :func:`broken_copy` needs)."""
    m, example = module(name)
    if graph:
        from neuron_client.tracing import trace as tracing

        traced = tracing.trace_graph(m, example)
    else:
        traced = neuron_client.trace(m, example)
    if lazy:
        neuron_client.lazy_load(traced)
    if asynchronous:
        neuron_client.async_load(traced)
    flags = "-lazy" * lazy + "-async" * asynchronous + "-graph" * graph
    path = os.path.join(directory, f"{name}{flags}-{os.getpid()}.pt")
    torch.jit.save(traced, path)
    return {"path": path}


@harness.command
def broken_copy(path: str) -> dict:
    """A copy of a saved model with its metadata but without its program: it cannot be loaded. Start from a plain
    graph file (``save(graph=True)``): a self-placing file's program is the wrapper's, not the model's."""
    broken = os.path.join(os.path.dirname(path), f"broken-{os.path.basename(path)}")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if "/code/" not in item.filename:
                dst.writestr(item, src.read(item.filename))
    return {"path": broken}


@harness.command
def save_lstm(directory: str, T: int = 12, B: int = 8, C: int = 64) -> dict:
    """Seed 004's ensemble of bidirectional LSTMs (scaled down, scripted) with torch.jit.fork, saved; the same
    ensemble run sequentially is the reference ``lstm_plain``."""
    torch.manual_seed(0)
    plain = torch.jit.script(LSTMEnsemble(2, C, False).eval())
    forked = torch.jit.script(LSTMEnsemble(2, C, True).eval())
    forked.load_state_dict(plain.state_dict())
    path = os.path.join(directory, f"lstm-fork-{os.getpid()}.pt")
    torch.jit.save(forked, path)

    def run_plain(x):
        with torch.no_grad():
            return plain(x)

    owner.reference("lstm_plain", run_plain)
    return {"path": path, "graph_forks": "fork" in torch.jit.load(path).code, "input": [T, B, C]}


@harness.command
def save_hog(directory: str) -> dict:
    path = os.path.join(directory, f"hog-{os.getpid()}.pt")
    torch.jit.save(torch.jit.script(Hog()), path)
    return {"path": path}


# -- placement inside a process ------------------------------------------------------------------------------------


@harness.command
def place(model: int, start_nc: int = -1, nc_count: int = -1, multicore: bool = False) -> dict:
    from neuron_client.experimental import set_multicore, set_neuron_cores

    m = harness.get(model)
    if multicore:
        set_multicore(m)
    else:
        set_neuron_cores(m, start_nc=start_nc, nc_count=nc_count)
    return owner.describe_model(m)


@harness.command
def context(start_nc: int = -1, nc_count: int = -1) -> dict:
    from neuron_client.experimental import neuron_cores_context

    with neuron_cores_context(start_nc, nc_count):
        pass
    return {}


@harness.command
def thread_contexts(path: str) -> dict:
    """Two threads, each inside its own context at the same time, place their own loads; then one load outside."""
    from neuron_client.experimental import neuron_cores_context

    neuron_client.get_runtime()
    barrier = threading.Barrier(2)
    placed = {}

    def load(name, start, count):
        with neuron_cores_context(start_nc=start, nc_count=count):
            barrier.wait(60)  # both contexts are open now
            placed[name] = harness.keep(neuron_client.jit.load(path))
            barrier.wait(60)

    threads = [threading.Thread(target=load, args=("a", 1, 2)), threading.Thread(target=load, args=("b", 5, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    outside = neuron_client.jit.load(path)  # no context in this thread: the least-used core
    harness.keep(outside)
    return {"a": harness.get(placed["a"]).cores if "a" in placed else None,
            "b": harness.get(placed["b"]).cores if "b" in placed else None, "outside": outside.cores}


@harness.command
def concurrency(path: str) -> dict:
    """Threads on a model replicated on nc0 and nc1 run on both cores at once; a busy replica holds no other up."""
    from neuron_client.experimental import neuron_cores_context

    with neuron_cores_context(start_nc=0, nc_count=2):
        m = neuron_client.jit.load(path)
    harness.keep(m)
    x = torch.rand(64, 256)  # about 0.1 s a call: long against thread start-up jitter
    m(x), m(x)  # warm both replicas
    spans = {}
    together = threading.Barrier(2)

    def call(name, barrier=None):
        if barrier is not None:
            barrier.wait(60)
        t0 = time.monotonic()
        m(x)
        spans[name] = (t0, time.monotonic(), m.last_core)

    a = threading.Thread(target=call, args=("a",))
    a.start()
    deadline = time.monotonic() + 30
    while not any(r.in_flight for r in m.replicas) and time.monotonic() < deadline:
        time.sleep(0.001)
    busy_core = next(r.core for r in m.replicas if r.in_flight)
    m(x)  # a call while 'a' is running goes to the idle replica, not round-robin onto the busy one
    follower = m.last_core
    a.join(60)
    b = threading.Thread(target=call, args=("b", together))
    c = threading.Thread(target=call, args=("c", together))
    b.start(), c.start(), b.join(60), c.join(60)
    (b0, b1, bcore), (c0, c1, ccore) = spans["b"], spans["c"]
    return {"busy_core": busy_core, "a_core": spans["a"][2], "follower": follower, "b_core": bcore, "c_core": ccore,
            "overlap_s": min(b1, c1) - max(b0, c0)}


@harness.command
def submit(model: int, n: int = 8) -> dict:
    """``model.submit`` n times from this one thread, then the results -> ``is_future``, ``same`` (as x * 2 + 1)."""
    from concurrent.futures import Future

    m = harness.get(model)
    xs = [torch.rand(2, 4) for _ in range(n)]
    futures = [m.submit(x) for x in xs]
    results = [f.result(60) for f in futures]
    return {"is_future": isinstance(futures[0], Future),
            "same": all(torch.allclose(r, x * 2 + 1) for r, x in zip(results, xs))}


# -- the cuda backend ----------------------------------------------------------------------------------------------


@harness.command
def output_device(model: int, device: str) -> dict:
    harness.get(model).output_device = device
    return {}


@harness.command
def gpu_memory() -> dict:
    return {"total": torch.cuda.get_device_properties(0).total_memory}


if __name__ == "__main__":
    harness.serve()
