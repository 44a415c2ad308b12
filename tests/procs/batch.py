"""Commands for asyncio calls and the request batcher (``python -m tests.procs.batch``), with those of
:mod:`tests.procs.owner`:

* ``batch_model`` (``name`` of :data:`MODELS`, ``directory``; ``dp``: wrap it in DataParallel) -> ``model`` (a
  handle) loaded on every core the process owns, ``cores``; every replica pick is recorded (``picks``);
* ``acall_many`` (``model``, ``rows``: one concurrent ``acall`` per entry, of that many rows; ``bad``: indices
  whose input has the wrong shape) -> per call ``same`` (the eager model's output) or its error, the cores picked,
  ``max_in_flight`` (calls running at once) and the blocking call's error type for the same bad input;
* ``acall_cancel`` (``model``) -> a running ``acall`` cancelled: ``cancelled``, ``in_flight`` (of the replicas,
  once its call is over), ``same`` (a later acall);
* ``batched`` (``model``; the ``batched`` arguments, ``queue_timeout_s`` for ``timeout_s``) -> ``served`` (a
  handle); ``stats`` (``served``);
  ``close_served`` (``served``) -> the batcher threads left;
* ``served_threads`` (``served``, ``rows``: one thread per entry, started together) and ``served_async`` (the same
  from asyncio tasks, submitted in order; ``bad``: {index: how the input is wrong}) -> per caller ``same``/``kinds``
  or its error, the shapes the model's replicas were called with (``calls``), and the batcher's ``stats``;
* ``served_beside_busy`` (``served``): requests while one replica is busy with a call of its own;
* ``served_pending`` (``served``, ``n``): ``n`` requests submitted and not waited for -> each one's error, if it
  failed at once, and ``pending`` handles (``outcome`` of a handle waits for it).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time

import torch

import neuron_client
from neuron_client.experimental import neuron_cores_context
from neuron_client.models import batching
from tests.procs import harness, inference  # inference: owner's commands and the slow model
from tests.procs.dp import Lookup, NestedModel  # Lookup fails in the worker for an index past its table


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _example(name: str, rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return (torch.rand(rows, 8, generator=gen),)
    if name == "nested":
        return torch.rand(rows, 3, generator=gen), {"a": torch.rand(rows, 3, generator=gen)}
    if name == "lookup":
        return (torch.randint(0, 4, (rows, 2), generator=gen),)
    return (torch.rand(rows, 256, generator=gen),)  # slow


# name -> (eager module maker, traced batch)
MODELS = {"mlp": (Mlp, 8), "nested": (NestedModel, 4), "lookup": (Lookup, 4),
          "slow": (lambda: inference.module("slow")[0], 64)}
_eager: dict = {}
_saved: dict = {}
_picks: dict = {}  # model handle -> [global core of each pick]
_in_flight: dict = {}  # model handle -> {"now": n, "max": n}
_shapes: dict = {}  # model handle -> the input shapes of every call sent to a worker


def eager(name: str) -> torch.nn.Module:
    if name not in _eager:
        torch.manual_seed(0)
        _eager[name] = MODELS[name][0]().eval()
    return _eager[name]


def reference(name: str, inputs: tuple):
    with torch.no_grad():
        return eager(name)(*inputs)


@harness.command
def batch_model(name: str, directory: str, dp: bool = False) -> dict:
    if (name, directory) not in _saved:
        path = os.path.join(directory, f"batch-{name}-{os.getpid()}.pt")
        torch.jit.save(neuron_client.trace(eager(name), _example(name, MODELS[name][1]), strict=False), path)
        _saved[name, directory] = path
    n = neuron_client.get_runtime().num_cores
    with neuron_cores_context(start_nc=0, nc_count=n):
        m = neuron_client.jit.load(_saved[name, directory])
    obj = neuron_client.DataParallel(m) if dp else m
    handle = harness.keep(obj)
    picks, flight = _picks.setdefault(handle, []), _in_flight.setdefault(handle, {"now": 0, "max": 0})
    shapes = _shapes.setdefault(handle, [])
    pick, run, lock = m._pick, m.run, threading.Lock()

    def recording_pick():
        r = pick()
        picks.append(r.core)
        return r

    def counting_run(args, replica=None):
        with lock:
            if replica is not None:  # the batcher (and DataParallel) name the replica
                picks.append(replica.core)
            shapes.append([list(t.shape) for t in batching.tensors(args)])
            flight["now"] += 1
            flight["max"] = max(flight["max"], flight["now"])
        try:
            return run(args, replica=replica)
        finally:
            with lock:
                flight["now"] -= 1

    m._pick, m.run = recording_pick, counting_run
    obj.__dict__["_test_name"] = name
    return {"model": handle, "cores": m.cores}


@harness.on_reset
def _forget() -> None:
    for obj in list(harness._objects.values()):
        if isinstance(obj, neuron_client.BatchedModel):
            obj.close()
    _picks.clear()
    _in_flight.clear()
    _shapes.clear()


def _name_of(obj) -> str:
    return obj.__dict__.get("_test_name") or _name_of(obj.model)


def _outcome(name: str, inputs: tuple, fn) -> dict:
    try:
        y = fn()
    except Exception as exc:  # noqa: BLE001 - the test reads it
        return harness.error_doc(exc)
    return {"same": harness.close(y, reference(name, inputs), 1e-5), "kinds": harness.kinds(y),
            "rows": [int(t.shape[0]) for t in batching.tensors(y)][:1]}


def _bad(name: str, how: str, rows: int) -> tuple:
    if how == "shape":
        return (torch.rand(rows, 7),)
    if how == "dtype":
        return (torch.rand(rows, 8, dtype=torch.float64),)
    if how == "rows":
        return (torch.rand(rows * 100, 8),)
    if how == "none":
        return (3,)
    if how == "index":
        return (torch.full((rows, 2), 9, dtype=torch.int64),)
    raise ValueError(how)


def _inputs(name: str, rows: list[int], bad: dict | None) -> list[tuple]:
    bad = {int(k): v for k, v in (bad or {}).items()}
    return [_bad(name, bad[i], n) if i in bad else _example(name, n, seed=i) for i, n in enumerate(rows)]


@harness.command
def acall_many(model: int, rows: list[int], bad: list[int] = ()) -> dict:
    obj = harness.get(model)
    name = _name_of(obj)
    xs = _inputs(name, rows, {i: "shape" for i in bad})
    before = len(_picks[model])

    async def main():
        return await asyncio.gather(*[obj.acall(*x) for x in xs], return_exceptions=True)

    results = asyncio.run(main())
    calls = [_outcome(name, x, lambda y=y: _raise_or(y)) for x, y in zip(xs, results)]
    blocking = None
    if bad:
        blocking = _outcome(name, xs[bad[0]], lambda: obj(*xs[bad[0]]))
    return {"calls": calls, "cores": sorted(set(_picks[model][before:])), "max_in_flight": _in_flight[model]["max"],
            "blocking": blocking}


@harness.command
def acall_cancel(model: int, wait_s: float = 30.0) -> dict:
    obj = harness.get(model)
    name = _name_of(obj)
    x = _example(name, MODELS[name][1])
    replicas = obj.replicas

    async def main():
        task = asyncio.ensure_future(obj.acall(*x))
        deadline = time.monotonic() + wait_s
        while sum(r.in_flight for r in replicas) == 0:  # wait until the call is running on its core
            assert time.monotonic() < deadline, "the call did not start"
            await asyncio.sleep(0.005)
        task.cancel()
        try:
            await task
            cancelled = False
        except asyncio.CancelledError:
            cancelled = True
        while sum(r.in_flight for r in replicas) and time.monotonic() < deadline:  # its thread finishes the call
            await asyncio.sleep(0.01)
        in_flight = sum(r.in_flight for r in replicas)
        y = await obj.acall(*x)
        return cancelled, in_flight, harness.close(y, reference(name, x), 1e-4)

    cancelled, in_flight, same = asyncio.run(main())
    return {"cancelled": cancelled, "in_flight": in_flight, "same": same}


@harness.command
def batched(model: int, queue_timeout_s: float | None = None, **kw) -> dict:
    served = neuron_client.batched(harness.get(model), timeout_s=queue_timeout_s, **kw)
    served.__dict__["_test_name"] = _name_of(harness.get(model))
    served.__dict__["_test_model"] = model
    return {"served": harness.keep(served), "max_batch_size": served.max_batch_size,
            "traced_size": served.traced_size}


@harness.command
def stats(served: int) -> dict:
    return dataclasses.asdict(harness.get(served).stats())


def _report(served, outcomes) -> dict:
    model = served.__dict__["_test_model"]
    return {"callers": outcomes, "stats": dataclasses.asdict(served.stats()),
            "cores": sorted(set(_picks.get(model, []))), "max_in_flight": _in_flight[model]["max"],
            "shapes": _shapes[model]}


@harness.command
def served_threads(served: int, rows: list[int], bad: dict | None = None) -> dict:
    s = harness.get(served)
    name = _name_of(s)
    xs = _inputs(name, rows, bad)
    outcomes: list = [None] * len(xs)
    start = threading.Barrier(len(xs))

    def caller(i):
        start.wait(30)
        outcomes[i] = _outcome(name, xs[i], lambda: s(*xs[i]))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return _report(s, outcomes)


@harness.command
def served_async(served: int, rows: list[int], bad: dict | None = None) -> dict:
    s = harness.get(served)
    name = _name_of(s)
    xs = _inputs(name, rows, bad)

    async def main():
        return await asyncio.gather(*[s.acall(*x) for x in xs], return_exceptions=True)

    results = asyncio.run(main())
    outcomes = [_outcome(name, x, lambda y=y: _raise_or(y)) for x, y in zip(xs, results)]
    return _report(s, outcomes)


def _raise_or(y):
    if isinstance(y, BaseException):
        raise y
    return y


@harness.command
def served_pending(served: int, n: int, rows: int = 1) -> dict:
    s = harness.get(served)
    name = _name_of(s)
    out = []
    for i in range(n):
        x = _example(name, rows, seed=i)
        try:
            out.append({"pending": harness.keep((name, x, s.submit(*x)))})
        except Exception as exc:  # noqa: BLE001
            out.append(harness.error_doc(exc))
    return {"requests": out}


@harness.command
def outcome(pending: int, timeout_s: float = 60.0) -> dict:
    name, x, fut = harness.get(pending)
    return _outcome(name, x, lambda: fut.result(timeout_s))


@harness.command
def served_beside_busy(served: int, calls: int = 4) -> dict:
    """``calls`` requests one after the other while the model's first replica counts a call in flight of its own (a
    direct call beside the batcher) -> ``busy`` (that replica's core), ``cores`` the batches ran on, ``same``."""
    s = harness.get(served)
    name, model = _name_of(s), s.__dict__["_test_model"]
    m = s.model
    r = m.replicas[0]
    with m._lock:
        r.in_flight += 1
    before = len(_picks[model])
    try:
        same = all(_outcome(name, x, lambda x=x: s(*x)).get("same") for x in
                   [_example(name, 1, seed=i) for i in range(calls)])
    finally:
        with m._lock:
            r.in_flight -= 1
    return {"busy": r.core, "cores": _picks[model][before:], "same": same}


@harness.command
def close_served(served: int) -> dict:
    harness.get(served).close()
    return {"threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("neuron-batch"))}


if __name__ == "__main__":
    harness.serve()
