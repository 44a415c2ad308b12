"""Tensors on the wire: dtypes, shapes, and where a tensor's bytes go (a frame, or a shared-memory segment).

The only module of the wire kernel that imports torch; :mod:`neuron_client.wire.codec` imports it the first time a
message carries a tensor, so a process that never sends one (the broker, the operator commands) never loads torch.
"""
from __future__ import annotations

import ctypes
import math
import warnings

import msgpack
import torch

from .codec import EXT_SHM_TENSOR, EXT_TENSOR
from .errors import ProtocolError

ZERO_COPY_MIN_BYTES = 64 * 1024  # received frames at least this large become tensors without a copy

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "complex64", "complex128",
        "int8", "int16", "int32", "int64", "uint8", "bool",
    )
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[torch.dtype, int] = {d: torch.empty((), dtype=d).element_size() for d in DTYPES.values()}



def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot travel; supported: {', '.join(DTYPES)}") from None


def _dtype(name) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise ProtocolError(f"unknown dtype {name!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[name]


def _shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 64:
        raise ProtocolError(f"bad tensor shape {shape!r}: expected a list of at most 64 non-negative ints")
    return tuple(shape)


def nbytes_of(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]


class TensorSink:
    """Where an encoder puts tensor bytes: appended frames, or a shared-memory arena for large ones.

    ``shm`` is an object with ``put(tensor) -> (segment name, offset) | None`` (None: no room, use a frame).
    """

    def __init__(self, shm=None, shm_threshold: int = 1 << 62):
        self.frames: list = []
        self.shm = shm
        self.shm_threshold = shm_threshold

    def put(self, t: torch.Tensor) -> msgpack.ExtType:
        if t.requires_grad:
            t = t.detach()
        if not t.is_cpu:
            t = t.cpu()
        name = _DTYPE_NAMES.get(t.dtype) or dtype_name(t.dtype)
        shape = list(t.shape)
        if self.shm is not None and t.numel() * ITEMSIZE[t.dtype] >= self.shm_threshold:
            where = self.shm.put(t)
            if where is not None:
                return msgpack.ExtType(EXT_SHM_TENSOR, msgpack.packb([where[0], where[1], name, shape]))
        self.frames.append(tensor_buffer(t))
        return msgpack.ExtType(EXT_TENSOR, msgpack.packb([len(self.frames), name, shape]))


def tensor_buffer(t: torch.Tensor):
    """A zero-copy, buffer-protocol view of a CPU tensor's bytes (keeps the tensor alive)."""
    t = t.contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return b""
    buf = (ctypes.c_char * n).from_address(t.data_ptr())
    buf._tensor = t  # the view must not outlive the storage
    return buf


def tensor_from_buffer(buf, dtype: torch.dtype, shape, copy: bool) -> torch.Tensor:
    """A tensor over ``buf`` or over a copy of it.

    Without a copy, ``buf`` may be a received frame's ``bytes``: the tensor then owns the only reference to memory
    nobody else reads, so its being nominally immutable does not matter (torch's warning about it is silenced).
    """
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    if copy:
        buf = bytearray(buf)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class TensorSource:
    """Where a decoder finds tensor bytes: the message's frames, and shared-memory segments by name.

    ``shm`` is an object with ``view(name, offset, nbytes) -> writable memoryview``. With ``copy_shm`` the decoded
    tensor owns a copy (the client side, whose arena is reused); without it, the tensor is a view (the worker side).
    """

    def __init__(self, frames, shm=None, copy_shm: bool = True):
        self.frames = frames
        self.shm = shm
        self.copy_shm = copy_shm
        self.used: set[int] = set()

    def frame_tensor(self, index, dtype_s, shape_l) -> torch.Tensor:
        dtype, shape = _dtype(dtype_s), _shape(shape_l)
        if not isinstance(index, int) or not 1 <= index < len(self.frames):
            raise ProtocolError(f"tensor points at frame {index!r} but the message has {len(self.frames)} frames")
        if index in self.used:
            raise ProtocolError(f"two tensors point at frame {index}")
        self.used.add(index)
        frame = self.frames[index]
        have = len(frame) if isinstance(frame, bytes) else memoryview(frame).nbytes
        want = nbytes_of(dtype, shape)
        if have != want:
            raise ProtocolError(
                f"tensor header says {dtype_s}{list(shape)} ({want} bytes) but its frame holds {have} bytes"
            )
        # a large frame's bytes object is used by this tensor alone: no copy. Small ones are copied: the copy is
        # cheap, and CPython shares small bytes objects (a 1-byte frame is a process-wide singleton)
        return tensor_from_buffer(frame, dtype, shape, copy=have < ZERO_COPY_MIN_BYTES)

    def shm_tensor(self, name, offset, dtype_s, shape_l) -> torch.Tensor:
        dtype, shape = _dtype(dtype_s), _shape(shape_l)
        if self.shm is None:
            raise ProtocolError("a shared-memory tensor arrived where none is accepted")
        if not isinstance(name, str) or not isinstance(offset, int) or offset < 0:
            raise ProtocolError(f"bad shared-memory reference {name!r}@{offset!r}")
        nbytes = nbytes_of(dtype, shape)
        view = self.shm.view(name, offset, nbytes)
        return tensor_from_buffer(view, dtype, shape, copy=self.copy_shm)




def map_tensors(obj, fn):
    """The same nesting of tuples, lists and dicts with ``fn`` applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(item, fn) for item in obj)
    if isinstance(obj, list):
        return [map_tensors(item, fn) for item in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def walk_tensors(obj):
    """Every tensor in a nesting of tuples, lists and dicts, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from walk_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from walk_tensors(item)

