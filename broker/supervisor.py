"""Worker processes: start one for a core, stop it, and tell how it ended. The decisions (when to start, restart,
retire or give up) are :mod:`broker.state`'s; this module only does what it is told.

Workers are started by entry point (:data:`WORKER_ENTRY`, a ``module:function`` name) from a ``forkserver`` that has
already imported that module (and torch with it): each worker is a fresh, single-threaded fork of that server
(spawn-safe), so a fresh worker for each new owner costs a fork, not a torch import. The broker process itself never
imports the worker, nor torch.
"""
from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass

from neuron_client.wire import config
from neuron_client.wire.procs import stop_processes

log = logging.getLogger("neuron.broker")

STOP_GRACE_S = 2.0
WORKER_ENTRY = "worker.main:run"  # called with the worker's settings as keyword arguments


def set_title(title: str) -> None:
    """Name this process in ``ps`` and ``top`` (``neuron-worker nc3``), with setproctitle; also its thread name
    (``/proc/PID/comm``, what ``top`` and ``pkill`` see), cut to the kernel's 15 characters."""
    try:
        import setproctitle

        setproctitle.setproctitle(title)
        setproctitle.setthreadtitle(title[:15])
    except (ImportError, OSError, AttributeError):
        pass


def run_entry(entry: str, settings: dict) -> None:
    """The target of a worker process (in the forkserver's child): name it ``neuron-worker nc<core>``, import
    ``entry``'s module and call it."""
    set_title(f"neuron-worker nc{settings.get('core')}")
    module, _, name = entry.partition(":")
    getattr(importlib.import_module(module), name)(**settings)


@dataclass(frozen=True)
class RestartPolicy:
    """A core whose worker dies more than ``max_restarts`` times within ``window_s`` under one lease is failed for
    the rest of that lease."""

    max_restarts: int = 5
    window_s: float = 60.0


def exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Owns the worker processes: one per core at a time, plus the ones being stopped until they are reaped.

    It decides nothing: :class:`broker.state.BrokerState` says when to start, stop or give up on a worker, and the
    broker's loop (:class:`broker.server.Broker`) calls it. Workers start by entry point (:data:`WORKER_ENTRY`)."""

    def __init__(self, directory: str, backend, shm_threshold: int, max_message_bytes: int = 0):
        self.directory = directory
        self.backend = backend
        self.shm_threshold = shm_threshold
        self.max_message_bytes = max_message_bytes
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload([WORKER_ENTRY.partition(":")[0]])
        self.procs: dict[int, mp.process.BaseProcess] = {}  # core -> its current process
        self.stopping: list[mp.process.BaseProcess] = []  # killed, not reaped yet
        self.kill_at: dict[int, float] = {}  # pid -> when a worker told to exit is killed

    def spin_us(self) -> int:
        """The fast path's spin for a worker: where every core has CPUs of its own, else none (a spinning worker
        would take the CPU from the workers it shares it with)."""
        from broker.backends import host_cpus

        return config.FAST_PATH_SPIN_US if self.backend.n_cores <= len(host_cpus()) else 0

    def start(self, core: int) -> tuple[int, int]:
        """Start a worker for ``core``; (pid, sentinel fd that becomes readable when it exits)."""
        settings = dict(core=core, directory=self.directory, backend=self.backend.name,
                        placement=self.backend.placement(core), broker_pid=os.getpid(),
                        shm_threshold=self.shm_threshold, max_message_bytes=self.max_message_bytes,
                        spin_us=self.spin_us())
        old = self.procs.get(core)
        if old is not None and old.is_alive():
            old.kill()
            self.stopping.append(old)
        proc = self.ctx.Process(target=run_entry, args=(WORKER_ENTRY, settings), name=f"neuron-worker-nc{core}", daemon=False)
        proc.start()
        self.procs[core] = proc
        return proc.pid, proc.sentinel

    def kill(self, core: int, grace_s: float = 0.0) -> int:
        """SIGKILL the core's worker now, or after ``grace_s`` if it has not exited by then; its pid, or 0."""
        proc = self.procs.get(core)
        if proc is None or proc.exitcode is not None:
            return 0
        if grace_s > 0:
            self.kill_at[proc.pid] = time.monotonic() + grace_s
            return proc.pid
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.pid

    def kill_overdue(self) -> None:
        """SIGKILL the workers told to exit that have not (their pid is still their own: we have not reaped it)."""
        now = time.monotonic()
        live = {p.pid for p in self.procs.values() if p.exitcode is None}
        for pid, when in list(self.kill_at.items()):
            if pid not in live:
                del self.kill_at[pid]
            elif now >= when:
                del self.kill_at[pid]
                log.warning("worker pid %d did not exit when told; killing it", pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def reap(self, core: int) -> list[tuple[int, str]]:
        """(pid, how it ended) of the core's worker if it exited; forgets it."""
        proc = self.procs.get(core)
        if proc is None:
            return []
        proc.join(0.5)
        if proc.exitcode is None:
            return []
        del self.procs[core]
        return [(proc.pid, exit_description(proc.exitcode))]

    def stop_all(self) -> None:
        procs = list(self.procs.values()) + self.stopping
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        stop_processes([p.pid for p in procs if p.exitcode is None], grace_s=1.0)
        for p in procs:
            p.join(0.1)
