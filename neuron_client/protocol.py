"""Moved: the wire format is now :mod:`neuron_client.wire.messages` (message types), :mod:`~neuron_client.wire.codec`
(encode, decode) and :mod:`~neuron_client.wire.tensors` (tensor bytes). This path keeps working for one release and
re-exports all three."""
import warnings

from .wire import codec as _codec, messages as _messages, tensors as _tensors

warnings.warn("neuron_client.protocol moved to neuron_client.wire (messages, codec, tensors); the old path goes in the "
              "next release", DeprecationWarning, stacklevel=2)
for _module in (_messages, _codec, _tensors):
    globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
del _module
