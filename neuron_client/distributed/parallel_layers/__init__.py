"""Tensor-parallel building blocks, shaped like ``neuronx_distributed.parallel_layers``."""
from . import checkpointing, layers, mappings, parallel_state
from .checkpointing import load, save

__all__ = ["layers", "parallel_state", "mappings", "checkpointing", "load", "save"]
