"""Commands for tensor parallelism on a real BERT, all-MiniLM-L6-v2 (``python -m tests.procs.tp``), with those of
:mod:`tests.procs.owner`. One process traces (it imports transformers), another loads what was saved (it never
does).

Tracing, into the work directory ``work``:

* the first command that needs them saves the unsharded checkpoint (``WORK/minilm.pt``) and the reference
  (``WORK/reference.pt``: the inputs, four real sentences and a pair as the seed's, and the CPU model's outputs);
* ``sharded_checkpoint`` -> ``same``: per rank, ``parallel_layers.save`` then ``load(sharded=True)`` give the shard
  ``load(sharded=False)`` gave;
* ``tp_trace`` (``name`` of :data:`MODELS`) traces it (the unsharded checkpoint loaded into the sharded model),
  runs it on the inputs, saves it into ``WORK/<name>`` and its outputs into ``WORK/<name>.outputs.pt``, unloads it
  -> ``tp``, ``cores``, ``group``, ``diff`` (to the CPU model), ``files``, ``bytes``, ``graph_bytes``, ``shapes``;
* ``tp_state``: io_aliases marked by ``get_model`` -> ``steps``, ``calls``, bytes ``received_per_call`` and
  ``sent_per_call``.

Loading: ``tp_load`` (``name``; ``context``) -> ``model`` (a handle), ``cores``, ``load_s``, ``inline``, ``diff``
(to the CPU model), ``same_as_traced``, ``transformers`` (whether it is imported); ``tp_call`` (``model``,
``input``) -> ``diff``; ``tp_concurrent`` (``models``, ``calls``: per model, from a thread each) -> ``diff``,
``calls``, ``errors``; ``tp_stream`` (``model``, ``seconds``) calls until one fails -> ``calls``, ``error``,
``failed_call_s``.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import torch

from neuron_client.distributed import parallel_layers, trace
from tests.procs import harness, owner

MODELS = {"inline2": (2, True), "sep2": (2, False), "sep4": (4, False)}


def max_diff(got, want) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want))


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# -- tracing ---------------------------------------------------------------------------------------------------------

_prepared: dict = {}


def prepared(work: str) -> dict:
    """The checkpoint's path, the inputs and the CPU model's outputs (made once per work directory)."""
    if work not in _prepared:
        from neuron_client.distributed.examples import minilm

        checkpoint = os.path.join(work, "minilm.pt")
        reference = os.path.join(work, "reference.pt")
        if not os.path.exists(reference):
            tok = minilm.tokenizer()
            inputs = [minilm.encode(tok, s) for s in minilm.SENTENCES]
            inputs.append(minilm.encode(tok, minilm.SENTENCES[1], minilm.SENTENCES[2]))  # a pair, as the seed's
            minilm.save_checkpoint(checkpoint)
            cpu = minilm.cpu_model()
            with torch.no_grad():
                want = [tuple(cpu(*x)) for x in inputs]
            torch.save({"inputs": inputs, "cpu": want}, reference)
        ref = torch.load(reference, weights_only=True)
        _prepared[work] = {"checkpoint": checkpoint, "inputs": ref["inputs"], "cpu": ref["cpu"]}
    return _prepared[work]


@harness.command
def sharded_checkpoint(work: str) -> dict:
    from neuron_client.distributed.examples import minilm

    checkpoint = prepared(work)["checkpoint"]
    shards = os.path.join(work, "shards")
    same = []
    for rank in range(2):
        with parallel_layers.parallel_state.rank_context(rank, 2):
            model, _ = minilm.get_model(checkpoint)
            parallel_layers.save({"model": model.state_dict()}, shards)
            again = minilm.parallelize(minilm.cpu_model())
            parallel_layers.load(shards, again, sharded=True)
            a, b = model.state_dict(), again.state_dict()
            q = "encoder.layer.0.attention.self.query.weight"
            same.append(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                        and list(a[q].shape) == [192, 384])
    return {"same": same}


@harness.command
def tp_trace(name: str, work: str) -> dict:
    from neuron_client.distributed.examples import minilm

    tp, inline = MODELS[name]
    ref = prepared(work)
    inputs, want = ref["inputs"], ref["cpu"]
    t0 = time.monotonic()
    model = trace.parallel_model_trace(minilm.get_model_fn(ref["checkpoint"]), inputs[0], tp_degree=tp,
                                       inline_weights_to_neff=inline)
    trace_s = time.monotonic() - t0
    outs = [tuple(model(*x)) for x in inputs]
    path = os.path.join(work, name)
    trace.parallel_model_save(model, path)
    torch.save(outs, os.path.join(work, f"{name}.outputs.pt"))
    doc = {"tp": tp, "inline": inline, "cores": model.cores, "group": model.group, "trace_s": trace_s,
           "diff": max(max_diff(o, w) for o, w in zip(outs, want)),
           "files": sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs),
           "bytes": dir_bytes(path), "graph_bytes": os.path.getsize(os.path.join(path, "tp_0.pt")),
           "shapes": [list(o.shape) for o in outs[0]]}
    model.unload()
    return doc


@harness.command
def tp_state() -> dict:
    """io_aliases from get_model: each rank's state stays on its core, updated in place, never sent."""
    from neuron_client.tracing.io_aliases import TrafficMeter

    class Stateful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.col = parallel_layers.layers.ColumnParallelLinear(64, 64, bias=False, gather_output=False)
            self.row = parallel_layers.layers.RowParallelLinear(64, 64, bias=False, input_is_parallel=True)
            self.register_buffer("calls", torch.zeros(1))
            self.register_buffer("memory", torch.zeros(16384))  # 64 KiB of state per rank

        def forward(self, x):
            return self.row(self.col(x)) + self.calls, self.calls + 1, self.memory + 1

    def get_model():
        torch.manual_seed(0)
        m = Stateful()
        return m, {m.calls: 1, m.memory: 2}

    model = trace.parallel_model_trace(get_model, torch.ones(2, 64), tp_degree=2)
    x = torch.ones(2, 64)
    with TrafficMeter() as meter:
        outs = [model(x) for _ in range(3)]
    outs = [o[0] if isinstance(o, (tuple, list)) else o for o in outs]
    model.unload()
    return {"steps": [float((o - outs[0]).mean()) for o in outs], "calls": meter.calls,
            "received_per_call": meter.received / max(1, meter.calls),
            "sent_per_call": meter.sent / max(1, meter.calls)}


# -- loading in a fresh process --------------------------------------------------------------------------------------

_loaded: dict = {}  # model handle -> the work directory's reference


@harness.on_reset
def _forget() -> None:
    _loaded.clear()


def reference(work: str) -> dict:
    ref = torch.load(os.path.join(work, "reference.pt"), weights_only=True)
    return {"inputs": ref["inputs"], "cpu": ref["cpu"]}


@harness.command
def tp_load(name: str, work: str, context=None) -> dict:
    ref = reference(work)
    with owner.context_of(context):
        model = trace.parallel_model_load(os.path.join(work, name))
    handle = harness.keep(model)
    _loaded[handle] = ref
    outs = [tuple(model(*x)) for x in ref["inputs"]]
    traced = torch.load(os.path.join(work, f"{name}.outputs.pt"), weights_only=True)
    return {"model": handle, "cores": model.cores, "load_s": model.load_s, "inline": model.inline_weights,
            "diff": max(max_diff(o, w) for o, w in zip(outs, ref["cpu"])),
            "same_as_traced": max(max_diff(o, w) for o, w in zip(outs, traced)),
            "transformers": "transformers" in sys.modules}


@harness.command
def tp_call(model: int, input: int = 0, asynchronous: bool = False) -> dict:
    """One call (``asynchronous``: ``await model.acall(...)``) -> ``diff`` from the CPU model, ``seconds``."""
    ref = _loaded[model]
    t0 = time.monotonic()
    m, x = harness.get(model), ref["inputs"][input]
    out = asyncio.run(m.acall(*x)) if asynchronous else m(*x)
    return {"diff": max_diff(out, ref["cpu"][input]), "seconds": time.monotonic() - t0}


@harness.command
def tp_concurrent(models: list, calls: int = 6) -> dict:
    """A thread per entry of ``models`` (handles; one may appear twice), each calling its model ``calls`` times."""
    diffs, errors = [], []

    def hammer(handle):
        ref, model = _loaded[handle], harness.get(handle)
        try:
            for i in range(calls):
                x = ref["inputs"][i % len(ref["inputs"])]
                diffs.append(max_diff(tuple(model(*x)), ref["cpu"][i % len(ref["inputs"])]))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=hammer, args=(h,)) for h in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return {"diff": max(diffs or [1.0]), "calls": len(diffs), "errors": errors}


@harness.command
def tp_stream(model: int, seconds: float = 60.0) -> dict:
    ref, m = _loaded[model], harness.get(model)
    calls, error, failed_call_s, t0 = 0, None, None, time.monotonic()
    while time.monotonic() - t0 < seconds:
        t_call = time.monotonic()
        try:
            m(*ref["inputs"][calls % len(ref["inputs"])])
            calls += 1
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            error, failed_call_s = harness.error_doc(exc), time.monotonic() - t_call
            break
    return {"calls": calls, "error": error, "failed_call_s": failed_call_s}


if __name__ == "__main__":
    harness.serve()
