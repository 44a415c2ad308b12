"""Unit tests of broker.leases.LeaseTable: liveness with an injected is_alive and explicit clock values."""
from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.leases import Lease, LeaseTable

TIMEOUT = 5.0


def make_lease(lease_id="l1", pid=100, create_time=1000.0, now=0.0, cores=(0,)) -> Lease:
    return Lease(lease_id=lease_id, token="t-" + lease_id, pid=pid, create_time=create_time, cmd="python app.py",
                 cores=list(cores), granted_at=now, last_seen=now)


class Procs:
    """A fake process table: pid -> start time; records every query."""

    def __init__(self, table=None):
        self.table = dict(table or {})
        self.calls = []

    def __call__(self, pid, create_time):
        self.calls.append((pid, create_time))
        return self.table.get(pid) == create_time


def reasons(dead):
    return {lease.lease_id: why for lease, why in dead}


def test_live_owner_with_fresh_heartbeat_is_not_dead():
    t = LeaseTable(TIMEOUT)
    t.add(make_lease(now=10.0))
    procs = Procs({100: 1000.0})
    assert t.dead(12.0, procs) == []
    assert procs.calls == [(100, 1000.0)]


def test_owner_exited():
    t = LeaseTable(TIMEOUT)
    lease = make_lease(now=10.0)
    t.add(lease)
    assert t.dead(10.0, Procs({})) == [(lease, "owner exited")]


def test_reused_pid_counts_as_exited():
    t = LeaseTable(TIMEOUT)
    t.add(make_lease(pid=100, create_time=1000.0, now=10.0))
    # pid 100 now names another process, started later
    assert reasons(t.dead(10.0, Procs({100: 2000.0}))) == {"l1": "owner exited"}


def test_heartbeat_timeout():
    t = LeaseTable(TIMEOUT)
    t.add(make_lease(now=10.0))
    procs = Procs({100: 1000.0})
    assert t.dead(10.0 + TIMEOUT, procs) == []  # exactly the timeout: still alive
    assert reasons(t.dead(10.0 + TIMEOUT + 0.25, procs)) == {"l1": "no heartbeat for 5.2s"}
    assert reasons(t.dead(30.0, procs)) == {"l1": "no heartbeat for 20.0s"}


def test_exit_is_reported_before_a_missed_heartbeat():
    t = LeaseTable(TIMEOUT)
    t.add(make_lease(now=0.0))
    assert reasons(t.dead(100.0, Procs({}))) == {"l1": "owner exited"}


def test_touch_keeps_a_lease_alive():
    t = LeaseTable(TIMEOUT)
    t.add(make_lease(now=0.0))
    procs = Procs({100: 1000.0})
    for now in (4.0, 8.0, 12.0, 16.0):
        assert t.touch("l1", now) is True
        assert t.dead(now + TIMEOUT, procs) == []
    assert t.get("l1").last_seen == 16.0
    assert reasons(t.dead(16.0 + TIMEOUT + 1, procs)) == {"l1": "no heartbeat for 6.0s"}


def test_touch_unknown_lease():
    t = LeaseTable(TIMEOUT)
    assert t.touch("nope", 1.0) is False
    assert t.leases == {}


def test_dead_does_not_remove():
    t = LeaseTable(TIMEOUT)
    t.add(make_lease())
    assert len(t.dead(100.0, Procs({}))) == 1
    assert t.get("l1") is not None
    assert t.remove("l1").lease_id == "l1"
    assert t.remove("l1") is None
    assert t.get("l1") is None
    assert t.dead(100.0, Procs({})) == []


def test_several_leases_mixed():
    t = LeaseTable(TIMEOUT)
    t.add(make_lease("alive", pid=1, create_time=1.0, now=9.0))
    t.add(make_lease("exited", pid=2, create_time=2.0, now=9.0))
    t.add(make_lease("silent", pid=3, create_time=3.0, now=1.0))
    t.add(make_lease("both", pid=4, create_time=4.0, now=1.0))
    got = reasons(t.dead(10.0, Procs({1: 1.0, 3: 3.0})))
    assert got == {"exited": "owner exited", "silent": "no heartbeat for 9.0s", "both": "owner exited"}


def test_of_pid_and_age():
    t = LeaseTable(TIMEOUT)
    t.add(make_lease("a", pid=7, now=2.0))
    t.add(make_lease("b", pid=7, now=3.0))
    t.add(make_lease("c", pid=8, now=4.0))
    assert sorted(lease.lease_id for lease in t.of_pid(7)) == ["a", "b"]
    assert t.of_pid(9) == []
    assert t.get("a").age_s(10.0) == 8.0


def test_new_ids_are_hex_and_distinct():
    ids = {LeaseTable.new_ids() for _ in range(50)}
    assert len(ids) == 50
    for lease_id, token in ids:
        assert len(lease_id) == 16 and len(token) == 32
        assert set(lease_id + token) <= set(string.hexdigits.lower())
    assert len({i for i, _ in ids}) == 50 and len({tok for _, tok in ids}) == 50


lease_specs = st.lists(
    st.tuples(st.integers(1, 20), st.floats(0, 100), st.booleans()),  # pid, last_seen, owner alive
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(specs=lease_specs, now=st.floats(0, 200), timeout=st.floats(0.1, 50))
def test_dead_is_exactly_exited_or_silent(specs, now, timeout):
    t = LeaseTable(timeout)
    alive_pids = {}
    expected = {}
    for i, (pid, seen, alive) in enumerate(specs):
        lid = f"l{i}"
        create_time = float(1000 + i)  # every lease its own process start time
        t.add(make_lease(lid, pid=pid, create_time=create_time, now=seen))
        if alive:
            alive_pids[(pid, create_time)] = True
            if now - seen > timeout:
                expected[lid] = f"no heartbeat for {now - seen:.1f}s"
        else:
            expected[lid] = "owner exited"
    got = reasons(t.dead(now, lambda pid, ct: (pid, ct) in alive_pids))
    assert got == expected


# -- hung or busy: an overdue owner that keeps using CPU keeps its lease (up to busy_limit_s) -------------------------

def _overdue_table():
    from broker.leases import Lease, LeaseTable

    table = LeaseTable(timeout_s=1.0, busy_limit_s=30.0, idle_window_s=0.3)
    table.add(Lease(lease_id="a", token="t", pid=10, create_time=1.0, cmd="x", cores=[0], granted_at=0.0,
                    last_seen=0.0))
    return table


def test_overdue_but_busy_owner_keeps_its_lease_until_the_busy_limit():
    table = _overdue_table()
    cpu = iter([1.0, 1.2, 1.4, 1.6])
    alive = lambda pid, ct: True  # noqa: E731
    for now in (1.1, 1.5, 2.0, 2.5):  # heartbeats overdue, CPU climbing: starved, not hung
        assert table.dead(now, alive, lambda pid: next(cpu)) == []
    dead = table.dead(30.5, alive, lambda pid: 9.0)
    assert [lease.lease_id for lease, _ in dead] == ["a"] and "no heartbeat for 30.5s" in dead[0][1]


def test_overdue_owner_using_no_cpu_is_hung():
    table = _overdue_table()
    alive = lambda pid, ct: True  # noqa: E731
    assert table.dead(1.1, alive, lambda pid: 5.0) == []  # first look
    assert table.dead(1.3, alive, lambda pid: 5.0) == []  # idle for 0.2 s: look a little longer
    dead = table.dead(1.45, alive, lambda pid: 5.0)
    assert len(dead) == 1 and "no CPU used" in dead[0][1]


def test_overdue_stopped_owner_is_reclaimed_at_once():
    table = _overdue_table()
    dead = table.dead(1.1, lambda pid, ct: True, lambda pid: None)
    assert len(dead) == 1 and "not running" in dead[0][1]


def test_a_heartbeat_resets_the_busy_watch():
    table = _overdue_table()
    alive = lambda pid, ct: True  # noqa: E731
    assert table.dead(1.2, alive, lambda pid: 5.0) == []
    table.touch("a", 1.3)
    assert table.leases["a"].last_seen == 1.3
    assert table.dead(1.4, alive, lambda pid: 5.0) == [] and table.leases["a"].cpu_mark == -1.0
