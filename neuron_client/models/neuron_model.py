"""A model placed on cores: the client-side proxy that ``neuron_client.jit.load`` returns.

It holds the model file's bytes and its recorded metadata, one replica per core it is loaded on, and serves calls
round-robin over the replicas, preferring an idle one (a replica busy with one call does not hold up calls that
another could serve). Loading is synchronous, lazy (at the first call or DataParallel) or asynchronous (in the
background; the first call waits), as the file's flags say.
"""
from __future__ import annotations

import threading
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from neuron_client.runtime import placement
from neuron_client.runtime.lease import Runtime, get_runtime
from neuron_client.wire import config, messages, tensors
from neuron_client.wire.errors import ModelLoadError, NeuronRuntimeError, UnknownModelError, WorkerUnavailableError

from .placed import LoadState, PlacedModel


@dataclass
class Replica:
    core: int  # global core id
    nc: int  # index among the process's cores
    model_id: int
    worker_pid: int  # the worker process holding it; another pid there means the worker was replaced
    in_flight: int = 0
    stale: bool = False  # its worker died under a call
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one recovery at a time


class NeuronModel(PlacedModel):
    """One traced graph and its replicas on the process's cores: the object ``neuron_client.jit.load`` returns.

    Owns its replicas (which core, which model id in which worker, calls in flight), the round-robin choice among them,
    and their recovery onto a core's fresh worker. Its load state, its count in the runtime's per-core tally and its
    finalizer are :class:`~.placed.PlacedModel`'s. Changed by its own methods only: ``place`` / ``load_onto`` (this
    process's code, :mod:`neuron_client.experimental`, DataParallel), ``unload``, and calls (which recover replicas).
    """

    def __init__(self, name: str, data: bytes, meta: dict, where: placement.Placement | None = None):
        super().__init__(name)
        self.meta = meta
        self._data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        self._where = where or placement.current()
        self.replicas: list[Replica] = []
        self._rr = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._local = threading.local()
        self._runtime: Runtime | None = None
        self.static_shapes = True
        self.output_device: str | torch.device | None = None  # outputs arrive on the host; set to move them

    # -- metadata --------------------------------------------------------------------------------------------
    @property
    def input_specs(self) -> list[dict] | None:
        return self.meta.get("inputs")

    @property
    def cores(self) -> list[int]:
        """Global ids of the cores holding this model's replicas."""
        return [r.core for r in self.replicas]

    @property
    def last_core(self) -> int | None:
        """The global core that served this thread's most recent call."""
        return getattr(self._local, "last_core", None)

    def copy(self) -> "NeuronModel":
        """Another model of the same file (sharing its bytes), not placed: one placement per copy."""
        other = NeuronModel(self.name, b"", self.meta, self._where)
        other._data = self._data
        other.static_shapes, other.output_device = self.static_shapes, self.output_device
        return other

    # -- loading ---------------------------------------------------------------------------------------------
    def place(self, where: placement.Placement | None = None, background: bool = False) -> None:
        """(Re)load onto the cores ``where`` names (default: the placement in force when the model was created)."""
        rt = get_runtime()
        load = list(rt.models_per_core)
        for r in self.replicas:  # where this model is now does not count against the new placement
            load[r.nc] -= 1
        ncs = placement.resolve(where or self._where, load)  # a bad placement leaves the model where it is
        self.unload()
        self._start(rt, ncs, background)

    def load_onto(self, ncs: list[int], background: bool = False) -> None:
        """(Re)load onto exactly these core indices of the process (DataParallel's placement)."""
        rt = get_runtime()
        for nc in ncs:
            rt.global_core(nc)  # validates before anything moves
        self.unload()
        self._start(rt, list(ncs), background)

    def _start(self, rt: Runtime, ncs: list[int], background: bool) -> None:
        with self._lock:
            self._runtime = rt
            self._to(LoadState.LOADING)
            self._ready.clear()
            self._load_error = None
            self._hold(rt, ncs)
        if background:
            threading.Thread(target=self._load, args=(rt, ncs), name=f"load-{self.name}", daemon=True).start()
        else:
            self._load(rt, ncs)
            self.wait_loaded()

    def _load(self, rt: Runtime, ncs: list[int]) -> None:
        def one(nc: int) -> Replica:
            core = rt.global_core(nc)
            pid = rt.worker(core).pid
            return Replica(core=core, nc=nc, model_id=self._load_on(rt, core), worker_pid=pid)

        try:
            if len(ncs) == 1:
                replicas = [one(ncs[0])]
            else:  # replicas load concurrently, one thread per core
                futures = [rt.submit(one, nc) for nc in ncs]
                replicas = [f.result() for f in futures]
            with self._lock:
                self.replicas = replicas
                self._to(LoadState.LOADED)
                self._track(rt, [(r.core, r.model_id) for r in replicas])
        except BaseException as exc:
            with self._lock:
                self._to(LoadState.FAILED)
                self._load_error = exc
                self._unhold()
        finally:
            self._ready.set()

    def _load_on(self, rt: Runtime, core: int) -> int:
        reply = rt.channel(core).request(
            messages.Load(token=rt.token, name=self.name, data=self._data), config.LOAD_TIMEOUT_S, [self._data])
        return reply.model_id

    def _recover(self, rt: Runtime, r: Replica, why: str) -> None:
        """Load replica ``r`` again on its core's fresh worker (the previous one died or was replaced)."""
        w = rt.await_worker(r.core, not_pid=r.worker_pid)
        r.model_id = self._load_on(rt, r.core)
        old, r.worker_pid, r.stale = r.worker_pid, w.pid, False
        warnings.warn(f"neuroncore {r.core} has a fresh worker (pid {w.pid}; the previous one, pid {old}, {why}); "
                      f"{self.name} was loaded on it again", RuntimeWarning, stacklevel=3)

    def wait_loaded(self, timeout_s: float = config.LOAD_TIMEOUT_S) -> None:
        if self.state in (LoadState.LAZY, LoadState.UNLOADED):
            self.place(background=False)
        if not self._ready.wait(timeout_s):
            raise ModelLoadError(f"{self.name} did not finish loading within {timeout_s:.0f}s")
        if self._load_error is not None:
            err = self._load_error
            if isinstance(err, NeuronRuntimeError):
                raise type(err)(f"{err} (while loading {self.name})") from None
            raise ModelLoadError(f"loading {self.name} failed: {type(err).__name__}: {err}") from err

    def unload(self) -> None:
        """Remove the model from its cores (it can be placed again)."""
        with self._lock:
            replicas, self.replicas = self.replicas, []
            rt = self._runtime
            self._untrack()
            self._unhold()
            self._to(LoadState.UNLOADED)
        if rt is not None and replicas and not rt.closed:
            for r in replicas:
                try:
                    rt.channel(r.core).request(messages.Unload(token=rt.token, model_id=r.model_id),
                                               config.BROKER_REQUEST_TIMEOUT_S)
                except NeuronRuntimeError:
                    pass

    # -- calls -----------------------------------------------------------------------------------------------
    def _pick(self) -> Replica:
        with self._lock:
            replicas = self.replicas
            n = len(replicas)
            if n == 1:
                chosen = replicas[0]
            else:
                order = [replicas[(self._rr + i) % n] for i in range(n)]
                chosen = min(order, key=lambda r: r.in_flight)  # first idle one in round-robin order
                self._rr = (replicas.index(chosen) + 1) % n
            chosen.in_flight += 1
            return chosen

    def run(self, args: tuple, replica: Replica | None = None):
        """Run one call on ``replica`` (default: the next in round-robin order); no shape check.

        A replica whose worker was replaced since it was loaded (a crash, a broker restart) is loaded again first.
        """
        if self._state is not LoadState.LOADED:
            self.wait_loaded()
        rt = self._runtime
        r = replica
        replicas = self.replicas
        counted = r is not None or len(replicas) != 1
        if not counted:  # one replica: nothing to pick, so no count of its calls in flight (only the pick reads it)
            r = replicas[0]
        elif r is None:
            r = self._pick()
        else:
            with self._lock:
                r.in_flight += 1
        try:
            if r.stale or rt.workers[r.core].pid != r.worker_pid:
                with r.lock:
                    if r.stale or rt.worker(r.core).pid != r.worker_pid:
                        self._recover(rt, r, rt.worker(r.core).last_exit or "exited")
            ch = rt.channel(r.core)
            try:
                out = ch.call(r.model_id, args, ch.timeout_s)
            except WorkerUnavailableError:
                r.stale = True  # the next call waits for the fresh worker and loads this replica there
                raise
            except UnknownModelError:  # reached a fresh worker before the heartbeat told us of it
                with r.lock:
                    rt.refresh_workers()
                    self._recover(rt, r, "was replaced")
                out = rt.channel(r.core).call(r.model_id, args, ch.timeout_s)
        finally:
            if counted:
                with self._lock:
                    r.in_flight -= 1
        self._local.last_core = r.core
        if self.output_device is not None:
            device = self.output_device
            out = tensors.map_tensors(out, lambda t: t.to(device))
        return out

    @property
    def bucketed(self) -> bool:
        """A packaged bucket model (``bucket_model_trace``): any input shape its kernel fits into a bucket."""
        return bool(self.meta.get("bucketed"))

    def _run_bucketed(self, args: tuple):
        """A call of a bucketed model: its outputs come back as a flat list; give them their traced structure."""
        from neuron_client.tracing import bucketing

        return bucketing.unpack_outputs(self.run(args), self.meta)

    def __call__(self, *args):
        if self._state is not LoadState.LOADED:
            self.wait_loaded()
        if self.bucketed:  # the kernel in the worker pads and picks the bucket: no static shapes to check
            return self._run_bucketed(args)
        self.check_shapes(args)
        return self.run(args)

    forward = __call__

    def submit(self, *args) -> Future:
        """Run a call in the background; returns a ``concurrent.futures.Future`` of its outputs."""
        if self.state is not LoadState.LOADED:
            self.wait_loaded()
        if self.bucketed:
            return self._runtime.submit(self._run_bucketed, args)
        self.check_shapes(args)
        return self._runtime.submit(self.run, args)

    def __repr__(self) -> str:
        where = f"cores {self.cores}" if self.replicas else self.state
        return f"NeuronModel({self.name!r}, {where})"


def as_neuron_model(model, placed_only: bool = False) -> NeuronModel:
    """The NeuronModel a user's object stands for: itself; the model behind a module ``torch.jit.load`` placed; or
    (unless ``placed_only``) a new, lazy one made from a traced module that was not loaded from a file."""
    if isinstance(model, NeuronModel):
        return model
    if isinstance(model, torch.jit.ScriptModule):
        from neuron_client.tracing import meta as trace_meta, script

        placed = script.model_of(model)
        if placed is not None:
            return placed
        if not placed_only:
            if script.is_placed_script(model):
                data, meta = script.parts_of(model)
                name = (meta.get(script.SCRIPT_KEY) or {}).get("name") or "model.pt"
            else:  # a plain traced module
                data = script.saved_bytes(model)
                meta = trace_meta.read_meta(data)
                name = f"{getattr(model, 'original_name', None) or type(model).__name__}.pt"
            nm = NeuronModel(name, data, meta)
            nm.defer()
            return nm
        raise TypeError("this traced module runs in this process: save it with torch.jit.save and load it with "
                        "torch.jit.load (after import neuron_client) or neuron_client.jit.load, then place that")
    raise TypeError(f"expected a model from torch.jit.load or neuron_client.jit.load (or a traced module from "
                    f"neuron_client.trace), got {type(model).__name__}")
