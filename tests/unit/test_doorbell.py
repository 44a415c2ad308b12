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
        self.expect, self.dozed = {}, 0
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
        box._wait(10.0, None, 0)
        took = time.monotonic() - t0
        t.join(10)
        assert seen["waiting"] == 1
        assert ctl[mb._REP_WAIT] == 0  # cleared once the reply is in
        assert took < 20.0  # woken by the doorbell, not by its poll's periodic look
        # a reply stored before the client blocks is found by the look after its fence, without a ring
        box.seq = 2
        ctl[mb._REP_SEQ] = 2
        t0 = time.monotonic()
        box._wait(10.0, None, 0)
        assert time.monotonic() - t0 < 20.0 and box.blocked == 2
    finally:
        for fd in (rep_bell, r, w):
            os.close(fd)


def test_a_call_due_beyond_the_spin_dozes_woken_early_by_its_reply(region, monkeypatch):
    """With a CPU free, a call whose model usually takes longer than the spin dozes until a lead before its reply is
    due; a reply that comes during the doze rings (the client said it waits) and ends it at once, its count drained;
    one that comes later is caught by the spin across the due time, or by the block after it."""
    monkeypatch.setattr(mb, "cpu_free", lambda now: True)  # the host's load is not the subject here
    monkeypatch.setattr(mb, "LIVENESS_POLL_S", 30.0)
    rep_bell = os.eventfd(0, os.EFD_NONBLOCK)
    r, w = os.pipe()
    try:
        box = _Box(region, rep_bell, r)
        box.spin_s = 100e-6
        ctl = region.ctl
        box.expect[7] = 0.08  # model 7's calls take 80 ms: the doze lasts 79.8 ms unless the reply rings
        dozing = {}

        def early():
            deadline = time.monotonic() + 10
            while not ctl[mb._REP_WAIT] and time.monotonic() < deadline:
                time.sleep(0.0005)
            dozing["waiting"] = ctl[mb._REP_WAIT]
            ctl[mb._REP_SEQ] = 1
            mb.ring_if_waiting(ctl, mb._REP_WAIT, rep_bell)

        t = threading.Thread(target=early)
        t.start()
        box._wait(10.0, None, 7)
        t.join(10)
        assert dozing["waiting"] == 1 and box.dozed == 1 and box.blocked == 0
        assert ctl[mb._REP_WAIT] == 0 and not _rung(rep_bell)  # the ring woke the doze, which took its count
        assert box.expect[7] < 0.08  # this call was quicker: the next doze is shorter

        box.seq = 2
        box.expect[7] = 0.002
        def late():  # after the doze and its spin: the client blocks, and the worker rings as it says it waits
            ctl[mb._REP_SEQ] = 2
            mb.ring_if_waiting(ctl, mb._REP_WAIT, rep_bell)

        later = threading.Timer(0.01, late)
        later.start()
        t0 = time.monotonic()
        box._wait(10.0, None, 7)
        took = time.monotonic() - t0
        later.join(10)
        assert ctl[mb._REP_SEQ] == 2 and ctl[mb._REP_WAIT] == 0 and box.dozed == 2
        assert took < 20.0  # woken by the ring after the doze, not by the 30 s poll: no wake-up lost between them
        box.seq = 3
        box.expect[7] = 1e-5  # within the spin: no doze
        ctl[mb._REP_SEQ] = 3
        box._wait(10.0, None, 7)
        assert box.dozed == 2
    finally:
        for fd in (rep_bell, r, w):
            os.close(fd)
