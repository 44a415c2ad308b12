"""A tensor-parallel model placed on N contiguous cores: the callable ``parallel_model_trace`` / ``_load`` return.

Rank ``r``'s graph (and, with weight separation, its weights) is loaded on the ``r``-th of the N cores, every rank
with the same fresh process-group name, so that the N workers rendezvous and form one group for this loaded instance.
A call sends the same inputs to all ranks at once; each worker runs its shard (the collectives inside go between the
workers directly) and the caller gets rank 0's output.

Failures: if any rank fails under a call, the call fails at once (it does not wait for the other ranks, which the
collective timeout frees), naming the core whose worker died when one did; the model's group is dropped, and the next
call loads every rank again with a new group (after waiting for a dead core's fresh worker), with a warning.
"""
from __future__ import annotations

import threading
import uuid
import warnings
from concurrent.futures import FIRST_EXCEPTION, wait
from dataclasses import dataclass, field

import torch

from neuron_client.models.placed import LoadState, PlacedModel
from neuron_client.runtime import placement
from neuron_client.runtime.lease import Runtime, get_runtime
from neuron_client.wire import config, messages
from neuron_client.wire.errors import ModelLoadError, NeuronRuntimeError, RequestTimeoutError, WorkerUnavailableError
from neuron_client.wire.procs import pid_running

from . import collectives

# An unload may queue behind a rank still waiting in a collective of a failed call (at most the collective timeout).
UNLOAD_TIMEOUT_S = config.BROKER_REQUEST_TIMEOUT_S + collectives.COLLECTIVE_TIMEOUT_S
CALL_GRACE_S = 5.0  # beyond the call timeout, how long a call waits for its ranks' replies before giving up

_core_locks: dict[int, threading.Lock] = {}
_core_locks_guard = threading.Lock()


def _locks_for(cores: list[int]) -> list[threading.Lock]:
    """One lock per global core, taken in ascending order: two TP models sharing cores never interleave their ranks'
    calls in different orders on different workers (which would pair the wrong collectives)."""
    with _core_locks_guard:
        return [_core_locks.setdefault(c, threading.Lock()) for c in sorted(cores)]


@dataclass
class RankShard:
    rank: int
    data: torch.Tensor  # uint8: the TorchScript file of this rank (weight-less when the weights are separated)
    meta: dict
    weights: dict | None = None  # name -> tensor, with weight separation


@dataclass
class _Placed:
    core: int
    nc: int
    model_id: int
    worker_pid: int


@dataclass
class _Loaded:
    group: str
    ranks: list = field(default_factory=list)  # _Placed, in rank order


class TensorParallelModel(PlacedModel):
    """One graph per rank on N contiguous cores of the process, called as one model.

    Owns its shards (each rank's graph and weights), the loaded instance (its process-group name and each rank's
    core, model id and worker) and its re-forming after a failure. Its load state, per-core tally and finalizer are
    :class:`~neuron_client.models.placed.PlacedModel`'s. Changed by its own methods only (``load``, ``unload``, and
    calls, which re-form a broken group); ``parallel_model_trace`` / ``parallel_model_load`` build it.
    """

    def __init__(self, shards: list[RankShard], name: str = "tp_model"):
        if not shards:
            raise ValueError("a tensor-parallel model needs at least one rank")
        super().__init__(name)
        self.shards = shards
        self.tp_degree = len(shards)
        self._loaded: _Loaded | None = None
        self._ncs: list[int] | None = None
        self._runtime: Runtime | None = None
        self._broken: str | None = None
        self._cleanup = None  # future of the unload that follows a failed call
        self._lock = threading.Lock()  # loading / re-forming
        self.shared_weights: dict | None = None  # with separated weights: those identical on every rank
        self.load_s: float | None = None  # parallel_model_load: seconds from reading the files to loaded

    # -- metadata --------------------------------------------------------------------------------------------
    @property
    def inline_weights(self) -> bool:
        return self.shards[0].weights is None

    @property
    def input_specs(self) -> list[dict] | None:
        return self.shards[0].meta.get("inputs")

    @property
    def cores(self) -> list[int]:
        """Global ids of the cores holding ranks 0..N-1."""
        return [p.core for p in self._loaded.ranks] if self._loaded else []

    @property
    def group(self) -> str | None:
        """The process-group name of the loaded instance (a new one each time the ranks are loaded)."""
        return self._loaded.group if self._loaded else None

    # -- loading ---------------------------------------------------------------------------------------------
    def load(self, where: placement.Placement | None = None) -> "TensorParallelModel":
        """Place the ranks on N contiguous cores of the process: the least-used run, or from the ``start_nc`` of
        ``where`` / of the enclosing ``neuron_cores_context``."""
        with self._lock:
            self._place_locked(where or placement.current())
        return self

    def _place_locked(self, where: placement.Placement) -> None:
        rt = get_runtime()
        self._unload_locked()
        if self.tp_degree > rt.num_cores:
            raise ModelLoadError(f"{self.name} has tp_degree {self.tp_degree} but this process owns {rt.num_cores} "
                                 f"NeuronCores; own at least {self.tp_degree} (NEURON_RT_NUM_CORES / "
                                 "NEURON_RT_VISIBLE_CORES)")
        ncs = placement.resolve(placement.Placement(where.start_nc, self.tp_degree), list(rt.models_per_core))
        self._runtime = rt
        self._ncs = ncs
        self._load_ranks(rt, ncs)

    def _load_ranks(self, rt: Runtime, ncs: list[int]) -> None:
        group = f"tp{self.tp_degree}-{uuid.uuid4().hex[:20]}"
        self._to(LoadState.LOADING)
        futures = [rt.submit(self._load_rank, rt, shard, nc, group) for shard, nc in zip(self.shards, ncs)]
        done, _ = wait(futures, timeout=config.LOAD_TIMEOUT_S, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed or len(done) < len(futures):
            self._to(LoadState.FAILED)
            rt.submit(self._discard_after, rt, futures)  # the others fail at the rendezvous or are unloaded
            exc = failed[0].exception() if failed else RequestTimeoutError(
                f"loading {self.name} took longer than {config.LOAD_TIMEOUT_S:.0f}s")
            rank = futures.index(failed[0]) if failed else 0
            raise ModelLoadError(f"loading rank {rank} of tensor-parallel model {self.name} on neuroncore "
                                 f"{rt.global_core(ncs[rank])} failed: {exc}") from None
        self._loaded = _Loaded(group=group, ranks=[f.result() for f in futures])
        self._hold(rt, ncs)
        self._broken = None
        self._to(LoadState.LOADED)
        self._track(rt, [(p.core, p.model_id) for p in self._loaded.ranks])

    def _load_rank(self, rt: Runtime, shard: RankShard, nc: int, group: str) -> _Placed:
        core = rt.global_core(nc)
        pid = rt.worker(core).pid
        spec = messages.GroupSpec(name=group, rank=shard.rank, size=self.tp_degree) if self.tp_degree > 1 else None
        weights = dict(shard.weights) if shard.weights is not None else None
        carried = [shard.data, *(weights.values() if weights else ())]
        reply = rt.channel(core).request(
            messages.Load(token=rt.token, name=f"{self.name}[tp{shard.rank}/{self.tp_degree}]", data=shard.data,
                          group=spec, weights=weights), config.LOAD_TIMEOUT_S, carried)
        return _Placed(core=core, nc=nc, model_id=reply.model_id, worker_pid=pid)

    @staticmethod
    def _discard_after(rt: Runtime, futures) -> None:
        """After a failed load: wait for every rank's answer, unload the ranks that did load."""
        for f in futures:
            try:
                p = f.result(timeout=config.LOAD_TIMEOUT_S)
            except Exception:
                continue
            _unload_one(rt, p)

    def unload(self) -> None:
        """Remove every rank from its core (the workers drop the group); the model can be loaded again."""
        with self._lock:
            self._unload_locked()

    def _unload_locked(self) -> None:
        loaded, self._loaded = self._loaded, None
        self._untrack()
        self._unhold()
        self._to(LoadState.UNLOADED)
        rt = self._runtime
        if loaded is None or rt is None:
            return
        if not rt.closed:
            for p in loaded.ranks:
                _unload_one(rt, p)

    def _reform(self, why: str) -> None:
        """Load every rank again on the same cores with a new group (a rank failed, or a worker was replaced)."""
        rt = self._runtime
        if self._cleanup is not None:
            try:
                self._cleanup.result(timeout=config.LOAD_TIMEOUT_S)
            except Exception:
                pass
            self._cleanup = None
        old = self._loaded
        if old is not None:
            for p in old.ranks:
                w = rt.worker(p.core)
                if w.pid != p.worker_pid or not pid_running(p.worker_pid):
                    rt.await_worker(p.core, not_pid=p.worker_pid)
        self._unload_locked()
        self._load_ranks(rt, self._ncs)
        warnings.warn(f"tensor-parallel model {self.name} was loaded again on neuroncores {self.cores} with a new "
                      f"process group ({why})", RuntimeWarning, stacklevel=4)

    def _ready(self) -> _Loaded:
        """The loaded ranks, loading them first if needed (the first call, or after a failure)."""
        with self._lock:
            if self._loaded is None and self._broken is None:
                if self._ncs is None:
                    self._place_locked(placement.current())
                else:
                    self._runtime = get_runtime()
                    self._load_ranks(self._runtime, self._ncs)
            rt = self._runtime
            rt.check_lease()
            if self._broken is not None:
                self._reform(self._broken)
            else:
                # a worker that died between calls: the broker's word may still be on its way, the kernel's is not
                replaced = [p.core for p in self._loaded.ranks
                            if rt.worker(p.core).pid != p.worker_pid or not pid_running(p.worker_pid)]
                if replaced:
                    self._reform(f"neuroncores {replaced} got fresh workers")
            return self._loaded

    # -- calls -----------------------------------------------------------------------------------------------
    def __call__(self, *args):
        self.check_shapes(args)
        loaded = self._ready()
        rt = self._runtime
        timeout_s = config.call_timeout_s()
        locks = _locks_for([p.core for p in loaded.ranks])
        for lock in locks:
            lock.acquire()
        try:
            futures = [rt.submit(_call_one, rt, p, args, timeout_s) for p in loaded.ranks]
            done, _ = wait(futures, timeout=timeout_s + CALL_GRACE_S, return_when=FIRST_EXCEPTION)
        finally:
            for lock in reversed(locks):
                lock.release()
        failed = [i for i, f in enumerate(futures) if f in done and f.exception() is not None]
        if not failed and len(done) == len(futures):
            return futures[0].result()
        raise self._failed(rt, loaded, futures, failed, timeout_s)

    forward = __call__

    def _failed(self, rt: Runtime, loaded: _Loaded, futures, failed: list[int], timeout_s: float) -> Exception:
        """The error of a failed call; drops the group (in the background) so that the next call re-forms it."""
        with self._lock:
            if self._loaded is loaded:
                self._broken = "a rank failed under a call"
                self._cleanup = rt.submit(_unload_after, rt, loaded, futures)
        dead = [(i, p) for i, p in enumerate(loaded.ranks) if not pid_running(p.worker_pid)]
        errors = {i: futures[i].exception() for i in failed}
        rank = next((i for i, e in errors.items() if isinstance(e, WorkerUnavailableError)), None)
        if rank is not None:
            cause = errors[rank]
        elif dead:
            rank, p = dead[0]
            cause = rt.worker_died(p.core, p.worker_pid)
        elif failed:
            rank = failed[0]
            cause = errors[rank]
        else:
            rank, cause = 0, RequestTimeoutError(f"no reply within {timeout_s:.0f}s")
        core = loaded.ranks[rank].core
        kind = type(cause) if isinstance(cause, NeuronRuntimeError) else NeuronRuntimeError
        return kind(f"tensor-parallel model {self.name}: rank {rank} on neuroncore {core} failed: {cause}. Its "
                    f"process group {loaded.group} was dropped; the next call loads all {self.tp_degree} ranks "
                    "again with a new group")

    def __repr__(self) -> str:
        where = f"cores {self.cores}" if self._loaded else self.state
        sep = "inline weights" if self.inline_weights else "separated weights"
        return f"TensorParallelModel({self.name!r}, tp_degree={self.tp_degree}, {sep}, {where})"


def _call_one(rt: Runtime, p: _Placed, args: tuple, timeout_s: float):
    return rt.channel(p.core).call(p.model_id, args, timeout_s)


def _unload_one(rt: Runtime, p: _Placed) -> None:
    if rt.closed or rt.worker(p.core).pid != p.worker_pid:
        return  # a fresh worker holds nothing of ours
    try:
        rt.channel(p.core).request(messages.Unload(token=rt.token, model_id=p.model_id), UNLOAD_TIMEOUT_S)
    except NeuronRuntimeError:
        pass


def _unload_after(rt: Runtime, loaded: _Loaded, futures) -> None:
    """Once every rank of a failed call has answered (the survivors' collectives fail or time out), unload them."""
    for f in futures:
        try:
            f.exception(timeout=config.call_timeout_s())
        except Exception:
            pass
    for p in loaded.ranks:
        if pid_running(p.worker_pid):
            _unload_one(rt, p)
