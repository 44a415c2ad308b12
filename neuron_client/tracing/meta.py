"""A traced model's record: its input shapes and load flags, kept inside the saved file.

The record is a string attribute ``neuron_meta`` (JSON) registered on the traced module, so a plain
``torch.jit.save`` keeps it. :func:`read_meta` reads it back from a file without loading the model and without
executing anything in the file (a restricted unpickler that resolves no globals).
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile

import torch

from neuron_client.wire import tensors

META_ATTR = "neuron_meta"
META_FORMAT = 1


def tensor_specs(inputs) -> list[dict]:
    """Shape and dtype of every tensor in a nesting of inputs, in order."""
    return [{"shape": list(t.shape), "dtype": tensors.dtype_name(t.dtype)} for t in tensors.walk_tensors(inputs)]


def get_meta(module) -> dict:
    c = getattr(module, "_c", None)
    if c is None or not c.hasattr(META_ATTR):
        return {}
    try:
        return json.loads(c.getattr(META_ATTR))
    except (TypeError, ValueError):
        return {}


def set_meta(module, meta: dict) -> None:
    c = module._c
    text = json.dumps(meta, sort_keys=True)
    if c.hasattr(META_ATTR):
        c.setattr(META_ATTR, text)
    else:
        c._register_attribute(META_ATTR, torch._C.StringType.get(), text)


def update_meta(module, **changes) -> None:
    if not isinstance(module, torch.jit.ScriptModule):
        raise TypeError(f"expected a traced TorchScript module (from neuron_client.trace), got {type(module).__name__}")
    meta = get_meta(module) or {"format": META_FORMAT}
    meta.update(changes)
    set_meta(module, meta)


class _Stub:
    """Stands in for every class a TorchScript pickle names: holds state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.state = None
        self.args = args  # a tensor's reference: (storage id, offset, size, ...)

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _MetaUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # never resolve a real global: nothing in the file can run
        return _Stub

    def persistent_load(self, pid):
        return pid  # a storage's id: ("storage", type, key, location, numel)


def read_state(data: bytes):
    """(the top module's pickled state, ``storage(ref) -> bytes | None``) of a saved TorchScript file, read without
    running anything in it; None if it is no TorchScript file. ``storage`` gives a 1-d uint8 tensor's bytes."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        names = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not names:
            return None
        top = _MetaUnpickler(io.BytesIO(z.read(names[0]))).load()
    except Exception:
        return None
    prefix = names[0].split("/")[0]

    def storage(ref):
        args = getattr(ref, "args", None)
        try:
            (_, _, key, _, _), offset, size = args[0][:5], args[1], args[2]
            blob = z.read(f"{prefix}/data/{key}")
            n = 1
            for d in size:
                n *= int(d)
            return blob[int(offset):int(offset) + n]
        except Exception:
            return None

    return getattr(top, "state", None), storage


def read_meta(data: bytes) -> dict:
    """The ``neuron_meta`` record of a saved TorchScript file's bytes (a self-placing module's, or a plain traced
    module's attribute); ``{}`` if it has none."""
    got = read_state(data)
    if got is None:
        return {}
    state = got[0]
    if isinstance(state, tuple) and len(state) == 3 and isinstance(state[1], str):  # tracing.script's module
        state = {META_ATTR: state[1]}
    if isinstance(state, dict) and isinstance(state.get(META_ATTR), str):
        try:
            meta = json.loads(state[META_ATTR])
            return meta if isinstance(meta, dict) else {}
        except (ValueError, RecursionError):
            return {}
    return {}


def saved_kind(data: bytes) -> str:
    """What a model file's bytes are, read without running anything: ``"torchscript"`` (``torch.jit.save``),
    ``"torch.save"`` (a pickled checkpoint or state dict: no graph in it), or ``"unknown"``."""
    if data[:2] == b"\x80\x02":  # the legacy (pre-1.6) torch.save format: a bare pickle stream
        return "torch.save"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return "unknown"
    tails = {n.split("/", 1)[1] for n in names if "/" in n}
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "torch.save"
    return "unknown"
