"""The saved form of a traced model: a TorchScript module that places itself on the process's cores when loaded.

``neuron_client.trace`` returns a :func:`wrap`-ped module, as torch-neuronx does: it holds the traced graph's
TorchScript file (a uint8 tensor) and its record (``neuron_meta``). ``torch.jit.save`` writes it like any module.
``torch.jit.load`` of that file, in a process that has imported ``neuron_client``, runs the module's
``__setstate__``, which calls the op ``neuron_client::place``: the graph becomes a
:class:`~neuron_client.models.neuron_model.NeuronModel` placed on this process's cores exactly as
``neuron_client.jit.load`` places it (``NEURON_RT_*``, the loading thread's ``neuron_cores_context`` /
``multicore_context``, the lazy and async flags). Its ``forward`` calls ``neuron_client::run``, which runs the call
in the core's worker (replicas round-robin). Without ``import neuron_client`` the ops do not exist and
``torch.jit.load`` fails, naming them (``Unknown builtin op: neuron_client::run``, in code from
``import_neuron_client.py``): never a silent run on the host CPU.

A module straight from ``trace`` (not loaded from a file) runs its graph in this process, as before.
:func:`model_of` gives the NeuronModel behind a loaded module (DataParallel and the placement APIs use it).

Lifetime: ``place`` returns a small tensor (the module's ``placement`` attribute) whose memory is a Python object
registered here; when TorchScript frees the module, the tensor and that object go, and the model is released.
"""
from __future__ import annotations

import io
import itertools
import json
import linecache
import threading
import weakref
from typing import Any

import torch

from neuron_client._ops import define_ops
from neuron_client.wire import tensors
from neuron_client.wire.errors import ModelLoadError, NeuronRuntimeError

OPS = "neuron_client"  # the ops' namespace: what torch names when neuron_client is not imported
CODE_MODULE = "import_neuron_client"  # the module name the saved code carries (torch shows it in the error too)
SCRIPT_KEY = "script"  # the record's part written by wrap(): {"inputs": [spec, ...], "outputs": spec, "name": str}

_registry: dict[int, tuple] = {}  # handle -> (callable, input specs, all inputs plain tensors, runs in a worker)
_registry_lock = threading.Lock()
_handles = itertools.count(1)


# -----------------------------------------------------------------------------------------------------------------
# Structures: a nesting of tuples, lists and str-keyed dicts of tensors, as a spec ("t", ["tuple", [...]],
# ["list", [...]], ["dict", [[key, spec], ...]]) and the flat list of its tensors.


def flatten(obj, what: str = "value") -> tuple[list, Any]:
    if isinstance(obj, torch.Tensor):
        return [obj], "t"
    if isinstance(obj, (tuple, list)):
        flat, specs = [], []
        for item in obj:
            f, s = flatten(item, what)
            flat += f
            specs.append(s)
        return flat, ["tuple" if isinstance(obj, tuple) else "list", specs]
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        flat, specs = [], []
        for k, v in obj.items():
            f, s = flatten(v, what)
            flat += f
            specs.append([k, s])
        return flat, ["dict", specs]
    raise TypeError(f"a traced model's {what} must be tensors, tuples, lists and str-keyed dicts of them; got "
                    f"{type(obj).__name__}")


def unflatten(flat: list, spec):
    items = iter(flat)

    def build(s):
        if s == "t":
            return next(items)
        kind, parts = s
        if kind == "dict":
            return {k: build(p) for k, p in parts}
        built = [build(p) for p in parts]
        return tuple(built) if kind == "tuple" else built

    out = build(spec)
    if next(items, None) is not None:
        raise ValueError("more tensors than the recorded structure holds")
    return out


def _type(spec) -> str:
    """The TorchScript type of a spec."""
    if spec == "t":
        return "torch.Tensor"
    kind, parts = spec
    if kind == "tuple":
        return f"Tuple[{', '.join(_type(p) for p in parts)}]" if parts else "Tuple[()]"
    inner = {_type(p[1] if kind == "dict" else p) for p in parts} or {"torch.Tensor"}
    if len(inner) != 1:
        raise TypeError(f"a {kind} whose items differ in structure cannot be typed in TorchScript")
    return f"List[{inner.pop()}]" if kind == "list" else f"Dict[str, {inner.pop()}]"


def _build(spec, counter) -> str:
    """The TorchScript expression that rebuilds ``spec`` from the flat list ``outs``."""
    if spec == "t":
        return f"outs[{next(counter)}]"
    kind, parts = spec
    if kind == "dict":
        return "{" + ", ".join(f"{k!r}: {_build(p, counter)}" for k, p in parts) + "}"
    items = [_build(p, counter) for p in parts]
    if kind == "tuple":
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    return "[" + ", ".join(items) + "]"


def _leaves(spec, expr: str) -> list[str]:
    """The TorchScript expressions of every tensor in an argument ``expr`` of structure ``spec``."""
    if spec == "t":
        return [expr]
    kind, parts = spec
    if kind == "dict":
        return [e for k, p in parts for e in _leaves(p, f"{expr}[{k!r}]")]
    return [e for i, p in enumerate(parts) for e in _leaves(p, f"{expr}[{i}]")]


# -----------------------------------------------------------------------------------------------------------------
# The module class, one per signature.

_SOURCE = '''
class PlacedGraph(torch.nn.Module):
    """A model for the cores of the process that loads it (import neuron_client first)."""

    graph: torch.Tensor
    neuron_meta: str
    placement: torch.Tensor

    def __init__(self, graph: torch.Tensor, meta: str, placement: torch.Tensor):
        super().__init__()
        self.graph = graph
        self.neuron_meta = meta
        self.placement = placement

    def forward(self{params}) -> {returns}:
        outs = torch.ops.{ops}.run(self.placement, [{leaves}])
        return {rebuild}

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.graph, self.neuron_meta, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.graph = state[0]
        self.neuron_meta = state[1]
        self.training = state[2]
        self.placement = torch.ops.{ops}.place(self.graph, self.neuron_meta)
'''
_classes: dict[str, type] = {}


def _class_for(in_specs: list, out_spec) -> type:
    params = "".join(f", x{i}: {_type(s)}" for i, s in enumerate(in_specs))
    leaves = ", ".join(e for i, s in enumerate(in_specs) for e in _leaves(s, f"x{i}"))
    src = _SOURCE.format(params=params, returns=_type(out_spec), ops=OPS, leaves=leaves,
                         rebuild=_build(out_spec, itertools.count()))
    cls = _classes.get(src)
    if cls is None:
        filename = f"<neuron_client.tracing.script {len(_classes)}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)  # torch.jit.script reads source
        from typing import Dict, List, Tuple

        scope = {"torch": torch, "Dict": Dict, "List": List, "Tuple": Tuple, "__name__": CODE_MODULE}
        exec(compile(src, filename, "exec", dont_inherit=True), scope)
        cls = _classes[src] = scope["PlacedGraph"]
    return cls


# -----------------------------------------------------------------------------------------------------------------
# Handles.


class _Anchor(bytearray):
    """The memory of a placement tensor: collected when TorchScript frees the tensor, which releases the handle."""


def _anchor(target, in_specs: list) -> torch.Tensor:
    handle = next(_handles)
    from neuron_client.models.neuron_model import NeuronModel

    with _registry_lock:
        _registry[handle] = (target, in_specs, all(s == "t" for s in in_specs), isinstance(target, NeuronModel))
    memory = _Anchor(handle.to_bytes(8, "little"))
    weakref.finalize(memory, _release, handle)
    return torch.frombuffer(memory, dtype=torch.uint8)


def _release(handle: int) -> None:
    with _registry_lock:
        _registry.pop(handle, None)  # a NeuronModel nobody else holds is unloaded by its own finalizer


def _lookup(placement: torch.Tensor):
    if placement.numel() != 8 or placement.dtype != torch.uint8:
        raise NeuronRuntimeError("this module was never placed: load its file with torch.jit.load (after "
                                 "import neuron_client) or neuron_client.jit.load")
    handle = int.from_bytes(bytes(memoryview(tensors.tensor_buffer(placement))), "little")
    with _registry_lock:
        entry = _registry.get(handle)
    if entry is None:
        raise NeuronRuntimeError("this copy of a placed model outlived the module it was copied from, whose "
                                 "placement has been released; load the file again with torch.jit.load")
    return entry


def _place(graph: torch.Tensor, meta_text: str) -> torch.Tensor:
    from neuron_client.models.neuron_model import NeuronModel
    from neuron_client.runtime import placement

    meta = json.loads(meta_text)
    script = meta.get(SCRIPT_KEY) or {}
    data = bytes(memoryview(tensors.tensor_buffer(graph)))
    model = NeuronModel(script.get("name") or "model.pt", data, meta, placement.current())
    if meta.get("lazy_load"):
        model.defer()
    else:
        model.place(background=bool(meta.get("async_load")))
    return _anchor(model, script.get("inputs") or [])


def _run(placement: torch.Tensor, inputs: list) -> list:
    target, in_specs, flat_inputs, remote = _lookup(placement)
    args = tuple(inputs) if flat_inputs else unflatten(list(inputs), ["tuple", in_specs])
    out = target(*args)
    flat = [out] if isinstance(out, torch.Tensor) else flatten(out, "outputs")[0]
    if remote:  # outputs that came over the wire are tensors of their own
        return flat
    # an output that is an input (an identity model run in this process) must be a tensor of its own
    ids = {id(t) for t in inputs}
    return [t.clone() if id(t) in ids else t for t in flat]


define_ops(OPS, {"place": ("(Tensor graph, str meta) -> Tensor", _place),
                 "run": ("(Tensor placement, Tensor[] inputs) -> Tensor[]", _run)})


# -----------------------------------------------------------------------------------------------------------------
# Wrapping and unwrapping.


def saved_bytes(module) -> bytes:
    """What ``torch.jit.save`` writes for ``module``."""
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def output_spec(module, example_inputs: tuple, call=None):
    """The structure of ``module``'s outputs on ``example_inputs``, run once with its buffers put back after (a
    model that updates state in place must not start from a changed state)."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        with torch.no_grad():
            out = (call or module)(*example_inputs)
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
    return flatten(out, "outputs")[1]


def wrap(graph_module, example_inputs: tuple, meta: dict, name: str, local=None):
    """The self-placing module for ``graph_module`` (a traced or scripted module) and its record ``meta``.

    ``local`` is what a call of the unsaved module runs in this process (default: ``graph_module`` itself)."""
    local = local or graph_module
    in_specs = [flatten(x, "inputs")[1] for x in example_inputs]
    out_spec = output_spec(graph_module, example_inputs, local)
    meta = dict(meta, **{SCRIPT_KEY: {"inputs": in_specs, "outputs": out_spec, "name": name}})
    data = saved_bytes(graph_module)
    cls = _class_for(in_specs, out_spec)
    graph = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return torch.jit.script(cls(graph, json.dumps(meta, sort_keys=True), _anchor(local, in_specs)))


def is_placed_script(module) -> bool:
    c = getattr(module, "_c", None)
    return c is not None and c.hasattr("placement") and c.hasattr("graph") and c.hasattr("neuron_meta")


def model_of(module):
    """The :class:`~neuron_client.models.neuron_model.NeuronModel` behind a module ``torch.jit.load`` placed, or None
    for one that runs in this process (straight from ``trace``) or is no placed module at all."""
    from neuron_client.models.neuron_model import NeuronModel

    if not is_placed_script(module):
        return None
    try:
        target = _lookup(module._c.getattr("placement"))[0]
    except NeuronRuntimeError:
        return None
    return target if isinstance(target, NeuronModel) else None


def parts_of(module) -> tuple[bytes, dict]:
    """(the graph's TorchScript file, the record) of a placed module (loaded or straight from ``trace``)."""
    graph = module._c.getattr("graph")
    return bytes(memoryview(tensors.tensor_buffer(graph))), json.loads(module._c.getattr("neuron_meta"))


def unwrap(data: bytes) -> tuple[bytes, dict] | None:
    """(graph file, record) from a saved placed module's bytes, read without running anything in the file; None for
    a file that is not one (a plain traced model: files written before the self-placing form)."""
    from .meta import read_state

    got = read_state(data)
    if got is None:
        return None
    state, storage = got
    if not (isinstance(state, tuple) and len(state) == 3 and isinstance(state[1], str)):
        return None
    try:
        meta = json.loads(state[1])
    except ValueError:
        return None
    if not isinstance(meta, dict) or SCRIPT_KEY not in meta:
        return None
    graph = storage(state[0])
    if graph is None:
        raise ModelLoadError("the model file's graph tensor is missing or malformed; save it again with "
                             "torch.jit.save(neuron_client.trace(...))")
    return graph, meta


def load_here(f):
    """The graph of a saved model (either form) as a plain TorchScript module running in this process: the in-process
    reference a test, a benchmark or a demo compares the cores against (``torch.jit.load`` would place it)."""
    import os

    data = f.read() if hasattr(f, "read") else open(os.fspath(f), "rb").read()
    parts = unwrap(data)
    return torch.jit.load(io.BytesIO(parts[0] if parts is not None else data))
