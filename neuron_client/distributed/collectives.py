"""Collectives between the ranks of a tensor-parallel model, as TorchScript-visible custom ops.

Two operators are registered with ``torch.library`` when this module is imported::

    neuron::all_reduce(Tensor x, str group) -> Tensor                    # sum over the ranks
    neuron::all_gather(Tensor x, int dim, int world_size, str group) -> Tensor  # concatenate along ``dim``

A traced tensor-parallel graph calls them by name, so a process that runs such a graph (a worker) imports this module
before ``torch.jit.load``. The Python implementation finds the process group to use, in this order:

1. the thread's *active* group (:func:`active`), which a worker sets around each call of a model loaded with group
   information: the group formed for that loaded instance, whatever tag the graph recorded;
2. a group registered under the ``group`` tag (:func:`register`);
3. none: a shape-correct stand-in (all_reduce returns a copy of ``x``, all_gather repeats ``x`` ``world_size`` times),
   so that ``torch.jit.trace`` in a client records the op. A worker calls :func:`require_groups` so that a model
   missing its group fails loudly instead of computing a wrong result.

Groups are real ``torch.distributed`` process groups built without ``init_process_group``: gloo for CPU tensors,
NCCL for CUDA ones, rendezvous through a ``FileStore``, and every collective bounded by a timeout so that a dead rank
fails its peers instead of hanging them. Groups are formed by the workers (:func:`worker.groups.form_group`).
"""
from __future__ import annotations

import datetime
import threading

import torch

from neuron_client._ops import define_ops

COLLECTIVE_TIMEOUT_S = 30.0  # a collective (or the rendezvous) waiting longer than this for a peer fails
TRACE_TAG = "tp"  # the group tag traced graphs record

_registry: dict[str, "Group"] = {}
_registry_lock = threading.Lock()
_local = threading.local()
_standins_allowed = True


class CollectiveError(RuntimeError):
    """A collective could not run: no group, or a peer failed or timed out."""


class Group:
    """One rank's membership in a process group of ``size`` ranks."""

    def __init__(self, name: str, rank: int, size: int, pg=None, store_path: str | None = None):
        self.name = name
        self.rank = rank
        self.size = size
        self.pg = pg
        self.store_path = store_path
        self.broken: str | None = None  # set after a failed collective: the group must be formed again

    def _wait(self, work) -> None:
        try:
            work.wait(datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        except Exception as exc:
            self.broken = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            raise CollectiveError(f"collective of group {self.name} (rank {self.rank} of {self.size}) failed: "
                                  f"{self.broken}") from None

    def _check(self) -> None:
        if self.broken:
            raise CollectiveError(f"group {self.name} is broken since an earlier collective failed ({self.broken}); "
                                  "load the model again to form a new group")
        if self.pg is None:
            raise CollectiveError(f"group {self.name} has been closed")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._check()
        t = x.contiguous().clone()
        self._wait(self.pg.allreduce([t]))
        return t

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self._check()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._wait(self.pg.allgather([parts], [x]))
        return torch.cat(parts, dim)

    def close(self) -> None:
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:
                pass


def register(group: Group) -> None:
    with _registry_lock:
        _registry[group.name] = group


def unregister(name: str) -> Group | None:
    with _registry_lock:
        return _registry.pop(name, None)


def registered() -> list[str]:
    with _registry_lock:
        return sorted(_registry)


class active:
    """``with active(group):`` the collectives of this thread use ``group`` (None: no change)."""

    def __init__(self, group: Group | None):
        self.group = group

    def __enter__(self):
        self.previous = getattr(_local, "group", None)
        if self.group is not None:
            _local.group = self.group
        return self.group

    def __exit__(self, *exc):
        _local.group = self.previous


def require_groups() -> None:
    """Make a collective without a group an error in this process (workers), instead of a stand-in."""
    global _standins_allowed
    _standins_allowed = False


def _resolve(tag: str) -> Group | None:
    group = getattr(_local, "group", None)
    if group is not None:
        return group
    with _registry_lock:
        group = _registry.get(tag)
    if group is None and not _standins_allowed:
        raise CollectiveError(f"a collective of group {tag!r} ran without a process group: load tensor-parallel "
                              "models with neuron_client.distributed.trace.parallel_model_load, not jit.load")
    return group


def _all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    g = _resolve(group)
    if g is None:
        return x.clone()
    return g.all_reduce(x)


def _all_gather(x: torch.Tensor, dim: int, world_size: int, group: str) -> torch.Tensor:
    g = _resolve(group)
    if g is None:
        return torch.cat([x] * world_size, dim)
    if g.size != world_size:
        raise CollectiveError(f"the graph was traced for {world_size} ranks but group {g.name} has {g.size}")
    return g.all_gather(x, dim)


define_ops("neuron", {"all_reduce": ("(Tensor x, str group) -> Tensor", _all_reduce),
                      "all_gather": ("(Tensor x, int dim, int world_size, str group) -> Tensor", _all_gather)})


def all_reduce(x: torch.Tensor, tag: str = TRACE_TAG) -> torch.Tensor:
    return torch.ops.neuron.all_reduce(x, tag)


def all_gather(x: torch.Tensor, dim: int, world_size: int, tag: str = TRACE_TAG) -> torch.Tensor:
    return torch.ops.neuron.all_gather(x, dim, world_size, tag)
