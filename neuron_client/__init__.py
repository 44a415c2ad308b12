"""neuron_client: run TorchScript models on cores owned exclusively by this process.

The API mirrors torch-neuronx, so code written for it ports by changing imports::

    import neuron_client
    traced = neuron_client.trace(model, example)
    torch.jit.save(traced, "model.pt")
    m = neuron_client.jit.load("model.pt")   # placed on this process's nc0
    y = m(example)                            # runs in that core's worker process

The package is laid out by concern; this face names the public API and imports each name's module on first use, so
``import neuron_client`` is cheap:

- the torch-neuronx face: :mod:`.jit`, :mod:`.experimental`, and the names below;
- :mod:`.wire`: the kernel the broker, the workers and the operator commands share (messages, codec, tensors, errors,
  comm, shm, config, cores, lease_link, procs, status); it imports nothing above it, and torch only when a tensor is
  encoded or decoded;
- :mod:`.runtime`: the process's lease, its channels to the workers, broker autostart, placement;
- :mod:`.models`: models placed on cores (``NeuronModel``, ``DataParallel``) and their shared lifecycle, ``acall``
  from asyncio, and ``batched`` (a request batcher: many callers' requests in one execution);
- :mod:`.tracing`: trace, bucketing, io_aliases (state kept on the core);
- :mod:`.generation`, :mod:`.distributed` (tensor parallelism), :mod:`.integrations` (Ray), :mod:`.tools` (launch).
"""
from ._lazy import exports
from ._torch_hook import when_torch_imported

__version__ = "0.1.0"

_ERRORS = ("BrokerUnavailableError", "ConfigError", "InputShapeError", "LeaseLostError", "ModelExecutionError", "ModelLoadError",
           "NeuronCoreSpecError", "NeuronCoreUnavailableError", "NeuronRuntimeError", "NotOwnerError",
           "WorkerUnavailableError", "QueueFullError", "QueueTimeoutError")

__getattr__, __dir__ = exports(__name__, {
    "jit": "jit", "experimental": "experimental", "errors": "wire.errors", "state": "tracing.io_aliases",
    "trace": "tracing.trace:trace", "lazy_load": "tracing.trace:lazy_load", "async_load": "tracing.trace:async_load",
    "BucketModelConfig": "tracing.bucketing:BucketModelConfig",
    "bucket_model_trace": "tracing.bucketing:bucket_model_trace",
    "NeuronModel": "models.neuron_model:NeuronModel", "DataParallel": "models.data_parallel:DataParallel",
    "batched": "models.batcher:batched", "BatchedModel": "models.batcher:BatchedModel",
    "get_runtime": "runtime.lease:get_runtime", "shutdown": "runtime.lease:shutdown",
    "generate": "generation.generate:generate",
    **{name: f"wire.errors:{name}" for name in _ERRORS},
})

__all__ = [
    "trace", "lazy_load", "async_load", "jit", "experimental", "errors", "NeuronModel", "get_runtime", "shutdown",
    "DataParallel", "batched", "BatchedModel", *_ERRORS, "BucketModelConfig", "bucket_model_trace", "generate", "state",
]


def _register_ops() -> None:
    """The ops a saved model calls when ``torch.jit.load`` reads it (:mod:`neuron_client.tracing.script`)."""
    import importlib

    importlib.import_module("neuron_client.tracing.script")  # importing it registers them


when_torch_imported(_register_ops)
