"""BrokerClient against a real broker: every control request, a broker that stops answering (SIGSTOP) and comes
back, and stop."""
from __future__ import annotations

import os
import signal
import time

from neuron_client.wire import messages
from neuron_client.wire.broker_client import BrokerClient
from neuron_client.wire.errors import LeaseLostError, RequestTimeoutError
from neuron_client.wire.status import SCHEMA, StatusDoc


def test_requests_of_a_real_broker(fresh_broker):
    b = fresh_broker(2)
    with BrokerClient.of_dir(b.directory) as client:
        pong = client.ping()
        assert pong.pid == b.proc.pid and pong.cores == 2 and pong.backend == "cpu"
        doc = client.status()
        assert type(doc) is StatusDoc and doc.schema == SCHEMA and doc.broker.pid == b.proc.pid
        assert [c.index for c in doc.cores] == [0, 1] and all(c.worker.ready for c in doc.cores)
        client.drain()
        assert client.status().broker.draining is True
        client.drain(resume=True)
        assert client.status().broker.draining is False
        released = client.release(os.getpid())  # this process holds nothing
        assert isinstance(released, messages.ForceReleased) and released.cores == [] and released.leases == []
        try:
            client.heartbeat("0" * 16)
            raise AssertionError("a heartbeat of an unknown lease was answered")
        except LeaseLostError as exc:
            assert "unknown to this broker" in str(exc)


def test_a_stopped_broker_times_out_and_the_client_recovers(fresh_broker):
    b = fresh_broker(1)
    with b.client(timeout_s=0.5) as client:
        assert client.status().broker.pid == b.proc.pid
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            try:
                client.status()
                raise AssertionError("a stopped broker answered")
            except RequestTimeoutError as exc:
                took = time.monotonic() - t0
                assert "no reply to 'status'" in str(exc) and "within 0.5s" in str(exc)
            assert 0.4 <= took < 2.0
            assert client.ping(0.3) is None
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        # the late replies to the requests that timed out are told apart from this one's
        assert client.status(timeout_s=10.0).broker.pid == b.proc.pid
        assert client.ping(10.0).pid == b.proc.pid


def test_stop(fresh_broker):
    b = fresh_broker(1)
    with b.client() as client:
        client.stop()
    assert b.proc.wait(30) == 0
    with b.client() as client:
        assert client.ping(0.5) is None
