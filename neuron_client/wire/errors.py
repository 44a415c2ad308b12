"""One error shape for the whole runtime: a code and a message.

Every failure that crosses a socket travels as ``{"code": ..., "message": ...}`` and becomes one of
these named exceptions on the client side (see :func:`from_code`). Codes are declared here once.
"""
from __future__ import annotations


class NeuronRuntimeError(RuntimeError):
    """Base class of every error the runtime raises on purpose."""

    code = "RUNTIME"


class NeuronCoreUnavailableError(NeuronRuntimeError):
    """The cores a process asked for are held by other processes (or too few are free)."""

    code = "CORES_UNAVAILABLE"


class NeuronCoreSpecError(NeuronRuntimeError, ValueError):
    """A malformed or out-of-range core request (NEURON_RT_VISIBLE_CORES, NEURON_RT_NUM_CORES, ...)."""

    code = "BAD_CORE_SPEC"


class ConfigError(NeuronRuntimeError, ValueError):
    """An environment variable of the runtime with a value it cannot use; the message names the variable, the value
    and an example of a good one."""

    code = "BAD_CONFIG"


class BrokerUnavailableError(NeuronRuntimeError):
    """No broker answers at the configured address."""

    code = "BROKER_UNAVAILABLE"


class LeaseLostError(NeuronRuntimeError):
    """The broker no longer knows this process's lease (missed heartbeats, or released by an operator)."""

    code = "LEASE_LOST"


class NotOwnerError(NeuronRuntimeError):
    """A request reached a core that the sender does not own."""

    code = "NOT_OWNER"


class ModelLoadError(NeuronRuntimeError):
    """A model file could not be loaded onto a core."""

    code = "LOAD_ERROR"


class ModelExecutionError(NeuronRuntimeError):
    """The model raised while running on a core; the message names the core and the original error."""

    code = "MODEL_ERROR"


class UnknownModelError(NeuronRuntimeError):
    """The worker holds no model with the given id (it was unloaded, or the worker restarted)."""

    code = "UNKNOWN_MODEL"


class WorkerUnavailableError(NeuronRuntimeError):
    """The worker process of a core died or does not answer."""

    code = "WORKER_UNAVAILABLE"


class ProtocolError(NeuronRuntimeError):
    """A message that does not follow the wire format."""

    code = "PROTOCOL"


class InputShapeError(NeuronRuntimeError, ValueError):
    """Inputs whose shapes or dtypes differ from those the model was traced with."""

    code = "BAD_INPUT"


class RequestTimeoutError(NeuronRuntimeError, TimeoutError):
    """A request got no reply in time."""

    code = "TIMEOUT"


class BrokerDrainingError(NeuronRuntimeError):
    """The broker is shutting down or draining and grants nothing new."""

    code = "DRAINING"


class QueueFullError(NeuronRuntimeError):
    """A batched model's queue holds ``max_queue_size`` requests: this one was refused, not queued."""

    code = "QUEUE_FULL"


class QueueTimeoutError(RequestTimeoutError):
    """A request waited in a batched model's queue past its ``timeout_s`` and was refused before it ran."""

    code = "QUEUE_TIMEOUT"


ERRORS: dict[str, type[NeuronRuntimeError]] = {
    cls.code: cls
    for cls in (
        NeuronRuntimeError,
        NeuronCoreUnavailableError,
        NeuronCoreSpecError,
        ConfigError,
        BrokerUnavailableError,
        LeaseLostError,
        NotOwnerError,
        ModelLoadError,
        ModelExecutionError,
        UnknownModelError,
        WorkerUnavailableError,
        ProtocolError,
        InputShapeError,
        RequestTimeoutError,
        BrokerDrainingError,
        QueueFullError,
        QueueTimeoutError,
    )
}


def from_code(code: str, message: str) -> NeuronRuntimeError:
    """The named exception for an error reply (unknown codes become the base class)."""
    return ERRORS.get(code, NeuronRuntimeError)(message)


def code_of(exc: BaseException) -> str:
    """The wire code of an exception raised while handling a request."""
    if isinstance(exc, NeuronRuntimeError):
        return exc.code
    return NeuronRuntimeError.code
