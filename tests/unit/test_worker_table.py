"""The runtime's table of its cores' workers (Runtime._update_workers): the broker's word arrives from two threads
(lease-link pushes, a heartbeat after a failed call), so a late report of a worker already replaced must not send
calls back to the dead one."""
from __future__ import annotations

import subprocess
import sys
import threading
import types

from neuron_client.runtime.lease import Runtime
from neuron_client.wire import messages


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def _table(pid: int):
    return types.SimpleNamespace(workers={3: messages.WorkerInfo(core=3, endpoint="e", pid=pid)}, _replaced={},
                                 _lock=threading.Lock())


def _update(table, pid: int) -> None:
    Runtime._update_workers(table, [messages.WorkerInfo(core=3, endpoint="e", pid=pid)])


def test_a_late_report_of_a_replaced_dead_worker_changes_nothing():
    dead, fresh = _dead_pid(), 1  # pid 1 runs as long as the host does
    table = _table(dead)
    _update(table, fresh)  # the push: a fresh worker replaced the dead one
    assert table.workers[3].pid == fresh
    _update(table, dead)  # a heartbeat's reply from before the replacement, read after it
    assert table.workers[3].pid == fresh
    _update(table, 0)  # the broker's word that the core's worker is being replaced is taken (no worker now)
    assert table.workers[3].pid == 0


def test_a_replaced_pid_that_runs_again_is_taken():
    """A pid the kernel gave to a later worker of the core (pids wrap): that worker is real, so it is taken."""
    table = _table(1)
    _update(table, 2)
    _update(table, 1)  # pid 1 runs: not stale
    assert table.workers[3].pid == 1
