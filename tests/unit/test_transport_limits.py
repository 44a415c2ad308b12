"""Unit tests of the client's message-size check (#18): a message above what the peer's socket reads is refused before
it is sent, at once, instead of being dropped by ZeroMQ (ZMQ_MAXMSGSIZE) while the client waits out its timeout.

A real ROUTER with a small hard limit on an ipc endpoint in a private temporary directory; no other process.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import pytest
import torch

from neuron_client.wire import codec, comm as transport, messages, tensors
from neuron_client.wire.errors import ProtocolError, RequestTimeoutError

LIMIT = 4096  # the peer's ZMQ_MAXMSGSIZE in these tests


@pytest.fixture
def endpoint():
    d = tempfile.mkdtemp(prefix="nrt-tl-", dir="/tmp")  # short: an ipc path must fit in sockaddr_un
    yield f"ipc://{d}/peer.sock"
    shutil.rmtree(d, ignore_errors=True)


class Peer:
    """A ROUTER (in its own thread) that reads with ``max_message_bytes`` and answers every request with Ok."""

    def __init__(self, endpoint: str, max_message_bytes: int):
        self.endpoint, self.max_message_bytes = endpoint, max_message_bytes
        self.received: list[int] = []  # the size of every message that arrived
        self.ready, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def run(self):
        sock = transport.router(self.endpoint, self.max_message_bytes)
        self.ready.set()
        try:
            while not self.stop.is_set():
                if not sock.poll(20, transport.POLLIN):
                    continue
                identity, *frames = transport.recv(sock)
                self.received.append(transport.frames_nbytes(frames))
                transport.send(sock, codec.encode(messages.Ok(), codec.peek_req_id(frames)), identity=identity)
        finally:
            sock.close(linger=0)

    def close(self):
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def peer(endpoint):
    p = Peer(endpoint, LIMIT)
    yield p
    p.close()


@pytest.fixture
def channel(endpoint, peer):
    ch = transport.Channel(endpoint, max_bytes=LIMIT)
    yield ch
    ch.close()


def load_of(nbytes: int) -> messages.Load:
    return messages.Load(token="t", name="m.pt", data=torch.zeros(nbytes, dtype=torch.uint8))


def message_bytes(msg) -> int:
    return transport.frames_nbytes(codec.encode(msg, 1))


# ----------------------------------------------------------------------------------------------------------------
# helpers


def test_frames_nbytes_counts_every_kind_of_frame():
    t = torch.arange(10, dtype=torch.float64)
    frames = [b"abc", memoryview(t.numpy()), tensors.tensor_buffer(torch.zeros(7, dtype=torch.int16)),
              bytearray(5), b""]
    assert transport.frames_nbytes(frames) == 3 + 80 + 14 + 5
    assert transport.frames_nbytes([]) == 0


def test_hard_limit_is_the_workers_socket_limit():
    assert transport.hard_limit(0) == 0  # no limit
    assert transport.hard_limit(1 << 30) == 2 << 30
    assert transport.hard_limit(1000) == transport.HARD_LIMIT_FACTOR * 1000


def test_check_size():
    frames = [b"x" * 100, b"y" * 28]
    assert transport.check_size(frames, 0) == 128
    assert transport.check_size(frames, 128) == 128
    with pytest.raises(transport.MessageTooLargeError, match="message of 128 bytes exceeds the limit of 127 bytes "
                                                             "of core 3"):
        transport.check_size(frames, 127, peer="core 3")


# ----------------------------------------------------------------------------------------------------------------
# Channel.request against a real ROUTER with a small hard limit


def test_without_the_check_zeromq_drops_a_large_message_silently(endpoint, peer):
    """The bug (#18): ZeroMQ drops the oversized message unread and the client only learns at its timeout."""
    ch = transport.Channel(endpoint)  # no max_bytes: the old behaviour
    try:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            ch.request(load_of(4 * LIMIT), timeout_s=0.5)
        assert time.monotonic() - t0 >= 0.5
    finally:
        ch.close()
    assert peer.received == []


def test_a_message_above_the_limit_is_refused_at_once(channel, peer):
    msg = load_of(4 * LIMIT)
    size = message_bytes(msg)
    with pytest.raises(transport.MessageTooLargeError) as info:  # a wait for the reply would end in a timeout
        channel.request(msg, timeout_s=30.0)
    assert isinstance(info.value, ProtocolError)
    text = str(info.value)
    assert f"of {size} bytes" in text and f"limit of {LIMIT} bytes" in text and channel.endpoint in text
    assert "'load'" in text and "shared memory" in text and "split the batch" in text and "--max-message-mb" in text
    time.sleep(0.1)
    assert peer.received == []  # nothing was sent


def test_a_message_within_the_limit_goes_through(channel, peer):
    small = load_of(LIMIT // 2)
    assert isinstance(channel.request(small, timeout_s=10.0).msg, messages.Ok)
    # the largest message that fits (each frame below the limit, as ZeroMQ checks them): sent; a byte more: refused
    n = LIMIT
    while message_bytes(load_of(n)) > LIMIT:
        n -= 1
    largest = message_bytes(load_of(n))
    assert LIMIT - 2 <= largest <= LIMIT < message_bytes(load_of(n + 1))
    assert isinstance(channel.request(load_of(n), timeout_s=10.0).msg, messages.Ok)
    with pytest.raises(transport.MessageTooLargeError):
        channel.request(load_of(n + 1), timeout_s=10.0)
    assert peer.received == [message_bytes(small), largest]
    # and the channel still works after a refusal
    assert isinstance(channel.request(small, timeout_s=10.0).msg, messages.Ok)


def test_a_single_frame_message_is_checked_too(endpoint, peer):
    ch = transport.Channel(endpoint, max_bytes=8)
    try:
        with pytest.raises(transport.MessageTooLargeError, match="'load' message of"):
            ch.request(messages.Load(token="t" * 64, name="m.pt", data=torch.zeros(0, dtype=torch.uint8)), 10.0)
        assert isinstance(ch.request(messages.Ping(), 10.0, max_bytes=0).msg, messages.Ok)  # per call: no limit
    finally:
        ch.close()


def test_the_per_call_limit_overrides_the_channels(endpoint, peer):
    ch = transport.Channel(endpoint)
    try:
        with pytest.raises(transport.MessageTooLargeError, match=f"limit of {LIMIT} bytes"):
            ch.request(load_of(4 * LIMIT), timeout_s=30.0, max_bytes=LIMIT)
        assert isinstance(ch.request(load_of(16), timeout_s=10.0, max_bytes=LIMIT).msg, messages.Ok)
    finally:
        ch.close()
    assert len(peer.received) == 1


def test_the_worker_limits_compose(endpoint):
    """A worker refuses (with an error reply) above max_message_bytes and its socket drops above hard_limit() of it;
    a client checking against max_message_bytes never reaches the silent drop."""
    max_message_bytes = LIMIT // 2
    p = Peer(endpoint, transport.hard_limit(max_message_bytes))
    ch = transport.Channel(endpoint, max_bytes=max_message_bytes)
    try:
        with pytest.raises(transport.MessageTooLargeError):
            ch.request(load_of(max_message_bytes), timeout_s=30.0)
        assert isinstance(ch.request(load_of(max_message_bytes // 2), timeout_s=10.0).msg, messages.Ok)
    finally:
        ch.close()
        p.close()
    assert os.path.exists(endpoint[len("ipc://"):])
