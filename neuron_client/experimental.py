"""Explicit core placement, as ``torch_neuronx.experimental`` names it (indices relative to the process's cores)."""
from __future__ import annotations

from neuron_client.models.neuron_model import NeuronModel
from neuron_client.runtime.placement import (ALL, Placement, multicore_context, neuron_cores_context, validate_count,
                                             validate_start)


def set_neuron_cores(model: NeuronModel, start_nc: int = -1, nc_count: int = -1) -> None:
    """Place (or re-place: unload, then load) ``model`` on ``nc_count`` replicas starting at ``start_nc``."""
    validate_count(nc_count, 1 << 30)
    validate_start(start_nc, 1 << 30)
    _check_model(model)
    model.place(Placement(start_nc, nc_count))


def set_multicore(model: NeuronModel) -> None:
    """Replicate ``model`` on every core the process owns."""
    _check_model(model)
    model.place(Placement(0, ALL))


def _check_model(model) -> None:
    if not isinstance(model, NeuronModel):
        raise TypeError(f"expected a model from neuron_client.jit.load, got {type(model).__name__}")


__all__ = ["neuron_cores_context", "multicore_context", "set_neuron_cores", "set_multicore"]
