"""What every model placed on cores shares: its load state and the one table of the moves between them, its count in
the runtime's per-core model tally (least-used placement reads it), the finalizer that unloads it when the last
reference goes, and the check of a call's inputs against the traced shapes.

:class:`~neuron_client.models.neuron_model.NeuronModel` (one graph, replicas on cores) and
:class:`~neuron_client.distributed.model.TensorParallelModel` (one graph per rank on contiguous cores) are placed
models; :class:`~neuron_client.models.data_parallel.DataParallel` places a NeuronModel on its cores.
"""
from __future__ import annotations

import enum
import weakref

import torch

from neuron_client.wire import tensors
from neuron_client.wire.errors import InputShapeError, NeuronRuntimeError

from .awaitable import AsyncCalls


def error_like(exc: BaseException, text: str) -> Exception:
    """An error of ``exc``'s type saying ``text`` (where it happened, and ``exc``'s words), caused by ``exc``; a
    :class:`NeuronRuntimeError` for an exception type that takes other arguments."""
    try:
        new = type(exc)(text)
    except Exception:  # noqa: BLE001
        new = NeuronRuntimeError(text)
    new.__cause__ = exc
    return new


class LoadState(str, enum.Enum):
    """Where a placed model is in its life. A ``str`` enum: ``model.state == "loaded"`` reads as it always did."""

    UNLOADED = "unloaded"  # on no core (new, or unloaded)
    LAZY = "lazy"  # placed at its first call, or by DataParallel (saved after lazy_load)
    LOADING = "loading"  # on its way to the cores (in the background after async_load)
    LOADED = "loaded"  # on its cores, serving calls
    FAILED = "failed"  # the last load failed; the next call (or place) tries again

    def __str__(self) -> str:
        return self.value


# The only moves a placed model makes; staying in a state is always allowed.
TRANSITIONS: dict[LoadState, frozenset] = {
    LoadState.UNLOADED: frozenset({LoadState.LAZY, LoadState.LOADING}),
    LoadState.LAZY: frozenset({LoadState.LOADING, LoadState.UNLOADED}),
    LoadState.LOADING: frozenset({LoadState.LOADED, LoadState.FAILED, LoadState.UNLOADED}),
    LoadState.LOADED: frozenset({LoadState.UNLOADED}),
    LoadState.FAILED: frozenset({LoadState.LOADING, LoadState.UNLOADED}),
}


class PlacedModel(AsyncCalls):
    """The shared lifecycle of a model on cores.

    Owns: :attr:`state` (changed only through :meth:`_to`, which enforces :data:`TRANSITIONS`), this model's entries in
    its runtime's ``models_per_core`` (:meth:`_hold` / :meth:`_unhold`), and its unload-on-collection finalizer
    (:meth:`_track` / :meth:`_untrack`). Subclasses decide where and how they load; callers change the state only
    through the public methods (``place``, ``unload``, :meth:`defer`). ``await model.acall(*inputs)`` is the call
    from asyncio (:mod:`.awaitable`).
    """

    static_shapes = True  # check every call's inputs against the traced shapes

    def __init__(self, name: str):
        self.name = name
        self._state = LoadState.UNLOADED
        self._held: tuple = (None, [])  # (runtime, process core indices counted in its models_per_core)
        self._finalizer = None

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def state(self) -> LoadState:
        return self._state

    def _to(self, new: LoadState) -> None:
        new = LoadState(new)
        if new is not self._state and new not in TRANSITIONS[self._state]:
            raise RuntimeError(f"{self.name}: a placed model cannot go from {self._state} to {new} "
                               f"(allowed: {', '.join(sorted(map(str, TRANSITIONS[self._state]))) or 'none'})")
        self._state = new

    def defer(self) -> None:
        """Load at the first call (or when DataParallel places it) instead of now: the ``lazy_load`` behaviour."""
        self._to(LoadState.LAZY)

    # -- the runtime's per-core tally ------------------------------------------------------------------------------
    def _hold(self, rt, ncs: list[int]) -> None:
        """Count this model on the process's cores ``ncs`` (it holds nothing else)."""
        self._unhold()
        for nc in ncs:
            rt.models_per_core[nc] += 1
        self._held = (rt, list(ncs))

    def _unhold(self) -> None:
        rt, ncs = self._held
        for nc in ncs:
            rt.models_per_core[nc] -= 1
        self._held = (None, [])

    # -- unload when collected -------------------------------------------------------------------------------------
    def _track(self, rt, placed: list[tuple[int, int]]) -> None:
        """When this object is collected, unload ``placed`` ((global core, model id) pairs) in the background."""
        self._untrack()
        self._finalizer = weakref.finalize(self, rt.unload_later, placed)

    def _untrack(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    # -- inputs ----------------------------------------------------------------------------------------------------
    @property
    def input_specs(self) -> list[dict] | None:
        """The traced inputs (``[{"shape": [...], "dtype": "float32"}, ...]``), or None when not recorded."""
        raise NotImplementedError

    def _expected(self):
        """The traced inputs as (shape, dtype) pairs, computed once."""
        exp = self.__dict__.get("_expected_cache")
        if exp is None and self.input_specs is not None:
            exp = self._expected_cache = [(tuple(s["shape"]), tensors.DTYPES.get(s["dtype"])) for s in self.input_specs]
        return exp

    def check_shapes(self, args: tuple) -> None:
        """Raise :class:`InputShapeError` unless ``args`` hold tensors of exactly the traced shapes and dtypes."""
        if not self.static_shapes:
            return
        expected = self._expected()
        if expected is None:
            return
        if len(args) == len(expected):  # the common case: flat tensor arguments of the traced shapes
            for a, (s, d) in zip(args, expected):
                if not (isinstance(a, torch.Tensor) and a.shape == s and a.dtype == d):
                    break
            else:
                return
        given = [(tuple(t.shape), t.dtype) for t in tensors.walk_tensors(args)]
        if given != expected:
            def fmt(pairs):
                return ", ".join(f"{tensors.dtype_name(d) if d is not None else '?'}{list(s)}" for s, d in pairs) \
                    or "none"

            raise InputShapeError(
                f"{self.name} was traced for inputs ({fmt(expected)}) but got ({fmt(given)}); traced models have "
                "static shapes: pad or split the input, trace again for this shape, or use DataParallel's dynamic "
                "batching or a bucketed model")
