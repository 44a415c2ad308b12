"""Putting a tensor-parallel rank's separated weights back into its weight-less graph, in the worker that loads it
(the client side, :mod:`neuron_client.distributed.weights`, takes them out and saves them)."""
from __future__ import annotations

import torch

from neuron_client.distributed.weights import _set, named_weights


def restore(module, weights: dict, device="cpu") -> int:
    """Put ``weights`` into a weight-less ScriptModule; they must name exactly its parameters and buffers.

    Returns the bytes restored. The tensors are copied (the caller's may be views of a reused buffer).
    """
    expected = named_weights(module)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the weights do not match the graph: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                         f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    total = 0
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"weight {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype != expected[name].dtype:
            raise ValueError(f"weight {name!r} is {t.dtype} but the graph holds {expected[name].dtype}")
        _set(module, name, t.to(device, copy=True))
        total += t.numel() * t.element_size()
    return total
