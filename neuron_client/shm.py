"""Shared memory for large tensors: POSIX segments in /dev/shm, mapped by client and worker.

A client owns its segments (it creates, grows and unlinks them); their names carry its pid, ``nrt-<pid>-<tag>-<n>``,
so that the broker can unlink whatever a killed client left behind (:func:`unlink_for_pid`). A worker only maps
segments whose names follow that pattern, that its own user owns, and only within their size.
"""
from __future__ import annotations

import glob
import itertools
import mmap
import os
import re
import secrets
from collections import OrderedDict

import torch

from .errors import ProtocolError

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^nrt-(\d+)-[0-9a-f]{1,32}-\d+$")
ALIGN_BYTES = 64


def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class Segment:
    """One mapped segment."""

    def __init__(self, name: str, size: int = 0, create: bool = False):
        self.name = name
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                st = os.fstat(fd)
                if st.st_uid != os.getuid():
                    raise ProtocolError(f"shared-memory segment {name} belongs to another user")
                size = st.st_size
            self.size = size
            self.map = mmap.mmap(fd, size) if size else None
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
        self.close()
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass


_counter = itertools.count()


class Arena:
    """A client's growable segment, filled front to back for one message at a time."""

    def __init__(self):
        self.tag = secrets.token_hex(4)
        self.segment: Segment | None = None
        self.offset = 0

    @property
    def name(self) -> str | None:
        return self.segment.name if self.segment else None

    @property
    def size(self) -> int:
        return self.segment.size if self.segment else 0

    def reset(self, need_bytes: int = 0) -> None:
        """Start a new message needing ``need_bytes``; grow (a new segment) if the current one is too small."""
        self.offset = 0
        if need_bytes > self.size:
            self.release()
            size = max(_align(need_bytes), 1 << 20)
            self.segment = Segment(f"nrt-{os.getpid()}-{self.tag}-{next(_counter)}", size, create=True)

    def put(self, t: torch.Tensor):
        """Copy ``t`` in; ``(name, offset)``, or None if it does not fit."""
        n = t.numel() * t.element_size()
        if self.segment is None or self.offset + n > self.size:
            return None
        off = self.offset
        self.segment.write(off, t)
        self.offset = _align(off + n)
        return self.segment.name, off

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
    """A worker's mappings of client segments, by name, least recently used dropped first."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.segments: OrderedDict[str, Segment] = OrderedDict()

    def get(self, name: str) -> Segment:
        seg = self.segments.get(name)
        if seg is not None:
            self.segments.move_to_end(name)
            return seg
        if not isinstance(name, str) or not _NAME.match(name):
            raise ProtocolError(f"{name!r} is not a runtime shared-memory segment name")
        try:
            seg = Segment(name)
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
    for path in glob.glob(os.path.join(SHM_DIR, f"nrt-{int(pid)}-*")):
        try:
            os.unlink(path)
            n += 1
        except OSError:
            pass
    return n


def segments_of(pid: int) -> list[str]:
    return [os.path.basename(p) for p in glob.glob(os.path.join(SHM_DIR, f"nrt-{int(pid)}-*"))]
