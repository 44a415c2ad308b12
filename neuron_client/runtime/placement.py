"""Where a model's replicas go inside a process: core contexts and the least-used default.

Indices are relative to the process's cores (``nc0`` is its first). The contexts are per thread (the reference's are
process-global and documented as not thread-safe): two threads each inside their own context place their own loads.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

_local = threading.local()


@dataclass(frozen=True)
class Placement:
    start_nc: int = -1  # -1: the least-used core
    nc_count: int = -1  # -1: one core; 'all': every owned core


ALL = "all"


def current() -> Placement:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else Placement()


@contextlib.contextmanager
def _placed(p: Placement):
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(p)
    try:
        yield
    finally:
        stack.pop()


def validate_count(nc_count, available: int) -> None:
    """The reference's checks on ``nc_count``, with its messages."""
    if nc_count == ALL:
        return
    if not isinstance(nc_count, int) or isinstance(nc_count, bool):
        raise TypeError(f"nc_count must be an int, got {type(nc_count).__name__}")
    if nc_count == 0:
        raise ValueError("Cannot be set to 0")
    if nc_count < -1:
        raise ValueError("Values less than -1 are invalid")
    if nc_count > available:  # the reference's message first, then what was asked and what to do
        raise ValueError(f"NeuronCores available: {available} (nc_count={nc_count} asks for {nc_count} cores, but this "
                         f"process owns {available}: nc0-nc{available - 1}; ask for at most {available}, or start "
                         f"the process with more cores, e.g. NEURON_RT_NUM_CORES={nc_count})")


def validate_start(start_nc, available: int) -> None:
    if not isinstance(start_nc, int) or isinstance(start_nc, bool):
        raise TypeError(f"start_nc must be an int, got {type(start_nc).__name__}")
    if start_nc < -1:
        raise ValueError(f"start_nc={start_nc} is invalid: use -1 (least-used core) or 0..{available - 1}")
    if start_nc >= available:
        raise ValueError(f"start_nc={start_nc} is past the NeuronCores this process owns "
                         f"(NeuronCores available: {available}, nc0-nc{available - 1})")


def neuron_cores_context(start_nc: int = -1, nc_count: int = -1):
    """Models loaded inside are placed on ``nc_count`` replicas starting at ``start_nc`` (checked at load time)."""
    if nc_count != ALL:
        validate_count(nc_count, 1 << 30)
    validate_start(start_nc, 1 << 30)
    return _placed(Placement(start_nc, nc_count))


def multicore_context():
    """Models loaded inside are replicated on every core the process owns."""
    return _placed(Placement(0, ALL))


def resolve(p: Placement, load_per_core: list[int]) -> list[int]:
    """The local core indices for placement ``p`` given how many models each owned core holds."""
    n = len(load_per_core)
    count = n if p.nc_count == ALL else p.nc_count
    validate_count(count, n)
    validate_start(p.start_nc, n)
    count = 1 if count == -1 else count
    if p.start_nc == -1:
        starts = range(0, n - count + 1)
        start = min(starts, key=lambda s: (sum(load_per_core[s:s + count]), s))
    else:
        start = p.start_nc
        if start + count > n:
            raise ValueError(f"start_nc={start} with nc_count={count} needs nc{start}-nc{start + count - 1}, "
                             f"but this process owns nc0-nc{n - 1} (NeuronCores available: {n})")
    return list(range(start, start + count))
