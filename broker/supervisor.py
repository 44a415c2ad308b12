"""Worker supervision: start one worker process per core, notice deaths, restart with back-off.

Workers are started from a ``forkserver`` that has already imported torch and the worker module: each worker is a
fresh, single-threaded fork of that server (spawn-safe), and eight of them start in about a second instead of eight
torch imports.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field

from worker.main import WorkerConfig, run

log = logging.getLogger("neuron.broker")

RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0)
STOP_GRACE_S = 2.0


@dataclass(frozen=True)
class RestartPolicy:
    """A core whose worker dies more than ``max_restarts`` times within ``window_s`` is marked failed."""

    max_restarts: int = 5
    window_s: float = 60.0


@dataclass
class WorkerSlot:
    core: int
    process: mp.process.BaseProcess | None = None
    ready: bool = False
    started_at: float = 0.0
    crashes: list = field(default_factory=list)  # monotonic times of recent crashes
    next_start_at: float = 0.0  # back-off: not before this
    failed: bool = False
    last_exit: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None and self.process.pid else 0


class Supervisor:
    def __init__(self, directory: str, backend, shm_threshold: int, policy: RestartPolicy = RestartPolicy(),
                 max_message_bytes: int = 0):
        self.directory = directory
        self.backend = backend
        self.shm_threshold = shm_threshold
        self.policy = policy
        self.max_message_bytes = max_message_bytes
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["worker.main"])
        self.slots = {c: WorkerSlot(c) for c in range(backend.n_cores)}

    def start(self, core: int) -> None:
        slot = self.slots[core]
        cfg = WorkerConfig(core=core, directory=self.directory, backend=self.backend.name,
                           placement=self.backend.placement(core), broker_pid=os.getpid(),
                           shm_threshold=self.shm_threshold, max_message_bytes=self.max_message_bytes)
        proc = self.ctx.Process(target=run, args=(cfg,), name=f"neuron-worker-nc{core}", daemon=False)
        proc.start()
        slot.process, slot.ready, slot.started_at = proc, False, time.monotonic()

    def start_all(self) -> None:
        for core in self.slots:
            self.start(core)

    def reap(self, now: float) -> list[WorkerSlot]:
        """Slots whose worker exited since the last call; schedules their restart (or marks them failed)."""
        dead = []
        for slot in self.slots.values():
            proc = slot.process
            if proc is None or proc.is_alive():
                continue
            code = proc.exitcode
            slot.last_exit = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
            slot.process, slot.ready = None, False
            slot.crashes = [t for t in slot.crashes if now - t < self.policy.window_s] + [now]
            if len(slot.crashes) > self.policy.max_restarts:
                slot.failed = True
                log.error("core %d: worker died %d times in %.0fs (last: %s); marking the core failed",
                          slot.core, len(slot.crashes), self.policy.window_s, slot.last_exit)
            else:
                delay = RESTART_BACKOFF_S[min(len(slot.crashes) - 1, len(RESTART_BACKOFF_S) - 1)]
                slot.next_start_at = now + delay
                log.warning("core %d: worker died (%s); restarting in %.1fs", slot.core, slot.last_exit, delay)
            dead.append(slot)
        return dead

    def restart_due(self, now: float) -> list[int]:
        started = []
        for slot in self.slots.values():
            if slot.process is None and not slot.failed and now >= slot.next_start_at:
                self.start(slot.core)
                started.append(slot.core)
        return started

    def stop_all(self) -> None:
        procs = [s.process for s in self.slots.values() if s.process is not None]
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(1.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
