"""Tracing: ``trace`` makes a TorchScript model and records its input shapes inside it (:mod:`.meta`);
``lazy_load`` and ``async_load`` record how it loads."""
from __future__ import annotations

import torch

from neuron_client.tracing.meta import META_FORMAT, get_meta, set_meta, tensor_specs, update_meta


def trace(model, example_inputs, *, input_output_aliases=None, **trace_kwargs) -> torch.jit.ScriptModule:
    """Trace ``model`` on ``example_inputs`` (a tensor or a tuple) for the cores, as ``torch_neuronx.trace`` does.

    Returns the self-placing module of :mod:`neuron_client.tracing.script`: called here, it runs the graph in this
    process; saved with ``torch.jit.save`` and loaded with ``torch.jit.load`` (after ``import neuron_client``) or
    ``neuron_client.jit.load``, it is placed on the loading process's cores. ``input_output_aliases`` ({state buffer:
    output index}) keeps those buffers on the core between calls, updated from the aliased outputs, which the call
    then no longer returns (see :mod:`neuron_client.tracing.io_aliases`).
    """
    from neuron_client.tracing import script

    examples = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    graph = trace_graph(model, examples, input_output_aliases=input_output_aliases, **trace_kwargs)
    name = getattr(model, "__name__", None) if not isinstance(model, torch.nn.Module) else type(model).__name__
    return script.wrap(graph, examples, get_meta(graph), f"{name or 'model'}.pt")


def trace_graph(model, example_inputs, *, input_output_aliases=None, **trace_kwargs) -> torch.jit.ScriptModule:
    """The traced graph itself (what a worker runs), with its record (input shapes, load flags, io_aliases)."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if input_output_aliases:
        from neuron_client.tracing import io_aliases as state

        traced, aliases = state.trace_with_state(model, example_inputs, input_output_aliases, **trace_kwargs)
        set_meta(traced, {"format": META_FORMAT, "inputs": tensor_specs(example_inputs), "lazy_load": False,
                          "async_load": False, "io_aliases": aliases,
                          "state_bytes": state.state_bytes(traced, aliases)})
        return traced
    if isinstance(model, torch.nn.Module):
        model = model.eval()
    elif callable(model):  # a plain function: trace it as a module so that the record has somewhere to live
        model = _FunctionModule(model)
    else:
        raise TypeError(f"trace expects a torch.nn.Module or a callable, got {type(model).__name__}")
    with torch.no_grad():
        traced = torch.jit.trace(model, example_inputs, **trace_kwargs)
    set_meta(traced, {"format": META_FORMAT, "inputs": tensor_specs(example_inputs),
                      "lazy_load": False, "async_load": False})
    return traced


def lazy_load(trace, enable_lazy_load: bool = True) -> None:
    """Delay loading onto a core until the first call (or DataParallel); saved inside the model file."""
    update_meta(trace, lazy_load=bool(enable_lazy_load))


def async_load(trace, enable_async_load: bool = True) -> None:
    """Make loading onto a core non-blocking; the first call waits for it. Saved inside the model file."""
    update_meta(trace, async_load=bool(enable_async_load))


class _FunctionModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


