"""neuron_client: run TorchScript models on cores owned exclusively by this process.

The API mirrors torch-neuronx, so code written for it ports by changing imports::

    import neuron_client
    traced = neuron_client.trace(model, example)
    torch.jit.save(traced, "model.pt")
    m = neuron_client.jit.load("model.pt")   # placed on this process's nc0
    y = m(example)                            # runs in that core's worker process
"""
from . import errors, experimental, jit
from .data_parallel import DataParallel
from .errors import (BrokerUnavailableError, InputShapeError, LeaseLostError, ModelExecutionError, ModelLoadError,
                     NeuronCoreSpecError, NeuronCoreUnavailableError, NeuronRuntimeError, NotOwnerError,
                     WorkerUnavailableError)
from .model import NeuronModel
from .runtime import get_runtime, shutdown
from .tracing import async_load, lazy_load, trace
from . import state  # io_aliases: state kept on the core; TrafficMeter
from .bucketing import BucketModelConfig, bucket_model_trace
from .generation import generate

__version__ = "0.1.0"

__all__ = [
    "trace", "lazy_load", "async_load", "jit", "experimental", "errors", "NeuronModel", "get_runtime", "shutdown",
    "DataParallel",
    "NeuronRuntimeError", "NeuronCoreUnavailableError", "NeuronCoreSpecError", "BrokerUnavailableError",
    "LeaseLostError", "ModelExecutionError", "ModelLoadError", "NotOwnerError", "WorkerUnavailableError",
    "InputShapeError",
    "BucketModelConfig", "bucket_model_trace", "generate", "state",
]
