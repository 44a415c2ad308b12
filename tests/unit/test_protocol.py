"""Unit tests of neuron_client.protocol: round trips of every message and any tensor tree, and hostile input."""
from __future__ import annotations

import collections
import dataclasses
import enum
import math
import re
import typing

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from neuron_client.wire import codec, messages, tensors
from neuron_client.wire.codec import EXT_SHM_TENSOR, EXT_TENSOR, EXT_TUPLE, decode, encode
from neuron_client.wire.errors import ProtocolError
from neuron_client.wire.messages import MESSAGES, PROTOCOL_VERSION
from neuron_client.wire.status import ModelStatus
from neuron_client.wire.tensors import TensorSink, TensorSource
from tests.helpers import sample_batcher, sample_status_doc

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------------
# Helpers.


def tensor_bytes(t: torch.Tensor) -> bytes:
    return bytes(tensors.tensor_buffer(t.detach()))


def same(a, b, path="value") -> None:
    """Deep equality that is strict about types (tuple is not list), compares tensors bitwise and NaN == NaN."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert tensor_bytes(a) == tensor_bytes(b), f"{path}: tensor bytes differ"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def round_trip(msg, req_id=0, sink=None, source_shm=None):
    frames = encode(msg, req_id, sink)
    frames = [bytes(f) for f in frames]  # what a socket delivers
    env = decode(frames, TensorSource(frames, shm=source_shm) if source_shm is not None else None)
    assert env.req_id == req_id and env.op == msg.op and type(env.msg) is type(msg)
    return env.msg, frames


def pack_header(header, frames=()):
    return [msgpack.packb(header, use_bin_type=True), *frames]


def ext(code, payload):
    return msgpack.ExtType(code, msgpack.packb(payload))


def result_with(outputs, frames=()):
    """Frames of a ``result`` message whose outputs are ``outputs`` (raw msgpack values / ExtTypes)."""
    return pack_header({"v": PROTOCOL_VERSION, "op": "result", "id": 1, "body": {"outputs": outputs}}, frames)


# ----------------------------------------------------------------------------------------------------------------
# Strategies.


@st.composite
def tensor_values(draw, dtypes=tuple(tensors.DTYPES)):
    dtype = tensors.DTYPES[draw(st.sampled_from(dtypes))]
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))  # [] is a 0-dim tensor
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if dtype == torch.bool:
        raw = bytearray(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    else:
        raw = bytearray(draw(st.binary(min_size=n, max_size=n)))
    t = torch.frombuffer(raw, dtype=dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # non-contiguous: must still arrive with the same logical contents
    return t


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2 ** 63), 2 ** 64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.binary(max_size=10),
)
keys = st.one_of(st.text(max_size=6), st.integers(-5, 5))
trees = st.recursive(
    st.one_of(scalars, tensor_values()),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


class FakeShm:
    """Both sides of shared memory: ``put`` (TensorSink) and ``view`` (TensorSource) over named bytearrays."""

    def __init__(self, size=1 << 16, name="seg"):
        self.name = name
        self.buf = bytearray(size)
        self.offset = 0
        self.puts = 0

    def put(self, t):
        n = t.numel() * t.element_size()
        if self.offset + n > len(self.buf):
            return None
        off = self.offset
        self.buf[off:off + n] = tensor_bytes(t)
        self.offset = off + n
        self.puts += 1
        return self.name, off

    def view(self, name, offset, nbytes):
        if name != self.name or offset < 0 or offset + nbytes > len(self.buf):
            raise ProtocolError(f"bad shm reference {name}@{offset}+{nbytes}")
        return memoryview(self.buf)[offset:offset + nbytes]


# ----------------------------------------------------------------------------------------------------------------
# Every message type round-trips.


def example_messages():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return {
        "ping": messages.Ping(),
        "pong": messages.Pong(pid=12, cores=8, backend="cpu"),
        "acquire": messages.Acquire(pid=1, create_time=123.5, cmd="python x.py", visible=[0, 2], count=None,
                                    wait_s=2.5),
        "granted": messages.Granted(lease_id="ab", token="cd", cores=[2, 3],
                                    workers=[messages.WorkerInfo(core=2, endpoint="ipc:///tmp/w2", pid=9)],
                                    heartbeat_s=0.5, lease_timeout_s=5.0),
        "heartbeat": messages.Heartbeat(lease_id="ab"),
        "heartbeat_ack": messages.HeartbeatAck(workers=[messages.WorkerInfo(
            core=2, endpoint="ipc:///tmp/w2", pid=9, ready=True, failed=False, last_exit="signal 9")]),
        "release": messages.Release(lease_id="ab"),
        "owner_report": messages.OwnerReport(batchers=[sample_batcher()]),
        "status": messages.Status(),
        "status_reply": messages.StatusReply(doc=sample_status_doc()),
        "stop": messages.Stop(),
        "drain": messages.Drain(resume=True),
        "force_release": messages.ForceRelease(pid=4321),
        "force_released": messages.ForceReleased(pid=4321, cores=[0, 1], leases=["ab"]),
        "ok": messages.Ok(),
        "error": messages.Error(code="PROTOCOL", message="bad"),
        "worker_ready": messages.WorkerReady(core=1, pid=77, endpoint="ipc:///tmp/w1"),
        "worker_stats": messages.WorkerStats(core=1, models=[ModelStatus(id=1, name="m", requests=3, bytes=10)],
                                             requests=3, errors=0, rss=1 << 40, busy=True),
        "assign": messages.Assign(lease_id="ab", token_hash="0" * 64, owner_pid=7, owner_uid=1000),
        "assigned": messages.Assigned(core=1, lease_id="ab"),
        "reattach": messages.Reattach(lease_id="ab", token="t"),
        "lease_ended": messages.LeaseEnded(lease_id="ab", reason="released by an operator"),
        "shutdown": messages.Shutdown(),
        "load": messages.Load(token="tok", name="m.pt", data=torch.tensor([1, 2, 3], dtype=torch.uint8),
                              group=messages.GroupSpec(name="tp2-x", rank=1, size=2)),
        "loaded": messages.Loaded(model_id=4, load_s=0.25),
        "unload": messages.Unload(token="tok", model_id=4),
        "call": messages.Call(token="tok", model_id=4, args=(t, [t, None], {"k": (1, 2.0)}), reply_shm="nrt-1-ab-0",
                              reply_shm_size=4096),
        "result": messages.Result(outputs=(t * 2, {"a": [t]})),
    }


EXAMPLE_OPS = sorted(set(MESSAGES) & set(example_messages()))


def test_examples_cover_every_message_type():
    assert set(example_messages()) == set(MESSAGES)
    for op, cls in MESSAGES.items():
        assert cls.op == op


@pytest.mark.parametrize("op", EXAMPLE_OPS)
def test_every_message_round_trips(op):
    msg = example_messages()[op]
    got, _ = round_trip(msg, req_id=4242)
    same(msg, got)


def test_defaults_apply_when_fields_are_absent():
    env = decode(pack_header({"v": 1, "op": "acquire", "id": 3, "body": {"pid": 1, "create_time": 2, "cmd": "c"}}))
    assert env.msg == messages.Acquire(pid=1, create_time=2, cmd="c")  # informational fields still decode
    assert env.msg.visible is None and env.msg.count is None and env.msg.wait_s == 0.0
    env = decode(pack_header({"v": 1, "op": "ping"}))  # id and body are optional
    assert env.req_id == 0 and isinstance(env.msg, messages.Ping)


def test_error_helper_and_peek():
    frames = codec.encode_error("NOT_OWNER", "nope", req_id=17)
    env = decode(frames)
    assert env.msg == messages.Error(code="NOT_OWNER", message="nope") and env.req_id == 17
    assert codec.peek_req_id(frames) == 17
    assert codec.peek_req_id([b"\xc1garbage"]) == 0
    assert codec.peek_req_id([msgpack.packb({"id": "x"})]) == 0
    assert codec.peek_req_id([msgpack.packb([1, 2])]) == 0
    assert codec.peek_req_id([msgpack.packb({"id": 5, "body": {"x": ext(EXT_TENSOR, [9, "x", []])}})]) == 5


@pytest.mark.parametrize("req_id", [0, 1, 2 ** 31, 2 ** 63 - 1, -1])
def test_request_ids(req_id):
    assert decode(encode(messages.Ping(), req_id)).req_id == req_id


# ----------------------------------------------------------------------------------------------------------------
# Tensor trees.


@FUZZ
@given(tree=trees)
def test_any_tree_round_trips_in_frames(tree):
    got, frames = round_trip(messages.Result(outputs=tree))
    same(tree, got.outputs)
    assert len(frames) == 1 + len(list(tensors.walk_tensors(tree)))


@FUZZ
@given(args=st.lists(trees, max_size=3).map(tuple))
def test_call_args_stay_a_tuple(args):
    got, _ = round_trip(messages.Call(token="t", model_id=1, args=args))
    same(args, got.args)


@FUZZ
@given(tree=trees, threshold=st.sampled_from([0, 1, 8, 64]))
def test_any_tree_round_trips_through_shared_memory(tree, threshold):
    shm = FakeShm()
    sink = TensorSink(shm=shm, shm_threshold=threshold)
    got, frames = round_trip(messages.Result(outputs=tree), sink=sink, source_shm=shm)
    same(tree, got.outputs)
    ts = list(tensors.walk_tensors(tree))
    big = [t for t in ts if t.numel() * t.element_size() >= threshold]
    assert shm.puts == len(big)
    assert len(frames) == 1 + len(ts) - len(big)


@pytest.mark.parametrize("dtype", sorted(tensors.DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4)])
def test_every_dtype_and_shape_round_trips(dtype, shape):
    dt = tensors.DTYPES[dtype]
    if dt.is_complex:
        t = torch.randn(shape, dtype=dt)
    elif dt.is_floating_point:
        t = torch.randn(shape).to(dt)
    elif dt == torch.bool:
        t = torch.randint(0, 2, shape).bool()
    else:
        t = torch.randint(0, 100, shape).to(dt)
    for sink, shm in ((None, None), (TensorSink(shm=(fake := FakeShm()), shm_threshold=0), fake)):
        got, _ = round_trip(messages.Result(outputs=t), sink=sink, source_shm=shm)
        same(t, got.outputs)
        assert got.outputs.dim() == len(shape)


def test_decoded_frame_tensors_are_writable_copies():
    t = torch.arange(4, dtype=torch.int32)
    frames = [bytes(f) for f in encode(messages.Result(outputs=t))]
    out = decode(frames).msg.outputs
    out += 1  # a view over the (read-only) frame would fail or corrupt the frame
    assert bytes(frames[1]) == tensor_bytes(t)


def test_shm_copy_flag():
    shm = FakeShm()
    t = torch.arange(8, dtype=torch.float64)
    frames = encode(messages.Result(outputs=t), sink=TensorSink(shm=shm, shm_threshold=0))
    viewed = decode(frames, TensorSource(frames, shm=shm, copy_shm=False)).msg.outputs
    copied = decode(frames, TensorSource(frames, shm=shm, copy_shm=True)).msg.outputs
    viewed.fill_(-1)
    assert torch.equal(copied, t)
    assert torch.equal(torch.frombuffer(shm.buf[:64], dtype=torch.float64), torch.full((8,), -1.0, dtype=torch.float64))


def test_full_shm_falls_back_to_frames():
    shm = FakeShm(size=16)
    t = torch.zeros(8, dtype=torch.float32)  # 32 bytes: does not fit
    frames = encode(messages.Result(outputs=(t, t[:2])), sink=TensorSink(shm=shm, shm_threshold=0))
    assert len(frames) == 2 and shm.puts == 1
    same((t, t[:2]), decode(frames, TensorSource(frames, shm=shm)).msg.outputs)


def test_tensor_with_grad_and_views_travel():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    w = torch.ones(3, requires_grad=True)
    tree = {"slice": base[1:3, ::2], "t": base.t(), "grad": w * 2, "expanded": torch.tensor(1.0).expand(3, 2)}
    got, _ = round_trip(messages.Result(outputs=tree))
    for k, v in tree.items():
        same(v.detach().contiguous(), got.outputs[k], k)


def test_dict_and_scalar_subclasses_travel_as_their_base():
    class Color(enum.IntEnum):
        RED = 3

    class S(str):
        pass

    tree = collections.OrderedDict(a=Color.RED, b=S("x"), c=collections.OrderedDict(z=1), d=torch.float16)
    got, _ = round_trip(messages.Result(outputs=tree))
    assert got.outputs == {"a": 3, "b": "x", "c": {"z": 1}, "d": "float16"}
    assert type(got.outputs) is dict and type(got.outputs["a"]) is int and type(got.outputs["b"]) is str


def test_numpy_float64_travels_as_a_python_float():
    np = pytest.importorskip("numpy")
    got, _ = round_trip(messages.Result(outputs=[np.float64(1.5)]))
    assert got.outputs == [1.5] and type(got.outputs[0]) is float


def test_numpy_scalars_travel_as_python_numbers():
    """Regression: only np.float64 (a float subclass) used to travel; np.int64, np.int32, np.float32 and np.bool_
    subclass no Python type and raised "cannot travel"."""
    np = pytest.importorskip("numpy")
    got, _ = round_trip(messages.Result(outputs=[np.int64(7), np.int32(-2), np.float32(0.5), np.bool_(True)]))
    assert got.outputs == [7, -2, 0.5, True]
    assert [type(v) for v in got.outputs] == [int, int, float, bool]


@pytest.mark.parametrize("value", [object(), {1, 2}, frozenset(), 1j, torch.nn.Linear(1, 1), range(3), [object()],
                                   (1, {"k": object()})])
def test_unencodable_values_raise_protocol_error(value):
    with pytest.raises(ProtocolError, match="cannot travel"):
        encode(messages.Result(outputs=value))


def test_unsupported_dtype_raises_protocol_error():
    for dtype in (torch.complex32, torch.quint8):
        t = torch.empty(2, dtype=dtype) if dtype != torch.quint8 else torch.quantize_per_tensor(
            torch.zeros(2), 1.0, 0, torch.quint8)
        with pytest.raises(ProtocolError, match="cannot travel"):
            encode(messages.Result(outputs=t))
    with pytest.raises(ProtocolError):
        tensors.dtype_name(torch.complex32)


def test_walk_tensors_order():
    a, b, c, d = (torch.tensor(i) for i in range(4))
    tree = (a, [1, {"x": b, "y": (c, None)}], {"z": [d]}, "s")
    assert [int(t) for t in tensors.walk_tensors(tree)] == [0, 1, 2, 3]
    assert list(tensors.walk_tensors(None)) == []


def test_nbytes_of():
    assert tensors.nbytes_of(torch.float32, ()) == 4
    assert tensors.nbytes_of(torch.complex128, (2, 3)) == 96
    assert tensors.nbytes_of(torch.bool, (0, 7)) == 0


# ----------------------------------------------------------------------------------------------------------------
# Hostile input: ProtocolError and nothing else.


@FUZZ
@given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_random_bytes_never_raise_anything_but_protocol_error(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass


ext_types = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=24))
tensor_refs = st.builds(
    lambda code, ref: msgpack.ExtType(code, msgpack.packb(ref)),
    st.sampled_from([EXT_TENSOR, EXT_SHM_TENSOR]),
    st.lists(st.one_of(st.integers(-3, 5), st.sampled_from(list(tensors.DTYPES) + ["x", "seg"]),
                       st.lists(st.integers(-2, 3), max_size=3), st.none()), max_size=5),
)
raw_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1), st.floats(), st.text(max_size=8),
              st.binary(max_size=8), ext_types, tensor_refs),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children,
                                                                                max_size=4)),
    max_leaves=10,
)


@FUZZ
@given(
    op=st.sampled_from(sorted(MESSAGES)) | st.text(max_size=6),
    body=st.dictionaries(st.text(max_size=12) | st.sampled_from(["pid", "lease_id", "outputs", "args", "cores", "doc",
                                                                 "token", "model_id", "data", "visible"]),
                         raw_values, max_size=5) | raw_values,
    v=st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, None, "1"]),
    rid=st.integers(-10, 10) | st.text(max_size=3),
    frames=st.lists(st.binary(max_size=32), max_size=3),
    shm=st.booleans(),
)
def test_random_well_formed_msgpack_never_raises_anything_but_protocol_error(op, body, v, rid, frames, shm):
    msg = pack_header({"v": v, "op": op, "id": rid, "body": body}, frames)
    source = TensorSource(msg, shm=FakeShm(size=64, name="seg")) if shm else None
    try:
        env = decode(msg, source)
    except ProtocolError:
        return
    assert env.op in MESSAGES and isinstance(env.msg, MESSAGES[env.op])


@FUZZ
@given(tree=trees, data=st.data())
def test_truncated_header_raises_protocol_error(tree, data):
    frames = encode(messages.Result(outputs=tree), 3)
    head = bytes(frames[0])
    cut = data.draw(st.integers(0, len(head) - 1))
    with pytest.raises(ProtocolError):
        decode([head[:cut], *frames[1:]])


@FUZZ
@given(tree=trees, extra=st.binary(min_size=1, max_size=8))
def test_trailing_bytes_after_header_raise_protocol_error(tree, extra):
    frames = encode(messages.Result(outputs=tree))
    with pytest.raises(ProtocolError):
        decode([bytes(frames[0]) + extra, *frames[1:]])


@FUZZ
@given(tree=trees.filter(lambda t: any(True for _ in tensors.walk_tensors(t))), data=st.data())
def test_missing_or_resized_tensor_frame_raises(tree, data):
    frames = [bytes(f) for f in encode(messages.Result(outputs=tree))]
    i = data.draw(st.integers(1, len(frames) - 1))
    if data.draw(st.booleans()):
        del frames[i]  # every later index is now off by one, the last is out of range
        bad = frames
    else:
        bad = list(frames)
        bad[i] = bad[i] + data.draw(st.binary(min_size=1, max_size=9))
    with pytest.raises(ProtocolError):
        decode(bad)


def test_empty_and_oversized_messages():
    with pytest.raises(ProtocolError, match="empty"):
        decode([])
    with pytest.raises(ProtocolError, match="frames"):
        decode(encode(messages.Ping()) + [b""] * codec.MAX_FRAMES)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode([b"\x00" * (codec.MAX_HEADER_BYTES + 1)])


@pytest.mark.parametrize("header", [
    [1, "ping"], 5, "ping", None, b"x", True,
])
def test_header_must_be_a_map(header):
    with pytest.raises(ProtocolError, match="map"):
        decode(pack_header(header))


@pytest.mark.parametrize("v", [0, 2, -1, "1", None, [1], 99])
def test_wrong_or_missing_version(v):
    header = {"op": "ping", "id": 1, "body": {}}
    if v is not None:
        header["v"] = v
    with pytest.raises(ProtocolError, match="protocol version"):
        decode(pack_header(header))


@pytest.mark.parametrize("op", ["nope", "", "Ping", None, 3, ["ping"], b"ping"])
def test_unknown_op(op):
    with pytest.raises(ProtocolError, match="unknown op"):
        decode(pack_header({"v": 1, "op": op, "id": 1, "body": {}}))


@pytest.mark.parametrize("rid", ["1", 1.5, None, [1], {"a": 1}])
def test_bad_request_id(rid):
    with pytest.raises(ProtocolError, match="request id"):
        decode(pack_header({"v": 1, "op": "ping", "id": rid}))


@pytest.mark.parametrize("body", [[], "x", 1, None])
def test_body_must_be_a_map(body):
    with pytest.raises(ProtocolError, match="body must be a map"):
        decode(pack_header({"v": 1, "op": "ping", "body": body}))


def plain(value):
    """A record as the map it travels as (tensors left alone)."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def body_of(msg) -> dict:
    return {f.name: plain(getattr(msg, f.name)) for f in dataclasses.fields(msg)}


def encodable_body(msg) -> dict:
    """The body with tensors replaced by a plain value so it can be packed without a sink."""
    return {k: (0 if isinstance(v, torch.Tensor) or k in ("args", "outputs") else v) for k, v in body_of(msg).items()}


REQUIRED = [(op, f.name) for op in EXAMPLE_OPS for cls in [MESSAGES[op]] for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


@pytest.mark.parametrize("op, name", REQUIRED)
def test_missing_field(op, name):
    body = encodable_body(example_messages()[op])
    del body[name]
    with pytest.raises(ProtocolError, match=f"missing field '{name}'"):
        decode(pack_header({"v": 1, "op": op, "body": body}))


@pytest.mark.parametrize("op", EXAMPLE_OPS)
def test_extra_field(op):
    body = encodable_body(example_messages()[op])
    body["surprise"] = 1
    with pytest.raises(ProtocolError, match="unexpected fields"):
        decode(pack_header({"v": 1, "op": op, "body": body}))
    body = encodable_body(example_messages()[op])
    body[7] = 1  # a non-string key
    with pytest.raises(ProtocolError, match="unexpected fields"):
        decode(pack_header({"v": 1, "op": op, "body": body}))


def wrong_values(hint):
    """Values that do not fit the field's declared type."""
    if hint is typing.Any:
        return []
    candidates = ["s", 1, 1.5, True, None, [1], {"a": 1}, b"b", ext(EXT_TUPLE, [1])]
    hints = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)

    def fits(v):
        for h in hints:
            if h is type(None) and v is None:
                return True
            if codec._is_record(h) and type(v) is dict:
                return True  # the right type; a malformed map is the nested tests' business
            if typing.get_origin(h) is list and type(v) is list:
                return True
            if h is float and type(v) in (int, float):
                return True
            if h in (int, str, list, dict, bool) and type(v) is h:
                return True
        return False

    return [v for v in candidates if not fits(v)]


WRONG = [(op, f.name, v) for op in EXAMPLE_OPS for cls in [MESSAGES[op]] for f in dataclasses.fields(cls)
         for v in wrong_values(typing.get_type_hints(cls)[f.name])]


@pytest.mark.parametrize("op, name, value", WRONG, ids=[f"{o}.{n}={v!r}" for o, n, v in WRONG])
def test_wrong_field_type(op, name, value):
    body = encodable_body(example_messages()[op])
    body[name] = value
    with pytest.raises(ProtocolError, match="wrong type"):
        decode(pack_header({"v": 1, "op": op, "body": body}))


def test_wrong_field_types_cover_something():
    assert len(WRONG) > 50


def test_int_fields_accept_no_bool_and_float_fields_accept_ints():
    with pytest.raises(ProtocolError, match="wrong type"):
        decode(pack_header({"v": 1, "op": "loaded", "body": {"model_id": True, "load_s": 1.0}}))
    env = decode(pack_header({"v": 1, "op": "loaded", "body": {"model_id": 1, "load_s": 1}}))
    assert env.msg.load_s == 1


def test_tensor_where_a_field_wants_a_string():
    frames = [msgpack.packb({"v": 1, "op": "heartbeat", "body": {"lease_id": ext(EXT_TENSOR, [1, "uint8", [1]])}}),
              b"\x00"]
    with pytest.raises(ProtocolError, match="wrong type"):
        decode(frames)


# ---- records: typed documents inside messages -------------------------------------------------------------------


def granted_body(**worker) -> dict:
    w = {"core": 2, "endpoint": "ipc:///tmp/w2", "pid": 9, **worker}
    return {"lease_id": "ab", "token": "cd", "cores": [2], "workers": [w], "heartbeat_s": 0.2, "lease_timeout_s": 0.0}


def test_records_are_built_from_their_maps():
    env = decode(pack_header({"v": 1, "op": "granted", "body": granted_body(ready=False)}))
    w = env.msg.workers[0]
    assert type(w) is messages.WorkerInfo and (w.core, w.pid, w.ready, w.failed, w.last_exit) == (2, 9, False, False, "")
    env = decode(pack_header({"v": 1, "op": "worker_stats", "body": {
        "core": 0, "models": [{"id": 1, "name": "m", "requests": 2, "bytes": 3}], "requests": 2, "errors": 0,
        "rss": 1, "busy": False}}))
    assert env.msg.models == [ModelStatus(id=1, name="m", requests=2, bytes=3)]


@pytest.mark.parametrize("body, match", [
    (granted_body(pid="9"), r"granted: field 'workers\[0\]\.pid' has the wrong type \(str; expected int\)"),
    (granted_body(ready=1), r"field 'workers\[0\]\.ready' has the wrong type \(int; expected bool\)"),
    (granted_body(extra=1), r"field 'workers\[0\]' has unexpected fields \['extra'\] \(a WorkerInfo has core, "),
    ({**granted_body(), "workers": [{"core": 2, "pid": 9}]},
     r"field 'workers\[0\]' is missing field 'endpoint' \(a WorkerInfo\)"),
    ({**granted_body(), "workers": [[2, "e", 9]]},
     r"field 'workers\[0\]' has the wrong type \(list; expected a map \(WorkerInfo\)\)"),
    ({**granted_body(), "workers": {"core": 2}}, r"field 'workers' has the wrong type \(dict; expected a list\)"),
])
def test_a_malformed_record_is_refused_naming_its_path(body, match):
    with pytest.raises(ProtocolError, match=match):
        decode(pack_header({"v": 1, "op": "granted", "body": body}))


def status_body(**change) -> dict:
    """A status_reply body, its document as a map, with ``change`` applied: {"path.to.field": value}."""
    doc = plain(sample_status_doc())
    for path, value in change.items():
        *parents, leaf = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return {"doc": doc}


DELETE = object()


def test_the_status_document_decodes_into_its_records():
    from neuron_client.wire import status

    sent = sample_status_doc()
    doc = decode(encode(messages.StatusReply(doc=sent))).msg.doc
    assert type(doc) is status.StatusDoc and doc == sent
    assert type(doc.cores[0].worker) is status.WorkerStatus and type(doc.cores[0].perf.latency_hist) is \
        status.LatencyHistogram and type(doc.leases[0]) is status.LeaseStatus
    assert doc.cores[0].owner.pid == 4242 and doc.cores[0].models[0].name == "m.pt" and doc.pending[0].requested == "nc0"


@pytest.mark.parametrize("change, match", [
    ({"cores.0.worker.pid": "7"}, r"status_reply: field 'doc\.cores\[0\]\.worker\.pid' has the wrong type "
                                  r"\(str; expected int\)"),
    ({"cores.0.owner": 5}, r"field 'doc\.cores\[0\]\.owner' has the wrong type \(int; expected a map \(OwnerStatus\) "
                           r"or null\)"),
    ({"cores.0.perf.latency_hist.counts": [1, "x"]},
     r"field 'doc\.cores\[0\]\.perf\.latency_hist\.counts\[1\]' has the wrong type \(str; expected int\)"),
    ({"cores.0.perf.surprise": 1}, r"field 'doc\.cores\[0\]\.perf' has unexpected fields \['surprise'\]"),
    ({"broker.leases_ended": {"released": 1.5}},
     r"field \"doc\.broker\.leases_ended\['released'\]\" has the wrong type \(float; expected int\)"),
    ({"broker": DELETE}, r"field 'doc' is missing field 'broker' \(a StatusDoc\)"),
    ({"cores.0.worker.memory_bytes": DELETE}, r"field 'doc\.cores\[0\]\.worker' is missing field 'memory_bytes'"),
    ({"cores": {"0": {}}}, r"field 'doc\.cores' has the wrong type \(dict; expected a list\)"),
    ({"cores.0.rss": 1}, r"field 'doc\.cores\[0\]' has unexpected fields \['rss'\]"),  # schema 1's name
])
def test_a_malformed_status_document_is_refused_naming_the_field(change, match):
    with pytest.raises(ProtocolError, match=match):
        decode(pack_header({"v": 1, "op": "status_reply", "body": status_body(**change)}))


def test_status_document_json_round_trip():
    from neuron_client.wire import status

    doc = sample_status_doc()
    assert status.from_json(status.to_json(doc)) == doc
    with pytest.raises(ProtocolError, match=r"^StatusDoc\.cores\[0\]\.index has the wrong type"):
        status.from_json(dict(status.to_json(doc), cores=[dict(status.to_json(doc)["cores"][0], index="0")]))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", status.timestamp())
    assert status.timestamp(0.5) == "1970-01-01T00:00:00.500Z"


def test_codec_build_checks_a_map_as_decode_does():
    assert codec.build(messages.WorkerInfo, {"core": 1, "endpoint": "e", "pid": 2}).pid == 2
    with pytest.raises(ProtocolError, match=r"^WorkerInfo\.core has the wrong type \(str; expected int\)$"):
        codec.build(messages.WorkerInfo, {"core": "1", "endpoint": "e", "pid": 2})


# ---- tensor references -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref, frames, match", [
    ([1, "float32", [3]], [b"\x00" * 8], "holds 8 bytes"),  # header says 12 bytes
    ([1, "float32", [2]], [b"\x00" * 12], "holds 12 bytes"),
    ([1, "float32", []], [b""], "holds 0 bytes"),  # 0-dim needs one element
    ([1, "int64", [0]], [b"\x00"], "holds 1 bytes"),  # empty needs an empty frame
    ([0, "uint8", [0]], [b""], "points at frame 0"),  # frame 0 is the header
    ([2, "uint8", [1]], [b"\x00"], "points at frame 2"),
    ([-1, "uint8", [1]], [b"\x00"], "points at frame -1"),
    (["1", "uint8", [1]], [b"\x00"], "points at frame"),
    ([None, "uint8", [1]], [b"\x00"], "points at frame"),
    ([1.0, "uint8", [1]], [b"\x00"], "points at frame"),
    ([1, "float128", [1]], [b"\x00" * 16], "unknown dtype"),
    ([1, "torch.float32", [1]], [b"\x00" * 4], "unknown dtype"),
    ([1, "", [1]], [b"\x00"], "unknown dtype"),
    ([1, 5, [1]], [b"\x00"], "unknown dtype"),
    ([1, None, [1]], [b"\x00"], "unknown dtype"),
    ([1, "uint8", [-1]], [b""], "bad tensor shape"),
    ([1, "uint8", [2, -3]], [b""], "bad tensor shape"),
    ([1, "uint8", 3], [b"\x00" * 3], "bad tensor shape"),
    ([1, "uint8", "3"], [b"\x00" * 3], "bad tensor shape"),
    ([1, "uint8", None], [b"\x00"], "bad tensor shape"),
    ([1, "uint8", [1.5]], [b"\x00"], "bad tensor shape"),
    ([1, "uint8", [1] * 65], [b"\x00"], "bad tensor shape"),
    ([1, "uint8", {"0": 1}], [b"\x00"], "bad tensor shape"),
    ([1, "uint8"], [b"\x00"], "malformed tensor reference"),
    ([1, "uint8", [1], 0], [b"\x00"], "malformed tensor reference"),
    ([], [], "malformed tensor reference"),
    ({"index": 1}, [b"\x00"], "must be a list"),
    (7, [b"\x00"], "must be a list"),
])
def test_bad_frame_tensor_reference(ref, frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode(result_with(ext(EXT_TENSOR, ref), frames))


def test_a_frame_used_twice_is_rejected():
    ref = ext(EXT_TENSOR, [1, "uint8", [2]])
    with pytest.raises(ProtocolError):
        decode(result_with([ref, ref], [b"ab"]))


def test_an_unreferenced_frame_is_rejected():
    frames = encode(messages.Result(outputs=torch.zeros(2))) + [b"extra"]
    with pytest.raises(ProtocolError):
        decode(frames)
    with pytest.raises(ProtocolError):
        decode(encode(messages.Ping()) + [b""])


def test_tuple_shape_is_not_a_list():
    shape = ext(EXT_TUPLE, [2])
    payload = msgpack.packb([1, "uint8", shape])
    with pytest.raises(ProtocolError):
        decode(result_with(msgpack.ExtType(EXT_TENSOR, payload), [b"\x00\x00"]))


@pytest.mark.parametrize("shape", [[0, 2 ** 63], [0, 2 ** 64 - 1], [2 ** 64 - 1, 0], [2 ** 40, 2 ** 40]])
def test_absurd_dimensions_raise_protocol_error(shape):
    with pytest.raises(ProtocolError):
        decode(result_with(ext(EXT_TENSOR, [1, "uint8", shape]), [b""]))
    with pytest.raises(ProtocolError):
        decode(result_with(ext(EXT_SHM_TENSOR, ["seg", 0, "uint8", shape])),
               TensorSource(result_with(0), shm=FakeShm()))


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x93\x01", b"\x92\x01\xa1"])
def test_extension_payload_not_msgpack(payload):
    for code in (EXT_TENSOR, EXT_SHM_TENSOR, EXT_TUPLE):
        with pytest.raises(ProtocolError):
            decode(result_with(msgpack.ExtType(code, payload), [b"\x00"]))


def raw_ext(code: int, data: bytes) -> bytes:
    """An ext value written by hand (msgpack.ExtType refuses negative codes): ext 8 format."""
    return bytes([0xC7, len(data), code & 0xFF]) + data


def result_with_raw(raw: bytes):
    """A ``result`` header whose outputs value is the raw msgpack bytes ``raw``."""
    marker = "\u2603" * 8
    head = msgpack.packb({"v": PROTOCOL_VERSION, "op": "result", "id": 1, "body": {"outputs": marker}})
    packed_marker = msgpack.packb(marker)
    assert head.count(packed_marker) == 1
    return [head.replace(packed_marker, raw)]


@pytest.mark.parametrize("code", [0, 4, 50, 127])
def test_unknown_extension_type(code):
    with pytest.raises(ProtocolError, match="extension"):
        decode(result_with(msgpack.ExtType(code, b"\x90")))


@pytest.mark.parametrize("code", [-2, -100, -128])
def test_unknown_negative_extension_type(code):
    with pytest.raises(ProtocolError, match="extension"):
        decode(result_with_raw(raw_ext(code, b"\x90")))


@FUZZ
@given(code=st.integers(-128, -1), data=st.binary(max_size=20))
def test_negative_extension_codes_never_raise_anything_but_protocol_error(code, data):
    try:
        decode(result_with_raw(raw_ext(code, data)))
    except ProtocolError:
        pass


def test_tuple_extension_must_hold_a_list():
    with pytest.raises(ProtocolError, match="must hold a list"):
        decode(result_with(ext(EXT_TUPLE, {"a": 1})))
    with pytest.raises(ProtocolError, match="must hold a list"):
        decode(result_with(ext(EXT_TUPLE, 5)))


def nested_tuples(depth: int):
    payload = msgpack.packb([])
    for _ in range(depth - 1):  # ((((),),),)
        payload = msgpack.packb([msgpack.ExtType(EXT_TUPLE, payload)])
    return result_with(msgpack.ExtType(EXT_TUPLE, payload))


def test_moderately_nested_tuples_decode():
    out = decode(nested_tuples(32)).msg.outputs
    for _ in range(31):
        assert isinstance(out, tuple) and len(out) == 1
        out = out[0]
    assert out == ()


def test_deeply_nested_tuples_raise_protocol_error():
    """Regression: tuple nesting was unbounded. Each level recurses through msgpack's C unpacker (~40 KiB of C stack
    per level), so about 195 levels (a ~1 KB header) overflowed an 8 MiB stack and killed the process with SIGSEGV
    before Python's recursion limit could help. 150 levels still fit in the stack, so without the limit this test
    fails cleanly instead of crashing the test run."""
    with pytest.raises(ProtocolError, match="nest"):
        decode(nested_tuples(150))


def test_nesting_limit_counts_depth_not_total_tuples():
    wide = tuple(tuple(() for _ in range(50)) for _ in range(50))  # 2,551 tuples, 2 levels deep
    got, _ = round_trip(messages.Result(outputs=wide))
    same(wide, got.outputs)


def test_nesting_limit_is_reset_between_messages():
    ok = nested_tuples(20)
    for _ in range(5):
        decode(ok)
    source = TensorSource(ok)
    decode(ok, source)


def test_tensor_in_a_nested_tuple_reference_is_checked():
    frames = result_with(ext(EXT_TUPLE, [ext(EXT_TENSOR, [1, "int32", [2]])]), [b"\x00" * 7])
    with pytest.raises(ProtocolError, match="holds 7 bytes"):
        decode(frames)


# ---- shared-memory references ------------------------------------------------------------------------------------


def shm_frames(ref):
    return result_with(ext(EXT_SHM_TENSOR, ref))


def test_shm_tensor_without_shm_source():
    frames = shm_frames(["seg", 0, "uint8", [1]])
    with pytest.raises(ProtocolError, match="none is accepted"):
        decode(frames)


@pytest.mark.parametrize("ref, match", [
    ([5, 0, "uint8", [1]], "bad shared-memory reference"),
    (["seg", -1, "uint8", [1]], "bad shared-memory reference"),
    (["seg", "0", "uint8", [1]], "bad shared-memory reference"),
    (["seg", 1.5, "uint8", [1]], "bad shared-memory reference"),
    (["seg", None, "uint8", [1]], "bad shared-memory reference"),
    (["seg", 0, "float99", [1]], "unknown dtype"),
    (["seg", 0, "uint8", [-4]], "bad tensor shape"),
    (["other", 0, "uint8", [1]], "bad shm reference"),  # FakeShm.view rejects it
    (["seg", 60, "float32", [2]], "bad shm reference"),  # past the end of the 64-byte segment
    (["seg", 0, "uint8"], "malformed tensor reference"),
])
def test_bad_shm_tensor_reference(ref, match):
    frames = shm_frames(ref)
    with pytest.raises(ProtocolError, match=match):
        decode(frames, TensorSource(frames, shm=FakeShm(size=64)))


def test_shm_view_errors_of_other_types_become_protocol_errors():
    class Broken:
        def view(self, name, offset, nbytes):
            raise OSError("mapping failed")

    frames = shm_frames(["seg", 0, "uint8", [1]])
    with pytest.raises(ProtocolError):
        decode(frames, TensorSource(frames, shm=Broken()))


def test_tensors_are_rejected_when_source_is_disabled_in_ext_hook():
    hook = codec._ext_hook(None)
    with pytest.raises(ProtocolError, match="cannot carry tensors"):
        hook(EXT_TENSOR, msgpack.packb([1, "uint8", [1]]))
