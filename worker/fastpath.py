"""A worker's side of the co-located fast path (:mod:`neuron_client.wire.mailbox`): it listens on
``<broker dir>/core-N.fast``, takes mailboxes from its owner only, and serves their calls next to its ZeroMQ socket.

Owns the listening socket and the mailboxes it accepted (their mappings, doorbells and connections); the data thread
alone uses them. A mailbox is dropped when its client closes the connection or dies.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import time

import msgpack

from neuron_client.wire import mailbox as mb
from neuron_client.wire.errors import NeuronRuntimeError, ProtocolError, code_of

log = logging.getLogger("neuron.worker")
HANDSHAKE_TIMEOUT_S = 2.0
STREAM_TIMEOUT_S = 30.0  # a streamed reply that the client does not read within this long ends its mailbox
# The worker's spin after a reply lasts its budget, or longer where this client's next request usually takes longer
# to come (a large reply to copy out, its own work between calls): GAP_FACTOR times the usual gap, up to
# GAP_SPIN_MAX_S. Gaps longer than that are idle time, not a client's turnaround, and do not count.
GAP_FACTOR = 1.5
GAP_SPIN_MAX_S = 1e-3


class ServedMailbox:
    """One client thread's mailbox, as its worker sees it."""

    def __init__(self, conn: socket.socket, region: mb.Region, req_bell: int, rep_bell: int):
        self.conn = conn
        self.region = region
        self.req_bell = req_bell
        self.rep_bell = rep_bell
        self.ctl = region.ctl
        self.last_seq = 0  # the request last taken
        self.queued = False  # taken into the backlog, not answered yet
        self.reader = mb.LeanReader(region.request)
        self.writer = mb.LeanWriter(region.reply)
        self.replied_at = 0.0  # perf_counter of the last reply (the spin's gap statistic)
        self.gap = 0.0  # the usual time from a reply to this client's next request (mailbox.track, of those that count)
        self.closed = False

    def waiting(self, on: bool) -> None:
        """Say in the control page whether this worker blocks in poll (then a request rings its doorbell)."""
        self.ctl[mb._REQ_WAIT] = 1 if on else 0

    def pending(self) -> bool:
        return not self.queued and self.ctl[mb._REQ_SEQ] != self.last_seq

    def take(self, now: float) -> tuple[int, int]:
        """Mark the waiting request as taken (``now``: ``perf_counter``); its (kind, bytes)."""
        gap = now - self.replied_at
        if gap < GAP_SPIN_MAX_S:
            self.gap = mb.track(self.gap, gap)
        self.last_seq = self.ctl[mb._REQ_SEQ]
        self.queued = True
        return self.ctl[mb._REQ_KIND], self.ctl[mb._REQ_LEN]

    def request_frames(self, nbytes: int) -> list:
        return mb.read_frames(self.region.request, nbytes)

    def reply(self, outputs=None, frames=None) -> None:
        """Answer the request taken: ``outputs`` in the lean format where they are flat and fit, else ``frames``
        (a codec reply: a structured result, or an error); frames too large for the area follow on the connection."""
        kind = mb.KIND_LEAN
        end = -1
        if outputs is not None:
            flat = mb.flat_tensors(outputs)
            if flat is not None:
                try:
                    end = self.writer.write(flat[1], flat[0])
                except mb.NotCarried:
                    end = -1
            if end < 0:
                from neuron_client.wire import codec, messages, tensors

                frames = codec.encode(messages.Result(outputs=outputs), 1, tensors.TensorSink())
        if end < 0:
            kind = mb.KIND_FRAMES
            try:
                end = mb.write_frames(self.region.reply, frames)
            except mb.NotCarried as too_big:
                kind, end = mb.KIND_STREAM, too_big.args[0]
        ctl = self.ctl
        ctl[mb._REP_KIND] = kind
        ctl[mb._REP_LEN] = end
        ctl[mb._REP_SEQ] = self.last_seq
        self.queued = False
        try:
            mb.ring_if_waiting(ctl, mb._REP_WAIT, self.rep_bell)
        except OSError:
            pass
        if kind == mb.KIND_STREAM:
            self.conn.settimeout(STREAM_TIMEOUT_S)
            try:
                mb.send_stream(self.conn, frames)
            finally:
                self.conn.setblocking(False)
        self.replied_at = time.perf_counter()

    def spin_until(self, budget_s: float) -> float:
        """Until when a spin after this mailbox's last reply may wait for its next request."""
        return self.replied_at + max(budget_s, min(GAP_FACTOR * self.gap, GAP_SPIN_MAX_S))

    def close(self) -> None:
        self.closed = True
        mb.close_fds(self.req_bell, self.rep_bell)
        self.conn.close()
        # the mapping goes with the last tensor over it (a model may keep a view of an input)


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class FastPath:
    """The listening socket and the mailboxes of one worker."""

    def __init__(self, directory: str, core: int, spin_us: int, cpus: list[int], max_message_bytes: int = 0):
        self.address = mb.fast_path_address(directory, core)
        self.max_capacity = mb.max_capacity(max_message_bytes)
        self.core = core
        self.spin_us = spin_us
        self.cpus = list(cpus)
        if os.path.exists(self.address):
            os.unlink(self.address)  # the previous worker's
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(self.address)
        os.chmod(self.address, 0o600)
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.boxes: dict[int, ServedMailbox] = {}  # conn fd -> mailbox
        self.by_bell: dict[int, ServedMailbox] = {}

    def accept(self, owner_pid: int, owner_uid: int, authorize) -> ServedMailbox | None:
        """Take a mailbox from a connecting client: only the owner (kernel credentials) with the lease's token."""
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        fds: list[int] = []
        try:
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if not owner_pid or pid != owner_pid or uid != owner_uid:
                log.warning("core %d: fast-path connection from pid %d uid %d refused (the owner is pid %d)",
                            self.core, pid, uid, owner_pid)
                raise ProtocolError(f"core {self.core}'s fast path serves its owner only")
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            data, fds, _flags, _addr = socket.recv_fds(conn, mb.MAX_HANDSHAKE_BYTES, 3)
            hello = msgpack.unpackb(data, raw=False)
            if not isinstance(hello, dict) or hello.get("v") != mb.VERSION:
                raise ProtocolError(f"a fast-path hello of version {getattr(hello, 'get', lambda k: None)('v')!r}; "
                                    f"this worker speaks {mb.VERSION}")
            authorize(hello.get("token"))
            capacity = hello.get("capacity")
            if type(capacity) is not int or not 0 < capacity <= self.max_capacity or capacity % mb.ALIGN:
                raise ProtocolError(f"a mailbox capacity of {capacity!r} bytes (at most {self.max_capacity})")
            if len(fds) != 3 or not _is_eventfd(fds[1]) or not _is_eventfd(fds[2]):
                raise ProtocolError("a fast-path hello carries a memfd and two eventfds")
            mb.check_memfd(fds[0], capacity)
            region = mb.Region(fds[0], capacity)
            os.close(fds[0])
            box = ServedMailbox(conn, region, fds[1], fds[2])
            conn.sendall(msgpack.packb({"ok": True, "spin_us": self.spin_us, "cpus": self.cpus}))
            conn.setblocking(False)
        except Exception as exc:
            if not isinstance(exc, NeuronRuntimeError):
                exc = ProtocolError(f"core {self.core}: a bad fast-path hello: {type(exc).__name__}: {exc}")
            try:
                conn.settimeout(0.2)
                conn.sendall(msgpack.packb({"ok": False, "code": code_of(exc), "message": str(exc)}))
            except OSError:
                pass
            conn.close()
            mb.close_fds(*fds)
            return None
        self.boxes[conn.fileno()] = box
        self.by_bell[box.req_bell] = box
        return box

    def drop(self, box: ServedMailbox) -> None:
        self.boxes.pop(box.conn.fileno(), None)
        self.by_bell.pop(box.req_bell, None)
        box.close()

    def close(self) -> None:
        for box in list(self.boxes.values()):
            self.drop(box)
        self.listener.close()
        try:
            os.unlink(self.address)
        except OSError:
            pass
