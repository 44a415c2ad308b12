"""Explicit core placement, as ``torch_neuronx.experimental`` names it (indices relative to the process's cores)."""
from __future__ import annotations

from neuron_client.models.neuron_model import as_neuron_model
from neuron_client.runtime.lease import get_runtime
from neuron_client.runtime.placement import (ALL, Placement, multicore_context, neuron_cores_context, validate_count,
                                             validate_start)


def set_neuron_cores(model, start_nc: int = -1, nc_count: int = -1) -> None:
    """Place (or re-place: unload, then load) ``model`` (from ``torch.jit.load`` or ``neuron_client.jit.load``) on
    ``nc_count`` replicas starting at ``start_nc``."""
    model = as_neuron_model(model, placed_only=True)
    available = get_runtime().num_cores
    validate_count(nc_count, available)
    validate_start(start_nc, available)
    model.place(Placement(start_nc, nc_count))


def set_multicore(model) -> None:
    """Replicate ``model`` on every core the process owns."""
    as_neuron_model(model, placed_only=True).place(Placement(0, ALL))


__all__ = ["neuron_cores_context", "multicore_context", "set_neuron_cores", "set_multicore"]
