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

    def age_s(self, now: float) -> float:
        return now - self.granted_at


@dataclass
class LeaseTable:
    timeout_s: float
    leases: dict[str, Lease] = field(default_factory=dict)

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

    def dead(self, now: float, is_alive: Callable[[int, float], bool]) -> list[tuple[Lease, str]]:
        """Leases whose owner exited (or whose pid now names another process) or stopped heartbeating."""
        out = []
        for lease in list(self.leases.values()):
            if not is_alive(lease.pid, lease.create_time):
                out.append((lease, "owner exited"))
            elif now - lease.last_seen > self.timeout_s:
                out.append((lease, f"no heartbeat for {now - lease.last_seen:.1f}s"))
        return out
