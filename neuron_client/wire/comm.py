"""ZeroMQ sockets: the only module that imports zmq.

Every socket has ``linger=0``; every wait has a timeout. A :class:`Channel` is one DEALER connection with
request/reply matched by request id (a late reply to a request that timed out is recognised and dropped).
"""
from __future__ import annotations

import itertools
import os
import threading
import time

import zmq

from neuron_client.wire import codec, messages
from neuron_client.wire.errors import ProtocolError, RequestTimeoutError, from_code

POLLIN = zmq.POLLIN
Again = zmq.Again
ZMQError = zmq.ZMQError

_ctx: zmq.Context | None = None
_ctx_pid = 0
_ctx_lock = threading.Lock()


def context() -> zmq.Context:
    """This process's context (a forked child gets a fresh one; it must not touch its parent's sockets)."""
    global _ctx, _ctx_pid
    with _ctx_lock:
        if _ctx is None or _ctx_pid != os.getpid():
            _ctx = zmq.Context()
            _ctx_pid = os.getpid()
        return _ctx


def _socket(kind: int) -> zmq.Socket:
    s = context().socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    return s


def dealer(endpoint: str, identity: bytes | None = None) -> zmq.Socket:
    s = _socket(zmq.DEALER)
    if identity:
        s.setsockopt(zmq.IDENTITY, identity)
    s.connect(endpoint)
    return s


def router(endpoint: str, max_message_bytes: int = 0, handover: bool = False) -> zmq.Socket:
    """A bound ROUTER. ``handover``: a peer connecting with an identity already in use takes it over (a fresh
    worker registering as ``core-N`` before ZeroMQ has noticed that the one it replaces has gone)."""
    s = _socket(zmq.ROUTER)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises instead of vanishing silently
    if handover:
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if max_message_bytes:
        s.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)  # ZeroMQ drops a peer that sends a larger frame
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)
    s.bind(endpoint)
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://"):], 0o600)
    return s


def poller(*sockets) -> zmq.Poller:
    p = zmq.Poller()
    for s in sockets:
        p.register(s, zmq.POLLIN)
    return p


def send(sock: zmq.Socket, frames, identity: bytes | None = None) -> bool:
    """Send without blocking; False if the peer is gone or its queue is full."""
    try:
        if identity is not None:
            frames = [identity, *frames]
        small = sum(_nbytes(f) for f in frames) < COPY_THRESHOLD_BYTES
        sock.send_multipart(frames, copy=small, flags=zmq.NOBLOCK)
        return True
    except (zmq.Again, zmq.ZMQError):
        return False


class Comm:
    """A ZeroMQ socket that speaks messages: :meth:`send` owns the encoding (a message or an exception, with its
    request id), so no caller pairs the codec with the socket. ``sock`` stays reachable for polling."""

    __slots__ = ("sock",)

    def __init__(self, sock: zmq.Socket):
        self.sock = sock

    def send(self, reply, req_id: int = 0, to: bytes | None = None, sink=None) -> bool:
        """Encode ``reply`` (a message, or an exception: an error reply) and send it without blocking, to the peer
        ``to`` on a ROUTER; False if the peer is gone or its queue is full."""
        return send(self.sock, codec.encode_reply(reply, req_id, sink), identity=to)

    def send_frames(self, frames, to: bytes | None = None) -> bool:
        """Send a reply already encoded (by :func:`codec.encode_reply`), without blocking."""
        return send(self.sock, frames, identity=to)

    def recv(self):
        """One waiting message as ``bytes`` frames (a ROUTER's start with the sender's identity)."""
        return self.sock.recv_multipart(flags=zmq.NOBLOCK)

    def readable(self) -> bool:
        return readable(self.sock)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms, zmq.POLLIN))

    def close(self) -> None:
        self.sock.close(linger=0)


def recv(sock: zmq.Socket):
    """One waiting message as ``bytes`` frames (tensors are decoded over them without another copy)."""
    return sock.recv_multipart(flags=zmq.NOBLOCK)


_POLLIN = int(zmq.POLLIN)  # a plain int: an enum's ``&`` costs more than the option read


def readable(sock: zmq.Socket) -> bool:
    """A message waits on ``sock`` (no system call beyond ZeroMQ's own bookkeeping)."""
    return bool(sock.get(zmq.EVENTS) & _POLLIN)


COPY_THRESHOLD_BYTES = 64 * 1024


def _nbytes(frame) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def frames_nbytes(frames) -> int:
    """The bytes of a multipart message (bytes, memoryviews, or the protocol's ctypes tensor buffers)."""
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


HARD_LIMIT_FACTOR = 2  # a worker's socket drops frames above 2x its message limit (it replies an error below that)


def hard_limit(max_message_bytes: int) -> int:
    """The ZMQ_MAXMSGSIZE a worker sets for a message limit of ``max_message_bytes`` (0: none)."""
    return HARD_LIMIT_FACTOR * max_message_bytes if max_message_bytes else 0


class MessageTooLargeError(ProtocolError):
    """A message larger than its peer accepts: refused before sending (ZeroMQ would drop it without a word)."""


def too_large(nbytes: int, limit: int, what: str = "message", peer: str = "") -> MessageTooLargeError:
    """The error for a ``nbytes`` message over a ``limit`` (for the client's check and for peers that refuse one)."""
    return MessageTooLargeError(
        f"{what} of {nbytes} bytes exceeds the limit of {limit} bytes{f' of {peer}' if peer else ''}, and would be "
        "dropped unread; send large tensors through shared memory (they travel there from "
        "NEURON_SHM_THRESHOLD_BYTES up, unless /dev/shm is unavailable), split the batch into smaller calls, or "
        "start the broker with a larger --max-message-mb"
    )


def check_size(frames, limit: int, what: str = "message", peer: str = "") -> int:
    """The bytes of ``frames``; raises :class:`MessageTooLargeError` above ``limit`` (0: no limit)."""
    n = frames_nbytes(frames)
    if limit and n > limit:
        raise too_large(n, limit, what, peer)
    return n


# -- TCP with CURVE authentication ------------------------------------------------------------------------------
# The broker listens on TCP only when asked (--listen), and then only with CURVE: its key pair and the authorised
# clients' public keys live in <broker dir>/curve (mode 0700), created on first use with zmq.auth.


def curve_dir(directory: str) -> str:
    return os.path.join(directory, "curve")


def ensure_curve_keys(directory: str) -> str:
    """Create the broker's and a first client's key pairs (the client's public key authorised) if missing."""
    import zmq.auth

    keys = curve_dir(directory)
    authorized = os.path.join(keys, "authorized")
    os.makedirs(authorized, mode=0o700, exist_ok=True)
    os.chmod(keys, 0o700)
    for name in ("server", "client"):
        if not os.path.exists(os.path.join(keys, f"{name}.key_secret")):
            zmq.auth.create_certificates(keys, name)
    client_public = os.path.join(keys, "client.key")
    target = os.path.join(authorized, "client.key")
    if not os.path.exists(target):
        with open(client_public, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
    for f in os.listdir(keys):
        if f.endswith(".key_secret"):
            os.chmod(os.path.join(keys, f), 0o600)
    return keys


def curve_router(endpoint: str, directory: str, max_message_bytes: int = 0):
    """A ROUTER on TCP that only CURVE clients whose public key is in ``curve/authorized`` can talk to.
    Returns (socket, authenticator); stop the authenticator when done."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    keys = ensure_curve_keys(directory)
    auth = ThreadAuthenticator(context())
    auth.start()
    auth.configure_curve(domain="*", location=os.path.join(keys, "authorized"))
    public, secret = zmq.auth.load_certificate(os.path.join(keys, "server.key_secret"))
    s = _socket(zmq.ROUTER)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if max_message_bytes:
        s.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    s.curve_secretkey, s.curve_publickey, s.curve_server = secret, public, True
    s.bind(endpoint)
    return s, auth


def _curve_client(sock: zmq.Socket, keys: str) -> None:
    import zmq.auth

    try:
        server_public, _ = zmq.auth.load_certificate(os.path.join(keys, "server.key"))
        public, secret = zmq.auth.load_certificate(os.path.join(keys, "client.key_secret"))
    except (OSError, ValueError) as exc:
        raise RequestTimeoutError(f"TCP to the broker needs CURVE keys in {keys} (server.key and "
                                  f"client.key_secret): {exc}") from None
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret


class Channel:
    """One DEALER connection to a broker or worker, used by one thread at a time."""

    def __init__(self, endpoint: str, max_bytes: int = 0):
        """``max_bytes``: the largest message the peer reads (0: no limit); :meth:`request` refuses a larger one
        before sending it, instead of waiting out its timeout for a reply that cannot come."""
        from neuron_client.wire.config import ENV_BROKER_KEYS, LIVENESS_POLL_S, broker_dir

        self.endpoint = endpoint
        self.max_bytes = max_bytes
        if endpoint.startswith("tcp://"):  # always authenticated: keys from NEURON_BROKER_KEYS or <broker dir>/curve
            self.sock = _socket(zmq.DEALER)
            _curve_client(self.sock, os.environ.get(ENV_BROKER_KEYS) or curve_dir(broker_dir()))
            self.sock.connect(endpoint)
        else:
            self.sock = dealer(endpoint)
        self.sock.setsockopt(zmq.RCVTIMEO, int(LIVENESS_POLL_S * 1000))
        self._ids = itertools.count(1)
        self.pid = os.getpid()

    def check_process(self) -> None:
        if self.pid != os.getpid():
            raise RuntimeError("a neuron_client connection cannot be used in a forked child; "
                               "create the runtime in the child instead")

    def request(self, msg, timeout_s: float, sink=None, source=None, alive=None, max_bytes: int | None = None):
        """Send ``msg`` and return the reply's :class:`codec.Envelope`.

        ``source(frames)`` builds the tensor source for the reply; ``alive()`` is called every
        ``config.LIVENESS_POLL_S`` while waiting and may raise to abandon the wait (a dead worker).
        ``max_bytes`` (default: the channel's) refuses, with :class:`MessageTooLargeError` and before sending, a
        message larger than the peer reads. An error reply is raised as its named exception.
        """
        self.check_process()
        rid = next(self._ids)
        frames = codec.encode(msg, rid, sink)

        def decode(reply):
            return codec.decode(reply, source(reply) if source else None)

        return self.exchange(frames, rid, msg.op, timeout_s, decode, alive, max_bytes)

    def next_id(self) -> int:
        return next(self._ids)

    def exchange(self, frames, rid: int, what: str, timeout_s: float, decode, alive=None,
                 max_bytes: int | None = None, peek=codec.peek_req_id):
        """Send ``frames`` (a request with id ``rid``) and return ``decode(reply)`` of its reply: an
        :class:`codec.Envelope`; ``peek(reply)`` is the request id of a reply that failed to decode. An error reply
        (the codec's) is raised as its named exception."""
        self.check_process()
        limit = self.max_bytes if max_bytes is None else max_bytes
        if len(frames) == 1 and not limit:
            small = True
        else:
            # small messages are copied into ZeroMQ (cheaper than wrapping each part); large frames go zero-copy
            n = frames_nbytes(frames)
            if limit and n > limit:
                raise too_large(n, limit, f"a {what!r} message", self.endpoint)
            small = len(frames) == 1 or n < COPY_THRESHOLD_BYTES
        try:
            self.sock.send_multipart(frames, copy=small, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise RequestTimeoutError(f"cannot send {what!r} to {self.endpoint}: its queue is full (peer gone?)") \
                from None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = self.sock.recv_multipart()  # waits at most RCVTIMEO (the liveness interval)
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise RequestTimeoutError(
                        f"no reply to {what!r} from {self.endpoint} within {timeout_s:.1f}s; the peer is busy or gone"
                    ) from None
                if alive is not None:
                    alive()
                continue
            try:
                env = decode(reply)
            except ProtocolError:
                if peek(reply) != rid:
                    continue  # a late, unreadable reply to an abandoned request
                raise
            if env.req_id != rid:
                continue  # a late reply to an abandoned request
            if isinstance(env.msg, messages.Error):
                raise from_code(env.msg.code, env.msg.message)
            return env

    def close(self) -> None:
        try:
            self.sock.close(linger=0)
        except Exception:
            pass
