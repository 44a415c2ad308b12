"""The core table: who owns which core. Pure logic, no sockets, no clock.

Semantics are those of the Neuron runtime (reference-behaviour.md, section 1):

* all cores (no variable set): every core must be free, or the request fails;
* ``count=n``: the first run of ``n`` free contiguous cores (first fit), all or nothing;
* ``visible=[...]``: exactly those cores.

A core is owned by at most one lease. Failed cores (a worker that keeps crashing) are never granted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from neuron_client.wire.cores import CoreRequest, format_cores
from neuron_client.wire.errors import NeuronCoreSpecError


@dataclass
class Denied:
    """Why a request could not be granted now: the cores that block it, and whether waiting could ever help."""

    requested: list[int] | None
    busy: dict[int, str] = field(default_factory=dict)  # core -> owner
    failed: list[int] = field(default_factory=list)
    could_succeed_later: bool = True


class CoreAllocator:
    """Which lease holds each core: the exclusive-ownership rule itself, with no I/O and no clock.

    Owns the core -> lease map and the failed cores. Changed only by :class:`broker.state.BrokerState` (reserve on an
    acquire, release at a lease's end); a request is granted whole or refused with the reason (:class:`Denied`).
    """

    def __init__(self, n_cores: int):
        if n_cores < 1:
            raise ValueError("a broker needs at least one core")
        self.n_cores = n_cores
        self.owner: list[str | None] = [None] * n_cores
        self.failed: set[int] = set()

    # -- queries -------------------------------------------------------------------------------------------
    def free_cores(self) -> list[int]:
        return [c for c in range(self.n_cores) if self.owner[c] is None and c not in self.failed]

    def cores_of(self, owner: str) -> list[int]:
        return [c for c in range(self.n_cores) if self.owner[c] == owner]

    def owner_of(self, core: int) -> str | None:
        return self.owner[core]

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self, req: CoreRequest) -> None:
        """Raise :class:`NeuronCoreSpecError` for a request that can never be met on this host."""
        n = self.n_cores
        if req.visible is not None:
            if not req.visible:
                raise NeuronCoreSpecError("NEURON_RT_VISIBLE_CORES names no core")
            if len(set(req.visible)) != len(req.visible):
                raise NeuronCoreSpecError(f"NEURON_RT_VISIBLE_CORES names a core more than once: {list(req.visible)}")
            bad = [c for c in req.visible if not 0 <= c < n]
            if bad:
                raise NeuronCoreSpecError(
                    f"NEURON_RT_VISIBLE_CORES asks for {format_cores(bad)} but this host has {n} cores "
                    f"(nc0-nc{n - 1}); pick indices below {n}"
                )
        elif req.count is not None and req.count < 1:
            raise NeuronCoreSpecError(f"NEURON_RT_NUM_CORES={req.count} is not a count of cores; ask for 1..{n} "
                                      "(0 means all)")
        elif req.count is not None and req.count > n:
            raise NeuronCoreSpecError(
                f"NEURON_RT_NUM_CORES={req.count} but this host has {n} cores; ask for at most {n} (0 means all)"
            )

    # -- changes -------------------------------------------------------------------------------------------
    def _pick(self, req: CoreRequest) -> list[int] | Denied:
        n = self.n_cores
        if req.visible is not None:
            wanted = sorted(req.visible)
        elif req.count is None:
            wanted = list(range(n))
        else:
            run = 0
            for c in range(n):
                run = run + 1 if self.owner[c] is None and c not in self.failed else 0
                if run == req.count:
                    return list(range(c - run + 1, c + 1))
            return Denied(
                requested=None,
                busy={c: self.owner[c] for c in range(n) if self.owner[c] is not None},
                failed=sorted(self.failed),
                could_succeed_later=_longest_possible_run(n, self.failed) >= req.count,
            )
        busy = {c: self.owner[c] for c in wanted if self.owner[c] is not None}
        failed = [c for c in wanted if c in self.failed]
        if busy or failed:
            return Denied(requested=wanted, busy=busy, failed=failed, could_succeed_later=not failed)
        return wanted

    def grant(self, req: CoreRequest, owner: str) -> list[int] | Denied:
        """Give ``owner`` the cores ``req`` asks for (all of them) or nothing; an owner holds one grant."""
        self.validate(req)
        if self.cores_of(owner):
            raise ValueError(f"{owner} already holds cores {format_cores(self.cores_of(owner))}")
        picked = self._pick(req)
        if isinstance(picked, Denied):
            return picked
        for c in picked:
            self.owner[c] = owner
        return picked

    def release(self, owner: str) -> list[int]:
        """Free every core of ``owner``; returns them."""
        freed = self.cores_of(owner)
        for c in freed:
            self.owner[c] = None
        return freed

    def mark_failed(self, core: int) -> None:
        self.failed.add(core)

    def mark_healthy(self, core: int) -> None:
        self.failed.discard(core)


def _longest_possible_run(n: int, failed: set[int]) -> int:
    best = run = 0
    for c in range(n):
        run = 0 if c in failed else run + 1
        best = max(best, run)
    return best
