"""BrokerClient against peers that do not answer, or answer the wrong thing: every wait ends at its timeout."""
from __future__ import annotations

import os
import threading
import time

import pytest

from neuron_client.wire import codec, comm as transport, messages
from neuron_client.wire.broker_client import BrokerClient
from neuron_client.wire.errors import NeuronRuntimeError, ProtocolError, RequestTimeoutError

SLACK_S = 1.0  # the channel looks at its deadline every LIVENESS_POLL_S; a loaded machine adds some


@pytest.fixture
def silent(tmp_path):
    """A bound ROUTER that reads requests and never answers."""
    endpoint = f"ipc://{tmp_path}/silent.sock"
    sock = transport.router(endpoint)
    yield endpoint
    sock.close(linger=0)


class Answering:
    """A ROUTER on a thread answering every request with ``reply(msg)`` (a message, or None for silence)."""

    def __init__(self, endpoint: str, reply):
        self.endpoint, self.reply = endpoint, reply
        self.sock = transport.router(endpoint)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        poller = transport.poller(self.sock)
        while not self.stop.is_set():
            if not poller.poll(50):
                continue
            ident, *frames = transport.recv(self.sock)
            env = codec.decode(frames)
            answer = self.reply(env.msg)
            if answer is not None:
                transport.send(self.sock, codec.encode(answer, env.req_id), identity=ident)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close(linger=0)


def timed(fn):
    t0 = time.monotonic()
    try:
        return fn(), time.monotonic() - t0
    except Exception as exc:
        return exc, time.monotonic() - t0


def test_ping_of_nothing_is_none_within_its_timeout(tmp_path):
    with BrokerClient(f"ipc://{tmp_path}/nobody.sock") as client:
        got, took = timed(lambda: client.ping(0.5))
    assert got is None and 0.4 <= took < 0.5 + SLACK_S


@pytest.mark.parametrize("call", ["status", "stop", "drain", "release", "heartbeat"])
def test_every_request_times_out_on_a_silent_peer(silent, call):
    args = {"release": (123,), "heartbeat": ("0" * 16,)}.get(call, ())
    with BrokerClient(silent, timeout_s=0.5) as client:
        got, took = timed(lambda: getattr(client, call)(*args))
    assert isinstance(got, RequestTimeoutError), got
    assert "no reply to " in str(got) and silent in str(got) and "within 0.5s" in str(got)
    assert 0.4 <= took < 0.5 + SLACK_S


def test_a_call_timeout_overrides_the_clients(silent):
    with BrokerClient(silent, timeout_s=30.0) as client:
        got, took = timed(lambda: client.status(timeout_s=0.3))
        assert isinstance(got, RequestTimeoutError) and took < 0.3 + SLACK_S
        assert client.ping(0.3) is None


def test_a_late_reply_is_dropped_and_the_client_goes_on(tmp_path):
    """The peer answers each request 0.8 s late: a request that timed out does not take the next one's reply."""
    endpoint = f"ipc://{tmp_path}/slow.sock"
    pong = messages.Pong(pid=os.getpid(), cores=1, backend="cpu")

    def slow(msg):
        time.sleep(0.8)
        return pong

    peer = Answering(endpoint, slow)
    try:
        with BrokerClient(endpoint) as client:
            assert client.ping(0.3) is None  # its pong arrives later ...
            assert client.ping(5.0) == pong  # ... and is told apart from this one's
    finally:
        peer.close()


def test_a_reply_of_the_wrong_kind_is_a_protocol_error(tmp_path):
    endpoint = f"ipc://{tmp_path}/odd.sock"
    peer = Answering(endpoint, lambda msg: messages.Pong(pid=1, cores=1, backend="cpu"))
    try:
        with BrokerClient(endpoint, timeout_s=5.0) as client:
            with pytest.raises(ProtocolError, match="answered 'pong' where 'status_reply' was expected"):
                client.status()
    finally:
        peer.close()


def test_an_error_reply_is_raised_as_its_exception(tmp_path):
    endpoint = f"ipc://{tmp_path}/err.sock"
    peer = Answering(endpoint, lambda msg: messages.Error(code="DRAINING", message="not now"))
    try:
        from neuron_client.wire.errors import BrokerDrainingError

        with BrokerClient(endpoint, timeout_s=5.0) as client, pytest.raises(BrokerDrainingError, match="not now"):
            client.drain()
    finally:
        peer.close()


def test_of_dir_refuses_a_directory_others_can_write(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(NeuronRuntimeError):
        BrokerClient.of_dir(str(d))
    assert BrokerClient.of_dir(str(d), verify=False).address == f"ipc://{d}/broker.sock"


def test_no_socket_before_the_first_request(tmp_path):
    client = BrokerClient(f"ipc://{tmp_path}/x.sock")
    assert client._channel is None
    client.close()  # closing an unused client is fine
