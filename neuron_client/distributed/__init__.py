"""Tensor parallelism, shaped like ``neuronx_distributed``: code written for it ports by changing imports::

    import neuron_client.distributed as neuronx_distributed
    from neuron_client.distributed.parallel_layers import layers, parallel_state

    model = neuronx_distributed.trace.parallel_model_trace(get_model, example, tp_degree=2)
    neuronx_distributed.trace.parallel_model_save(model, "tp_models")
    model = neuronx_distributed.trace.parallel_model_load("tp_models")

Modules: ``parallel_layers`` (``layers``, ``parallel_state``, ``load`` / ``save``), ``trace``, ``collectives`` (the
``neuron::all_reduce`` / ``neuron::all_gather`` ops and process groups), ``weights`` (weight separation), ``model``
(the callable that runs all ranks).
"""
from . import collectives, parallel_layers, trace, weights
from .model import TensorParallelModel
from .trace import parallel_model_load, parallel_model_save, parallel_model_trace

__all__ = ["collectives", "parallel_layers", "trace", "weights", "TensorParallelModel", "parallel_model_trace",
           "parallel_model_save", "parallel_model_load"]
