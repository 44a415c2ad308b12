"""Unit tests of broker.state.BrokerState: every ownership decision, without sockets, processes or sleeps.

A small driver plays the loop: it feeds events with explicit clock values, carries out journal writes (succeeding
or failing as a test says) and answers for the workers (ready, assigned), and records every other effect.
"""
from __future__ import annotations

import pytest

from broker import state as st
from neuron_client.wire import messages
from neuron_client.wire.errors import (BrokerDrainingError, LeaseLostError, NeuronCoreSpecError,
                                       NeuronCoreUnavailableError, NeuronRuntimeError, ProtocolError)


class Loop:
    def __init__(self, n=4, policy=st.Policy(), restored=(), recovering=False, auto_workers=True):
        self.s = st.BrokerState(n, policy, worker_address=lambda c: f"ipc://core-{c}")
        self.now = 0.0
        self.journal_error = ""
        self.auto_workers = auto_workers
        self.effects: list = []
        self.next_pid = 1000
        self.journal: dict[str, st.Lease] = {}
        self.run(self.s.start(self.now, list(restored), recovering))

    def run(self, effects):
        for eff in effects:
            self.effects.append(eff)
            if isinstance(eff, st.JournalRecord):
                if not self.journal_error:
                    self.journal[eff.lease.lease_id] = eff.lease
                self.feed(st.JournalWritten(eff.lease.lease_id, self.journal_error))
            elif isinstance(eff, st.JournalForget):
                self.journal.pop(eff.lease_id, None)
            elif isinstance(eff, st.StartWorker) and self.auto_workers:
                self.next_pid += 1
                pid = self.next_pid
                self.feed(st.WorkerStarted(eff.core, pid))
                self.feed(st.WorkerMessage(eff.core, messages.WorkerReady(core=eff.core, pid=pid, endpoint="")))
            elif isinstance(eff, st.StopWorker) and self.auto_workers:
                self.feed(st.WorkerExited(eff.core, self.s.slots[eff.core].pid, "signal SIGKILL"))
            elif isinstance(eff, st.ToWorker) and self.auto_workers and isinstance(eff.msg, messages.Assign):
                self.feed(st.WorkerMessage(eff.core, messages.Assigned(core=eff.core, lease_id=eff.msg.lease_id)))

    def feed(self, event):
        self.run(self.s.handle(event, self.now))

    def open(self, link, pid, start=1.0):
        self.feed(st.LinkOpened(link, pid, 1000, start, f"python app{pid}.py"))

    def ask(self, link, req_id=1, **kw):
        self.effects = []
        self.feed(st.LinkMessage(link, req_id, messages.Acquire(cmd="x", **kw)))
        return self.replies(link)

    def replies(self, link):
        return [e.msg for e in self.effects if isinstance(e, st.Reply) and e.to == ("link", link)]

    def workers_report(self):
        for c, slot in self.s.slots.items():
            if slot.ready:
                self.feed(st.WorkerMessage(c, messages.WorkerStats(core=c, models=[], requests=0, errors=0, rss=0,
                                                                   busy=False)))

    def owners(self):
        return [self.s.alloc.owner_of(c) for c in range(self.s.alloc.n_cores)]


def granted(replies):
    assert len(replies) == 1 and isinstance(replies[0], messages.Granted), replies
    return replies[0]


def test_grant_goes_out_only_after_every_worker_acknowledged():
    loop = Loop(2, auto_workers=False)
    for c in range(2):
        loop.feed(st.WorkerStarted(c, 10 + c))
        loop.feed(st.WorkerMessage(c, messages.WorkerReady(core=c, pid=10 + c, endpoint="")))
    loop.open(1, 500)
    assert loop.ask(1) == []  # journalled, assignments sent, nothing told yet
    assigns = [e for e in loop.effects if isinstance(e, st.ToWorker)]
    assert [a.core for a in assigns] == [0, 1]
    assert all(len(a.msg.token_hash) == 64 and a.msg.owner_pid == 500 for a in assigns)
    loop.effects = []
    loop.feed(st.WorkerMessage(0, messages.Assigned(core=0, lease_id=assigns[0].msg.lease_id)))
    assert loop.replies(1) == []
    loop.feed(st.WorkerMessage(1, messages.Assigned(core=1, lease_id=assigns[0].msg.lease_id)))
    g = granted(loop.replies(1))
    assert g.cores == [0, 1] and st.token_hash(g.token) == assigns[0].msg.token_hash


def test_token_is_unguessable_never_empty_and_not_kept():
    loop = Loop(2)
    loop.open(1, 500)
    g = granted(loop.ask(1, count=1))
    assert len(g.token) >= 40
    lease = loop.s.leases[g.lease_id]
    assert lease.token == "" and lease.token_hash == st.token_hash(g.token)
    assert g.token not in repr(loop.journal[g.lease_id].token_hash)


def test_link_close_ends_the_lease_at_once_and_retires_its_workers():
    loop = Loop(2)
    loop.open(1, 500)
    g = granted(loop.ask(1, count=2))
    old = [loop.s.slots[c].pid for c in (0, 1)]
    loop.effects = []
    loop.feed(st.LinkClosed(1))
    assert loop.owners() == [None, None]
    assert [e.core for e in loop.effects if isinstance(e, st.StopWorker)] == [0, 1]
    assert all(loop.s.slots[c].pid not in old and loop.s.slots[c].state == st.SlotState.FRESH for c in (0, 1))
    assert g.lease_id not in loop.journal
    assert loop.s.ended_counts == [st.EndReason.RELEASED]


def test_owner_exit_ends_the_lease_even_if_a_forked_child_keeps_the_link_open():
    loop = Loop(2)
    loop.open(1, 500)
    granted(loop.ask(1))
    loop.effects = []
    loop.feed(st.OwnerExited(500, 1.0))
    assert loop.owners() == [None, None]
    assert loop.s.ended_counts == [st.EndReason.OWNER_EXITED]
    assert any(isinstance(e, st.CloseLink) and e.link == 1 for e in loop.effects)
    assert any(isinstance(e, st.UnlinkSegments) and e.pid == 500 for e in loop.effects)


def test_a_live_owner_keeps_its_cores_however_long_it_is_silent():
    loop = Loop(2)
    loop.open(1, 500)
    g = granted(loop.ask(1))
    for t in range(1, 200):
        loop.now = t * 30.0
        loop.workers_report()
        loop.feed(st.Tick())
    assert loop.owners() == [g.lease_id, g.lease_id]


def test_stopped_owner_policy_is_off_by_default_and_opt_in():
    loop = Loop(1)
    loop.open(1, 500)
    g = granted(loop.ask(1))
    loop.now = 1000.0
    loop.feed(st.OwnerStopped(500, since=0.0))
    assert loop.owners() == [g.lease_id]
    loop = Loop(1, st.Policy(stopped_owner_s=5.0))
    loop.open(1, 500)
    granted(loop.ask(1))
    loop.now = 4.0
    loop.feed(st.OwnerStopped(500, since=0.0))
    assert loop.owners() != [None]
    loop.now = 6.0
    loop.effects = []
    loop.feed(st.OwnerStopped(500, since=0.0))
    assert loop.owners() == [None]
    ended = [m for m in loop.replies(1) if isinstance(m, messages.LeaseEnded)]
    assert ended and "stopped by a signal" in ended[0].reason


def test_conflict_names_owner_and_free_cores():
    loop = Loop(4)
    loop.open(1, 500)
    granted(loop.ask(1, visible=[1, 2]))
    loop.open(2, 600)
    (err,) = loop.ask(2, visible=[2, 3])
    assert isinstance(err, NeuronCoreUnavailableError)
    assert "Requested:nc2-nc3" in str(err) and "pid 500" in str(err) and "Available:nc0,nc3" in str(err)


def test_journal_failure_undoes_the_grant_and_says_why():
    loop = Loop(2)
    loop.journal_error = "database or disk is full"
    loop.open(1, 500)
    (err,) = loop.ask(1)
    assert isinstance(err, NeuronRuntimeError) and "disk is full" in str(err) and "nothing was granted" in str(err)
    assert loop.owners() == [None, None] and loop.s.leases == {}
    assert not any(isinstance(e, st.ToWorker) for e in loop.effects)
    loop.journal_error = ""
    granted(loop.ask(1, req_id=2))  # the same link can ask again


def test_one_lease_per_link_and_bounded_links_per_process():
    loop = Loop(2)
    loop.open(1, 500)
    granted(loop.ask(1, count=1))
    (err,) = loop.ask(1, req_id=2, count=1)
    assert isinstance(err, ProtocolError)
    for link in range(2, 2 + st.MAX_LINKS_PER_PID):
        loop.open(link, 700)
    loop.effects = []
    loop.open(999, 700)
    assert isinstance(loop.replies(999)[0], NeuronCoreUnavailableError)
    assert any(isinstance(e, st.CloseLink) and e.link == 999 for e in loop.effects)


@pytest.mark.parametrize("kw, fragment", [
    (dict(visible=[True]), "integers"),
    (dict(visible=[0, 9]), "nc9"),
    (dict(visible=list(range(100))), "at most"),
    (dict(count=2 ** 62), "NEURON_RT_NUM_CORES"),
    (dict(count=-1), "NEURON_RT_NUM_CORES"),
    (dict(count=1, wait_s=1e12), "NEURON_RT_ACQUIRE_TIMEOUT"),
])
def test_bad_requests_are_refused_before_anything_changes(kw, fragment):
    loop = Loop(4)
    loop.open(1, 500)
    (err,) = loop.ask(1, **kw)
    assert isinstance(err, NeuronCoreSpecError) and fragment in str(err)
    assert loop.owners() == [None] * 4 and loop.s.leases == {}


def test_waiting_acquires_are_bounded_and_served_in_order():
    loop = Loop(1)
    loop.open(1, 500)
    first = granted(loop.ask(1))
    loop.open(2, 600)
    assert loop.ask(2, wait_s=10.0) == []
    loop.open(3, 700)
    assert loop.ask(3, wait_s=10.0) == []
    loop.effects = []
    loop.feed(st.LinkClosed(1))
    assert granted(loop.replies(2)).cores == [0] and loop.replies(3) == []
    loop.now = 11.0
    loop.feed(st.Tick())
    (err,) = loop.replies(3)
    assert isinstance(err, NeuronCoreUnavailableError) and "waited" in str(err)
    assert first.lease_id not in loop.s.leases


def test_pending_queue_limit(monkeypatch):
    monkeypatch.setattr(st, "MAX_PENDING", 3)
    loop = Loop(1)
    loop.open(1, 1)
    granted(loop.ask(1))
    for link in range(2, 5):
        loop.open(link, link)
        assert loop.ask(link, wait_s=5.0) == []
    loop.open(9, 9)
    (err,) = loop.ask(9, wait_s=5.0)
    assert isinstance(err, NeuronCoreUnavailableError) and "already wait" in str(err)


def test_operator_release_pushes_the_reason_and_frees_the_cores():
    loop = Loop(2)
    loop.open(1, 500)
    g = granted(loop.ask(1))
    loop.effects = []
    loop.feed(st.Control(("zmq", b"op"), 7, messages.ForceRelease(pid=500)))
    (pushed,) = loop.replies(1)
    assert isinstance(pushed, messages.LeaseEnded) and "release --pid 500" in pushed.reason
    reply = [e.msg for e in loop.effects if isinstance(e, st.Reply) and e.to == ("zmq", b"op")][0]
    assert reply.cores == [0, 1] and reply.leases == [g.lease_id]
    assert loop.owners() == [None, None]
    assert loop.s.ended_counts == [st.EndReason.OPERATOR]
    # the effects are ordered: the owner hears the reason before its workers are stopped
    kinds = [type(e) for e in loop.effects]
    assert kinds.index(st.Reply) < kinds.index(st.StopWorker)
    loop.feed(st.Control(("zmq", b"op"), 8, messages.Heartbeat(lease_id=g.lease_id)))
    err = loop.effects[-1].msg
    assert isinstance(err, LeaseLostError) and "release --pid 500" in str(err)


def test_crashes_are_charged_to_the_lease_and_forgiven_for_the_next_owner():
    loop = Loop(1, st.Policy(max_restarts=2, window_s=60.0))
    loop.open(1, 500)
    g = granted(loop.ask(1))
    for i in range(3):
        loop.now += 1.0
        loop.feed(st.WorkerExited(0, loop.s.slots[0].pid, "signal SIGSEGV"))
        loop.now += 5.0
        loop.feed(st.Tick())
    slot = loop.s.slots[0]
    assert slot.failed and slot.state == st.SlotState.DOWN and loop.s.core_state(0) == "failed"
    assert slot.restarts == 3 and loop.s.recent_crashes(slot, loop.now) == 3  # every crash in the window counted
    pushed = [m for m in loop.replies(1) if isinstance(m, messages.HeartbeatAck)]
    assert pushed[-1].workers[0].failed is True
    loop.feed(st.LinkClosed(1))
    loop.feed(st.Tick())
    assert not slot.failed and slot.state == st.SlotState.FRESH and loop.s.core_state(0) == "free"
    loop.open(2, 600)
    assert granted(loop.ask(2)).lease_id != g.lease_id
    assert loop.s.recent_crashes(slot, loop.now) == 0  # forgiven for the next owner ...
    loop.feed(st.WorkerExited(0, slot.pid, "signal SIGSEGV"))
    assert slot.restarts == 4  # ... but the counter runs on since the broker started
    loop.now += 120.0
    assert loop.s.recent_crashes(slot, loop.now) == 0 and slot.restarts == 4


def test_a_crashed_worker_of_an_active_lease_is_replaced_and_the_owner_told():
    loop = Loop(1)
    loop.open(1, 500)
    g = granted(loop.ask(1))
    old = loop.s.slots[0].pid
    loop.effects = []
    loop.feed(st.WorkerExited(0, old, "signal SIGKILL"))
    loop.feed(st.Tick())
    pushes = [m for m in loop.replies(1) if isinstance(m, messages.HeartbeatAck)]
    assert pushes[0].workers[0].pid == 0 and pushes[-1].workers[0].pid not in (0, old)
    assert pushes[-1].workers[0].ready is True
    assert loop.owners() == [g.lease_id]


def test_silent_worker_is_replaced():
    loop = Loop(1)
    loop.now = st.WORKER_SILENCE_S + 1
    loop.effects = []
    loop.feed(st.Tick())
    stops = [e for e in loop.effects if isinstance(e, st.StopWorker)]
    assert stops and "hung" in stops[0].why


def test_grant_gives_up_on_workers_that_never_come():
    loop = Loop(1, auto_workers=False)
    loop.open(1, 500)
    assert loop.ask(1) == []
    loop.now = st.GRANT_TIMEOUT_S + 1
    loop.effects = []
    loop.feed(st.Tick())
    (err,) = loop.replies(1)
    assert isinstance(err, NeuronCoreUnavailableError) and "did not become ready" in str(err)
    assert loop.owners() == [None]


def test_unknown_worker_messages_and_late_words_change_nothing():
    loop = Loop(1)
    pid = loop.s.slots[0].pid
    loop.feed(st.WorkerMessage(0, messages.Assigned(core=0, lease_id="ffffffffffffffff")))
    loop.feed(st.WorkerMessage(0, messages.WorkerReady(core=0, pid=pid + 77, endpoint="")))
    loop.feed(st.WorkerExited(0, pid + 77, "exit code 0"))
    assert loop.s.slots[0].state == st.SlotState.FRESH and loop.s.slots[0].pid == pid


def restored_record(lease_id="a" * 16, pid=500, alive=True, cores=(0,), token="tok"):
    return {"lease_id": lease_id, "token_hash": st.token_hash(token), "pid": pid, "uid": 1000, "start_time": 1.0,
            "cmd": "app", "cores": list(cores), "granted_wall": 0.0, "alive": alive}


def test_restart_keeps_a_live_owners_cores_until_it_reattaches():
    loop = Loop(2, restored=[restored_record(), restored_record("b" * 16, pid=501, alive=False, cores=(1,))])
    assert loop.owners() == ["a" * 16, None]
    loop.open(2, 600)
    (err,) = loop.ask(2, visible=[0])
    assert "waiting for it to re-attach" in str(err)
    loop.open(1, 500)
    loop.effects = []
    loop.feed(st.LinkMessage(1, 3, messages.Reattach(lease_id="a" * 16, token="tok")))
    g = granted(loop.replies(1))
    assert g.lease_id == "a" * 16 and g.cores == [0]


def test_reattach_needs_the_token_and_the_same_process():
    loop = Loop(1, restored=[restored_record()])
    loop.open(1, 999)  # another process with the right token
    loop.effects = []
    loop.feed(st.LinkMessage(1, 1, messages.Reattach(lease_id="a" * 16, token="tok")))
    assert isinstance(loop.replies(1)[0], LeaseLostError)
    loop.open(2, 500)  # the owner with a wrong token
    loop.effects = []
    loop.feed(st.LinkMessage(2, 1, messages.Reattach(lease_id="a" * 16, token="nope")))
    assert isinstance(loop.replies(2)[0], LeaseLostError)
    assert loop.owners() == ["a" * 16]


def test_orphaned_lease_is_freed_after_the_grace_period():
    loop = Loop(1, restored=[restored_record()])
    loop.now = st.RESTART_GRACE_S + 0.1
    loop.feed(st.Tick())
    assert loop.owners() == [None] and "a" * 16 not in loop.journal


def test_a_lost_journal_makes_acquires_wait_out_the_recovery_window():
    loop = Loop(1, recovering=True)
    loop.open(1, 500)
    assert loop.ask(1) == []  # parked, not refused and not granted
    loop.now = st.RESTART_GRACE_S + 0.1
    loop.workers_report()
    loop.effects = []
    loop.feed(st.Tick())
    granted(loop.replies(1))


def test_drain_refuses_new_and_waiting_acquires():
    loop = Loop(1)
    loop.open(1, 500)
    granted(loop.ask(1))
    loop.open(2, 600)
    assert loop.ask(2, wait_s=30.0) == []
    loop.effects = []
    loop.feed(st.Control(("zmq", b"op"), 1, messages.Drain()))
    assert isinstance(loop.replies(2)[0], BrokerDrainingError)
    loop.open(3, 700)
    assert isinstance(loop.ask(3)[0], BrokerDrainingError)


def test_owner_leaving_before_its_grant_frees_the_reservation():
    loop = Loop(1, auto_workers=False)
    loop.feed(st.WorkerStarted(0, 10))
    loop.feed(st.WorkerMessage(0, messages.WorkerReady(core=0, pid=10, endpoint="")))
    loop.open(1, 500)
    assert loop.ask(1) == []
    loop.effects = []
    loop.feed(st.LinkClosed(1))
    assert loop.owners() == [None]
    assert any(isinstance(e, st.StopWorker) for e in loop.effects)  # it was told of the owner: it goes


def test_journal_rows_the_broker_cannot_hold_are_dropped():
    loop = Loop(2, restored=[restored_record(cores=(5,)), restored_record("b" * 16, cores=(0, 1))])
    assert loop.owners() == ["b" * 16, "b" * 16]
    assert any(isinstance(e, st.JournalForget) and e.lease_id == "a" * 16 for e in loop.effects)


def test_stats_from_a_starting_worker_register_it_when_its_first_word_was_lost():
    loop = Loop(1, auto_workers=False)
    loop.feed(st.WorkerStarted(0, 42))
    loop.feed(st.WorkerMessage(0, messages.WorkerStats(core=0, models=[], requests=0, errors=0, rss=0, busy=False,
                                                       pid=41)))
    assert loop.s.slots[0].state == st.SlotState.STARTING  # not the worker it started
    loop.feed(st.WorkerMessage(0, messages.WorkerStats(core=0, models=[], requests=0, errors=0, rss=0, busy=False,
                                                       pid=42)))
    assert loop.s.slots[0].state == st.SlotState.FRESH


def test_after_a_lost_journal_a_live_owner_claims_its_cores_back_first():
    loop = Loop(2, recovering=True)
    loop.open(1, 500)  # the owner re-attaching on its word
    loop.effects = []
    loop.feed(st.LinkMessage(1, 1, messages.Reattach(lease_id="c" * 16, token="t" * 43, cores=[1])))
    g = granted(loop.replies(1))
    assert g.lease_id == "c" * 16 and g.cores == [1] and "c" * 16 in loop.journal
    loop.open(2, 600)
    loop.effects = []
    loop.feed(st.LinkMessage(2, 1, messages.Reattach(lease_id="d" * 16, token="u" * 43, cores=[1])))
    assert isinstance(loop.replies(2)[0], LeaseLostError)  # a core is claimed once
    assert loop.ask(2, req_id=2, visible=[0]) == []  # a new acquire waits out the window
    loop.now = st.RESTART_GRACE_S + 0.1
    loop.workers_report()
    loop.effects = []
    loop.feed(st.Tick())
    assert granted(loop.replies(2)).cores == [0]


def test_the_newest_journal_row_of_a_core_wins():
    stale = dict(restored_record("a" * 16, pid=500, cores=(0,)), granted_wall=100.0)
    live = dict(restored_record("b" * 16, pid=500, cores=(0,), token="tok2"), granted_wall=200.0)
    loop = Loop(1, restored=[stale, live])
    assert loop.owners() == ["b" * 16]
    assert any(isinstance(e, st.JournalForget) and e.lease_id == "a" * 16 for e in loop.effects)


def test_an_owners_batcher_report_is_kept_with_its_lease_unanswered_and_bounded():
    from tests.helpers import sample_batcher

    loop = Loop(2)
    loop.open(1, 500)
    g = granted(loop.ask(1, count=1))
    loop.open(2, 501)  # a link holding no lease: its report is dropped
    loop.effects = []
    loop.feed(st.LinkMessage(1, 2, messages.OwnerReport(batchers=[sample_batcher(f"m{i}.pt") for i in range(100)])))
    loop.feed(st.LinkMessage(2, 1, messages.OwnerReport(batchers=[sample_batcher()])))
    assert loop.replies(1) == [] and loop.replies(2) == []
    lease = loop.s.leases[g.lease_id]
    assert [b.model for b in lease.batchers] == [f"m{i}.pt" for i in range(st.MAX_BATCHERS)]
    loop.feed(st.LinkMessage(1, 3, messages.OwnerReport(batchers=[])))  # its last batcher closed
    assert lease.batchers == []
