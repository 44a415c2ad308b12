"""One client of the broker's operator socket (``broker.sock``, or ``tcp://`` with CURVE): every request that the
operator commands, ``neuron-run``, the Ray integration, the embedded broker, the tests and the benchmarks make.

    with BrokerClient.of_dir(directory) as broker:
        if broker.ping() is not None:
            doc = broker.status()          # a neuron_client.wire.status.StatusDoc

Each method sends one control message and waits at most its ``timeout_s`` (default: the client's) for the reply:
``ping`` answers ``None`` when nothing answers in time; the others raise :class:`RequestTimeoutError`, or the named
error the broker replied. Lease links (acquire, reattach, release of one's own lease) are
:mod:`neuron_client.wire.lease_link`'s, not this client's.

One client is one ZeroMQ connection (opened at the first request) for one thread at a time; it cannot be used in a
forked child. zmq is imported at the first request, not with this module.
"""
from __future__ import annotations

from neuron_client.wire import config, messages
from neuron_client.wire.errors import ProtocolError, RequestTimeoutError
from neuron_client.wire.status import StatusDoc


class BrokerClient:
    def __init__(self, address: str, timeout_s: float = config.BROKER_REQUEST_TIMEOUT_S):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = None

    @classmethod
    def of_dir(cls, directory: str | None = None, timeout_s: float = config.BROKER_REQUEST_TIMEOUT_S,
               verify: bool = True) -> "BrokerClient":
        """The client of the broker in ``directory`` (default: :func:`config.broker_dir`). ``verify`` first checks
        that the directory is private (:func:`config.ensure_private_dir`): a socket another user planted there is
        never spoken to."""
        directory = directory or config.broker_dir()
        if verify:
            config.ensure_private_dir(directory)
        return cls(config.broker_address(directory), timeout_s)

    # -- requests ------------------------------------------------------------------------------------------------
    def request(self, msg, timeout_s: float | None = None):
        """Send ``msg``; the reply's message (an error reply raises its named exception)."""
        if self._channel is None:
            from neuron_client.wire import comm

            self._channel = comm.Channel(self.address)
        return self._channel.request(msg, self.timeout_s if timeout_s is None else timeout_s).msg

    def ping(self, timeout_s: float = config.BROKER_PING_TIMEOUT_S) -> messages.Pong | None:
        """The broker's :class:`~messages.Pong` (pid, cores, backend), or None if nothing answers in time."""
        try:
            reply = self.request(messages.Ping(), timeout_s)
        except (RequestTimeoutError, ProtocolError):
            return None
        return reply if isinstance(reply, messages.Pong) else None

    def status(self, timeout_s: float | None = None) -> StatusDoc:
        """The status document: cores, their workers, owners and models, leases, waiting acquires."""
        return self._expect(self.request(messages.Status(), timeout_s), messages.StatusReply).doc

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask the broker to stop (it stops its workers, then exits); returns once it has said so."""
        self._expect(self.request(messages.Stop(), timeout_s), messages.Ok)

    def drain(self, resume: bool = False, timeout_s: float | None = None) -> None:
        """Grant no new leases (acquires fail with BrokerDrainingError) until ``drain(resume=True)``."""
        self._expect(self.request(messages.Drain(resume=resume), timeout_s), messages.Ok)

    def release(self, pid: int, timeout_s: float | None = None) -> messages.ForceReleased:
        """Take every core of process ``pid`` back (its next call fails with LeaseLostError); what was taken."""
        return self._expect(self.request(messages.ForceRelease(pid=pid), timeout_s), messages.ForceReleased)

    def heartbeat(self, lease_id: str, timeout_s: float | None = None) -> list[messages.WorkerInfo]:
        """The workers of lease ``lease_id`` now (LeaseLostError if the broker no longer knows it)."""
        return self._expect(self.request(messages.Heartbeat(lease_id=lease_id), timeout_s),
                            messages.HeartbeatAck).workers

    def _expect(self, reply, cls):
        if not isinstance(reply, cls):
            raise ProtocolError(f"the broker at {self.address} answered {reply.op!r} where {cls.op!r} was expected")
        return reply

    # -- lifetime ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> "BrokerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
