"""Echo servers for the baselines, each run in its own process (multiprocessing ``spawn``), and their clients.

* :func:`zmq_echo`: a ROUTER that sends every message back as it came (bare pyzmq, zero-copy frames);
* :func:`unix_echo`: a Unix-domain stream socket echoing length-prefixed messages (the machine's floor for moving
  bytes to another process and back through a socket).

Imports nothing of the runtime: the servers are the bare transports.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import struct
import time

HEADER = struct.Struct("<Q")
SMALL_BYTES = 64 * 1024  # up to this, header and payload go in one send
CONNECT_TIMEOUT_S = 30.0


def _quiet_on_ctrl_c() -> None:
    """Ctrl-C reaches the whole foreground group; the parent stops the echo servers itself, without tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def zmq_echo(endpoint: str) -> None:
    import zmq

    _quiet_on_ctrl_c()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    try:
        while True:
            sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    finally:
        sock.close(0)
        ctx.term()


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("peer closed")
        got += k


def unix_echo(path: str) -> None:
    _quiet_on_ctrl_c()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    conn, _ = srv.accept()
    buf = bytearray(HEADER.size)
    head = memoryview(bytearray(HEADER.size))
    try:
        while True:
            _recv_exact(conn, head)
            (n,) = HEADER.unpack(head)
            if n > len(buf):
                buf = bytearray(n)
            view = memoryview(buf)[:n]
            _recv_exact(conn, view)
            if n <= SMALL_BYTES:
                conn.sendall(bytes(head) + view)
            else:
                conn.sendall(head)
                conn.sendall(view)
    except ConnectionError:
        pass
    finally:
        conn.close()
        srv.close()


def _pinned_main(target, arg: str, cpus) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    target(arg)


def start(target, arg: str, cpus=None):
    """Start ``target(arg)`` in a spawned process (a fresh interpreter: no state of this one carries over), pinned to
    ``cpus`` if given (the CPUs of the worker it stands beside, so that both servers compete for the same CPUs)."""
    proc = mp.get_context("spawn").Process(target=_pinned_main, args=(target, arg, list(cpus or [])),
                                           name=f"bench-{target.__name__}", daemon=True)
    proc.start()
    return proc


class ZmqClient:
    """A bare DEALER: one message of ``payload`` out, the echo back (zero-copy both ways)."""

    def __init__(self, endpoint: str):
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def roundtrip(self, payload) -> object:
        self.sock.send(payload, copy=False)
        return self.sock.recv(copy=False)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class UnixClient:
    """Length-prefixed messages over a Unix stream socket; the echo lands in a buffer allocated once."""

    def __init__(self, path: str, proc=None):
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline or (proc is not None and not proc.is_alive()):
                    raise
                time.sleep(0.02)
        self.head = memoryview(bytearray(HEADER.size))
        self.buf = bytearray(0)

    def roundtrip(self, payload) -> memoryview:
        n = len(payload)
        if n > len(self.buf):
            self.buf = bytearray(n)
        if n <= SMALL_BYTES:
            self.sock.sendall(HEADER.pack(n) + payload)
        else:
            self.sock.sendall(HEADER.pack(n))
            self.sock.sendall(payload)
        _recv_exact(self.sock, self.head)
        view = memoryview(self.buf)[:n]
        _recv_exact(self.sock, view)
        return view

    def close(self) -> None:
        self.sock.close()


def socket_path(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    if len(path) > 100:
        raise ValueError(f"socket path {path} is too long for AF_UNIX")
    return path
