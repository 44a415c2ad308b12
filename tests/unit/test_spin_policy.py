"""The fast path's spin policy (neuron_client.wire.mailbox.SpinPolicy): spin while recent spins paid, probe now and
then after they stopped paying, and come back at once when a probe pays."""
from __future__ import annotations

import io
import os

from neuron_client.wire import mailbox, procs


def _policy(monkeypatch, free: bool = True) -> mailbox.SpinPolicy:
    monkeypatch.setattr(mailbox, "cpu_free", lambda now: free)
    return mailbox.SpinPolicy(100e-6)


def test_misses_stop_the_spin_and_only_every_32nd_wait_probes(monkeypatch):
    p = _policy(monkeypatch)
    assert p.should(0.0)
    for _ in range(8):
        p.record(False)
    assert p.hits < 0.5
    spun = [i for i in range(64) if p.should(0.0)]
    assert len(spun) == 2 and spun[1] - spun[0] == p.PROBE_EVERY  # the probes


def test_a_probe_that_pays_restores_the_spin_at_once(monkeypatch):
    p = _policy(monkeypatch)
    for _ in range(8):
        p.record(False)
    p.record(True)  # the probe found its reply within the spin
    assert p.hits == 1.0
    p.record(False)  # one miss later it still spins: not hovering at the threshold
    assert p.should(0.0)


def test_a_hit_while_spinning_moves_the_average_a_little(monkeypatch):
    p = _policy(monkeypatch)
    p.record(False)
    before = p.hits
    p.record(True)
    assert before < p.hits < 1.0


def test_no_spin_without_a_budget_or_without_a_free_cpu(monkeypatch):
    assert not mailbox.SpinPolicy(0.0).should(0.0)
    assert not _policy(monkeypatch, free=False).should(0.0)


def test_cpu_free_reads_the_run_queue_once_per_ttl(monkeypatch):
    reads = []
    real_open = open

    def counting_open(path, *a, **kw):
        if path == "/proc/loadavg":
            reads.append(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr(procs, "_cpu_free", [0.0, False, procs.CPU_BUSY_LOOKS])
    t0 = 1000.0
    first = procs.cpu_free(t0)
    assert procs.cpu_free(t0 + procs.CPU_FREE_TTL_S / 2) == first and len(reads) == 1
    procs.cpu_free(t0 + procs.CPU_FREE_TTL_S * 2)
    assert len(reads) == 2


def _loadavg(monkeypatch, running_counts):
    """/proc/loadavg reads that report these running counts, one per read."""
    counts = iter(running_counts)
    real_open = open

    def fake_open(path, *a, **kw):
        if path == "/proc/loadavg":
            return io.BytesIO(f"0.50 0.40 0.30 {next(counts)}/300 4242\n".encode())
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(procs, "_cpu_free", [0.0, True, 0])


def test_one_passing_thread_does_not_stop_the_spin_but_sustained_contention_does(monkeypatch):
    _loadavg(monkeypatch, [2, 3, 2, 3, 3, 3, 1])
    ttl = procs.CPU_FREE_TTL_S
    looks = [procs.cpu_free(1000.0 + i * 2 * ttl) for i in range(7)]
    # 2 free; 3 (one look over: a thread passing) free; 2 free; 3 free; 3 again (two in a row): busy, and stays busy
    # while the contention lasts; back to 1 runnable: free at once
    assert looks == [True, True, True, True, False, False, True]


def test_a_workers_spin_lasts_as_long_as_its_clients_usual_turnaround_within_a_bound():
    """The worker spins after a reply for its budget, or 1.5x the usual gap until this client's next request (a
    client copying out a large reply takes longer), up to 1 ms; an idle pause longer than that is not a gap."""
    import socket

    from worker import fastpath

    fd = mailbox.create_memfd(mailbox.CAPACITY_BYTES)
    a, b = socket.socketpair()
    bells = [os.eventfd(0), os.eventfd(0)]
    try:
        box = fastpath.ServedMailbox(a, mailbox.Region(fd, mailbox.CAPACITY_BYTES), *bells)
        box.replied_at = 10.0
        assert box.spin_until(100e-6) == 10.0 + 100e-6  # no gap seen yet: the budget
        for _ in range(40):  # the client's next request comes 400 us after each reply
            box.take(box.replied_at + 400e-6)
        assert abs(box.gap - 400e-6) < 1e-6
        assert abs(box.spin_until(100e-6) - (10.0 + 600e-6)) < 1e-6
        box.take(box.replied_at + 5.0)  # an idle pause: not counted
        assert abs(box.gap - 400e-6) < 1e-6
        box.gap = 3e-3  # (not reachable by takes: gaps of 1 ms or more do not count) the bound holds anyway
        assert box.spin_until(100e-6) == 10.0 + fastpath.GAP_SPIN_MAX_S
        assert box.spin_until(5e-3) == 10.0 + 5e-3  # a larger budget stays
    finally:
        a.close(), b.close(), os.close(fd)
        mailbox.close_fds(*bells)


def test_a_usual_time_shrugs_off_an_outlier_and_falls_at_once():
    usual = mailbox.track(0.0, 40e-6)
    assert usual == 40e-6  # the first sample
    usual = mailbox.track(usual, 5e-3)  # one slow call (a wake-up from idle, a collection)
    assert usual == 50e-6  # rose by a quarter of itself, not towards 5 ms
    usual = mailbox.track(usual, 20e-6)
    assert usual == 20e-6  # under half: taken at once
    for _ in range(40):  # a model that really became slower is followed, a quarter per call
        usual = mailbox.track(usual, 10e-3)
    assert abs(usual - 10e-3) < 1e-4
