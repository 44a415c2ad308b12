"""Unit tests of neuron_client.wire.shm: the client's arena, the worker's segment cache, cleanup of a dead pid's segments.

These create real POSIX segments in /dev/shm (only the fork tests start another process); every test leaves none
behind.
"""
from __future__ import annotations

import os
import secrets
import stat
import sys

import msgpack
import pytest
import torch

from neuron_client.wire import codec, messages, shm, tensors
from neuron_client.wire.errors import NeuronRuntimeError, ProtocolError

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
    """A worker's cache bound to the (fake) owner FAKE_PID, of this process's user."""
    c = shm.SegmentCache(owner_pid=FAKE_PID)
    yield c
    c.clear()


@pytest.fixture
def mine():
    """A worker's cache bound to this process, the owner of the arenas the tests create."""
    c = shm.SegmentCache(owner_pid=os.getpid(), owner_uid=os.getuid())
    yield c
    c.clear()


def make_file(name: str, size: int, sparse: bool = False) -> str:
    """A segment file as a client makes it: its memory reserved (or, ``sparse``, only its size set)."""
    path = shm_path(name)
    with open(path, "wb") as f:
        if size and not sparse:
            os.posix_fallocate(f.fileno(), 0, size)
        else:
            f.truncate(size)
    return path


def fake_name(pid=FAKE_PID, n=0) -> str:
    return f"nrt-{pid}-{secrets.token_hex(8)}-{n}"


def dev_shm_files() -> set[str]:
    """This process's files in /dev/shm (other processes may be creating theirs meanwhile)."""
    return set(shm.segments_of(os.getpid()))


# ----------------------------------------------------------------------------------------------------------------
# Arena


def test_new_arena_is_empty(arena):
    assert arena.name is None and arena.size == 0
    assert arena.put(torch.zeros(4)) is None


def test_reset_creates_a_segment_named_for_this_pid(arena):
    arena.reset(100)
    assert arena.size == 1 << 20  # at least 1 MiB
    assert shm.valid_name(arena.name)
    assert arena.name.startswith(shm.name_prefix(os.getpid()))
    assert os.path.getsize(shm_path(arena.name)) == arena.size
    assert arena.name in shm.segments_of(os.getpid())


def test_segment_names_have_an_unguessable_part():
    names = [shm.new_name() for _ in range(3)]
    randoms = [name.split("-")[2] for name in names]
    assert all(len(r) == 2 * shm.NAME_RANDOM_BYTES and int(r, 16) >= 0 for r in randoms)
    assert len(set(randoms)) == 3  # not one tag per process or arena and a counter
    assert all(shm.valid_name(n) and n.startswith(f"nrt-{os.getpid()}-") for n in names)


def test_a_new_segments_memory_is_reserved(arena):
    """Regression (#18): segments were sparse (ftruncate only); a full /dev/shm then killed whoever touched a page
    with SIGBUS. Now every byte is allocated at creation."""
    arena.reset(3 << 20)
    st = os.stat(shm_path(arena.name))
    assert st.st_size == arena.size and st.st_blocks * 512 >= st.st_size


def _free_dev_shm() -> tuple[int, int]:
    space = shm.free_bytes()
    if space is None:
        pytest.skip(f"{shm.SHM_DIR} reports no size (an unlimited tmpfs)")
    return space


def test_a_segment_larger_than_dev_shm_has_free_is_a_clear_error(arena):
    """Regression (#18): asking for more than /dev/shm holds fails at creation with the sizes and what to do, and
    leaves no file behind (and no SIGBUS later)."""
    free, _ = _free_dev_shm()
    before = dev_shm_files()
    with pytest.raises(shm.SharedMemoryFullError) as info:
        arena.reset(free + (1 << 30))
    assert isinstance(info.value, NeuronRuntimeError)
    text = str(info.value)
    want = shm._align(free + (1 << 30))
    assert f"({want} bytes)" in text and "free of" in text
    assert "NEURON_SHM_THRESHOLD_BYTES" in text and "size" in text
    assert arena.segment is None and arena.size == 0
    assert dev_shm_files() - before == set()
    arena.reset(10)  # and the arena still works afterwards
    assert arena.put(torch.ones(2)) == (arena.name, 0)


def test_a_failed_reservation_unlinks_the_partly_created_segment(monkeypatch):
    """Past the free-space check (another process may fill /dev/shm in between): the real posix_fallocate fails,
    the error is the same, and the half-made file is gone."""
    free, total = _free_dev_shm()
    monkeypatch.setattr(shm, "free_bytes", lambda: None)  # only the pre-check goes; the reservation is real
    before = dev_shm_files()
    name = shm.new_name()
    with pytest.raises(shm.SharedMemoryFullError, match=f"segment {name}"):
        shm.Segment(name, total + (1 << 30), create=True)  # more than the whole tmpfs: refused at once
    assert not os.path.exists(shm_path(name))
    assert dev_shm_files() - before == set()


def test_put_packs_aligned_and_the_bytes_are_there(arena, mine):
    arena.reset(1000)
    a = torch.arange(10, dtype=torch.float32)  # 40 bytes
    b = torch.arange(3, dtype=torch.int64)  # 24 bytes
    c = torch.tensor([[True, False], [False, True]]).t()  # non-contiguous
    name, off_a = arena.put(a)
    _, off_b = arena.put(b)
    _, off_c = arena.put(c)
    assert (off_a, off_b, off_c) == (0, 64, 128)
    assert arena.offset == 192
    seg = mine.get(name)
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


def test_release_while_a_tensor_still_views_the_segment(arena):
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
    "nrt-1-ab-0\n",  # "$" would match before a trailing newline
    "nrt-01-ab-0", "nrt-0-ab-0",  # one pid, one spelling: the owner's prefix check must not be sidestepped
    "nrt-\u0661-ab-0", "nrt-1-ab-\u0660",  # non-ASCII digits
    "nrt-1-ab-0\x00", "nrt-1-ab-..", "nrt-1-../-0", "..", "nrt-1-ab-" + "1" * 21,
])
def test_cache_rejects_names_that_are_not_runtime_segments(cache, name):
    with pytest.raises(ProtocolError, match="not a runtime shared-memory segment name"):
        cache.get(name)
    assert cache.segments == {}


@pytest.mark.parametrize("name", [5, None, b"nrt-1-ab-0", 1.5])
def test_cache_rejects_non_string_names(cache, name):
    with pytest.raises(ProtocolError):
        cache.get(name)


@pytest.mark.parametrize("name", [[1], {"a": 1}, bytearray(b"nrt-1-ab-0")])
def test_cache_rejects_unhashable_names_as_protocol_errors(cache, name):
    with pytest.raises(ProtocolError):
        cache.get(name)


def test_cache_rejects_a_missing_segment(cache):
    with pytest.raises(ProtocolError, match="does not exist"):
        cache.get(fake_name())


# -- ownership (#9): a worker maps only its owner's segments


def test_a_cache_with_no_owner_maps_nothing(arena):
    arena.reset(64)
    name = fake_name()
    make_file(name, 64)
    for unbound in (shm.SegmentCache(), shm.SegmentCache(owner_pid=0)):
        for n in (arena.name, name):
            with pytest.raises(ProtocolError, match="no owner"):
                unbound.get(n)
        assert unbound.segments == {}


def test_a_cache_refuses_another_processes_segment(arena, cache):
    """Regression (#9): a worker wrote outputs into, and read inputs from, any nrt-<pid>-... segment it was named,
    so one process could make another receive wrong results."""
    arena.reset(64)  # this process's segment; the cache is bound to FAKE_PID
    with pytest.raises(ProtocolError, match=f"not one of the owner's .pid {FAKE_PID}"):
        cache.get(arena.name)
    longer = fake_name(FAKE_PID * 10)  # the owner's pid is a prefix of this one's digits
    make_file(longer, 64)
    with pytest.raises(ProtocolError, match="not one of the owner's"):
        cache.get(longer)
    assert cache.segments == {}


def test_the_owners_pid_prefix_is_what_its_arenas_name(arena):
    arena.reset(64)
    c = shm.SegmentCache(owner_pid=os.getpid())
    try:
        assert c.get(arena.name) is not None
        assert c.owner_uid == os.getuid()
    finally:
        c.clear()


def test_a_cache_refuses_a_segment_of_another_user(cache):
    name = fake_name()
    make_file(name, 64)
    other = shm.SegmentCache(owner_pid=FAKE_PID, owner_uid=os.getuid() + 1)
    with pytest.raises(ProtocolError, match=f"belongs to user {os.getuid()}, not to the owner's user"):
        other.get(name)
    assert cache.get(name).size == 64  # of the right user: mapped


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_cache_refuses_a_segment_chowned_to_another_user(cache):
    name = fake_name()
    os.chown(make_file(name, 64), 54321, -1)
    with pytest.raises(ProtocolError, match="belongs to user 54321"):
        cache.get(name)


def test_a_cache_refuses_a_symbolic_link(cache, tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 64)
    name = fake_name()
    os.symlink(target, shm_path(name))
    with pytest.raises(ProtocolError, match="cannot open"):
        cache.get(name)
    assert target.read_bytes() == b"x" * 64


def test_a_cache_refuses_what_is_not_a_regular_file(cache):
    name = fake_name()
    os.mkfifo(shm_path(name), 0o600)
    assert stat.S_ISFIFO(os.stat(shm_path(name)).st_mode)
    with pytest.raises(ProtocolError, match="not a regular file"):
        cache.get(name)


def test_set_owner_forgets_the_previous_owners_mappings(arena, cache):
    name = fake_name()
    make_file(name, 64)
    seg = cache.get(name)
    arena.reset(64)
    cache.set_owner(os.getpid(), os.getuid())
    assert cache.segments == {} and seg.map is None
    assert cache.get(arena.name).size == arena.size
    with pytest.raises(ProtocolError, match="not one of the owner's"):
        cache.get(name)
    cache.set_owner(None)
    assert cache.segments == {}
    with pytest.raises(ProtocolError, match="no owner"):
        cache.get(arena.name)


@pytest.mark.parametrize("pid, uid", [(-1, None), ("12", None), (12, -1), (12, "0")])
def test_set_owner_rejects_bad_ids(pid, uid):
    with pytest.raises(ValueError):
        shm.SegmentCache().set_owner(pid, uid)


def test_a_cached_segment_costs_no_system_call(cache):
    """The hot path: a cached name is a dictionary hit (the file may even be gone; the mapping stays valid)."""
    name = fake_name()
    make_file(name, 64)
    seg = cache.get(name)
    os.unlink(shm_path(name))
    assert cache.get(name) is seg and cache.view(name, 0, 64).nbytes == 64


# -- mapping within what the file really holds (#18): an error, never a SIGBUS


def test_a_cache_refuses_a_sparse_segment(cache):
    """A segment whose memory is not reserved could SIGBUS the worker when /dev/shm fills up: refused."""
    name = fake_name()
    make_file(name, 1 << 20, sparse=True)
    with pytest.raises(ProtocolError, match="is sparse"):
        cache.get(name)
    assert cache.segments == {}


def test_a_truncated_segment_is_an_error_not_a_sigbus(cache):
    name = fake_name()
    make_file(name, 8192)
    os.truncate(shm_path(name), 100)  # the client shrank it before the worker mapped it
    with pytest.raises(ProtocolError, match="lies outside the segment .100 bytes"):
        cache.view(name, 4096, 64)
    assert cache.view(name, 0, 100).nbytes == 100


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
    cache = shm.SegmentCache(capacity=2, owner_pid=FAKE_PID)
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


def test_cache_sees_the_clients_writes(arena, mine):
    arena.reset(64)
    t = torch.arange(16, dtype=torch.float64)
    name, off = arena.put(t)
    got = torch.frombuffer(mine.view(name, off, 128), dtype=torch.float64)
    assert torch.equal(got, t)
    got.mul_(2)  # the worker writes, the client sees it
    assert torch.equal(torch.frombuffer(arena.segment.view(off, 128), dtype=torch.float64), t * 2)
    del got


# ----------------------------------------------------------------------------------------------------------------
# SegmentWriter and the protocol over real segments


def test_segment_writer(arena, mine):
    arena.reset(1)
    seg = mine.get(arena.name)
    w = shm.SegmentWriter(seg)
    assert w.put(torch.ones(3)) == (arena.name, 0)
    assert w.put(torch.ones(1)) == (arena.name, 64)
    assert w.put(torch.zeros(seg.size, dtype=torch.uint8)) is None
    assert w.offset == 128


@pytest.mark.parametrize("copy", [True, False])
def test_protocol_round_trip_through_real_segments(arena, mine, copy):
    big = torch.randn(64, 33)
    small = torch.arange(3)
    outputs = (big, [small, {"b": big.t()}])
    arena.reset(shm.reserve_bytes(tensors.walk_tensors(outputs), 1024))
    frames = codec.encode(messages.Result(outputs=outputs), 7, tensors.TensorSink(arena, shm_threshold=1024))
    assert len(frames) == 2  # only the small tensor went into a frame
    env = codec.decode(frames, tensors.TensorSource(frames, shm=mine, copy_shm=copy))
    got = env.msg.outputs
    assert torch.equal(got[0], big) and torch.equal(got[1][0], small) and torch.equal(got[1][1]["b"], big.t())
    del got, env


def test_protocol_rejects_a_reference_to_a_bad_segment(cache, arena):
    arena.reset(64)  # exists, but is not the owner's (FAKE_PID's)
    for ref, why in ((["nope", 0, "uint8", [1]], "not a runtime"), ([fake_name(), 0, "uint8", [1]], "does not exist"),
                     ([arena.name, 0, "uint8", [1]], "not one of the owner's")):
        frames = [msgpack.packb({"v": 1, "op": "result", "body": {
            "outputs": msgpack.ExtType(codec.EXT_SHM_TENSOR, msgpack.packb(ref))}})]
        with pytest.raises(ProtocolError, match=why):
            codec.decode(frames, tensors.TensorSource(frames, shm=cache))


# ----------------------------------------------------------------------------------------------------------------
# fork: a child never names, writes into or unlinks its parent's segments


def _in_child(fn) -> None:
    """Run ``fn()`` in a forked child; fail with what it printed unless it returned True."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's cleanups
        code = 1
        try:
            os.close(r)
            msg = repr(fn())
            code = 0 if msg == "True" else 1
        except BaseException as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {exc}"
        try:
            os.write(w, msg.encode()[:4000])
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    shm.unlink_for_pid(pid)
    assert os.waitstatus_to_exitcode(status) == 0, out


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="fork")
def test_a_forked_child_names_segments_for_its_own_pid():
    parent = os.getpid()

    def child():
        name = shm.new_name()
        return name.startswith(shm.name_prefix(os.getpid())) and not name.startswith(shm.name_prefix(parent))

    _in_child(child)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="fork")
def test_a_forked_child_never_writes_into_or_unlinks_its_parents_segment(arena):
    arena.reset(64)
    theirs = arena.name
    arena.put(torch.full((4,), 7, dtype=torch.int32))
    parent = os.getpid()

    def child():
        assert arena.put(torch.zeros(4, dtype=torch.int32)) is None  # not into the parent's segment
        arena.reset(16)  # big enough, but the parent's: a segment of its own
        assert arena.name != theirs and arena.name.startswith(shm.name_prefix(os.getpid()))
        assert arena.put(torch.zeros(4, dtype=torch.int32)) == (arena.name, 0)
        arena.release()
        assert os.path.exists(shm_path(theirs))
        leftover = shm.Segment(theirs, uid=os.getuid())
        leftover.unlink()  # mapped, not created here: the file stays
        return os.path.exists(shm_path(theirs)) and os.getppid() == parent

    _in_child(child)
    assert os.path.exists(shm_path(theirs)) and arena.name == theirs
    assert torch.frombuffer(arena.segment.view(0, 16), dtype=torch.int32).tolist() == [7, 7, 7, 7]


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
