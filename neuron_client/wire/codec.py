"""The wire format: the one module that knows how messages look on a socket.

A message is a ZeroMQ multipart message: frame 0 is a msgpack header
``{"v": PROTOCOL_VERSION, "op": <name>, "id": <request id>, "body": {...}}``, and every further frame is the raw
bytes of one tensor named in the body. Tensors, tuples, lists, dicts and scalars nest freely inside a body: a tensor
becomes a msgpack extension that points at its frame (or, when large, at a region of a shared-memory segment), a tuple
becomes an extension holding its items. Nothing is ever pickled.

The message types are :mod:`neuron_client.wire.messages`'. :func:`encode` turns one into frames, :func:`decode` turns
frames back into a typed message or raises :class:`ProtocolError` with a clear reason: bad input never gets further
than this module. A field may hold a *record*, a dataclass that is no message (the status document and its parts,
a lease's workers, a model's statistics, a tensor-parallel group): it travels as a map of its fields, and
:func:`decode` checks that map field by field, as strictly as a message's body, and builds the dataclass, so that
code reads attributes, never string keys. ``list[Record]``, ``Optional[Record]`` and ``dict[str, Record]`` nest. Tensor bytes are :mod:`neuron_client.wire.tensors`' business, imported the first time a tensor
travels: torch is not loaded by a process that only exchanges control messages.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import ProtocolError
from .messages import MESSAGES, PROTOCOL_VERSION, Error

MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_FRAMES = 4096
MAX_TUPLE_NESTING = 32  # each level recurses through msgpack's C unpacker: unbounded nesting overflows the C stack

EXT_TENSOR = 1  # [frame index, dtype, shape]
EXT_SHM_TENSOR = 2  # [segment name, offset, dtype, shape]
EXT_TUPLE = 3  # packed list of items


def _tensors():
    from . import tensors

    return tensors



def _default(sink):
    torch = sys.modules.get("torch")  # no torch loaded: no value can be a tensor or a dtype

    def hook(obj):
        if torch is not None and isinstance(obj, torch.Tensor):
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
        if torch is not None and isinstance(obj, torch.dtype):
            return _tensors().dtype_name(obj)
        names = _record_fields(type(obj))
        if names is not None:  # a record: the map of its fields
            return {name: getattr(obj, name) for name in names}
        raise ProtocolError(f"a value of type {type(obj).__name__} cannot travel; use tensors, numbers, strings, "
                            "None, tuples, lists and dicts")

    return hook


def encode(msg, req_id: int = 0, sink=None) -> list:
    """The frames of ``msg``: its header, then one frame per tensor that ``sink`` did not place in shared memory."""
    body = {name: getattr(msg, name) for name in _schema(type(msg))[2]}
    header = {"v": PROTOCOL_VERSION, "op": msg.op, "id": req_id, "body": body}
    if sink is None and "torch" in sys.modules:
        sink = _tensors().TensorSink()
    head = msgpack.packb(header, default=_default(sink), strict_types=True)
    return [head, *sink.frames] if sink is not None else [head]


def encode_error(code: str, text: str, req_id: int = 0) -> list:
    return encode(Error(code=code, message=text), req_id)


def encode_reply(reply, req_id: int = 0, sink=None, max_text: int | None = None) -> list:
    """The frames of a reply: a message, or an exception as an :class:`Error` with its code (our errors' own words;
    anything else named by its type) so that the peer raises the same exception; its text cut at ``max_text``."""
    if isinstance(reply, BaseException):
        from .errors import NeuronRuntimeError, code_of

        text = str(reply) if isinstance(reply, NeuronRuntimeError) else f"{type(reply).__name__}: {reply}"
        return encode_error(code_of(reply), text[:max_text], req_id)
    return encode(reply, req_id, sink)


@dataclass
class Envelope:
    """A decoded message with its request id."""

    req_id: int
    msg: Any
    op: str = field(default="")


def _ext_hook(source):
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


class _FrameSource:
    """A message's own frames as its tensors' source, made a real ``TensorSource`` (and torch imported) only when the
    message turns out to hold a tensor."""

    def __init__(self, frames):
        self.frames = frames
        self.used: set[int] = set()
        self._real = None

    def _source(self):
        if self._real is None:
            self._real = _tensors().TensorSource(self.frames)
            self._real.used = self.used
        return self._real

    def frame_tensor(self, *ref):
        return self._source().frame_tensor(*ref)

    def shm_tensor(self, *ref):
        return self._source().shm_tensor(*ref)


def _checker(hint):
    """A fast ``value -> bool`` type check for a field annotation (built once per message type)."""
    if hint is Any:
        return None
    if _is_union(hint):
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
    if hint is bool:
        return lambda v: type(v) is bool
    base = typing.get_origin(hint) or hint
    return lambda v: isinstance(v, base)


def _is_union(hint) -> bool:
    return typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)


def _is_record(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint) and "op" not in hint.__dict__


def _holds_record(hint) -> bool:
    return _is_record(hint) or any(_holds_record(h) for h in typing.get_args(hint))


def _record_fields(cls):
    """The field names of a record type (cached), or None when ``cls`` is no record."""
    names = _RECORD_FIELDS.get(cls)
    if names is None and cls not in _RECORD_FIELDS:
        names = tuple(f.name for f in dataclasses.fields(cls)) if _is_record(cls) else None
        _RECORD_FIELDS[cls] = names
    return names


_RECORD_FIELDS: dict[type, tuple | None] = {}


class _Bad(Exception):
    """A record's field that does not fit: (path, reason), made a ProtocolError naming the message by decode."""


def _type_name(hint) -> str:
    if _is_record(hint):
        return f"a map ({hint.__name__})"
    if _is_union(hint):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a map"
    return getattr(hint, "__name__", str(hint))


def _converter(hint):
    """``(value, path) -> value`` for an annotation that holds records: checks ``value`` all the way down and builds
    the records; raises :class:`_Bad` naming the path of the first value that does not fit."""
    if _is_record(hint):
        return _record_converter(hint)
    if _is_union(hint):
        args = typing.get_args(hint)
        nullable = type(None) in args
        rest = [h for h in args if h is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"a record field may be Optional[X], not {hint}")
        inner, expected = _converter(rest[0]), _type_name(hint)

        def optional(v, path):
            if v is None and nullable:
                return None
            try:
                return inner(v, path)
            except _Bad as bad:
                if bad.args[0] == path and bad.args[1].startswith("has the wrong type"):
                    raise _Bad(path, f"has the wrong type ({type(v).__name__}; expected {expected})") from None
                raise

        return optional
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        item = _converter(args[0]) if args else _converter(Any)

        def items(v, path):
            if type(v) is not list:
                raise _Bad(path, f"has the wrong type ({type(v).__name__}; expected a list)")
            return [item(x, f"{path}[{i}]") for i, x in enumerate(v)]

        return items
    if origin is dict:
        key = _converter(args[0]) if args else _converter(Any)
        value = _converter(args[1]) if args else _converter(Any)

        def entries(v, path):
            if type(v) is not dict:
                raise _Bad(path, f"has the wrong type ({type(v).__name__}; expected a map)")
            return {key(k, f"{path} key {k!r}"): value(x, f"{path}[{k!r}]") for k, x in v.items()}

        return entries
    check, expected = _checker(hint), _type_name(hint)
    if check is None:
        return lambda v, path: v

    def plain(v, path):
        if not check(v):
            raise _Bad(path, f"has the wrong type ({type(v).__name__}; expected {expected})")
        return v

    return plain


_RECORD_CONVERTERS: dict[type, Any] = {}


def _record_converter(cls):
    conv = _RECORD_CONVERTERS.get(cls)
    if conv is not None:
        return conv
    fields = []

    def record(v, path):
        if type(v) is not dict:
            raise _Bad(path, f"has the wrong type ({type(v).__name__}; expected a map ({cls.__name__}))")
        unexpected = v.keys() - names
        if unexpected:
            raise _Bad(path, f"has unexpected fields {sorted(map(str, unexpected))} (a {cls.__name__} has "
                             f"{', '.join(sorted(names))})")
        kwargs = {}
        for name, convert, required in fields:
            if name in v:
                kwargs[name] = convert(v[name], f"{path}.{name}")
            elif required:
                raise _Bad(path, f"is missing field {name!r} (a {cls.__name__})")
        return cls(**kwargs)

    _RECORD_CONVERTERS[cls] = record  # before the fields: a record may (through Optional) hold its own type
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        fields.append((f.name, _converter(hints[f.name]),
                       f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING))
    names = frozenset(f[0] for f in fields)
    return record


def build(cls, value, what: str = ""):
    """The record ``cls`` built from ``value`` (a map, e.g. parsed JSON), checked as :func:`decode` checks it;
    :class:`ProtocolError` names the first field that does not fit."""
    try:
        return _record_converter(cls)(value, what or cls.__name__)
    except _Bad as bad:
        path, reason = bad.args
        raise ProtocolError(f"{path} {reason}") from None


def _schema(cls):
    """(field names, [(name, check, required, convert)], names in order) of a message type, computed once.
    ``convert`` is None for a field of plain values (checked by ``check``), else it checks and builds records."""
    schema = cls.__dict__.get("_schema_cache")
    if schema is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        checks = []
        for f in fields:
            hint = hints[f.name]
            convert = _converter(hint) if _holds_record(hint) else None
            checks.append((f.name, None if convert else _checker(hint), f.default is dataclasses.MISSING, convert))
        schema = (frozenset(f.name for f in fields), checks, tuple(f.name for f in fields))
        cls._schema_cache = schema
    return schema


def decode(frames, source=None) -> Envelope:
    """Parse ``frames`` into an :class:`Envelope`; raise :class:`ProtocolError` saying what is wrong.

    ``source`` (a :class:`~neuron_client.wire.tensors.TensorSource`) says where tensors' bytes are; without one, a
    message's tensors are read from its own frames (and torch is imported only if it holds any)."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"message has {len(frames)} frames; at most {MAX_FRAMES} are accepted")
    head = memoryview(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {head.nbytes} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if source is None:
        source = _FrameSource(frames)
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
    for name, check, required, convert in checks:
        if name not in body:
            if required:
                raise ProtocolError(f"{op}: missing field {name!r}")
            continue
        if convert is not None:
            try:
                body[name] = convert(body[name], name)
            except _Bad as bad:
                path, reason = bad.args
                raise ProtocolError(f"{op}: field {path!r} {reason}") from None
        elif check is not None and not check(body[name]):
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
