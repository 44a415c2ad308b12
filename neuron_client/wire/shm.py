"""Shared memory for large tensors: POSIX segments in /dev/shm, mapped by client and worker.

A client owns its segments (it creates, grows and unlinks them); their names carry its pid and a random part,
``nrt-<pid>-<random hex>-<n>`` (:func:`new_name`), so that the broker can unlink whatever a killed client left behind
(:func:`unlink_for_pid`) and no other process can guess them. A segment's memory is reserved when it is created
(``posix_fallocate``): a full /dev/shm is then a :class:`SharedMemoryFullError` at creation, never a SIGBUS later.

A worker maps only its owner's segments (:class:`SegmentCache` bound with ``set_owner``): names of the owner's pid,
regular files of the owner's user, fully allocated, and only within their size.
"""
from __future__ import annotations

import errno
import glob
import itertools
import mmap
import os
import re
import secrets
import stat
from collections import OrderedDict
from typing import TYPE_CHECKING

from neuron_client.wire.errors import NeuronRuntimeError, ProtocolError
from neuron_client.wire.procs import current_pid

if TYPE_CHECKING:
    import torch

SHM_DIR = "/dev/shm"
# strict: ASCII digits and lowercase hex only, a pid without leading zeros (so one pid has one prefix), no "/" or ".."
_NAME = re.compile(r"nrt-([1-9][0-9]{0,9})-[0-9a-f]{1,32}-[0-9]{1,20}")
ALIGN_BYTES = 64
NAME_RANDOM_BYTES = 8  # 16 hex digits in every segment name
ENV_SHM_THRESHOLD = "NEURON_SHM_THRESHOLD_BYTES"  # as config.ENV_SHM_THRESHOLD (named in error messages)

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.ENOMEM, getattr(errno, "EDQUOT", errno.ENOSPC)}


class SharedMemoryError(NeuronRuntimeError):
    """A shared-memory segment could not be created or mapped."""


class SharedMemoryFullError(SharedMemoryError):
    """/dev/shm has not enough free memory for a new segment."""


def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def name_prefix(pid: int) -> str:
    """The prefix of every segment name of process ``pid`` (what a worker bound to that owner accepts)."""
    return f"nrt-{int(pid)}-"


def new_name() -> str:
    """A fresh, unguessable segment name of the calling process (its pid read now: a forked child gets its own)."""
    return f"{name_prefix(os.getpid())}{secrets.token_hex(NAME_RANDOM_BYTES)}-{next(_counter)}"


def valid_name(name) -> bool:
    return type(name) is str and _NAME.fullmatch(name) is not None


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def free_bytes() -> tuple[int, int] | None:
    """(free, total) bytes of the file system under SHM_DIR, or None where it does not say (an unlimited tmpfs)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    if not st.f_blocks:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _full_error(name: str, size: int, cause: str = "") -> SharedMemoryFullError:
    space = free_bytes()
    have = (f"{SHM_DIR} has {_fmt(space[0])} free of {_fmt(space[1])}" if space
            else f"{SHM_DIR} does not say how much it has free")
    return SharedMemoryFullError(
        f"cannot reserve {_fmt(size)} ({size} bytes) of shared memory for segment {name}: {have}"
        f"{f' ({cause})' if cause else ''}. Free memory in {SHM_DIR} (remove segments of processes that are gone), "
        f"raise its size (e.g. `mount -o remount,size=<bytes> {SHM_DIR}`, or `docker run --shm-size`), or raise "
        f"{ENV_SHM_THRESHOLD} so that tensors this large travel over the socket instead"
    )


class Segment:
    """One mapped segment.

    ``create``: a new segment of ``size`` bytes, its memory reserved (SharedMemoryFullError if /dev/shm lacks it).
    Otherwise an existing one, mapped at its real size; it must be a regular file of user ``uid`` (default: this
    process's user) whose memory is all allocated (a sparse segment could SIGBUS whoever touches it).
    """

    def __init__(self, name: str, size: int = 0, create: bool = False, uid: int | None = None):
        self.name = name
        self.creator_pid = 0  # the process that created (and may unlink) it; 0: mapped, not created
        self.size = 0
        self.map = None
        if not valid_name(name):
            raise ProtocolError(f"{name!r} is not a runtime shared-memory segment name")
        path = os.path.join(SHM_DIR, name)
        if create:
            self._create(path, size)
        else:
            self._open(path, os.getuid() if uid is None else uid)

    def _create(self, path: str, size: int) -> None:
        if size < 0:
            raise ValueError(f"a segment of {size} bytes")
        space = free_bytes()
        if size and space is not None and size > space[0]:
            raise _full_error(self.name, size)  # before touching /dev/shm: a doomed reservation would fill it
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise _full_error(self.name, size, exc.strerror) from None
            raise SharedMemoryError(f"cannot create shared-memory segment {path}: {exc.strerror}") from None
        try:
            if size:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, size)  # reserves the memory (and sets the size): no sparse pages
                else:
                    os.ftruncate(fd, size)
                self.map = mmap.mmap(fd, size)
        except BaseException as exc:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            if isinstance(exc, OSError):
                if exc.errno in _FULL_ERRNOS:
                    raise _full_error(self.name, size, exc.strerror) from None
                raise SharedMemoryError(f"cannot reserve {size} bytes for shared-memory segment {path}: "
                                        f"{exc.strerror}") from None
            raise
        os.close(fd)
        self.size = size
        self.creator_pid = os.getpid()

    def _open(self, path: str, uid: int) -> None:
        try:
            fd = os.open(path, os.O_RDWR | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:  # ELOOP: a symbolic link; EACCES: another user's
            raise ProtocolError(f"cannot open shared-memory segment {self.name}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolError(f"shared-memory segment {self.name} is not a regular file")
            if st.st_uid != uid:
                raise ProtocolError(f"shared-memory segment {self.name} belongs to user {st.st_uid}, "
                                    f"not to the owner's user {uid}")
            size = st.st_size
            if size and st.st_blocks * 512 < size:
                raise ProtocolError(
                    f"shared-memory segment {self.name} is sparse ({st.st_blocks * 512} of {size} bytes allocated): "
                    "touching it could kill this process with SIGBUS once /dev/shm is full; segments must be "
                    "created with their memory reserved (neuron_client.wire.shm.Segment does)"
                )
            try:
                self.map = mmap.mmap(fd, size) if size else None
            except OSError as exc:
                raise ProtocolError(f"cannot map shared-memory segment {self.name}: {exc.strerror}") from None
            self.size = size
        finally:
            os.close(fd)

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ProtocolError(
                f"shared-memory reference {self.name}@{offset}+{nbytes} lies outside the segment ({self.size} bytes)"
            )
        if self.map is None:  # an empty segment
            return memoryview(bytearray())
        return memoryview(self.map)[offset:offset + nbytes]

    def write(self, offset: int, t: torch.Tensor) -> None:
        import torch  # only a process that writes tensors loads torch (the broker only unlinks segments)

        n = t.numel() * t.element_size()
        if n:
            dst = torch.frombuffer(self.view(offset, n), dtype=torch.uint8)
            dst.copy_(t.contiguous().view(-1).view(torch.uint8))

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a tensor still views it; the mapping goes when that tensor does
                pass
            self.map = None

    def unlink(self) -> None:
        """Close, and remove the file if this process created it (a forked child never removes its parent's)."""
        self.close()
        if self.creator_pid and self.creator_pid == os.getpid():
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
        self.creator_pid = 0


_counter = itertools.count()


class Arena:
    """A client's growable segment, filled front to back for one message at a time.

    Its segments are named for the process that creates them (:func:`new_name`). A forked child that inherits an
    arena never writes into, nor unlinks, its parent's segment: it starts a segment of its own.
    """

    def __init__(self):
        self.segment: Segment | None = None
        self.offset = 0

    @property
    def name(self) -> str | None:
        return self.segment.name if self.segment else None

    @property
    def size(self) -> int:
        return self.segment.size if self.segment else 0

    def reset(self, need_bytes: int = 0) -> None:
        """Start a new message needing ``need_bytes``; grow (a new segment) if the current one is too small.

        Raises :class:`SharedMemoryFullError` (and holds no segment) if /dev/shm cannot hold the new one."""
        self.offset = 0
        seg = self.segment
        if seg is not None and seg.creator_pid != current_pid():  # inherited across fork: the parent's segment
            seg.close()
            self.segment = None
        if need_bytes > self.size:
            self.release()
            size = max(_align(need_bytes), 1 << 20)
            self.segment = Segment(new_name(), size, create=True)

    def put(self, t: torch.Tensor):
        """Copy ``t`` in; ``(name, offset)``, or None if it does not fit."""
        n = t.numel() * t.element_size()
        seg = self.segment
        if seg is None or self.offset + n > seg.size or seg.creator_pid != current_pid():
            return None
        off = self.offset
        seg.write(off, t)
        self.offset = _align(off + n)
        return seg.name, off

    def release(self) -> None:
        if self.segment is not None:
            self.segment.unlink()
            self.segment = None


def reserve_bytes(tensors, threshold: int) -> int:
    """Arena bytes needed for the tensors of one message that are at least ``threshold`` bytes."""
    total = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if n >= threshold:
            total += _align(n)
    return total


class SegmentCache:
    """A worker's mappings of its owner's segments, by name, least recently used dropped first.

    Bound to an owner (``owner_pid``, ``owner_uid``; :meth:`set_owner`), it maps only segments whose names start with
    ``nrt-<owner_pid>-`` and whose files belong to ``owner_uid`` (default: this process's user). Unbound, it maps
    nothing. A cached segment costs one dictionary look-up (no system call).
    """

    def __init__(self, capacity: int = 64, owner_pid: int | None = None, owner_uid: int | None = None):
        self.capacity = capacity
        self.segments: OrderedDict[str, Segment] = OrderedDict()
        self.owner_pid: int | None = None
        self.owner_uid: int | None = None
        self._prefix: str | None = None
        if owner_pid:
            self.set_owner(owner_pid, owner_uid)

    def set_owner(self, pid: int | None, uid: int | None = None) -> None:
        """Forget every mapping and accept only segments of process ``pid`` owned by user ``uid`` (default: this
        process's user) from now on; ``pid`` None or 0: no owner, nothing is mapped."""
        self.clear()
        if not pid:
            self.owner_pid = self.owner_uid = self._prefix = None
            return
        if type(pid) is not int or pid < 0 or (uid is not None and (type(uid) is not int or uid < 0)):
            raise ValueError(f"bad segment owner pid={pid!r} uid={uid!r}")
        self.owner_pid = pid
        self.owner_uid = os.getuid() if uid is None else uid
        self._prefix = name_prefix(pid)

    def get(self, name: str) -> Segment:
        seg = self.segments.get(name) if type(name) is str else None
        if seg is not None:
            self.segments.move_to_end(name)
            return seg
        if not valid_name(name):
            raise ProtocolError(f"{name!r} is not a runtime shared-memory segment name")
        if self._prefix is None:
            raise ProtocolError(f"shared-memory segment {name} refused: this core has no owner, so it maps no "
                                "shared memory")
        if not name.startswith(self._prefix):
            raise ProtocolError(f"shared-memory segment {name} refused: it is not one of the owner's (pid "
                                f"{self.owner_pid}: names {self._prefix}...); a core maps only its owner's segments")
        try:
            seg = Segment(name, uid=self.owner_uid)
        except FileNotFoundError:
            raise ProtocolError(f"shared-memory segment {name} does not exist") from None
        self.segments[name] = seg
        while len(self.segments) > self.capacity:
            _, old = self.segments.popitem(last=False)
            old.close()
        return seg

    def view(self, name: str, offset: int, nbytes: int) -> memoryview:
        return self.get(name).view(offset, nbytes)

    def clear(self) -> None:
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()


class SegmentWriter:
    """A worker writing large outputs into the segment the client offered for its reply."""

    def __init__(self, segment: Segment):
        self.segment = segment
        self.offset = 0

    def put(self, t: torch.Tensor):
        n = t.numel() * t.element_size()
        if self.offset + n > self.segment.size:
            return None
        off = self.offset
        self.segment.write(off, t)
        self.offset = _align(off + n)
        return self.segment.name, off


def unlink_for_pid(pid: int) -> int:
    """Unlink every segment a (dead) process left; returns how many."""
    n = 0
    for path in glob.glob(os.path.join(SHM_DIR, name_prefix(pid) + "*")):
        try:
            os.unlink(path)
            n += 1
        except OSError:
            pass
    return n


def segments_of(pid: int) -> list[str]:
    return [os.path.basename(p) for p in glob.glob(os.path.join(SHM_DIR, name_prefix(pid) + "*"))]
