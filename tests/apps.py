"""Client programs that tests run as real processes: ``python tests/apps.py SCENARIO ARGS...``.

Each prints JSON lines that the test reads; a scenario that holds cores prints ``{"ready": ...}`` and then waits to
be killed (at most HOLD_S seconds).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List

import torch

HOLD_S = 120


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


def model_zoo():
    return {
        "affine": (Affine(), torch.rand(2, 4)),
        "nested": (Nested(), (torch.rand(3), {"a": torch.rand(3)}, [torch.rand(2, 2), torch.ones(5, dtype=torch.int32)])),
        "gather": (Gather(), (torch.rand(4, 3), torch.tensor([0, 1]))),
        "big": (Affine(), torch.rand(1024, 1024)),
    }


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def hold() -> None:
    time.sleep(HOLD_S)


def scenario_load2(models: str) -> None:
    """Seed 001: two plain loads land on nc0 and nc1 of the process."""
    import neuron_client

    rt = neuron_client.get_runtime()
    m0 = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    m1 = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    x = torch.rand(2, 4)
    y = m0(x)
    emit(pid=os.getpid(), owned=rt.cores, m0=m0.cores, m1=m1.cores, ok=bool(torch.allclose(y, x * 2 + 1)),
         last_core=m0.last_core)


def scenario_hold(models: str = "", load: str = "0") -> None:
    """Own cores (and optionally load a model on them), say so, and wait to be killed."""
    import neuron_client

    rt = neuron_client.get_runtime()
    m = neuron_client.jit.load(os.path.join(models, "affine.pt")) if load == "1" else None
    emit(ready=True, pid=os.getpid(), owned=rt.cores, model_cores=m.cores if m else [])
    hold()


def scenario_acquire_error() -> None:
    """Try to own cores; report the error class and message instead of a traceback."""
    import neuron_client

    try:
        rt = neuron_client.get_runtime()
        emit(ok=True, owned=rt.cores)
    except Exception as exc:
        emit(ok=False, error=type(exc).__name__, message=str(exc),
             is_value_error=isinstance(exc, ValueError),
             is_unavailable=isinstance(exc, neuron_client.NeuronCoreUnavailableError))


def scenario_roundtrip(models: str) -> None:
    """Nested inputs and outputs, a large tensor through shared memory, and a model raising inside the worker."""
    import neuron_client
    from neuron_client import shm

    nested = neuron_client.jit.load(os.path.join(models, "nested.pt"))
    x, a = torch.rand(3), torch.rand(3)
    items = [torch.rand(2, 2), torch.arange(5, dtype=torch.int32)]
    out = nested(x, {"a": a}, items)
    total, doubled, pair, flag = out
    ok_nested = (isinstance(out, tuple) and torch.allclose(total, x + a)
                 and isinstance(doubled, dict) and torch.allclose(doubled["double"], a * 2)
                 and isinstance(pair, list) and torch.allclose(pair[0], items[0] * 3)
                 and pair[1].dtype == torch.int64 and torch.equal(pair[1], items[1].long() - 1)
                 and flag.dtype == torch.bool)

    big = neuron_client.jit.load(os.path.join(models, "big.pt"))
    xb = torch.rand(1024, 1024)
    first = big(xb)
    second = big(xb)  # the reply arena exists now: the output comes back through shared memory too
    segments = shm.segments_of(os.getpid())
    ok_big = bool(torch.allclose(first, xb * 2 + 1) and torch.allclose(second, xb * 2 + 1))

    gather = neuron_client.jit.load(os.path.join(models, "gather.pt"))
    xs = torch.rand(4, 3)
    try:
        gather(xs, torch.tensor([0, 9]))
        raised = None
    except neuron_client.ModelExecutionError as exc:
        raised = str(exc)
    after = gather(xs, torch.tensor([3, 1]))
    emit(ok_nested=bool(ok_nested), ok_big=ok_big, segments=len(segments), raised=raised,
         core=gather.cores[0], after_ok=bool(torch.equal(after, xs[[3, 1]])))


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    globals()[f"scenario_{name}"](*args)
