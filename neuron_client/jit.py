"""``neuron_client.jit.load``: the counterpart of ``torch.jit.load`` that places the model on the process's cores."""
from __future__ import annotations

import os

from neuron_client.models.neuron_model import NeuronModel
from neuron_client.runtime import placement
from neuron_client.tracing import meta as trace_meta, script
from neuron_client.wire.errors import ModelLoadError


def _read(f) -> tuple[str, bytes]:
    if hasattr(f, "read"):
        return getattr(f, "name", "model"), f.read()
    path = os.fspath(f)
    try:
        with open(path, "rb") as fh:
            return os.path.basename(path), fh.read()
    except FileNotFoundError:
        raise ModelLoadError(f"model file {path!r} does not exist (working directory {os.getcwd()})") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path!r} is a directory; give the path of a file saved with torch.jit.save") from None
    except PermissionError:
        raise ModelLoadError(f"no permission to read model file {path!r}") from None


def load(f, map_location=None, _extra_files=None) -> NeuronModel:
    """Load a saved TorchScript model onto the process's cores.

    Placement follows the enclosing ``neuron_cores_context`` / ``multicore_context`` (this thread's), else the
    least-used core. A file saved after ``lazy_load`` is not placed until its first call (or ``DataParallel``); one
    saved after ``async_load`` starts loading now in the background and its first call waits.
    """
    name, data = _read(f)
    if trace_meta.saved_kind(data) == "torch.save":
        raise ModelLoadError(
            f"{name!r} was written by torch.save (a checkpoint or state dict: weights without a graph), not by "
            "torch.jit.save; trace the model and save that: traced = neuron_client.trace(model, example); "
            f"torch.jit.save(traced, {name!r}) (for a state dict, load it into the model first with "
            "model.load_state_dict(torch.load(path)))")
    parts = script.unwrap(data)  # a self-placing module's graph and record; None: a plain traced file (older form)
    data, meta = parts if parts is not None else (data, trace_meta.read_meta(data))
    model = NeuronModel(str(name), data, meta, placement.current())
    if meta.get("lazy_load"):
        model.defer()
        return model
    model.place(background=bool(meta.get("async_load")))
    return model
