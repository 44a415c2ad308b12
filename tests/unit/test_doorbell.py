"""The fast path's doorbells ring only for a peer that blocks (neuron_client.wire.mailbox.ring_if_waiting), and the
client's wait says so while it blocks: the store-then-look handshake that leaves no wake-up lost. Real memfd mappings
and eventfds; a thread plays the worker."""
from __future__ import annotations

import os
import select
import threading
import time

import pytest

from neuron_client.wire import mailbox as mb


@pytest.fixture
def region():
    fd = mb.create_memfd(mb.CAPACITY_BYTES)
    try:
        yield mb.Region(fd, mb.CAPACITY_BYTES)
    finally:
        os.close(fd)


def _rung(bell: int) -> bool:
    if not select.select([bell], [], [], 0)[0]:
        return False
    os.read(bell, 8)
    return True


def test_a_message_rings_only_when_the_peer_said_it_blocks(region, monkeypatch):
    monkeypatch.setattr(mb, "RING_ALWAYS", False)
    bell = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        ctl = region.ctl
        mb.ring_if_waiting(ctl, mb._REQ_WAIT, bell)
        assert not _rung(bell)  # the peer spins (or is busy): it finds the sequence number itself
        ctl[mb._REQ_WAIT] = 1
        mb.ring_if_waiting(ctl, mb._REQ_WAIT, bell)
        assert _rung(bell)
        monkeypatch.setattr(mb, "RING_ALWAYS", True)  # where no fence is known: every message rings
        ctl[mb._REQ_WAIT] = 0
        mb.ring_if_waiting(ctl, mb._REQ_WAIT, bell)
        assert _rung(bell)
    finally:
        os.close(bell)


class _Box(mb.ClientMailbox):
    """A client mailbox over ``region`` without a worker process: only its wait is exercised."""

    def __init__(self, region, rep_bell: int, conn_fd: int):
        self.region, self.rep_bell, self.seq, self.blocked, self.core, self.worker_pid = region, rep_bell, 1, 0, 0, 0
        self.fence_lock = threading.Lock()
        self.spin = mb.SpinPolicy(0.0)  # blocks at once
        self.spin_s = 0.0
        self.poll = select.poll()
        self.poll.register(rep_bell, select.POLLIN)
        self.poll.register(conn_fd, select.POLLIN)


def test_a_blocked_client_says_so_and_the_reply_wakes_it(region, monkeypatch):
    monkeypatch.setattr(mb, "LIVENESS_POLL_S", 30.0)  # a lost wake-up would wait out a 30 s poll
    rep_bell = os.eventfd(0, os.EFD_NONBLOCK)
    r, w = os.pipe()
    try:
        box = _Box(region, rep_bell, r)
        ctl = region.ctl
        seen = {}

        def worker():
            deadline = time.monotonic() + 10
            while not ctl[mb._REP_WAIT] and time.monotonic() < deadline:
                time.sleep(0.001)
            seen["waiting"] = ctl[mb._REP_WAIT]
            time.sleep(0.05)  # the client is in poll by now
            ctl[mb._REP_SEQ] = 1
            mb.ring_if_waiting(ctl, mb._REP_WAIT, rep_bell)

        t = threading.Thread(target=worker)
        t.start()
        t0 = time.monotonic()
        box._wait(10.0, None)
        took = time.monotonic() - t0
        t.join(10)
        assert seen["waiting"] == 1
        assert ctl[mb._REP_WAIT] == 0  # cleared once the reply is in
        assert took < 20.0  # woken by the doorbell, not by its poll's periodic look
        # a reply stored before the client blocks is found by the look after its fence, without a ring
        box.seq = 2
        ctl[mb._REP_SEQ] = 2
        t0 = time.monotonic()
        box._wait(10.0, None)
        assert time.monotonic() - t0 < 20.0 and box.blocked == 2
    finally:
        for fd in (rep_bell, r, w):
            os.close(fd)
