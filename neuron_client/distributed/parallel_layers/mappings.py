"""Moving activations between tensor-parallel ranks (forward only: this is an inference runtime).

With one rank every mapping is the identity, so a model built with parallel layers traces without collectives.
"""
from __future__ import annotations

import torch

from .. import collectives
from . import parallel_state


def _size() -> int:
    return parallel_state.get_tensor_model_parallel_size()


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Every rank uses the whole input (the identity in the forward pass)."""
    return x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the ranks (all-reduce)."""
    return x if _size() == 1 else collectives.all_reduce(x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """The ranks' ``x`` concatenated along the last dimension, in rank order (all-gather)."""
    size = _size()
    return x if size == 1 else collectives.all_gather(x, x.dim() - 1, size)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous chunk of the last dimension (no communication)."""
    size = _size()
    if size == 1:
        return x
    if not torch.jit.is_tracing() and x.shape[-1] % size:
        raise ValueError(f"the last dimension ({x.shape[-1]}) does not split evenly over {size} tensor-parallel "
                         "ranks")
    return x.chunk(size, -1)[parallel_state.get_tensor_model_parallel_rank()].contiguous()
