"""Unit tests of neuron_client.shm: the client's arena, the worker's segment cache, cleanup of a dead pid's segments.

These create real POSIX segments in /dev/shm (no other processes); every test leaves none behind.
"""
from __future__ import annotations

import os
import secrets

import pytest
import torch

from neuron_client import protocol, shm
from neuron_client.errors import ProtocolError

pytestmark = pytest.mark.skipif(not shm.available(), reason="/dev/shm is not writable here")

FAKE_PID = 4_999_999  # above any Linux pid_max (2**22): names no live process


def shm_path(name: str) -> str:
    return os.path.join(shm.SHM_DIR, name)


@pytest.fixture(autouse=True)
def no_leaks():
    before = set(shm.segments_of(os.getpid()))
    yield
    leaked = set(shm.segments_of(os.getpid())) - before
    for name in leaked:
        os.unlink(shm_path(name))
    for pid in (FAKE_PID, FAKE_PID * 10, FAKE_PID * 10 + 1):
        shm.unlink_for_pid(pid)
    assert not leaked, f"segments left behind: {sorted(leaked)}"


@pytest.fixture
def arena():
    a = shm.Arena()
    yield a
    a.release()


@pytest.fixture
def cache():
    c = shm.SegmentCache()
    yield c
    c.clear()


def make_file(name: str, size: int) -> str:
    path = shm_path(name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def fake_name(pid=FAKE_PID, n=0) -> str:
    return f"nrt-{pid}-{secrets.token_hex(4)}-{n}"


# ----------------------------------------------------------------------------------------------------------------
# Arena


def test_new_arena_is_empty(arena):
    assert arena.name is None and arena.size == 0
    assert arena.put(torch.zeros(4)) is None


def test_reset_creates_a_segment_named_for_this_pid(arena):
    arena.reset(100)
    assert arena.size == 1 << 20  # at least 1 MiB
    assert shm._NAME.match(arena.name)
    assert arena.name.startswith(f"nrt-{os.getpid()}-{arena.tag}-")
    assert os.path.getsize(shm_path(arena.name)) == arena.size
    assert arena.name in shm.segments_of(os.getpid())


def test_put_packs_aligned_and_the_bytes_are_there(arena, cache):
    arena.reset(1000)
    a = torch.arange(10, dtype=torch.float32)  # 40 bytes
    b = torch.arange(3, dtype=torch.int64)  # 24 bytes
    c = torch.tensor([[True, False], [False, True]]).t()  # non-contiguous
    name, off_a = arena.put(a)
    _, off_b = arena.put(b)
    _, off_c = arena.put(c)
    assert (off_a, off_b, off_c) == (0, 64, 128)
    assert arena.offset == 192
    seg = cache.get(name)
    assert torch.equal(torch.frombuffer(seg.view(off_a, 40), dtype=torch.float32), a)
    assert torch.equal(torch.frombuffer(seg.view(off_b, 24), dtype=torch.int64), b)
    assert torch.equal(torch.frombuffer(seg.view(off_c, 4), dtype=torch.bool).reshape(2, 2), c)


def test_put_returns_none_when_full_and_changes_nothing(arena):
    arena.reset(1)
    size = arena.size
    big = torch.zeros(size // 4 + 1, dtype=torch.float32)
    assert arena.put(big) is None
    assert arena.offset == 0
    assert arena.put(torch.zeros(size // 4, dtype=torch.float32)) == (arena.name, 0)  # exactly fills it
    assert arena.put(torch.zeros(1, dtype=torch.uint8)) is None


def test_empty_tensor_takes_no_room(arena):
    arena.reset(64)
    assert arena.put(torch.zeros(0)) == (arena.name, 0)
    assert arena.offset == 0


def test_reset_reuses_a_big_enough_segment(arena):
    arena.reset(10)
    name = arena.name
    arena.put(torch.zeros(100))
    arena.reset(arena.size)
    assert arena.name == name and arena.offset == 0
    arena.reset()
    assert arena.name == name


def test_reset_grows_into_a_new_segment_and_unlinks_the_old(arena):
    arena.reset(10)
    old = arena.name
    need = (1 << 20) + 1
    arena.reset(need)
    assert arena.name != old
    assert not os.path.exists(shm_path(old))
    assert arena.size == shm._align(need) and arena.size >= need and arena.size % shm.ALIGN_BYTES == 0
    assert os.path.exists(shm_path(arena.name))
    assert arena.put(torch.zeros(need, dtype=torch.uint8)) == (arena.name, 0)


def test_release_unlinks(arena):
    arena.reset(10)
    name = arena.name
    arena.release()
    assert arena.name is None and arena.size == 0
    assert not os.path.exists(shm_path(name))
    arena.release()  # twice is fine


def test_release_while_a_tensor_still_views_the_segment(arena, cache):
    arena.reset(64)
    name, off = arena.put(torch.arange(4, dtype=torch.int32))
    view = torch.frombuffer(arena.segment.view(off, 16), dtype=torch.int32)
    arena.release()  # the mapping stays until the view goes; the file is gone
    assert not os.path.exists(shm_path(name))
    assert view.tolist() == [0, 1, 2, 3]
    del view


def test_two_arenas_never_share_a_name():
    a, b = shm.Arena(), shm.Arena()
    try:
        a.reset(1)
        b.reset(1)
        assert a.name != b.name
    finally:
        a.release()
        b.release()


def test_reserve_bytes():
    ts = [torch.zeros(10, dtype=torch.uint8), torch.zeros(100, dtype=torch.uint8), torch.zeros(16, dtype=torch.float32)]
    assert shm.reserve_bytes(ts, 64) == 128 + 64
    assert shm.reserve_bytes(ts, 0) == 64 + 128 + 64
    assert shm.reserve_bytes(ts, 1000) == 0
    assert shm.reserve_bytes([], 0) == 0


@pytest.mark.parametrize("n, aligned", [(0, 0), (1, 64), (63, 64), (64, 64), (65, 128)])
def test_align(n, aligned):
    assert shm._align(n) == aligned


# ----------------------------------------------------------------------------------------------------------------
# SegmentCache


@pytest.mark.parametrize("name", [
    "foo", "", "nrt", "nrt-abc-ab-0", "nrt-1-XY-0", "nrt-1-ab", "nrt-1--0", "nrt-1-ab-x", "nrt--ab-0",
    "../nrt-1-ab-0", "nrt-1-ab-0/../../etc/passwd", "/dev/shm/nrt-1-ab-0", "nrt-1-" + "a" * 33 + "-0",
    "nrt-1-ab-0 ", " nrt-1-ab-0", "NRT-1-ab-0",
])
def test_cache_rejects_names_that_are_not_runtime_segments(cache, name):
    with pytest.raises(ProtocolError, match="not a runtime shared-memory segment name"):
        cache.get(name)
    assert cache.segments == {}


@pytest.mark.parametrize("name", [5, None, b"nrt-1-ab-0", 1.5])
def test_cache_rejects_non_string_names(cache, name):
    with pytest.raises(ProtocolError):
        cache.get(name)


def test_cache_rejects_a_missing_segment(cache):
    with pytest.raises(ProtocolError, match="does not exist"):
        cache.get(fake_name())


def test_cache_maps_an_existing_segment_by_its_real_size(cache):
    name = fake_name()
    make_file(name, 256)
    seg = cache.get(name)
    assert seg.size == 256
    assert cache.get(name) is seg  # cached
    view = cache.view(name, 250, 6)
    assert isinstance(view, memoryview) and view.nbytes == 6 and not view.readonly


@pytest.mark.parametrize("offset, nbytes", [(0, 257), (256, 1), (250, 7), (-1, 1), (0, -1), (1000, 0),
                                            (2 ** 62, 2 ** 62)])
def test_cache_rejects_views_outside_the_segment(cache, offset, nbytes):
    name = fake_name()
    make_file(name, 256)
    with pytest.raises(ProtocolError, match="lies outside the segment"):
        cache.view(name, offset, nbytes)


def test_cache_views_the_edges(cache):
    name = fake_name()
    make_file(name, 256)
    assert cache.view(name, 0, 256).nbytes == 256
    assert cache.view(name, 256, 0).nbytes == 0


def test_cache_view_of_an_empty_segment(cache):
    """Regression (was a bug): a zero-length segment maps to ``map=None``; ``Segment.view(0, 0)`` then does ``memoryview(None)`` and
    raises TypeError instead of returning an empty view (or ProtocolError). A client can create such a file."""
    name = fake_name()
    make_file(name, 0)
    try:
        view = cache.view(name, 0, 0)
    except ProtocolError:
        return
    assert view.nbytes == 0


def test_cache_evicts_the_least_recently_used():
    cache = shm.SegmentCache(capacity=2)
    names = [fake_name(n=i) for i in range(3)]
    for name in names:
        make_file(name, 64)
    try:
        a = cache.get(names[0])
        b = cache.get(names[1])
        cache.get(names[0])  # names[1] is now the least recently used
        cache.get(names[2])
        assert list(cache.segments) == [names[0], names[2]]
        assert b.map is None  # the evicted mapping is closed
        assert cache.get(names[0]) is a  # order now: 2, 0
        again = cache.get(names[1])  # re-mapped on demand; evicts 2
        assert again.size == 64 and list(cache.segments) == [names[0], names[1]]
    finally:
        cache.clear()
    assert cache.segments == {}


def test_cache_sees_the_clients_writes(arena, cache):
    arena.reset(64)
    t = torch.arange(16, dtype=torch.float64)
    name, off = arena.put(t)
    got = torch.frombuffer(cache.view(name, off, 128), dtype=torch.float64)
    assert torch.equal(got, t)
    got.mul_(2)  # the worker writes, the client sees it
    assert torch.equal(torch.frombuffer(arena.segment.view(off, 128), dtype=torch.float64), t * 2)
    del got


# ----------------------------------------------------------------------------------------------------------------
# SegmentWriter and the protocol over real segments


def test_segment_writer(arena, cache):
    arena.reset(1)
    seg = cache.get(arena.name)
    w = shm.SegmentWriter(seg)
    assert w.put(torch.ones(3)) == (arena.name, 0)
    assert w.put(torch.ones(1)) == (arena.name, 64)
    assert w.put(torch.zeros(seg.size, dtype=torch.uint8)) is None
    assert w.offset == 128


@pytest.mark.parametrize("copy", [True, False])
def test_protocol_round_trip_through_real_segments(arena, cache, copy):
    big = torch.randn(64, 33)
    small = torch.arange(3)
    outputs = (big, [small, {"b": big.t()}])
    arena.reset(shm.reserve_bytes(protocol.walk_tensors(outputs), 1024))
    frames = protocol.encode(protocol.Result(outputs=outputs), 7, protocol.TensorSink(arena, shm_threshold=1024))
    assert len(frames) == 2  # only the small tensor went into a frame
    env = protocol.decode(frames, protocol.TensorSource(frames, shm=cache, copy_shm=copy))
    got = env.msg.outputs
    assert torch.equal(got[0], big) and torch.equal(got[1][0], small) and torch.equal(got[1][1]["b"], big.t())
    del got, env


def test_protocol_rejects_a_reference_to_a_bad_segment(cache):
    for ref in (["nope", 0, "uint8", [1]], [fake_name(), 0, "uint8", [1]]):
        frames = [protocol.msgpack.packb({"v": 1, "op": "result", "body": {
            "outputs": protocol.msgpack.ExtType(protocol.EXT_SHM_TENSOR, protocol.msgpack.packb(ref))}})]
        with pytest.raises(ProtocolError):
            protocol.decode(frames, protocol.TensorSource(frames, shm=cache))


# ----------------------------------------------------------------------------------------------------------------
# unlink_for_pid


def test_unlink_for_pid_removes_exactly_that_pids_segments():
    mine = [fake_name(FAKE_PID, i) for i in range(3)]
    longer_pid = [fake_name(FAKE_PID * 10, 0), fake_name(FAKE_PID * 10 + 1, 0)]  # same digit prefix
    other = "not-nrt-" + str(FAKE_PID)
    for name in mine + longer_pid + [other]:
        make_file(name, 8)
    try:
        assert sorted(shm.segments_of(FAKE_PID)) == sorted(mine)
        assert shm.unlink_for_pid(FAKE_PID) == 3
        for name in mine:
            assert not os.path.exists(shm_path(name))
        for name in longer_pid + [other]:
            assert os.path.exists(shm_path(name))
        assert shm.unlink_for_pid(FAKE_PID) == 0
        assert shm.segments_of(FAKE_PID) == []
    finally:
        for name in longer_pid + [other]:
            if os.path.exists(shm_path(name)):
                os.unlink(shm_path(name))


def test_unlink_for_pid_coerces_to_int():
    name = fake_name(FAKE_PID)
    make_file(name, 8)
    assert shm.unlink_for_pid(str(FAKE_PID)) == 1
    with pytest.raises(ValueError):
        shm.unlink_for_pid("*")  # never a glob pattern


def test_unlink_for_pid_removes_an_arenas_segments_after_the_fact(arena):
    arena.reset(1)
    name = arena.name
    assert shm.unlink_for_pid(os.getpid()) >= 1
    assert not os.path.exists(shm_path(name))
    arena.release()  # the owner unlinking again is harmless
