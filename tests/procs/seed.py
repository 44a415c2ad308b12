"""Run one of the seed pages' examples (scripts/seeds/*.py) as it is, and report what it did as one JSON line.

``python -m tests.procs.seed <example.py> [--then PYTHON]`` runs the example with ``runpy`` in the current directory
(where the test put ``model.pt``), with the names a page leaves to its reader defined (``model``, ``inputs``, ...).
Every call a model runs is recorded (its core and its batch), by wrapping ``NeuronModel.run``: an observer in this
process, nothing of the runtime is replaced. ``--then`` runs more code in the example's namespace afterwards (what a
page does "some time later"). The report names each model the example holds: where it is, its state; the cores the
process owns; and the error, if the example raised one.
"""
from __future__ import annotations

import json
import runpy
import sys
import time
import traceback


def _ensemble_class():
    import torch

    class Ensemble(torch.nn.Module):
        """Two loaded models called from one scripted module, the first forked (seed 004's fork / wait)."""

        def __init__(self, a, b):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            f = torch.jit.fork(self.a, x)
            return torch.jit.wait(f) + self.b(x)

    return Ensemble


def reader_names() -> dict:
    """What the pages leave undefined: a model and its inputs (seed 000's ``model``, ``inputs``, ``model1``...)."""
    import torch

    torch.manual_seed(0)
    names = {"Ensemble": _ensemble_class()}  # for a test's --then code (a scripted class needs its source in a file)
    for suffix in ("", "1", "2"):
        names[f"model{suffix}"] = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        names[f"inputs{suffix}"] = torch.rand(3, 4)
        if suffix:
            names[f"input{suffix}"] = names[f"inputs{suffix}"]
    return names


def describe(value):
    import torch

    from neuron_client.models.data_parallel import DataParallel
    from neuron_client.models.neuron_model import NeuronModel
    from neuron_client.tracing import script

    if isinstance(value, torch.jit.ScriptModule) and script.is_placed_script(value):
        model = script.model_of(value)
        if model is None:
            return {"kind": "traced"}
        return {"kind": "loaded", "model": id(model), "state": str(model.state), "cores": model.cores}
    if isinstance(value, NeuronModel):
        return {"kind": "neuron_model", "model": id(value), "state": str(value.state), "cores": value.cores}
    if isinstance(value, DataParallel):
        return {"kind": "data_parallel", "model": id(value.module), "device_ids": value.device_ids, "dim": value.dim,
                "dynamic_batching": value.dynamic_batching, "cores": value.module.cores}
    return None


def main() -> int:
    path = sys.argv[1]
    then = sys.argv[sys.argv.index("--then") + 1] if "--then" in sys.argv else ""
    from neuron_client.models.neuron_model import NeuronModel

    calls = []
    run = NeuronModel.run

    def recorded(self, args, replica=None):
        out = run(self, args, replica)
        first = args[0] if args else None
        calls.append({"model": id(self), "core": self.last_core,
                      "shape": list(first.shape) if hasattr(first, "shape") else None})
        return out

    NeuronModel.run = recorded
    loads = []
    load_on = NeuronModel._load_on

    def recorded_load(self, rt, core):
        loads.append({"model": id(self), "core": core})
        return load_on(self, rt, core)

    NeuronModel._load_on = recorded_load
    report: dict = {"error": None}
    namespace = dict(reader_names())
    t0 = time.monotonic()
    try:
        namespace = runpy.run_path(path, init_globals=namespace, run_name="__main__")
        report["run_s"] = time.monotonic() - t0
        if then:
            exec(then, namespace)
    except Exception as exc:
        report["error"] = {"type": type(exc).__name__, "message": str(exc)}
        report["trace"] = traceback.format_exc()[-3000:]
    import neuron_client
    from neuron_client.runtime import lease

    rt = lease._runtime
    report["owned"] = list(rt.cores) if rt is not None else None
    report["models"] = {name: d for name, value in namespace.items() if (d := describe(value)) is not None}
    report["calls"] = calls
    report["loads"] = loads
    report["values"] = {k: v for k, v in namespace.items() if k.startswith("seen_") and isinstance(v, (int, float, str,
                                                                                                       list, bool))}
    print(json.dumps(report), flush=True)
    neuron_client.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
