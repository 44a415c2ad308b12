"""Leases: a process's grant of cores, its identity (pid + start time, against pid reuse) and its liveness.

Pure logic: the clock is passed in (``now`` from ``time.monotonic()``) and liveness of a pid is a function
passed in, so that the table is tested without processes or sleeps.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Lease:
    lease_id: str
    token: str  # secret the owner presents to workers
    pid: int
    create_time: float  # the owner's process start time: a reused pid has another
    cmd: str
    cores: list[int]
    granted_at: float  # monotonic
    last_seen: float  # monotonic, last heartbeat or request
    granted_wall: float = 0.0  # wall clock, for display
    cpu_mark: float = -1.0  # the owner's CPU seconds when its heartbeats were overdue and it last used CPU
    cpu_mark_at: float = 0.0  # monotonic time of that look

    def age_s(self, now: float) -> float:
        return now - self.granted_at


@dataclass
class LeaseTable:
    """``timeout_s``: a silent owner that is not running (stopped, deadlocked, waiting on nothing) loses its lease
    after this long. ``busy_limit_s``: a silent owner that keeps using CPU (its heartbeat thread starved, say by a
    long TorchScript compile holding the GIL) is given this long before it loses its lease all the same."""

    timeout_s: float
    leases: dict[str, Lease] = field(default_factory=dict)
    busy_limit_s: float = 30.0
    idle_window_s: float = 0.3  # how long an overdue owner must use no CPU to count as hung

    @staticmethod
    def new_ids() -> tuple[str, str]:
        return secrets.token_hex(8), secrets.token_hex(16)

    def add(self, lease: Lease) -> None:
        self.leases[lease.lease_id] = lease

    def get(self, lease_id: str) -> Lease | None:
        return self.leases.get(lease_id)

    def touch(self, lease_id: str, now: float) -> bool:
        lease = self.leases.get(lease_id)
        if lease is None:
            return False
        lease.last_seen = now
        return True

    def remove(self, lease_id: str) -> Lease | None:
        return self.leases.pop(lease_id, None)

    def of_pid(self, pid: int) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.pid == pid]

    def dead(self, now: float, is_alive: Callable[[int, float], bool],
             cpu_seconds: Callable[[int], float | None] | None = None) -> list[tuple[Lease, str]]:
        """Leases whose owner exited (or whose pid now names another process), or hung: no heartbeat for
        ``timeout_s`` while (when ``cpu_seconds`` can tell) stopped or using no CPU for ``idle_window_s``, or none for
        ``busy_limit_s`` however busy. ``cpu_seconds(pid)`` is the owner's CPU time, None if not running."""
        out = []
        for lease in list(self.leases.values()):
            silent = now - lease.last_seen
            if not is_alive(lease.pid, lease.create_time):
                out.append((lease, "owner exited"))
            elif silent <= self.timeout_s:
                lease.cpu_mark = -1.0
            elif silent > self.busy_limit_s or cpu_seconds is None:
                out.append((lease, f"no heartbeat for {silent:.1f}s"))
            else:
                cpu = cpu_seconds(lease.pid)
                if cpu is None:  # stopped by a signal, or gone
                    out.append((lease, f"no heartbeat for {silent:.1f}s and the owner is not running"))
                elif lease.cpu_mark < 0 or cpu > lease.cpu_mark:  # first look, or it used CPU since: busy
                    lease.cpu_mark, lease.cpu_mark_at = cpu, now
                elif now - lease.cpu_mark_at >= self.idle_window_s:
                    out.append((lease, f"no heartbeat for {silent:.1f}s and no CPU used for "
                                       f"{now - lease.cpu_mark_at:.1f}s (hung)"))
        return out
