"""``neuron_client.DataParallel``: one model replicated on several of the process's cores, each batch split across them.

Mirrors ``torch_neuronx.DataParallel`` (seed 002, reference-behaviour section 4)::

    model = neuron_client.jit.load("model.pt")           # traced with batch 1
    parallel = neuron_client.DataParallel(model)          # a replica on every core the process owns
    y = parallel(torch.rand(5, 3, 224, 224))              # chunks of 2, 2, 1 run concurrently on nc0, nc1, nc2

* ``device_ids``: ints or ``'nc:#'`` strings, relative to the cores the process owns (sorted; default: all of them).
* The batch is split along ``dim`` by the divmod rule (:func:`batching.chunk_sizes`); chunk ``i`` runs on the
  ``i``-th core of ``device_ids``; the outputs are concatenated along ``dim`` in chunk order.
* Dynamic batching (default when ``dim == 0``): any batch size works; each chunk is fed to its core in pieces of the
  traced batch size, the last one zero-padded, and the padding is cut off the outputs. Disabled
  (:meth:`DataParallel.disable_dynamic_batching`, or ``dim != 0``), ``input.shape[dim] / len(device_ids)`` must equal
  the traced size. Either way a worker only ever sees the traced shapes.
"""
from __future__ import annotations

import re
import threading
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

from neuron_client.models import batching
from neuron_client.models.awaitable import AsyncCalls
from neuron_client.models.neuron_model import Replica, as_neuron_model
from neuron_client.models.placed import LoadState, error_like
from neuron_client.runtime.lease import get_runtime
from neuron_client.wire.errors import InputShapeError

_NC = re.compile(r"nc:(\d+)")
SUBMIT_WINDOW = 4  # batches of one DataParallel in flight at once through submit()

UNEVEN_WARNING = ("the NeuronCores are not fully used: input.shape[dim]={n} is not divisible by the {k} NeuronCores "
                  "in device_ids, so the chunks are {sizes}; for the best throughput make the batch a multiple of "
                  "len(device_ids)")


def parse_device_id(device_id) -> int:
    """The core index an ``int`` or ``'nc:#'`` names; the reference's ValueError for anything else."""
    if isinstance(device_id, int) and not isinstance(device_id, bool):
        return device_id
    if isinstance(device_id, str):
        m = _NC.fullmatch(device_id.strip())
        if m:
            return int(m.group(1))
    raise ValueError(f"Expected `nc:#` or an integer, but got: {device_id!r}")


def parse_device_ids(device_ids, num_cores: int) -> list[int]:
    """Sorted, validated process-relative core indices (default: all ``num_cores``)."""
    if device_ids is None:
        return list(range(num_cores))
    if isinstance(device_ids, (str, int)):
        raise TypeError(f"device_ids must be a list of `nc:#` or integers, but got: {device_ids!r}")
    ids = sorted(parse_device_id(d) for d in device_ids)
    if not ids:
        raise ValueError("device_ids is empty: name at least one NeuronCore (or leave it out to use all "
                         f"{num_cores} this process owns)")
    bad = [i for i in ids if not 0 <= i < num_cores]
    if bad:
        raise ValueError(f"device_ids {bad} are outside the NeuronCores this process owns: it owns {num_cores} "
                         f"NeuronCores, nc0-nc{num_cores - 1} (device_ids are relative to the process's cores; "
                         "set NEURON_RT_NUM_CORES / NEURON_RT_VISIBLE_CORES to own more)")
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise ValueError(f"device_ids names NeuronCore(s) {dups} more than once; each core holds one replica")
    return ids


_as_neuron_model = as_neuron_model  # the seed passes a trace, a loaded module or a NeuronModel


class DataParallel(AsyncCalls):
    """Replicate ``model`` on the cores ``device_ids`` names and split each call's batch across them (``await
    parallel.acall(x)`` from asyncio)."""

    def __init__(self, model, device_ids=None, dim: int = 0, set_dynamic_batching: bool = True):
        self._submitter: ThreadPoolExecutor | None = None
        self._submit_lock = threading.Lock()
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        self.module = _as_neuron_model(model)
        holder = self.module.__dict__.get("_data_parallel")
        if holder is not None and holder() is not None:
            # another DataParallel placed this model on its cores: this one keeps a placement of its own (moving
            # the shared model back and forth would reload it on every alternating call)
            self.module = self.module.copy()
        self.module._data_parallel = weakref.ref(self)
        self.dim = dim
        self._runtime = get_runtime()
        self.device_ids = parse_device_ids(device_ids, self._runtime.num_cores)
        self.set_dynamic_batching = bool(set_dynamic_batching)
        self.traced_size = self._traced_size()
        if self.set_dynamic_batching:
            why = self._dynamic_batching_blocker()
            if why:
                warnings.warn(f"dynamic batching is disabled for DataParallel because {why}", stacklevel=2)
                self.set_dynamic_batching = False
        self._placed = None
        self._place(wait=False)

    # -- set-up ----------------------------------------------------------------------------------------------
    def _traced_size(self) -> int | None:
        """The traced size along ``dim`` shared by every input (None: unknown or not shared)."""
        return batching.traced_size(self.module.input_specs, self.dim)

    def _dynamic_batching_blocker(self) -> str | None:
        if self.dim != 0:
            return f"dim != 0 (dim={self.dim}); input.shape[dim] / len(device_ids) must equal the traced size"
        specs = self.module.input_specs
        if specs is not None and self.traced_size is None:
            shapes = [s["shape"] for s in specs]
            return (f"the model's inputs do not share one batch size along dim 0 (traced shapes {shapes}); "
                    "input.shape[dim] / len(device_ids) must equal the traced size")
        if self.traced_size == 0:
            return "the model was traced with an empty batch"
        return None

    def _place(self, wait: bool = True) -> None:
        """Put a replica on each of ``device_ids`` (a lazy model loads straight there; a placed one is moved). A
        model saved with ``async_load`` loads in the background unless ``wait``: the first call waits for it."""
        m = self.module
        if m.state in (LoadState.LOADING, LoadState.FAILED):
            m.wait_loaded()  # an async load in flight finishes first; a failed one raises its error
        have = sorted(r.nc for r in m.replicas) if m.state is LoadState.LOADED else None
        if have != self.device_ids:
            background = not wait and bool(m.meta.get("async_load"))
            m.load_onto(self.device_ids, background=background)
            if background:
                return  # the first call finds it loading and waits
        self._placed = m.replicas  # the list object: load and unload replace it
        by_nc = {r.nc: r for r in m.replicas}
        self._replicas = [by_nc[nc] for nc in self.device_ids]

    def _replicas_for_call(self) -> list[Replica]:
        if self.module.state is not LoadState.LOADED or self.module.replicas is not self._placed:
            self._place()  # the model was unloaded or moved since: put it back
        return self._replicas

    def disable_dynamic_batching(self) -> None:
        """From now on ``input.shape[dim] / len(device_ids)`` must equal the traced size."""
        self.set_dynamic_batching = False

    @property
    def dynamic_batching(self) -> bool:
        return self.set_dynamic_batching

    # -- calls -----------------------------------------------------------------------------------------------
    def _plan(self, inputs: tuple) -> list[list[tuple[tuple, int, int]]]:
        """Per chunk, its calls: (args, real items, items the call carries)."""
        n = batching.batch_size(inputs, self.dim)
        k = len(self.device_ids)
        if n is None:
            raise ValueError("DataParallel needs at least one input tensor to split along dim "
                             f"{self.dim}; call the model itself for tensor-free inputs")
        b = self.traced_size
        if self.set_dynamic_batching and b is not None:
            sizes = batching.chunk_sizes(n, k) or [0]  # an empty batch: one padded call, trimmed to nothing
            if n % k:
                warnings.warn(UNEVEN_WARNING.format(n=n, k=k, sizes=sizes), stacklevel=3)
            pieces = [batching.piece_sizes(c, b) or [0] for c in sizes]
            flat = batching.split(inputs, [p for ps in pieces for p in ps], self.dim)
            plan, i = [], 0
            for ps in pieces:
                plan.append([(batching.pad(flat[i + j], b, self.dim), p, b) for j, p in enumerate(ps)])
                i += len(ps)
            return plan
        if b is not None and n != b * k:
            how = ("dim != 0" if self.dim != 0 else "dynamic batching disabled")
            raise InputShapeError(
                f"DataParallel over {k} NeuronCores with {how}: input.shape[{self.dim}] / len(device_ids) must "
                f"equal the traced size {b}, so the input must have {b * k} items along dim {self.dim} "
                f"({k} x {b}), but it has {n}" + (
                    "; enable dynamic batching (dim=0) to use any batch size" if self.dim == 0 else
                    "; or trace the model with input.shape[dim] / len(device_ids) items along dim "
                    f"{self.dim}"))
        sizes = batching.chunk_sizes(n, k)
        if not sizes:
            raise InputShapeError(f"the input has no items along dim {self.dim}")
        if n % k:
            warnings.warn(UNEVEN_WARNING.format(n=n, k=k, sizes=sizes), stacklevel=3)
        return [[(args, c, c)] for args, c in zip(batching.split(inputs, sizes, self.dim), sizes)]

    def _run_chunk(self, replica: Replica, calls: list) -> list:
        return [self.module.run(args, replica=replica) for args, _, _ in calls]

    def __call__(self, *inputs):
        plan = self._plan(inputs)
        for calls in plan:  # every call has the traced shapes before anything is sent
            for args, _, _ in calls:
                self.module.check_shapes(args)
        replicas = self._replicas_for_call()
        futures = [self._runtime.submit(self._run_chunk, replicas[i], calls) for i, calls in enumerate(plan[1:], 1)]
        results: list = [None] * len(plan)
        errors: list = [None] * len(plan)
        try:
            results[0] = self._run_chunk(replicas[0], plan[0])  # the first chunk runs in the calling thread
        except Exception as exc:  # noqa: BLE001 - re-raised below, naming the core
            errors[0] = exc
        for i, fut in enumerate(futures, 1):
            try:
                results[i] = fut.result()
            except Exception as exc:  # noqa: BLE001
                errors[i] = exc
        for i, exc in enumerate(errors):
            if exc is not None:
                raise self._on_core_error(i, replicas[i], plan, exc)
        outs = [batching.trim(out, real, carried, self.dim)
                for calls, chunk_outs in zip(plan, results) for (_, real, carried), out in zip(calls, chunk_outs)]
        return batching.gather(outs, self.dim)

    forward = __call__

    def submit(self, *inputs) -> Future:
        """Run a call in the background; returns a ``concurrent.futures.Future`` of its gathered outputs.

        Its inputs are checked now (a bad batch raises here, not in the future). Several submitted batches stay in
        flight at once (up to :data:`SUBMIT_WINDOW`; more wait their turn), so the next batch's chunks are already
        queued on a core that finishes its chunk of this one early: one caller keeps every core busy."""
        plan = self._plan(inputs)
        for calls in plan:
            for args, _, _ in calls:
                self.module.check_shapes(args)
        with self._submit_lock:
            if self._submitter is None:  # its own threads: a batch waits for chunks that run on the runtime's pool
                self._submitter = ThreadPoolExecutor(max_workers=SUBMIT_WINDOW, thread_name_prefix="neuron-dp")
        return self._submitter.submit(self.__call__, *inputs)

    def _on_core_error(self, i: int, replica: Replica, plan: list, exc: Exception) -> Exception:
        start = sum(real for calls in plan[:i] for _, real, _ in calls)
        count = sum(real for _, real, _ in plan[i])
        text = (f"DataParallel chunk {i} (items {start}-{start + count - 1} along dim {self.dim}) failed on "
                f"neuroncore {replica.nc} (global core {replica.core}): {type(exc).__name__}: {exc}")
        return error_like(exc, text)

    def __repr__(self) -> str:
        return (f"DataParallel({self.module.name!r}, device_ids={self.device_ids}, dim={self.dim}, "
                f"dynamic_batching={self.set_dynamic_batching})")
