"""``neuron_client.batched(model, ...)``: many small requests from the threads and asyncio tasks of one process,
coalesced into one execution of the model (a dynamic batcher, as Triton's or Ray Serve's ``@serve.batch``)::

    model = neuron_client.jit.load("model.pt")             # traced with batch 8; replicas on the process's cores
    with neuron_client.batched(model, max_queue_delay_us=100) as served:
        y = served(x)                                       # x: 1..8 rows; from any thread
        y = await served.acall(x)                           # from asyncio

* **Queue**: a caller's request is checked first (:meth:`BatchedModel.submit`): its tensors share one size along dim
  0 (its rows, 1..``max_batch_size``), and, for a model with static shapes, have the traced shapes past dim 0 and
  the traced dtypes. A bad request fails its caller only, before it joins the queue; so does a full queue
  (:class:`~neuron_client.wire.errors.QueueFullError`).
* **Lanes**: one thread per replica. When its replica is free of the batcher's executions it takes the requests
  waiting (in order, those of the first one's shapes), at most ``max_batch_size`` rows; with
  ``max_queue_delay_us`` > 0 it first waits up to that long after the oldest request for more to come, unless the
  batch is full already (``max_batch_size``, or the largest of ``preferred_batch_sizes``). ``preferred_batch_sizes``
  cut a batch at the largest preferred size it can make; the rest goes next. With a delay of 0 (the default) only
  what is already waiting is batched: while the replicas are busy, requests gather in the queue, and a free replica
  takes them all. A request that waited past ``timeout_s`` fails with
  :class:`~neuron_client.wire.errors.QueueTimeoutError` (checked whenever a lane looks at the queue or a request
  arrives).
* **Execution**: the requests' inputs are concatenated along dim 0 (:func:`batching.gather`), cut into pieces of the
  traced batch size and zero-padded (static shapes, :func:`batching.pad`), run on the lane's replica (one execution
  per replica at a time, so several batches run at once on several cores; a replica busy with the batcher takes
  nothing more, and of the free ones the one with the fewest calls in flight takes it), and the
  outputs cut back into each caller's rows (:func:`batching.split`; tuples, lists and dicts kept). A failing
  execution fails each of its callers with the error's type, naming the core.
* **Statistics** (:meth:`BatchedModel.stats`): requests, executions, rows, queue and compute time; the lease thread
  reports them to the broker every second, which shows them in ``neuron-broker status --json`` (``leases[].batchers``),
  ``neuron-top`` and the metrics (``neuron_batcher_*``).
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError

import torch

from neuron_client.models import batching
from neuron_client.models.awaitable import await_future
from neuron_client.models.placed import LoadState, PlacedModel, error_like
from neuron_client.wire import config, tensors
from neuron_client.wire.errors import InputShapeError, NeuronRuntimeError, QueueFullError, QueueTimeoutError
from neuron_client.wire.status import BatcherStatus

DEFAULT_MAX_BATCH_SIZE = 8  # for a model with no traced batch size (dynamic shapes)
DEFAULT_MAX_QUEUE_SIZE = 1024
CLOSE_TIMEOUT_S = 30.0
_WAIT_S = 0.5  # a lane thread's longest sleep (so that it sees a closed batcher promptly)
_DEFER_S = 0.002  # how long a lane leaves a batch to a less busy one before it looks again

_ids = itertools.count(1)
log = logging.getLogger("neuron_client")


class _Request:
    __slots__ = ("inputs", "rows", "signature", "future", "enqueued", "deadline")

    def __init__(self, inputs: tuple, rows: int, signature, deadline: float | None):
        self.inputs, self.rows, self.signature = inputs, rows, signature
        self.future: Future = Future()
        self.enqueued = time.monotonic()
        self.deadline = deadline


def _signature(obj):
    """What requests must share to be concatenated: the nesting, and each tensor's shape past dim 0 and dtype (and
    every other leaf's value)."""
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape[1:]), obj.dtype, obj.device.type)
    if isinstance(obj, dict):
        return ("D", tuple(obj.keys()), tuple(_signature(v) for v in obj.values()))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_signature(v) for v in obj))
    return ("V", repr(obj))


def _fmt(pairs) -> str:
    return ", ".join(f"{tensors.dtype_name(d)}[{', '.join(map(str, s))}]" for s, d in pairs) or "none"


class BatchedModel:
    """A model served through a request batcher (made by :func:`batched`); thread-safe, usable from asyncio.

    Owns its queue, its lane threads (one per replica: each takes a batch when its replica is free and runs it there)
    and its counters. The model itself is shared: calls made on it directly still work beside the batcher's.
    """

    def __init__(self, model, max_batch_size: int | None = None, max_queue_delay_us: int = 0,
                 preferred_batch_sizes=(), max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
                 timeout_s: float | None = None, name: str | None = None):
        self.model = _target(model)
        m = self.model
        if hasattr(m, "replicas"):  # a NeuronModel: placed now (a lazy one loads), its load error raised here
            if m.state is not LoadState.LOADED:
                m.wait_loaded()
        else:  # a tensor-parallel model: its ranks loaded now
            m._ready()
        self.name = name or m.name
        self.traced_size = (batching.traced_size(m.input_specs, 0)
                            if m.static_shapes and not getattr(m, "bucketed", False) else None)
        if max_batch_size is None:
            max_batch_size = self.traced_size or DEFAULT_MAX_BATCH_SIZE
        _check_int("max_batch_size", max_batch_size, 1)
        _check_int("max_queue_delay_us", max_queue_delay_us, 0)
        _check_int("max_queue_size", max_queue_size, 1)
        preferred = sorted(set(preferred_batch_sizes or ()))
        for p in preferred:
            _check_int("preferred_batch_sizes entries", p, 1)
        if preferred and preferred[-1] > max_batch_size:
            raise ValueError(f"preferred_batch_sizes {preferred} has sizes above max_batch_size {max_batch_size}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be a number of seconds > 0 (or None: no limit), not {timeout_s!r}")
        self.max_batch_size, self.max_queue_delay_us = max_batch_size, max_queue_delay_us
        self.preferred_batch_sizes, self.max_queue_size, self.timeout_s = preferred, max_queue_size, timeout_s
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._executing: set[int] = set()  # the lanes running a batch
        self._counts = dict(requests=0, served=0, executions=0, rows=0, queue_s=0.0, compute_s=0.0, refused=0,
                            timed_out=0, failed=0)
        self._lanes_max = max(1, len(self._lanes()))
        self._key = next(_ids)
        self._runtime = m._runtime
        stats = weakref.WeakMethod(self.stats)
        self._runtime.add_reporter(self._key, lambda: stats()())
        weakref.finalize(self, self._runtime.remove_reporter, self._key)
        self._threads = [threading.Thread(target=_lane_loop, args=(weakref.ref(self), i), daemon=True,
                                          name=f"neuron-batch-{self.name}-{i}") for i in range(self._lanes_max)]
        for t in self._threads:
            t.start()

    # -- calls -----------------------------------------------------------------------------------------------
    def submit(self, *inputs) -> Future:
        """Queue one request; a ``concurrent.futures.Future`` of its outputs. A bad request or a full queue raises
        here, in the caller."""
        rows, signature = self._validate(inputs)
        timeout_s = self.timeout_s
        req = _Request(inputs, rows, signature, None if timeout_s is None else time.monotonic() + timeout_s)
        with self._cond:
            if self._closed:
                raise NeuronRuntimeError(f"the batcher of {self.name} is closed; make another with "
                                         "neuron_client.batched(model)")
            if timeout_s is not None:
                self._expire(time.monotonic())
            if len(self._queue) >= self.max_queue_size:
                self._counts["refused"] += 1
                raise QueueFullError(
                    f"the batcher of {self.name} refused a request: its queue holds max_queue_size="
                    f"{self.max_queue_size} requests waiting for {self._lanes_max} replica(s); retry later, or raise "
                    "max_queue_size or add replicas")
            self._queue.append(req)
            self._counts["requests"] += 1
            self._cond.notify()  # one idle lane takes it
        return req.future

    def _wait_s(self) -> float:
        """The longest a caller waits for its result: its queue time, then one call (several pieces at most)."""
        call = config.call_timeout_s()
        pieces = -(-self.max_batch_size // self.traced_size) if self.traced_size else 1
        return (self.timeout_s if self.timeout_s is not None else call) + call * pieces + 5.0

    def __call__(self, *inputs):
        fut = self.submit(*inputs)
        try:
            return fut.result(self._wait_s())
        except TimeoutError:
            fut.cancel()
            raise QueueTimeoutError(f"{self.name}: no result within {self._wait_s():.0f}s") from None

    forward = __call__

    async def acall(self, *inputs):
        """``await served.acall(*inputs)``: the same as ``served(*inputs)``, without blocking the event loop;
        cancelling the task drops the request (its rows are not run if it is still queued)."""
        return await await_future(self.submit(*inputs), self._wait_s())

    # -- validation ------------------------------------------------------------------------------------------
    def _validate(self, inputs: tuple) -> tuple[int, tuple]:
        found = batching.tensors(inputs)
        if not found:
            raise InputShapeError(f"the batcher of {self.name} concatenates requests along dim 0, but this request "
                                  "has no tensor inputs; call the model itself")
        if any(t.dim() == 0 for t in found):
            raise InputShapeError(f"the batcher of {self.name} concatenates requests along dim 0, but this request "
                                  f"has a scalar input (shapes {[list(t.shape) for t in found]}); give every input "
                                  "a batch dimension")
        sizes = {t.shape[0] for t in found}
        if len(sizes) > 1:
            raise InputShapeError(f"a request to the batcher of {self.name} must have one batch size along dim 0 in "
                                  f"all its tensors; got shapes {[list(t.shape) for t in found]}")
        rows = sizes.pop()
        if not 1 <= rows <= self.max_batch_size:
            raise InputShapeError(f"a request to the batcher of {self.name} has {rows} rows along dim 0; it takes "
                                  f"1..{self.max_batch_size} (max_batch_size); split it, or call the model itself")
        expected = self.model._expected() if self.traced_size is not None else None
        if expected is not None:
            given = [(tuple(t.shape[1:]), t.dtype) for t in found]
            want = [(s[1:], d) for s, d in expected]
            if given != want:
                takes = _fmt([((f"1..{self.max_batch_size}", *s), d) for s, d in want])
                raise InputShapeError(
                    f"{self.name} was traced for inputs ({_fmt(expected)}); the batcher takes any 1.."
                    f"{self.max_batch_size} rows of them: ({takes}), but got "
                    f"({_fmt([(tuple(t.shape), t.dtype) for t in found])})")
        return rows, _signature(inputs)

    # -- dispatch (the lane threads) -------------------------------------------------------------------------
    def _lanes(self) -> list:
        """Where an execution can run: the model's replicas (a tensor-parallel model: itself, as one lane)."""
        replicas = getattr(self.model, "replicas", None)
        return list(replicas) if replicas is not None and hasattr(self.model, "run") else [self.model]

    def _lane(self, i: int):
        lanes = self._lanes()
        return lanes[i] if i < len(lanes) else None

    def _expire(self, now: float) -> float | None:
        """Fail the requests waiting past their deadline; the next deadline (None: none)."""
        nxt = None
        if self.timeout_s is None:
            return None
        keep = collections.deque()
        for req in self._queue:
            if req.deadline <= now:
                self._counts["timed_out"] += 1
                _fail(req, QueueTimeoutError(
                    f"a request to the batcher of {self.name} waited {now - req.enqueued:.3f}s in its queue, past "
                    f"its timeout_s={self.timeout_s:g}, and was not run ({len(self._queue)} requests waiting for "
                    f"{self._lanes_max} replica(s)); raise timeout_s, or send fewer requests"))
            else:
                keep.append(req)
                nxt = req.deadline if nxt is None else min(nxt, req.deadline)
        self._queue = keep
        return nxt

    def _batch_rows(self) -> int:
        sig = self._queue[0].signature
        return sum(r.rows for r in self._queue if r.signature == sig)

    def _take(self) -> list[_Request]:
        """The next batch: waiting requests of the first one's shapes, in order, at most max_batch_size rows, cut at
        the largest preferred size it reaches."""
        sig = self._queue[0].signature
        taken, rows, cuts = [], 0, []
        for req in self._queue:
            if req.signature != sig:
                continue
            if rows + req.rows > self.max_batch_size:
                break
            taken.append(req)
            rows += req.rows
            cuts.append(rows)
        if self.preferred_batch_sizes:
            hits = [i for i, c in enumerate(cuts) if c in self.preferred_batch_sizes]
            if hits:
                taken = taken[:hits[-1] + 1]
        chosen = set(map(id, taken))
        self._queue = collections.deque(r for r in self._queue if id(r) not in chosen)
        return [r for r in taken if r.future.set_running_or_notify_cancel()]  # a cancelled request is dropped

    def _step(self, i: int) -> None:
        """One round of lane ``i``'s thread: wait (bounded) for requests, take a batch and run it on the lane."""
        with self._cond:
            now = time.monotonic()
            next_deadline = self._expire(now)
            wait = _WAIT_S if next_deadline is None else max(0.0, min(_WAIT_S, next_deadline - now))
            lane = self._lane(i)
            if not self._queue or lane is None:
                self._cond.wait(wait)
                return
            if self._less_busy_than(i, lane):  # a free replica with fewer calls in flight takes it
                self._cond.notify_all()
                self._cond.wait(min(wait, _DEFER_S))
                return
            if self.max_queue_delay_us:
                full = max(self.preferred_batch_sizes or [self.max_batch_size])
                due = self._queue[0].enqueued + self.max_queue_delay_us / 1e6
                if now < due and self._batch_rows() < full:
                    self._cond.wait(min(wait, due - now))
                    return
            batch = self._take()
            if self._queue:
                self._cond.notify()  # more waiting: another idle lane may take the next batch
            if batch:
                self._executing.add(i)
        if batch:
            try:
                self._execute(lane, batch)
            finally:
                with self._cond:
                    self._executing.discard(i)

    def _less_busy_than(self, i: int, lane) -> bool:
        """Whether another lane, free of the batcher's work, has a replica with fewer calls in flight (calls made on
        the model directly, beside the batcher) than lane ``i``'s."""
        mine = getattr(lane, "in_flight", 0)
        if not mine:
            return False
        lanes = self._lanes()
        return any(getattr(lanes[j], "in_flight", 0) < mine for j in range(min(len(lanes), self._lanes_max))
                   if j != i and j not in self._executing)

    # -- execution (a lane's thread) ---------------------------------------------------------------------------
    def _execute(self, lane, batch: list[_Request]) -> None:
        start = time.monotonic()
        rows = sum(r.rows for r in batch)
        parts, errors, ran = None, None, 0.0
        try:
            inputs = batch[0].inputs if len(batch) == 1 else batching.gather([r.inputs for r in batch], 0)
            t0 = time.monotonic()
            try:
                out = self._run(lane, inputs, rows)
            finally:
                ran = time.monotonic() - t0
            try:
                parts = [out] if len(batch) == 1 else batching.split(out, [r.rows for r in batch], 0)
            except ValueError as exc:
                raise NeuronRuntimeError(
                    f"{self.name}'s outputs cannot be cut back into its callers' rows: {exc}; the batcher needs "
                    "outputs whose tensors have the batch along dim 0") from None
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
            text = (f"a batch of {len(batch)} requests ({rows} rows) of {self.name} failed {self._where(lane)}: "
                    f"{type(exc).__name__}: {exc}")
            errors = [error_like(exc, text) for _ in batch]
        with self._cond:  # counted before the callers hear: what they read after their call includes it
            c = self._counts
            c["executions"] += 1
            c["rows"] += rows
            c["compute_s"] += ran
            c["queue_s"] += sum(start - r.enqueued for r in batch)
            c["served" if errors is None else "failed"] += len(batch)
        for i, req in enumerate(batch):
            if errors is not None:
                _fail(req, errors[i])
                continue
            try:
                req.future.set_result(parts[i])
            except InvalidStateError:
                pass

    def _run(self, lane, inputs: tuple, rows: int):
        b = self.traced_size
        if b is None or rows == b:
            return self._run_one(lane, inputs)
        sizes = batching.piece_sizes(rows, b)
        pieces = batching.split(inputs, sizes, 0)
        outs = [batching.trim(self._run_one(lane, batching.pad(p, b, 0)), n, b, 0) for p, n in zip(pieces, sizes)]
        return batching.gather(outs, 0)

    def _run_one(self, lane, args: tuple):
        m = self.model
        if lane is m:
            return m(*args)
        out = m.run(tuple(args), replica=lane)
        if getattr(m, "bucketed", False):
            from neuron_client.tracing import bucketing

            out = bucketing.unpack_outputs(out, m.meta)
        return out

    def _where(self, lane) -> str:
        if lane is self.model:
            return f"on neuroncores {self.model.cores}"
        return f"on neuroncore {lane.nc} (global core {lane.core})"

    # -- statistics, life ------------------------------------------------------------------------------------
    def stats(self) -> BatcherStatus:
        """Counters since the batcher was made (what the broker shows for it)."""
        with self._cond:
            c = dict(self._counts)
            waiting = len(self._queue)
        return BatcherStatus(model=self.name[:200], requests=c["requests"], served=c["served"],
                             executions=c["executions"], rows=c["rows"], queue_s=round(c["queue_s"], 6),
                             compute_s=round(c["compute_s"], 6), waiting=waiting, refused=c["refused"],
                             timed_out=c["timed_out"], failed=c["failed"], max_batch_size=self.max_batch_size,
                             max_queue_delay_us=self.max_queue_delay_us)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop: queued requests fail, executions running finish, the threads end. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            waiting, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for req in waiting:
            if req.future.set_running_or_notify_cancel():
                _fail(req, NeuronRuntimeError(f"the batcher of {self.name} was closed before this request ran"))
        deadline = time.monotonic() + timeout_s
        for t in self._threads:  # each finishes the execution it runs
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self._runtime.remove_reporter(self._key)

    def __enter__(self) -> "BatchedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BatchedModel({self.name!r}, max_batch_size={self.max_batch_size}, max_queue_delay_us="
                f"{self.max_queue_delay_us}, preferred_batch_sizes={self.preferred_batch_sizes}"
                f"{', closed' if self._closed else ''})")


def _lane_loop(ref, i: int) -> None:
    """Lane ``i``'s thread: it holds the batcher only for a step, so that a batcher nobody holds is collected (and
    its threads end)."""
    while True:
        b = ref()
        if b is None or b._closed:
            return
        try:
            b._step(i)
        except Exception:  # noqa: BLE001 - a bug here must not leave the queue without a lane
            log.exception("the batcher of %s failed; its lane %d goes on", b.name, i)
            time.sleep(_WAIT_S)
        del b


def _fail(req: _Request, exc: Exception) -> None:
    if req.future.done():
        return
    try:
        req.future.set_exception(exc)
    except InvalidStateError:
        pass


def _check_int(what: str, value, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{what} must be an integer >= {least}, not {value!r}")


def _target(model):
    """What the batcher runs: a NeuronModel (also the one behind a DataParallel or a module from torch.jit.load,
    placed on its cores) or a tensor-parallel model."""
    from neuron_client.models.data_parallel import DataParallel
    from neuron_client.models.neuron_model import as_neuron_model

    if isinstance(model, BatchedModel):
        raise TypeError("this model is batched already")
    if isinstance(model, DataParallel):
        model._replicas_for_call()  # placed on its device_ids: the batcher runs on those replicas
        return model.module
    if isinstance(model, PlacedModel):
        return model
    return as_neuron_model(model)


def batched(model, max_batch_size: int | None = None, max_queue_delay_us: int = 0, preferred_batch_sizes=(),
            max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE, timeout_s: float | None = None,
            name: str | None = None) -> BatchedModel:
    """Serve ``model`` through a request batcher (see the module's text): ``served(x)`` from threads, ``await
    served.acall(x)`` from asyncio.

    ``max_batch_size``: rows per execution (default: the traced batch size; 8 for a model with dynamic shapes);
    ``max_queue_delay_us``: how long the oldest request may wait for others (0: batch only what is waiting);
    ``preferred_batch_sizes``: batch sizes to cut at; ``max_queue_size``: requests waiting at most (more are
    refused); ``timeout_s``: how long a request may wait in the queue (None: no limit); ``name``: in the
    statistics (default: the model's).
    """
    return BatchedModel(model, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                        preferred_batch_sizes=preferred_batch_sizes, max_queue_size=max_queue_size,
                        timeout_s=timeout_s, name=name)
