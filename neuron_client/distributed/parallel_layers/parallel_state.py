"""Which tensor-parallel rank this code is building or tracing (``neuronx_distributed.parallel_layers.parallel_state``).

``parallel_model_trace`` runs ``get_model()`` and the trace once per rank inside :func:`rank_context`, so the
parallel layers size their shards for that rank. Outside any context the process-wide setting applies
(:func:`initialize_model_parallel`; size 1, rank 0 by default). Contexts are per thread, so that tests can simulate
several ranks in one process, one thread each.
"""
from __future__ import annotations

import contextlib
import threading

_local = threading.local()
_size = 1
_rank = 0


def _current() -> tuple[int, int]:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else (_rank, _size)


def get_tensor_model_parallel_size() -> int:
    """How many ranks the tensor-parallel model is split over (``tp_degree``)."""
    return _current()[1]


get_tensor_model_parallel_world_size = get_tensor_model_parallel_size


def get_tensor_model_parallel_rank() -> int:
    """This shard's rank, 0 .. size-1."""
    return _current()[0]


def model_parallel_is_initialized() -> bool:
    return bool(getattr(_local, "stack", None)) or _size > 1


def initialize_model_parallel(tensor_model_parallel_size: int = 1, rank: int = 0) -> None:
    """Set the process-wide size and rank (used outside ``parallel_model_trace``, e.g. to build one shard)."""
    global _size, _rank
    _check(rank, tensor_model_parallel_size)
    _size, _rank = tensor_model_parallel_size, rank


def destroy_model_parallel() -> None:
    global _size, _rank
    _size, _rank = 1, 0


@contextlib.contextmanager
def rank_context(rank: int, size: int):
    """Within the block (this thread), code sees tensor-parallel ``rank`` of ``size``."""
    _check(rank, size)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append((rank, size))
    try:
        yield
    finally:
        stack.pop()


def _check(rank, size) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor-parallel size must be an int >= 1, got {size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank must be 0..{size - 1}, got {rank!r}")
