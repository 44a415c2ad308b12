"""The wire format: the one module that knows how messages look on a socket.

A message is a ZeroMQ multipart message: frame 0 is a msgpack header
``{"v": PROTOCOL_VERSION, "op": <name>, "id": <request id>, "body": {...}}``, and every further frame is the raw
bytes of one tensor named in the body. Tensors, tuples, lists, dicts and scalars nest freely inside a body: a tensor
becomes a msgpack extension that points at its frame (or, when large, at a region of a shared-memory segment), a tuple
becomes an extension holding its items. Nothing is ever pickled.

Every message type is declared once below as a dataclass with its op name. :func:`encode` turns one into frames,
:func:`decode` turns frames back into a typed message or raises :class:`ProtocolError` with a clear reason: bad input
never gets further than this module.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import warnings
import typing
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from .errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_FRAMES = 4096
MAX_TUPLE_NESTING = 32  # each level recurses through msgpack's C unpacker: unbounded nesting overflows the C stack

ZERO_COPY_MIN_BYTES = 64 * 1024  # received frames at least this large become tensors without a copy
EXT_TENSOR = 1  # [frame index, dtype, shape]
EXT_SHM_TENSOR = 2  # [segment name, offset, dtype, shape]
EXT_TUPLE = 3  # packed list of items

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "complex64", "complex128",
        "int8", "int16", "int32", "int64", "uint8", "bool",
    )
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[torch.dtype, int] = {d: torch.empty((), dtype=d).element_size() for d in DTYPES.values()}

MESSAGES: dict[str, type] = {}


def message(op: str):
    """Register a dataclass as the message type for ``op``."""

    def register(cls):
        cls = dataclass(cls)
        cls.op = op
        MESSAGES[op] = cls
        return cls

    return register


# --------------------------------------------------------------------------------------------------------------
# Message types. Control plane: client <-> broker.


@message("ping")
class Ping:
    pass


@message("pong")
class Pong:
    pid: int
    cores: int
    backend: str
    version: int = PROTOCOL_VERSION


@message("acquire")
class Acquire:
    """Sent on a lease link (:mod:`lease_link`). The owner's pid and uid are the kernel's (``SO_PEERCRED``); the
    ``pid`` and ``create_time`` fields are informational and never trusted."""

    cmd: str
    visible: typing.Optional[list] = None  # exact global core ids
    count: typing.Optional[int] = None  # contiguous count; None with visible None = all cores
    wait_s: float = 0.0  # opt-in queueing (NEURON_RT_ACQUIRE_TIMEOUT)
    pid: int = 0
    create_time: float = 0.0


@message("reattach")
class Reattach:
    """On a new lease link after the broker restarted: take back ``lease_id`` (the broker checks the token against
    its journal's hash and the link's kernel pid against the lease's)."""

    lease_id: str
    token: str
    cores: typing.Optional[list] = None  # the cores it holds: claimed back if the broker lost its journal


@message("lease_ended")
class LeaseEnded:
    """Pushed on a lease link when the broker ends the lease (an operator released it); the link closes next."""

    lease_id: str
    reason: str


@message("granted")
class Granted:
    lease_id: str
    token: str
    cores: list  # global core ids, ascending
    workers: list  # [{"core", "endpoint", "pid", "ready", "failed", "last_exit"}] in core order
    heartbeat_s: float  # unused since leases live as long as their owner's lease link; kept for older clients
    lease_timeout_s: float  # the broker's opt-in stopped-owner policy (0: off)
    max_message_bytes: int = 0  # the workers' limit for one data message (0: none)


@message("heartbeat")
class Heartbeat:
    lease_id: str


@message("heartbeat_ack")
class HeartbeatAck:
    workers: list  # the lease's cores' workers now: [{"core", "endpoint", "pid", "ready", "failed", "last_exit"}]


@message("release")
class Release:
    lease_id: str


@message("status")
class Status:
    pass


@message("status_reply")
class StatusReply:
    doc: dict


@message("stop")
class Stop:
    pass


@message("drain")
class Drain:
    """Stop granting new leases (acquires get BrokerDrainingError) until ``resume``; owners keep their cores."""

    resume: bool = False


@message("force_release")
class ForceRelease:
    """An operator takes every core of ``pid`` back (``neuron-broker release --pid``); its next call fails."""

    pid: int


@message("force_released")
class ForceReleased:
    pid: int
    cores: list  # the global core ids taken back, ascending (empty: the pid held none)
    leases: list  # their lease ids


@message("ok")
class Ok:
    pass


@message("error")
class Error:
    code: str
    message: str


# Supervision: broker <-> worker.


@message("worker_ready")
class WorkerReady:
    core: int
    pid: int
    endpoint: str


# Upper bounds (seconds) of the call-latency histogram a worker reports; one more bucket counts slower calls.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@message("worker_stats")
class WorkerStats:
    core: int
    models: list  # [{"id", "name", "requests", "bytes"}]
    requests: int
    errors: int
    rss: int
    busy: bool
    # Added for the operator tools; the defaults keep older workers decodable. Totals count since the worker started.
    busy_s: float = 0.0  # seconds spent running calls (the model itself)
    latency_p50_s: float = 0.0  # call latency (receipt to reply) over the recent window, 0 when no call in it
    latency_p99_s: float = 0.0
    latency_window: int = 0  # calls in that window (the last 512 calls within 60 s)
    latency_sum_s: float = 0.0  # total latency of all calls
    latency_buckets: typing.Optional[list] = None  # call counts per LATENCY_BUCKETS_S bucket, plus one for slower
    queue: int = 0  # requests received and waiting behind the one running
    loads: int = 0  # models loaded
    load_s: float = 0.0  # seconds spent loading them
    # Accelerator backends (cuda): the worker's device memory in use and the driver's utilisation (percent, or None).
    device_memory: int = 0
    device_util: typing.Optional[float] = None
    pid: int = 0  # the worker's; stats from a worker the broker has not heard register it (a lost worker_ready)


@message("assign")
class Assign:
    """The core now belongs to ``lease_id``. A worker serves one owner in its life: the broker starts a fresh worker
    for the next one. ``token_hash`` is the SHA-256 hex digest of the owner's token; the worker answers with
    :class:`Assigned` before the owner is told its grant."""

    lease_id: str
    token_hash: str
    owner_pid: int
    owner_uid: int = -1


@message("assigned")
class Assigned:
    core: int
    lease_id: str


@message("shutdown")
class Shutdown:
    pass


# Data plane: client <-> worker.


@message("load")
class Load:
    token: str
    name: str
    data: Any  # uint8 tensor: the TorchScript file's bytes (the worker never opens client-named paths)
    # A tensor-parallel rank: {"name": group name, "rank": int, "size": int}. The worker joins that process group
    # (all ranks load at once, so the rendezvous completes) and runs the model's collectives in it.
    group: typing.Optional[dict] = None
    # Weight separation: {name: tensor} of the weights kept apart from a weight-less graph, put into it on load.
    weights: Any = None


@message("loaded")
class Loaded:
    model_id: int
    load_s: float


@message("unload")
class Unload:
    token: str
    model_id: int


@message("call")
class Call:
    token: str
    model_id: int
    args: Any  # tuple of inputs: any nesting of tensors, tuples, lists, dicts and scalars
    reply_shm: typing.Optional[str] = None  # client segment the worker may write large outputs into
    reply_shm_size: int = 0


@message("result")
class Result:
    outputs: Any


# --------------------------------------------------------------------------------------------------------------
# Tensors.


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


# --------------------------------------------------------------------------------------------------------------
# Encoding and decoding.


def _default(sink: TensorSink | None):
    def hook(obj):
        if isinstance(obj, torch.Tensor):
            if sink is None:
                raise ProtocolError("this message cannot carry tensors")
            return sink.put(obj)
        if isinstance(obj, tuple):
            return msgpack.ExtType(EXT_TUPLE, msgpack.packb(list(obj), default=hook, strict_types=True))
        if isinstance(obj, dict):  # dict subclasses (OrderedDict, ...)
            return dict(obj)
        if isinstance(obj, list):
            return list(obj)
        if isinstance(obj, (bool, int, float, str, bytes)):  # subclasses (IntEnum, ...)
            for base in (bool, int, float, str, bytes):
                if isinstance(obj, base):
                    return base(obj)
        if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:  # numpy scalars
            value = obj.item()
            if isinstance(value, (bool, int, float)):
                return value
        if isinstance(obj, torch.dtype):
            return dtype_name(obj)
        raise ProtocolError(f"a value of type {type(obj).__name__} cannot travel; use tensors, numbers, strings, "
                            "None, tuples, lists and dicts")

    return hook


def encode(msg, req_id: int = 0, sink: TensorSink | None = None) -> list:
    """The frames of ``msg``: its header, then one frame per tensor that ``sink`` did not place in shared memory."""
    body = {name: getattr(msg, name) for name in _schema(type(msg))[2]}
    header = {"v": PROTOCOL_VERSION, "op": msg.op, "id": req_id, "body": body}
    if sink is None:
        sink = TensorSink()
    head = msgpack.packb(header, default=_default(sink), strict_types=True)
    return [head, *sink.frames]


def encode_error(code: str, text: str, req_id: int = 0) -> list:
    return encode(Error(code=code, message=text), req_id)


@dataclass
class Envelope:
    """A decoded message with its request id."""

    req_id: int
    msg: Any
    op: str = field(default="")


def _ext_hook(source: TensorSource | None):
    depth = [0]

    def hook(code, data):
        try:
            if code == EXT_TUPLE:
                if depth[0] >= MAX_TUPLE_NESTING:
                    raise ProtocolError(f"tuples nest deeper than {MAX_TUPLE_NESTING} levels")
                depth[0] += 1
                try:
                    items = msgpack.unpackb(data, ext_hook=hook, raw=False, strict_map_key=False)
                finally:
                    depth[0] -= 1
                if not isinstance(items, list):
                    raise ProtocolError("a tuple extension must hold a list")
                return tuple(items)
            if code in (EXT_TENSOR, EXT_SHM_TENSOR):
                if source is None:
                    raise ProtocolError("this message cannot carry tensors")
                ref = msgpack.unpackb(data, raw=False)
                if not isinstance(ref, list):
                    raise ProtocolError("a tensor reference must be a list")
                if code == EXT_TENSOR and len(ref) == 3:
                    return source.frame_tensor(*ref)
                if code == EXT_SHM_TENSOR and len(ref) == 4:
                    return source.shm_tensor(*ref)
                raise ProtocolError(f"malformed tensor reference {ref!r}")
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack's own errors on hostile bytes
            raise ProtocolError(f"malformed extension {code}: {exc}") from None
        raise ProtocolError(f"unknown extension type {code}")

    return hook


def _checker(hint):
    """A fast ``value -> bool`` type check for a field annotation (built once per message type)."""
    if hint is Any:
        return None
    if typing.get_origin(hint) is typing.Union:
        parts = [_checker(h) for h in typing.get_args(hint)]
        if any(p is None for p in parts):
            return None
        return lambda v: any(p(v) for p in parts)
    if hint is type(None):
        return lambda v: v is None
    if hint is float:
        return lambda v: type(v) is float or type(v) is int
    if hint is int:
        return lambda v: type(v) is int
    base = typing.get_origin(hint) or hint
    return lambda v: isinstance(v, base)


def _schema(cls):
    """(field names, [(name, check, required)]) of a message type, computed once."""
    schema = cls.__dict__.get("_schema_cache")
    if schema is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        schema = (frozenset(f.name for f in fields),
                  [(f.name, _checker(hints[f.name]), f.default is dataclasses.MISSING) for f in fields],
                  tuple(f.name for f in fields))
        cls._schema_cache = schema
    return schema


def decode(frames, source: TensorSource | None = None) -> Envelope:
    """Parse ``frames`` into an :class:`Envelope`; raise :class:`ProtocolError` saying what is wrong."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"message has {len(frames)} frames; at most {MAX_FRAMES} are accepted")
    head = memoryview(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {head.nbytes} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if source is None:
        source = TensorSource(frames)
    try:
        header = msgpack.unpackb(head, ext_hook=_ext_hook(source), raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    if len(source.used) != len(frames) - 1:
        raise ProtocolError(f"message has {len(frames) - 1} tensor frames but its header points at "
                            f"{len(source.used)}; frames were added or lost on the way")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION}); "
            "upgrade the older side so that client, broker and workers match"
        )
    op, req_id, body = header.get("op"), header.get("id", 0), header.get("body", {})
    if type(req_id) is not int:
        raise ProtocolError(f"request id must be an int, got {req_id!r}")
    cls = MESSAGES.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unknown op {op!r}; known: {', '.join(sorted(MESSAGES))}")
    if not isinstance(body, dict):
        raise ProtocolError(f"{op}: body must be a map")
    names, checks, _ = _schema(cls)
    if not names.issuperset(body):
        raise ProtocolError(f"{op}: unexpected fields {sorted(map(str, set(body) - names))}")
    for name, check, required in checks:
        if name not in body:
            if required:
                raise ProtocolError(f"{op}: missing field {name!r}")
            continue
        if check is not None and not check(body[name]):
            raise ProtocolError(f"{op}: field {name!r} has the wrong type ({type(body[name]).__name__})")
    return Envelope(req_id=req_id, msg=cls(**body), op=op)


def peek_req_id(frames) -> int:
    """Best-effort request id of a message that failed to decode, so that the error reply can echo it."""
    try:
        header = msgpack.unpackb(memoryview(frames[0]), raw=False, strict_map_key=False,
                                 ext_hook=lambda c, d: None)
        rid = header.get("id", 0) if isinstance(header, dict) else 0
        return rid if isinstance(rid, int) else 0
    except Exception:
        return 0


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

