"""The co-located fast path: a per-(client thread, core) shared-memory mailbox with eventfd doorbells.

A client thread and the worker of one of its cores, on one host, exchange calls through a mailbox instead of ZeroMQ:

* **Memory**: an anonymous ``memfd`` made by the owner (never a name in ``/dev/shm`` another process could open),
  its whole size reserved with ``posix_fallocate`` (no room is a :class:`~.shm.SharedMemoryFullError` at creation,
  never a SIGBUS later) and sealed against shrinking and growing, so neither side can make the other's mapping
  fault. Layout: a control page of sequence numbers, then the request area, then the reply area, ``capacity`` bytes
  each.
* **Doorbells**: two ``eventfd``\\ s, one per direction. A side writes its message and stores its sequence number;
  the other may spin on the sequence number for a bounded, adaptive time before it blocks in ``poll`` on the
  doorbell: on x86-64 only (where stores are seen in order), where the peer has a CPU of its own, while a CPU of the
  host is free (:func:`~.procs.cpu_free`), and while replies come within the spin. A side about to block says so in
  the control page (its *waiting* slot), then looks at the sequence number once more; the writer rings only when
  that slot is set. Each side puts a full fence (:func:`fence`) between its store and its look at the other's, so
  that one of the two always sees the other (no lost wake-up). Elsewhere than on x86-64 every message rings.
* **Binding**: the memfd and both eventfds travel once, with ``SCM_RIGHTS``, over an AF_UNIX connection to the core's
  worker (``<broker dir>/core-N.fast``). The client checks with ``SO_PEERCRED`` that the listening process is the
  worker the broker named for the core; the worker accepts only its owner (pid and uid from the kernel) bearing the
  lease's token. The connection stays open as each side's liveness signal: when a peer dies or closes, the other sees
  it at once. The worker serves one owner in its life, so the mailbox ends with the lease.

Two formats travel in an area (the kind is in the control page):

* ``LEAN``: a flat call (a model id and a tuple of tensors; a result of one tensor, or a tuple or list of them). A
  fixed header (tensor count, container, model id, header length), a 16-byte record plus the dims per tensor, then
  each tensor's bytes at a 64-byte aligned offset. Both sides cache a layout per signature (dtypes and shapes), so a
  static-shape model writes and reads its tensors in place, in preallocated slots.
* ``FRAMES``: anything else, as :mod:`.codec` frames (the same messages as on the socket: a structured call or
  result, and every error), each length-prefixed.

A reply too large for the reply area (``STREAM``) follows on the connection itself, as length-prefixed frames; the
client then grows its mailbox for the next call. A request too large for :data:`MAX_CAPACITY_BYTES` takes the socket
path, whose shared-memory arenas carry large tensors.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import platform
import select
import socket
import struct
import threading
import time

import msgpack
import torch

from . import codec, messages, tensors
from .config import LIVENESS_POLL_S
from .errors import ProtocolError, RequestTimeoutError, WorkerUnavailableError, from_code
from .procs import cpu_free
from .shm import SharedMemoryError, _full_error

VERSION = 2  # 2: a doorbell rings only for a peer that said it blocks (a version-1 peer waits for every ring)
CTL_BYTES = 4096
ALIGN = 64
CAPACITY_BYTES = 256 * 1024  # each direction, at first; a mailbox grows to fit a call, up to ...
MAX_CAPACITY_BYTES = 16 * 1024 * 1024  # ... this (larger calls take the socket path and its shm arenas)
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 1024
MAX_LAYOUTS = 64  # cached layouts per area (a model of many input shapes just rebuilds them)
HANDSHAKE_TIMEOUT_S = 5.0
MAX_HANDSHAKE_BYTES = 4096

# control page: u64 slots; the request's on one cache line, the reply's on another, each side's "I am blocking"
# on a third and a fourth (written by the waiter, read by the writer)
_REQ_SEQ, _REQ_KIND, _REQ_LEN = 8, 9, 10
_REP_SEQ, _REP_KIND, _REP_LEN = 16, 17, 18
_REQ_WAIT = 24  # the worker is about to block (or blocks) in poll: a request must ring
_REP_WAIT = 32  # the client is about to block (or blocks) in poll: the reply must ring
KIND_LEAN, KIND_FRAMES, KIND_STREAM = 1, 2, 3

CONTAINER_ONE, CONTAINER_TUPLE, CONTAINER_LIST = 0, 1, 2
_HEAD = struct.Struct("<IIII")  # tensors, container, model id, header bytes
_TENSOR = struct.Struct("<BB6xQ")  # dtype code, ndim, (pad), offset from the area's start
_DTYPE_LIST = list(tensors.DTYPES.values())
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPE_LIST)}
_ONE = (1).to_bytes(8, "little")
_U64 = struct.Struct("<Q")

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# Spinning on a sequence number reads it without a barrier: sound where stores become visible in program order.
SPIN_ARCH = platform.machine() in ("x86_64", "AMD64", "i686", "i386")
RING_ALWAYS = not SPIN_ARCH  # elsewhere, no fence is known to order a store before a later load: ring every message

_fence_lock = threading.Lock()

# A call whose reply is due later than the spin reaches (a model that computes longer than the spin budget): with a
# CPU free the client dozes in select, woken early by the reply's ring, until a lead before the reply is due, then
# spins across it; the reply then needs no ring and the client's next request comes within the worker's own spin, so
# neither side pays a wake-up from idle (hundreds of microseconds on a VM). Calls due beyond DOZE_MAX_S just block:
# there a wake-up is noise.
DOZE_LEAD_S = 200e-6  # wake this long before the reply is due (a timer's wake-up takes 80-160 us here)
DOZE_MIN_S = 300e-6  # shorter dozes are spun through instead
DOZE_MAX_S = 0.1
EXPECT_WEIGHT = 0.25  # of the latest sample in a usual time (track)
FD_SETSIZE = 1024  # select() takes descriptors below it (sub-millisecond timeouts, which poll does not)


def track(usual: float, sample: float) -> float:
    """The usual duration after ``sample``: it falls at once to a sample under half of it and follows shorter ones
    quickly, but rises by at most a quarter per sample, so that an outlier (a wake-up from idle, a collection, a
    descheduled thread) barely moves it. A spin or doze sized by it then rarely overshoots a reply that comes early,
    which would cost the very wake-up it is there to avoid. ``usual`` 0: no sample yet."""
    if not usual or sample < 0.5 * usual:
        return sample
    return usual + EXPECT_WEIGHT * min(sample - usual, usual)


def _spin_for(ctl, seq: int, stop: float) -> bool:
    """Watch the reply's sequence number until ``stop`` (``perf_counter``); True if reply ``seq`` came."""
    while time.perf_counter() < stop:
        if ctl[_REP_SEQ] == seq:
            return True
    return False


def fence(lock: threading.Lock = _fence_lock) -> None:
    """A full memory barrier on x86: taking and releasing a lock is a locked read-modify-write (``lock cmpxchg`` in
    the semaphore or mutex behind ``threading.Lock``), which orders every earlier store before every later load. The
    store-then-look-at-the-other handshake of the doorbells needs exactly that. Any lock will do; a mailbox passes
    its own, which only its thread takes, so that it is never contended."""
    lock.acquire()
    lock.release()


def ring_if_waiting(ctl, wait_slot: int, bell: int, lock: threading.Lock = _fence_lock) -> None:
    """After storing a sequence number: ring ``bell`` if the peer said it blocks (``ctl[wait_slot]``)."""
    if RING_ALWAYS:
        os.write(bell, _ONE)
        return
    fence(lock)
    if ctl[wait_slot]:
        os.write(bell, _ONE)


class NotCarried(Exception):
    """This call does not fit the mailbox (too large); the caller sends it by the socket path."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def mapping_size(capacity: int) -> int:
    return CTL_BYTES + 2 * capacity


def fast_path_address(directory: str, core: int) -> str:
    return os.path.join(directory, f"core-{core}.fast")


# -- the mapping -------------------------------------------------------------------------------------------------


class Region:
    """A mailbox's mapping: the control page's u64 slots and the two areas."""

    def __init__(self, fd: int, capacity: int):
        self.capacity = capacity
        self.size = mapping_size(capacity)
        self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mv = memoryview(self.mm)
        self.ctl = mv[:CTL_BYTES].cast("Q")
        self.request = mv[CTL_BYTES:CTL_BYTES + capacity]
        self.reply = mv[CTL_BYTES + capacity:self.size]


def create_memfd(capacity: int) -> int:
    """A sealed memfd of a mailbox of ``capacity`` bytes per direction, its memory reserved."""
    size = mapping_size(capacity)
    fd = os.memfd_create("neuron-mailbox", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise _full_error("neuron-mailbox (memfd)", size, os.strerror(exc.errno)) from None
            raise SharedMemoryError(f"cannot reserve {size} bytes for a mailbox: {exc}") from None
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_memfd(fd: int, capacity: int) -> None:
    """Refuse a mailbox memfd that could fault its mapper: wrong size, or not sealed against shrinking."""
    st = os.fstat(fd)
    if not (st.st_mode & 0o170000 == 0o100000):
        raise ProtocolError("a mailbox must be a regular memory file")
    if st.st_size != mapping_size(capacity):
        raise ProtocolError(f"a mailbox of capacity {capacity} must be {mapping_size(capacity)} bytes, "
                            f"not {st.st_size}")
    if st.st_blocks * 512 < st.st_size:
        raise ProtocolError("a mailbox's memory must be reserved (posix_fallocate)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL:
        raise ProtocolError("a mailbox memfd must be sealed against shrinking (F_SEAL_SHRINK, F_SEAL_SEAL)")


# -- the lean format ---------------------------------------------------------------------------------------------


class LeanWriter:
    """Writes flat tensor messages into one area, through a layout cached per signature: the header's bytes and a
    preallocated slot (a tensor over the area) per tensor."""

    def __init__(self, area: memoryview):
        self.area = area
        self.layouts: dict = {}

    def _layout(self, key, ts, container: int, model_id: int):
        n = len(ts)
        hlen = _HEAD.size + sum(_TENSOR.size + 8 * t.dim() for t in ts)
        offset = _align(hlen)
        need = offset + sum(_align(t.numel() * tensors.ITEMSIZE.get(t.dtype, 0)) for t in ts)
        if need > len(self.area):
            raise NotCarried(need)
        parts, slots = [], []
        for t in ts:
            dtype = t.dtype
            code = _DTYPE_CODE.get(dtype)
            if code is None:
                return None
            parts.append(_TENSOR.pack(code, t.dim(), offset) + struct.pack(f"<{t.dim()}q", *t.shape))
            nbytes = t.numel() * tensors.ITEMSIZE[dtype]
            if t.numel():
                slots.append(torch.frombuffer(self.area, dtype=dtype, count=t.numel(), offset=offset).view(t.shape))
            else:
                slots.append(None)
            offset = _align(offset + nbytes)
        head = _HEAD.pack(n, container, model_id, hlen) + b"".join(parts)
        if len(self.layouts) >= MAX_LAYOUTS:
            self.layouts.clear()
        layout = self.layouts[key] = (head, slots, offset)
        return layout

    def write(self, ts, container: int, model_id: int = 0) -> int:
        """Write tensors ``ts``; their bytes' end. -1: not a lean message (a dtype the wire does not carry);
        raises :class:`NotCarried` when it does not fit."""
        if len(ts) == 1:
            t = ts[0]
            key = (model_id, container, t.dtype, t.shape)
        else:
            key = (model_id, container, *[(t.dtype, t.shape) for t in ts])
        layout = self.layouts.get(key)
        if layout is None:
            layout = self._layout(key, ts, container, model_id)
            if layout is None:
                return -1
        head, slots, end = layout
        self.area[:len(head)] = head
        for slot, t in zip(slots, ts):
            if slot is not None:
                slot.copy_(t.detach() if t.requires_grad else t)
        return end


def parse_layout(head: bytes, n: int, container: int, area_bytes: int):
    """The tensors of a lean header: ([(dtype, count, offset, shape)], end of the last); ProtocolError if any falls
    outside an area of ``area_bytes`` or the header is malformed."""
    if n > MAX_TENSORS or container not in (CONTAINER_ONE, CONTAINER_TUPLE, CONTAINER_LIST):
        raise ProtocolError(f"a lean message of {n} tensors in container {container}")
    if container == CONTAINER_ONE and n != 1:
        raise ProtocolError("a lean message of one tensor must hold one")
    pos, end, specs = _HEAD.size, _align(len(head)), []
    for _ in range(n):
        if pos + _TENSOR.size > len(head):
            raise ProtocolError("a lean header cut short")
        code, ndim, offset = _TENSOR.unpack_from(head, pos)
        pos += _TENSOR.size
        if code >= len(_DTYPE_LIST) or ndim > 64 or pos + 8 * ndim > len(head):
            raise ProtocolError(f"a lean tensor of dtype code {code} and {ndim} dims")
        shape = struct.unpack_from(f"<{ndim}q", head, pos)
        pos += 8 * ndim
        if any(d < 0 for d in shape):
            raise ProtocolError(f"a lean tensor of shape {list(shape)}")
        dtype = _DTYPE_LIST[code]
        count = 1
        for d in shape:
            count *= d
        size = count * tensors.ITEMSIZE[dtype]
        if offset % ALIGN or offset < end or offset + size > area_bytes:
            raise ProtocolError(f"a lean tensor at offset {offset} of {size} bytes in an area of {area_bytes}")
        specs.append((dtype, count, offset, shape))
        end = _align(offset + size)
    if pos != len(head):
        raise ProtocolError("a lean header longer than its tensors")
    return specs, end


def views_of(buf, specs) -> tuple:
    """Tensors over ``buf`` as ``specs`` place them (no copy)."""
    return tuple(torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).view(shape) if count
                 else torch.empty(shape, dtype=dtype) for dtype, count, offset, shape in specs)


class LeanReader:
    """Reads flat tensor messages from one area (``area``: views of its slots, made once per layout) or from a fresh
    buffer each time (``area`` None: :meth:`read_from`), through layouts cached per header."""

    def __init__(self, area: memoryview | None):
        self.area = area
        self.layouts: dict = {}
        self.last = None  # (header, layout) of the last message

    def _layout(self, buf, nbytes: int, area_bytes: int):
        if not _HEAD.size <= nbytes <= area_bytes:
            raise ProtocolError(f"a lean message of {nbytes} bytes does not fit an area of {area_bytes}")
        n, container, model_id, hlen = _HEAD.unpack_from(buf, 0)
        if not _HEAD.size <= hlen <= min(nbytes, MAX_HEADER_BYTES):
            raise ProtocolError(f"a lean header of {hlen} bytes in a message of {nbytes}")
        last = self.last
        if last is not None and len(last[0]) == hlen and buf[:hlen] == last[0]:  # the same shapes as last time
            layout = last[1]
        else:
            head = bytes(buf[:hlen])
            layout = self.layouts.get(head)
            if layout is None:
                specs, end = parse_layout(head, n, container, area_bytes)
                layout = (specs, end, views_of(self.area, specs) if self.area is not None else None)
                if len(self.layouts) >= MAX_LAYOUTS:
                    self.layouts.clear()
                self.layouts[head] = layout
            self.last = (head, layout)
        if layout[1] > nbytes:
            raise ProtocolError(f"a lean message of {nbytes} bytes whose tensors end at {layout[1]}")
        return model_id, container, layout

    def read(self, nbytes: int):
        """(model id, container, tensors over the area) of the message of ``nbytes`` bytes in the area; every offset
        and size is checked against the area."""
        model_id, container, layout = self._layout(self.area, nbytes, len(self.area))
        return model_id, container, layout[2]

    def read_from(self, buf):
        """(model id, container, tensors over ``buf``) of the lean message that is all of ``buf``."""
        n = memoryview(buf).nbytes
        model_id, container, layout = self._layout(buf, n, n)
        return model_id, container, views_of(buf, layout[0])


def flat_tensors(obj):
    """(container, tensors) when ``obj`` is a tensor or a plain tuple or list of CPU-or-device tensors; else None."""
    if isinstance(obj, torch.Tensor):
        return CONTAINER_ONE, (obj,)
    kind = type(obj)
    if kind is tuple or kind is list:
        for t in obj:
            if not isinstance(t, torch.Tensor):
                return None
        return (CONTAINER_TUPLE if kind is tuple else CONTAINER_LIST), obj
    return None


def rebuild(container: int, ts):
    if container == CONTAINER_ONE:
        return ts[0]
    return tuple(ts) if container == CONTAINER_TUPLE else list(ts)


# -- the lean format on the socket -------------------------------------------------------------------------------
# A flat call on the socket path (no mailbox) is two frames: a prefix (magic, kind, request id, and for a call the
# lease's token), then the lean message itself; its result likewise. Any other message, and every error, is the
# codec's, whose header (a msgpack map) never starts with the magic.

LEAN_MAGIC = b"NRTL"
LEAN_CALL, LEAN_RESULT = 1, 2
_PREFIX = struct.Struct("<4sB3xQ")  # magic, kind, request id
SOCKET_LEAN_MAX_BYTES = 32 * 1024  # larger take the codec's frames; below comm.COPY_THRESHOLD_BYTES, so that ZeroMQ
# copies a lean message out of the reused buffer it is written in


def is_lean(frames) -> bool:
    return len(frames) == 2 and frames[0][:4] == LEAN_MAGIC


class SocketLean:
    """One side's lean messages on a socket: a reusable buffer to write them (ZeroMQ copies what it sends from
    it), layouts cached per header to read them."""

    def __init__(self, max_bytes: int = SOCKET_LEAN_MAX_BYTES):
        """``max_bytes``: the largest lean message it writes (larger ones are the codec's: above the shared-memory
        threshold their tensors go through shared memory)."""
        self.buf = memoryview(bytearray(max(_HEAD.size, min(max_bytes, SOCKET_LEAN_MAX_BYTES))))
        self.writer = LeanWriter(self.buf)
        self.reader = LeanReader(None)

    def _frames(self, kind: int, req_id: int, extra: bytes, ts, container: int, model_id: int = 0):
        """The two frames of a lean message, or None where it is not one (a dtype the wire does not carry, too
        large)."""
        try:
            end = self.writer.write(ts, container, model_id)
        except NotCarried:
            return None
        if end < 0:
            return None
        return [_PREFIX.pack(LEAN_MAGIC, kind, req_id) + extra, self.buf[:end]]

    def call(self, req_id: int, model_id: int, token: str, args):
        """The frames of a call of ``args`` (a tuple of tensors), or None."""
        if type(args) is not tuple or flat_tensors(args) is None:
            return None
        return self._frames(LEAN_CALL, req_id, token.encode(), args, CONTAINER_TUPLE, model_id)

    def result(self, req_id: int, outputs):
        """The frames of a result, or None where it is not flat or not small (the codec's frames carry it)."""
        flat = flat_tensors(outputs)
        if flat is None:
            return None
        return self._frames(LEAN_RESULT, req_id, b"", flat[1], flat[0])

    def read(self, frames):
        """(kind, request id, token, model id, container, tensors) of a lean message; its tensors own a copy of its
        bytes (the receiver may change them). ProtocolError if it is malformed."""
        prefix = frames[0]
        if len(prefix) < _PREFIX.size:
            raise ProtocolError("a lean message's prefix is cut short")
        magic, kind, req_id = _PREFIX.unpack_from(prefix, 0)
        if kind not in (LEAN_CALL, LEAN_RESULT):
            raise ProtocolError(f"a lean message of kind {kind}")
        token = prefix[_PREFIX.size:].decode("ascii", "replace") if kind == LEAN_CALL else ""
        if len(frames[1]) > SOCKET_LEAN_MAX_BYTES:
            raise ProtocolError(f"a lean message of {len(frames[1])} bytes (at most {SOCKET_LEAN_MAX_BYTES})")
        model_id, container, ts = self.reader.read_from(bytearray(frames[1]))
        return kind, req_id, token, model_id, container, ts


def lean_req_id(frames) -> int:
    """The request id of a lean message, else of a codec one (0 if unreadable): for an error reply to one that
    failed to decode, and to recognise a late reply."""
    if not is_lean(frames):
        return codec.peek_req_id(frames)
    try:
        return _PREFIX.unpack_from(frames[0], 0)[2]
    except struct.error:
        return 0


# -- frames ------------------------------------------------------------------------------------------------------


def frames_size(frames) -> int:
    return 4 + 8 * len(frames) + sum(memoryview(f).nbytes for f in frames)


def write_frames(area: memoryview, frames) -> int:
    """Write codec frames (count, lengths, bytes) into ``area``; their end. NotCarried if they do not fit."""
    need = frames_size(frames)
    if need > len(area):
        raise NotCarried(need)
    struct.pack_into("<I", area, 0, len(frames))
    pos = 4 + 8 * len(frames)
    for i, f in enumerate(frames):
        b = memoryview(f).cast("B")
        _U64.pack_into(area, 4 + 8 * i, b.nbytes)
        area[pos:pos + b.nbytes] = b
        pos += b.nbytes
    return pos


def read_frames(area, nbytes: int) -> list:
    """The codec frames of a FRAMES message of ``nbytes`` (copied out: the area is reused)."""
    if not 4 <= nbytes <= len(area):
        raise ProtocolError(f"a frames message of {nbytes} bytes in an area of {len(area)}")
    (count,) = struct.unpack_from("<I", area, 0)
    if not 1 <= count <= codec.MAX_FRAMES or 4 + 8 * count > nbytes:
        raise ProtocolError(f"a frames message of {count} frames in {nbytes} bytes")
    pos, frames = 4 + 8 * count, []
    for i in range(count):
        (n,) = _U64.unpack_from(area, 4 + 8 * i)
        if pos + n > nbytes:
            raise ProtocolError("a frames message cut short")
        frames.append(bytes(area[pos:pos + n]))
        pos += n
    return frames


def send_stream(conn: socket.socket, frames) -> None:
    """Frames on the connection (a reply too large for the area): total length, then :func:`write_frames`' form."""
    lengths = b"".join(_U64.pack(memoryview(f).nbytes) for f in frames)
    head = struct.pack("<I", len(frames)) + lengths
    conn.sendall(_U64.pack(len(head) + sum(memoryview(f).nbytes for f in frames)) + head)
    for f in frames:
        conn.sendall(f)


def recv_exact(conn: socket.socket, n: int, deadline: float) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeoutError(f"a streamed reply stalled after {got} of {n} bytes")
        conn.settimeout(left)
        k = conn.recv_into(view[got:])
        if not k:
            raise ConnectionError("the worker closed the fast-path connection")
        got += k
    return buf


# -- the client side ---------------------------------------------------------------------------------------------


class SpinPolicy:
    """When a bounded spin before blocking pays: while most recent spins found what they waited for (an EWMA of
    their hits), and a CPU of the host is free. Every :data:`PROBE_EVERY`-th wait spins regardless (a CPU free), so
    that a side that stopped spinning notices when spins would pay again (a blocked wait is slower by the wake-up,
    so its own time never tells); a probe that hits restores the spin at once, rather than hovering at the threshold
    where every miss stops it for another :data:`PROBE_EVERY` waits."""

    PROBE_EVERY = 32

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.hits = 1.0
        self.waits = 0

    def should(self, now: float) -> bool:
        if not self.budget_s:
            return False
        self.waits += 1
        return (self.hits >= 0.5 or not self.waits % self.PROBE_EVERY) and cpu_free(now)

    def record(self, hit: bool) -> None:
        if hit and self.hits < 0.5:  # a probe that paid: the calls come back to back again
            self.hits = 1.0
        else:
            self.hits += 0.125 * ((1.0 if hit else 0.0) - self.hits)


def close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _peer(sock: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


class ClientMailbox:
    """One client thread's mailbox to one core's worker (used by that thread only).

    ``calls`` counts the calls it carried, ``blocked`` those whose reply it waited for in ``poll`` (not found by the
    spin); ``spin_us`` is its spin budget (0: it always blocks)."""

    def __init__(self, address: str, worker_pid: int, token: str, capacity: int = CAPACITY_BYTES,
                 spin_us: int | None = None, core: int = -1):
        self.worker_pid = worker_pid
        self.core = core
        self.address = address
        self.capacity = capacity
        self.calls = 0
        self.blocked = 0
        self.seq = 0
        self.fence_lock = threading.Lock()  # this thread's (see fence)
        self.closed = False
        self.grow_to = 0  # bytes of the last reply, when it was too large for the reply area
        fds = []
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            memfd = create_memfd(capacity)
            fds.append(memfd)
            self.req_bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fds.append(self.req_bell)
            self.rep_bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fds.append(self.rep_bell)
            self.conn.settimeout(HANDSHAKE_TIMEOUT_S)
            self.conn.connect(address)
            pid, uid = _peer(self.conn)
            if pid != worker_pid or uid != os.getuid():
                raise ProtocolError(f"{address} is served by pid {pid} (uid {uid}), not by the core's worker "
                                    f"(pid {worker_pid}); not sending it the mailbox")
            hello = msgpack.packb({"v": VERSION, "token": token, "capacity": capacity})
            try:
                socket.send_fds(self.conn, [hello], [memfd, self.req_bell, self.rep_bell])
            except BrokenPipeError:  # refused before the hello was read: the answer says why
                pass
            data = self.conn.recv(MAX_HANDSHAKE_BYTES)
            if not data:
                raise ProtocolError(f"the worker of core {core} closed its fast path without an answer")
            answer = msgpack.unpackb(data, raw=False)
            if not isinstance(answer, dict):
                raise ProtocolError("the worker's fast-path answer is not a map")
            if not answer.get("ok"):
                raise from_code(str(answer.get("code", "")), str(answer.get("message", "refused")))
            self.region = Region(memfd, capacity)
        except BaseException:
            self.conn.close()
            close_fds(*fds[1:])
            raise
        finally:
            if fds:
                os.close(fds[0])  # the mapping (and the worker's) keeps the memory
        self.conn.setblocking(False)
        worker_spin = int(answer.get("spin_us", 0))
        cpus = set(answer.get("cpus") or [])
        free_cpu = bool(set(os.sched_getaffinity(0)) - cpus) if cpus else False
        self.spin_s = (worker_spin if spin_us is None else spin_us) / 1e6 if (SPIN_ARCH and free_cpu) else 0.0
        self.spin = SpinPolicy(self.spin_s)
        self.expect: dict[int, float] = {}  # model id -> its calls' usual time, write to reply (track)
        self.dozed = 0  # calls whose wait began with a doze (their reply due beyond the spin)
        self.writer = LeanWriter(self.region.request)
        self.reader = LeanReader(self.region.reply)
        self.poll = select.poll()
        self.poll.register(self.rep_bell, select.POLLIN)
        self.poll.register(self.conn, select.POLLIN)

    def call(self, model_id: int, args: tuple, token: str, timeout_s: float, alive=None):
        """The outputs of one call; :class:`NotCarried` (nothing sent) if it does not fit."""
        flat = flat_tensors(args)
        end = -1
        if flat is not None and type(args) is tuple:
            end = self.writer.write(args, CONTAINER_TUPLE, model_id)
        if end >= 0:
            kind = KIND_LEAN
        else:
            frames = codec.encode(messages.Call(token=token, model_id=model_id, args=args), 1, tensors.TensorSink())
            end = write_frames(self.region.request, frames)
            kind = KIND_FRAMES
        ctl = self.region.ctl
        ctl[_REQ_KIND] = kind
        ctl[_REQ_LEN] = end
        self.seq += 1
        ctl[_REQ_SEQ] = self.seq
        try:
            ring_if_waiting(ctl, _REQ_WAIT, self.req_bell, self.fence_lock)
            self._wait(timeout_s, alive, model_id)
        except BaseException:
            self.close()  # a call abandoned half way: its reply may still come, so this mailbox is not reused
            raise
        self.calls += 1
        return self._read_reply(timeout_s)

    def _wait(self, timeout_s: float, alive, model_id: int) -> None:
        ctl, seq = self.region.ctl, self.seq
        sent = time.perf_counter()
        expect = self.expect.get(model_id, 0.0)
        try:
            if 0 < self.spin_s < expect <= DOZE_MAX_S and cpu_free(sent):
                # its reply comes later than the spin reaches: be awake when it is due, and spin across it
                if expect >= DOZE_MIN_S + DOZE_LEAD_S and self._doze(ctl, seq, expect - DOZE_LEAD_S):
                    return
                if _spin_for(ctl, seq, sent + expect + self.spin_s):
                    return
            elif self.spin.should(sent):
                hit = _spin_for(ctl, seq, sent + self.spin_s)
                self.spin.record(hit)
                if hit:
                    return
            ctl[_REP_WAIT] = 1  # from here the worker rings; the look below catches a reply stored before it saw this
            self.blocked += 1
            try:
                fence(self.fence_lock)
                self._block(ctl, seq, timeout_s, alive)
            finally:
                ctl[_REP_WAIT] = 0
        finally:
            self.expect[model_id] = track(expect, time.perf_counter() - sent)

    def _doze(self, ctl, seq: int, for_s: float) -> bool:
        """Sleep in select for ``for_s``, woken early by the reply's ring; True if the reply came meanwhile."""
        ctl[_REP_WAIT] = 1  # a reply stored from here rings; one stored before is seen by the look after the fence
        self.dozed += 1
        try:
            fence(self.fence_lock)
            if ctl[_REP_SEQ] == seq:
                return True
            if self.rep_bell < FD_SETSIZE:
                ready = select.select((self.rep_bell,), (), (), for_s)[0]
            else:
                ready = [fd for fd, _ in self.poll.poll(max(1, int(for_s * 1000)))]
            if self.rep_bell in ready:
                try:
                    os.read(self.rep_bell, 8)
                except BlockingIOError:
                    pass
        finally:
            ctl[_REP_WAIT] = 0  # a ring the worker decided on already leaves a count, which the next block drains
        return ctl[_REP_SEQ] == seq

    def _block(self, ctl, seq: int, timeout_s: float, alive) -> None:
        now = time.monotonic()
        deadline, check_at = now + timeout_s, now + LIVENESS_POLL_S
        slice_ms = int(LIVENESS_POLL_S * 1000)
        while ctl[_REP_SEQ] != seq:
            events = self.poll.poll(slice_ms)
            for fd, _ev in events:
                if fd == self.rep_bell:
                    try:
                        os.read(self.rep_bell, 8)  # a count left by a call its spin served, or this reply's
                    except BlockingIOError:
                        pass
                elif ctl[_REP_SEQ] != seq and not self._conn_alive():
                    raise WorkerUnavailableError("the worker closed the fast path")
            if ctl[_REP_SEQ] == seq:
                return
            now = time.monotonic()
            if now >= deadline:
                raise RequestTimeoutError(f"no reply to 'call' from the worker of core {self.core} (pid "
                                          f"{self.worker_pid}) within {timeout_s:.1f}s; the peer is busy or gone")
            if alive is not None and now >= check_at:
                check_at = now + LIVENESS_POLL_S
                alive()

    def _conn_alive(self) -> bool:
        try:
            return self.conn.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _read_reply(self, timeout_s: float):
        ctl = self.region.ctl
        kind, nbytes = ctl[_REP_KIND], ctl[_REP_LEN]
        if kind == KIND_LEAN:
            _, container, views = self.reader.read(nbytes)
            return rebuild(container, [v.clone() for v in views])
        if kind == KIND_FRAMES:
            frames = read_frames(self.region.reply, nbytes)
        elif kind == KIND_STREAM:
            deadline = time.monotonic() + max(timeout_s, 1.0)
            try:
                (total,) = _U64.unpack(recv_exact(self.conn, 8, deadline))
                if total > MAX_CAPACITY_BYTES * 64:
                    raise ProtocolError(f"a streamed reply of {total} bytes")
                frames = read_frames(recv_exact(self.conn, total, deadline), total)
            except (ConnectionError, OSError) as exc:
                self.close()
                raise WorkerUnavailableError(f"the fast-path connection broke during a streamed reply: {exc}") \
                    from None
            finally:
                self.conn.setblocking(False)
            self.grow_to = nbytes  # the reply needed this much: the next mailbox holds it
        else:
            raise ProtocolError(f"unknown mailbox reply kind {kind}")
        env = codec.decode(frames)
        if isinstance(env.msg, messages.Error):
            raise from_code(env.msg.code, env.msg.message)
        return env.msg.outputs

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        close_fds(self.req_bell, self.rep_bell)
        self.conn.close()


def max_capacity(max_message_bytes: int) -> int:
    """The largest mailbox a worker takes: :data:`MAX_CAPACITY_BYTES`, or less under the broker's message limit."""
    return min(MAX_CAPACITY_BYTES, max_message_bytes) if max_message_bytes else MAX_CAPACITY_BYTES


def capacity_for(nbytes: int, max_message_bytes: int = 0) -> int | None:
    """The capacity of a mailbox that holds a message of ``nbytes`` (a power of two from the default), or None above
    :func:`max_capacity` (the call takes the socket path, which has its own limit and errors)."""
    cap = CAPACITY_BYTES
    while cap < nbytes:
        cap *= 2
    return cap if cap <= max_capacity(max_message_bytes) else None

