"""The lease link: one connected AF_UNIX stream socket per lease, between its owner and the broker.

A lease lives exactly as long as its owner process. The owner opens this link, asks for its cores on it and keeps it
open; the broker takes the owner's pid and uid from the kernel (``SO_PEERCRED``), never from a message, and watches
the process through a pidfd, so it sees the owner's end at once, however the owner ends, and a live owner keeps its
cores however starved it is. The owner checks, before it sends anything, that the broker runs as its own user.

On the link each message is a 4-byte big-endian length followed by one :mod:`protocol` frame (control messages carry
no tensors). :class:`FrameReader` is the broker's non-blocking side; :class:`LeaseLink` is the owner's blocking side,
with a timeout on every call.
"""
from __future__ import annotations

import os
import re
import socket
import struct
import time

from neuron_client.wire import codec, messages
from neuron_client.wire.errors import BrokerUnavailableError, ProtocolError, RequestTimeoutError

MAX_LINK_MESSAGE_BYTES = 64 * 1024  # control messages are small; a longer frame closes the link
_LEN = struct.Struct("!I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def lease_socket_path(directory: str) -> str:
    return os.path.join(directory, "lease.sock")


def tombstone_dir(directory: str) -> str:
    return os.path.join(directory, "released")


def write_tombstone(directory: str, lease_id: str) -> bool:
    """Left by an owner that released while the broker was away, so that a restarted broker does not bring the
    lease back from its journal. True if written."""
    if not re.fullmatch(r"[0-9a-f]{16}", lease_id):
        return False
    path = tombstone_dir(directory)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(path, lease_id), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        return True
    except OSError:
        return False


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected AF_UNIX socket, from the kernel."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))

MAX_ERROR_TEXT = 4000  # an error's words on the link (its frames are bounded)


def pack(reply, req_id: int = 0) -> bytes:
    """One frame of the lease link: a message, or an exception as an error reply."""
    frames = codec.encode_reply(reply, req_id, max_text=MAX_ERROR_TEXT)
    if len(frames) != 1:
        raise ProtocolError(f"{reply.op}: the lease link carries no tensors")
    body = bytes(frames[0])
    if len(body) > MAX_LINK_MESSAGE_BYTES:
        raise ProtocolError(f"{getattr(reply, 'op', 'error')}: {len(body)} bytes exceed the lease link's limit of "
                            f"{MAX_LINK_MESSAGE_BYTES}")
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into frames; raises :class:`ProtocolError` on an oversized frame."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while len(self.buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self.buf)
            if n > MAX_LINK_MESSAGE_BYTES:
                raise ProtocolError(f"a lease-link frame of {n} bytes exceeds the limit of {MAX_LINK_MESSAGE_BYTES}")
            if len(self.buf) < _LEN.size + n:
                break
            out.append(bytes(self.buf[_LEN.size:_LEN.size + n]))
            del self.buf[:_LEN.size + n]
        return out


class LeaseLink:
    """The owner's end of the link. Not thread-safe: one thread sends requests, or one thread reads pushes."""

    def __init__(self, directory: str, timeout_s: float):
        path = lease_socket_path(directory)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise BrokerUnavailableError(f"no broker listens at {path} ({exc.strerror})") from None
        except OSError as exc:
            self.sock.close()
            raise BrokerUnavailableError(f"could not connect to the broker at {path}: {exc}") from None
        pid, uid, _ = peer_cred(self.sock)
        if uid != os.getuid():
            self.sock.close()
            raise BrokerUnavailableError(
                f"the process listening at {path} (pid {pid}) runs as uid {uid}, not as you (uid {os.getuid()}): "
                "nothing was sent to it. Another user may have planted it; set NEURON_BROKER_DIR to a directory "
                "of your own")
        self.broker_pid = pid
        self.reader = FrameReader()
        self.inbox: list[bytes] = []
        self.next_id = 1

    def send(self, msg) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        try:
            self.sock.sendall(pack(msg, rid))
        except OSError as exc:
            said = self._last_word()
            if said is not None:  # the broker refused the link and said why before closing it
                raise said from None
            raise BrokerUnavailableError(f"the broker closed the lease link: {exc}") from None
        return rid

    def _last_word(self) -> Exception | None:
        """The error the broker sent before it closed the link, if one is waiting to be read."""
        try:
            self.sock.settimeout(0.0)
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.inbox += self.reader.feed(data)
        except (OSError, ProtocolError):
            pass
        for frame in self.inbox:
            try:
                env = codec.decode([frame])
            except ProtocolError:
                continue
            if isinstance(env.msg, messages.Error):
                from neuron_client.wire.errors import from_code

                return from_code(env.msg.code, env.msg.message)
        return None

    def recv(self, timeout_s: float | None):
        """The next message from the broker (an :class:`codec.Envelope`; error replies raise); None on timeout.

        Raises :class:`BrokerUnavailableError` when the broker closed the link."""
        while not self.inbox:
            self.sock.settimeout(timeout_s)
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, BlockingIOError):
                return None
            except OSError as exc:
                raise BrokerUnavailableError(f"the lease link to the broker failed: {exc}") from None
            if not data:
                raise BrokerUnavailableError("the broker closed the lease link")
            self.inbox += self.reader.feed(data)
        env = codec.decode([self.inbox.pop(0)])
        if isinstance(env.msg, messages.Error):
            from neuron_client.wire.errors import from_code

            raise from_code(env.msg.code, env.msg.message)
        return env

    def request(self, msg, timeout_s: float):
        """Send ``msg`` and return the reply's message; :class:`RequestTimeoutError` after ``timeout_s``."""
        rid = self.send(msg)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            env = self.recv(max(0.0, left)) if left > 0 else None
            if env is None:
                raise RequestTimeoutError(f"the broker did not answer {msg.op} within {timeout_s:.0f}s")
            if env.req_id == rid:
                return env.msg

    def shutdown(self) -> None:
        """End the link now (the broker takes it as a release); a thread blocked reading it wakes up."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
