"""Device-resident state (``io_aliases``): tensors that stay in the worker between calls, such as a KV cache.

A state tensor is a registered buffer of the model. ``io_aliases`` maps it (the buffer tensor itself, or its
qualified name) to the index of the model output that holds its next value::

    class Accumulate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("total", torch.zeros(1000, 1000))

        def forward(self, x):
            new = self.total + x
            return new.sum(), new                     # output 1 is the next value of ``total``

    traced = neuron_client.trace(m, x, input_output_aliases={m.total: 1})
    model = neuron_client.jit.load(saved)
    s = model(x)                                       # (sum,): output 1 went into ``total`` on the core

The write-back is part of the traced graph: after the model runs, each aliased output is copied in place into its
buffer, and the call returns the tuple of the *other* outputs. So the state never crosses the socket (only the inputs
and the remaining outputs do), every replica keeps its own state, and a file loaded with plain ``torch.jit.load``
behaves the same. The model may also update a buffer in place and return it; the copy onto itself costs nothing.
The state starts from the buffer's value at trace time (tracing runs the model once; the state is put back after)
and again from it whenever the model is loaded onto a core (a worker that restarts loads it afresh).

:class:`TrafficMeter` counts the bytes a process's calls send and receive, to show that.
"""
from __future__ import annotations

import threading
import warnings

import torch

from neuron_client.wire import codec, messages, tensors


def buffer_names(model: torch.nn.Module, io_aliases) -> dict[str, int]:
    """``io_aliases`` ({buffer tensor or qualified name: output index}) as {qualified buffer name: output index}."""
    if not io_aliases:
        return {}
    if not isinstance(io_aliases, dict):
        raise TypeError(f"io_aliases must be a dict {{state buffer: output index}}, got {type(io_aliases).__name__}")
    buffers = dict(model.named_buffers())
    by_id = {id(t): name for name, t in buffers.items()}
    params = {id(t): name for name, t in model.named_parameters()}
    names: dict[str, int] = {}
    for key, index in io_aliases.items():
        if isinstance(key, str):
            if key not in buffers:
                raise ValueError(f"io_aliases names {key!r}, which is not a buffer of the model "
                                 f"(buffers: {', '.join(buffers) or 'none'}); register state with register_buffer")
            name = key
        elif isinstance(key, torch.Tensor):
            name = by_id.get(id(key))
            if name is None:
                what = f"parameter {params[id(key)]!r}" if id(key) in params else "a tensor that is not a buffer of it"
                raise ValueError(f"io_aliases holds {what}: state tensors must be buffers of the model "
                                 "(module.register_buffer), given as the buffer itself or its qualified name")
        else:
            raise TypeError(f"io_aliases keys must be buffer tensors or names, got {type(key).__name__}")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"io_aliases[{name!r}] must be a non-negative output index, got {index!r}")
        if name in names:
            raise ValueError(f"io_aliases names buffer {name!r} twice")
        if index in names.values():
            raise ValueError(f"io_aliases sends output {index} into two buffers")
        names[name] = index
    return names


def slots(model: torch.nn.Module, names) -> list[tuple[torch.nn.Module, str]]:
    """(owning submodule, attribute name) of each qualified buffer name."""
    out = []
    for name in names:
        owner, _, attr = name.rpartition(".")
        out.append((model.get_submodule(owner) if owner else model, attr))
    return out


def check_aliased_outputs(outputs, aliases: dict[str, int], buffers: dict[str, torch.Tensor]) -> list:
    """The model's top-level outputs as a list, after checking that every aliased output fits its buffer."""
    if not isinstance(outputs, (tuple, list)):
        raise ValueError("a model with io_aliases must return a tuple of outputs (the aliased ones hold the next "
                         f"values of its state), got {type(outputs).__name__}")
    for name, index in aliases.items():
        if index >= len(outputs):
            raise ValueError(f"io_aliases[{name!r}] = {index}, but the model returns {len(outputs)} outputs")
        out, buf = outputs[index], buffers[name]
        with warnings.catch_warnings():  # shapes are constants of the trace: comparing them records nothing
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            fits = isinstance(out, torch.Tensor) and list(out.shape) == list(buf.shape) and out.dtype == buf.dtype
        if not fits:
            got = f"{tensors.dtype_name(out.dtype)}{list(out.shape)}" if isinstance(out, torch.Tensor) else \
                type(out).__name__
            raise ValueError(f"output {index} ({got}) cannot be written into state buffer {name!r} "
                             f"({tensors.dtype_name(buf.dtype)}{list(buf.shape)}): shapes and dtypes must match")
    return list(outputs)


class Snapshot:
    """The values of some buffers, put back after tracing ran the model (and so updated its state) once."""

    def __init__(self, model: torch.nn.Module, names):
        buffers = dict(model.named_buffers())
        self.saved = [(buffers[n], buffers[n].detach().clone()) for n in names]

    def restore(self) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)


class _Aliased(torch.nn.Module):
    """Runs ``model``, writes the aliased outputs into their buffers, returns the other outputs (a tuple)."""

    def __init__(self, model: torch.nn.Module, aliases: dict[str, int]):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_aliases", aliases)  # plain attributes: not submodules
        object.__setattr__(self, "_slots", slots(model, aliases))

    def forward(self, *args):
        buffers = dict(self.model.named_buffers())
        outputs = check_aliased_outputs(self.model(*args), self._aliases, buffers)
        for (owner, attr), index in zip(self._slots, self._aliases.values()):
            getattr(owner, attr).copy_(outputs[index])
        keep = set(self._aliases.values())
        return tuple(o for i, o in enumerate(outputs) if i not in keep)


def trace_with_state(model: torch.nn.Module, example_inputs: tuple, io_aliases, **trace_kwargs):
    """``torch.jit.trace`` of ``model`` with its aliased outputs written back into its state buffers in the graph.

    Returns the traced module and {qualified buffer name in the traced module: output index}.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError("io_aliases needs a torch.nn.Module whose state tensors are registered buffers")
    aliases = buffer_names(model, io_aliases)
    wrapper = _Aliased(model.eval(), aliases)
    snap = Snapshot(model, aliases)
    trace_kwargs.setdefault("check_trace", False)  # a second run sees the state the first one left
    try:
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example_inputs, **trace_kwargs)
    finally:
        snap.restore()  # the traced module holds the same buffer tensors: both start from the traced-time state
    return traced, {f"model.{name}": index for name, index in aliases.items()}


def state_bytes(module, names) -> int:
    buffers = dict(module.named_buffers())
    return sum(buffers[n].numel() * buffers[n].element_size() for n in names if n in buffers)


class TrafficMeter:
    """Counts the bytes this process's data-plane messages carry (a diagnostic; the wire format is unchanged).

    While active (``with TrafficMeter() as meter:``), every message the process encodes or decodes is measured: the
    header frame plus every tensor it carries, whether the tensor travels in a frame or through shared memory (a
    fast-path call in the lean format: its header and tensor bytes in the mailbox).
    ``meter.sent`` / ``meter.received`` are bytes, ``meter.calls`` the ``call`` messages sent. One meter at a time.
    """

    _lock = threading.Lock()
    _active: "TrafficMeter | None" = None

    def __init__(self):
        self.sent = 0
        self.received = 0
        self.calls = 0
        self._encode = self._decode = self._box_call = self._lean_call = self._lean_read = None

    def __enter__(self) -> "TrafficMeter":
        with TrafficMeter._lock:
            if TrafficMeter._active is not None:
                raise RuntimeError("a TrafficMeter is already active in this process")
            TrafficMeter._active = self
        self._encode, self._decode = codec.encode, codec.decode
        encode, decode = self._encode, self._decode

        def counting_encode(msg, req_id=0, sink=None):
            frames = encode(msg, req_id, sink)
            if isinstance(msg, messages.Call):
                self.calls += 1
            self.sent += len(frames[0]) + _tensor_bytes(msg)
            return frames

        def counting_decode(frames, source=None):
            env = decode(frames, source)
            self.received += len(frames[0]) + _tensor_bytes(env.msg)
            return env

        from neuron_client.wire import mailbox

        self._box_call = call = mailbox.ClientMailbox.call

        def counting_call(box, *args, **kw):  # the fast path's lean messages (its frames pass the codec above)
            out = call(box, *args, **kw)
            ctl = box.region.ctl
            if ctl[mailbox._REQ_KIND] == mailbox.KIND_LEAN:
                self.calls += 1
                self.sent += ctl[mailbox._REQ_LEN]
            if ctl[mailbox._REP_KIND] == mailbox.KIND_LEAN:
                self.received += ctl[mailbox._REP_LEN]
            return out

        self._lean_call, self._lean_read = lean_call, lean_read = mailbox.SocketLean.call, mailbox.SocketLean.read

        def counting_lean_call(lean, *args, **kw):  # the socket path's lean messages
            frames = lean_call(lean, *args, **kw)
            if frames is not None:
                self.calls += 1
                self.sent += sum(memoryview(f).nbytes for f in frames)
            return frames

        def counting_lean_read(lean, frames):
            self.received += sum(memoryview(f).nbytes for f in frames)
            return lean_read(lean, frames)

        codec.encode, codec.decode = counting_encode, counting_decode
        mailbox.ClientMailbox.call = counting_call
        mailbox.SocketLean.call, mailbox.SocketLean.read = counting_lean_call, counting_lean_read
        return self

    def __exit__(self, *exc) -> None:
        from neuron_client.wire import mailbox

        mailbox.ClientMailbox.call = self._box_call
        mailbox.SocketLean.call, mailbox.SocketLean.read = self._lean_call, self._lean_read
        codec.encode, codec.decode = self._encode, self._decode
        with TrafficMeter._lock:
            TrafficMeter._active = None

    def snapshot(self) -> tuple[int, int, int]:
        return self.sent, self.received, self.calls


def _tensor_bytes(msg) -> int:
    payload = getattr(msg, "args", None) if isinstance(msg, messages.Call) else getattr(msg, "outputs", None)
    if payload is None:
        return 0
    return sum(t.numel() * t.element_size() for t in tensors.walk_tensors(payload))
