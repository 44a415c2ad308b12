"""Commands for the operator-tool tests (``python -m tests.procs.ops``), with those of :mod:`tests.procs.owner`.

* ``serve`` (``path``): replicates the model on every core the process owns (``acquire`` first) and keeps calling
  it from a thread (every ``interval_s``) until ``reset`` -> ``pid``, ``owned``, ``model_cores``.
"""
from __future__ import annotations

import os
import threading

import torch

import neuron_client
from tests.procs import harness, owner

_stop = threading.Event()
_threads: list[threading.Thread] = []


@harness.command
def serve(path: str, interval_s: float = 0.01) -> dict:
    m = harness.get(owner.load(path, context="multicore")["model"])
    x = torch.rand(2, 4)
    m(x)
    _stop.clear()

    def loop():
        while not _stop.wait(interval_s):
            try:
                m(x)
            except Exception:  # noqa: BLE001 - the lease ended (drained, released): nothing left to serve
                return

    t = threading.Thread(target=loop, name="serve", daemon=True)
    t.start()
    _threads.append(t)
    return {"pid": os.getpid(), "owned": neuron_client.get_runtime().cores, "model_cores": m.cores}


@harness.on_reset
def _stop_serving() -> None:
    _stop.set()
    for t in _threads:
        t.join(10)
    _threads.clear()


if __name__ == "__main__":
    harness.serve()
