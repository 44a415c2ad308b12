"""Checkpoints of tensor-parallel models, as ``neuronx_distributed.parallel_layers.load`` / ``save``.

* a full (unsharded) checkpoint is one file, ``torch.save({"model": state_dict})`` (or a bare state dict), of the
  model without parallel layers: :func:`load` with ``sharded=False`` slices each parallel parameter for the current
  rank (``partition_dim``) and takes every other tensor whole;
* a sharded checkpoint is a directory with one file per rank,
  ``DIR/tp_rank_{rank:02d}_pp_rank_00/checkpoint.pt``, as :func:`save` writes it from inside each rank.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, nothing executed.
"""
from __future__ import annotations

import os

import torch

from . import parallel_state


def shard_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"tp_rank_{rank:02d}_pp_rank_00", "checkpoint.pt")


def _read(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path!r} does not exist") from None


def shard_state_dict(model: torch.nn.Module, full: dict) -> dict:
    """This rank's slice of a full state dict, shaped like ``model``'s own (parallel) state dict."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_size()
    own = model.state_dict(keep_vars=True)
    out = dict(full)
    for name, param in own.items():
        if name not in full:
            continue
        t = full[name]
        if getattr(param, "tensor_model_parallel", False):
            dim = param.partition_dim
            if t.dim() != param.dim() or t.shape[dim] != param.shape[dim] * size:
                raise ValueError(f"checkpoint tensor {name} has shape {list(t.shape)}, which does not split into "
                                 f"{size} shards of {list(param.shape)} along dim {dim}")
            t = t.narrow(dim, rank * param.shape[dim], param.shape[dim])
        if t.shape != param.shape:
            raise ValueError(f"checkpoint tensor {name} has shape {list(t.shape)} but the model's is "
                             f"{list(param.shape)} (rank {rank} of {size})")
        out[name] = t.contiguous()
    return out


def load(chkpt_path: str, model: torch.nn.Module | None = None, model_key: str = "model", sharded: bool = True,
         strict: bool = True):
    """Load a checkpoint into ``model`` for the current tensor-parallel rank; returns the (rank's) state dict.

    ``sharded=False``: ``chkpt_path`` is one file holding the full model. ``sharded=True`` (the default, as in
    neuronx-distributed): a directory of per-rank shards written by :func:`save`.
    """
    if sharded:
        if os.path.isfile(chkpt_path):
            raise ValueError(f"{chkpt_path!r} is a single file: pass sharded=False to load a full (unsharded) "
                             "checkpoint into the sharded model")
        path = shard_path(chkpt_path, parallel_state.get_tensor_model_parallel_rank())
    else:
        if os.path.isdir(chkpt_path):
            raise ValueError(f"{chkpt_path!r} is a directory: pass sharded=True to load per-rank shards")
        path = chkpt_path
    state = _read(path)
    if model_key and isinstance(state, dict) and isinstance(state.get(model_key), dict):
        state = state[model_key]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(state).__name__}, not a state dict")
    if model is None:
        return state
    if not sharded:
        state = shard_state_dict(model, state)
    model.load_state_dict(state, strict=strict)
    return state


def save(checkpoint: dict, output_dir: str) -> str:
    """Write the current rank's ``checkpoint`` (e.g. ``{"model": model.state_dict()}``) into ``output_dir``."""
    path = shard_path(output_dir, parallel_state.get_tensor_model_parallel_rank())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({k: (_plain(v) if isinstance(v, dict) else v) for k, v in checkpoint.items()}, path)
    return path


def _plain(state: dict) -> dict:
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
