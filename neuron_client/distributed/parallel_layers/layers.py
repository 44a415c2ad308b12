"""Tensor-parallel layers, as ``neuronx_distributed.parallel_layers.layers``.

* :class:`ColumnParallelLinear` splits the output features: rank ``r`` holds rows ``r*out/N .. (r+1)*out/N`` of the
  weight (and bias) and computes that slice of the output; ``gather_output=True`` all-gathers the full output.
* :class:`RowParallelLinear` splits the input features: rank ``r`` holds columns ``r*in/N ..`` of the weight, computes
  a partial product and all-reduces it; the bias is replicated and added once, after the reduction.
  ``input_is_parallel=True`` takes an input already split (a column-parallel layer's output without gathering).

The shard sizes come from ``parallel_state`` when the layer is built. Each split parameter carries
``tensor_model_parallel=True`` and ``partition_dim``, which ``parallel_layers.load`` uses to slice a full checkpoint.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import mappings, parallel_state


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int = 1) -> None:
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride


def _init_weight(weight: torch.Tensor, init_method) -> None:
    with torch.no_grad():
        if init_method is not None:
            init_method(weight)
        else:  # nn.Linear's default
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its output features over the tensor-parallel ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = True,
                 dtype: torch.dtype = torch.float32, device=None, stride: int = 1, init_method=None,
                 keep_master_weight: bool = False, skip_bias_add: bool = False):
        super().__init__()
        self.tensor_parallel_size = parallel_state.get_tensor_model_parallel_size()
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.output_size_per_partition = divide(output_size, self.tensor_parallel_size)
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size, dtype=dtype, device=device))
        _init_weight(self.weight, init_method)
        set_tensor_model_parallel_attributes(self.weight, True, 0, stride)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=dtype, device=device))
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, input: torch.Tensor):
        bias = None if self.skip_bias_add else self.bias
        output = F.linear(mappings.copy_to_tensor_model_parallel_region(input), self.weight, bias)
        if self.gather_output:
            output = mappings.gather_from_tensor_model_parallel_region(output)
        if self.skip_bias_add:
            return output, self.bias
        return output

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} ({self.output_size_per_partition} on this rank), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its input features over the tensor-parallel ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, stride: int = 1, init_method=None,
                 keep_master_weight: bool = False, skip_bias_add: bool = False):
        super().__init__()
        self.tensor_parallel_size = parallel_state.get_tensor_model_parallel_size()
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.input_size_per_partition = divide(input_size, self.tensor_parallel_size)
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition, dtype=dtype, device=device))
        _init_weight(self.weight, init_method)
        set_tensor_model_parallel_attributes(self.weight, True, 1, stride)
        if bias:  # replicated: every rank holds the whole bias
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    def forward(self, input: torch.Tensor):
        if not self.input_is_parallel:
            input = mappings.scatter_to_tensor_model_parallel_region(input)
        output = mappings.reduce_from_tensor_model_parallel_region(F.linear(input, self.weight))
        if self.skip_bias_add:
            return output, self.bias
        return output + self.bias if self.bias is not None else output

    def extra_repr(self) -> str:
        return (f"in={self.input_size} ({self.input_size_per_partition} on this rank), out={self.output_size}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}")
