"""DataParallel's pure logic: splitting inputs into chunks, padding pieces, gathering outputs. No sockets, no clock.

Inputs and outputs are any nesting of tensors, tuples (named ones too), lists and dicts; anything else is a leaf that
travels unchanged. Every tensor in an input must have the same size along the split dimension (the batch).

* :func:`chunk_sizes` is the reference rule: ``q, r = divmod(n, parts)``; the first ``r`` chunks get one extra item,
  and a batch smaller than ``parts`` makes only ``n`` chunks (never an empty one).
* :func:`split` cuts a nesting into chunks of given sizes (views, no copies); non-tensor leaves go to every chunk.
* :func:`piece_sizes`, :func:`pad` and :func:`trim` serve dynamic batching: a chunk is cut into pieces of the traced
  size, the last one zero-padded up to it, and the padding cut off the outputs again.
* :func:`gather` concatenates outputs in order, keeping their structure; a scalar output is unsqueezed (warning).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

SCALAR_WARNING = ("the model returns scalar outputs, which cannot be concatenated; DataParallel unsqueezes each "
                  "scalar and returns a vector with one entry per call")


def _is_namedtuple(obj) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields") and hasattr(obj, "_asdict")


def _rebuild(like, items: list):
    """A container of ``like``'s kind holding ``items`` (for a dict: its values, in key order)."""
    if isinstance(like, dict):
        return type(like)(zip(like.keys(), items))
    if _is_namedtuple(like):
        return type(like)(*items)
    if isinstance(like, tuple):
        return tuple(items)
    return list(items)


def _children(obj) -> list | None:
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple)):
        return list(obj)
    return None


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a nesting, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    kids = _children(obj)
    return [t for kid in kids for t in tensors(kid)] if kids is not None else []


def chunk_sizes(n: int, parts: int) -> list[int]:
    """Sizes of the chunks a batch of ``n`` makes over ``parts`` cores: divmod, the remainder to the first chunks."""
    if parts < 1:
        raise ValueError(f"cannot split over {parts} NeuronCores")
    if n < 0:
        raise ValueError(f"a batch cannot have {n} items")
    q, r = divmod(n, parts)
    return [q + 1 if i < r else q for i in range(min(n, parts))]


def piece_sizes(n: int, size: int) -> list[int]:
    """Real item counts of the pieces of the traced ``size`` that a chunk of ``n`` items makes (last may be short)."""
    if size < 1:
        raise ValueError(f"a piece must hold at least one item, not {size}")
    q, r = divmod(n, size)
    return [size] * q + ([r] if r else [])


def traced_size(specs: list[dict] | None, dim: int) -> int | None:
    """The size along ``dim`` that every traced input shares (``input_specs``), or None: unknown or not shared."""
    if not specs:
        return None
    sizes = set()
    for s in specs:
        shape = s["shape"]
        if not -len(shape) <= dim < len(shape):
            return None
        sizes.add(shape[dim])
    return sizes.pop() if len(sizes) == 1 else None


def batch_size(obj, dim: int) -> int | None:
    """The common size along ``dim`` of every tensor in ``obj`` (None: no tensors); ValueError if they differ."""
    found = tensors(obj)
    if not found:
        return None
    sizes = []
    for i, t in enumerate(found):
        if not -t.dim() <= dim < t.dim():
            raise ValueError(f"DataParallel splits its inputs along dim {dim}, but input tensor {i} has shape "
                             f"{list(t.shape)}, which has no dim {dim}")
        sizes.append(t.shape[dim])
    if len(set(sizes)) > 1:
        raise ValueError(f"DataParallel splits every input tensor along dim {dim}, so they must have the same size "
                         f"there; got sizes {sizes} (shapes {[list(t.shape) for t in found]})")
    return sizes[0]


def split(obj, sizes: list[int], dim: int) -> list:
    """``len(sizes)`` nestings shaped like ``obj``: its tensors cut along ``dim`` into consecutive runs of ``sizes``
    items (views), every other leaf shared by all chunks."""
    if isinstance(obj, torch.Tensor):
        total = sum(sizes)
        if obj.shape[dim] != total:
            raise ValueError(f"cannot split a tensor of shape {list(obj.shape)} into {sizes} along dim {dim}")
        return list(torch.split(obj, sizes, dim)) if sizes else []
    kids = _children(obj)
    if kids is None:
        return [obj for _ in sizes]
    per_kid = [split(kid, sizes, dim) for kid in kids]
    return [_rebuild(obj, [chunks[i] for chunks in per_kid]) for i in range(len(sizes))]


def pad(obj, size: int, dim: int):
    """``obj`` with each tensor zero-padded along ``dim`` up to ``size`` items (unchanged if already that long)."""
    if isinstance(obj, torch.Tensor):
        have = obj.shape[dim]
        if have == size:
            return obj
        if have > size:
            raise ValueError(f"cannot pad a tensor of {have} items along dim {dim} down to {size}")
        shape = list(obj.shape)
        shape[dim] = size - have
        return torch.cat([obj, obj.new_zeros(shape)], dim)
    kids = _children(obj)
    if kids is None:
        return obj
    return _rebuild(obj, [pad(kid, size, dim) for kid in kids])


def trim(obj, n: int, size: int, dim: int):
    """``obj`` with each tensor that has ``size`` items along ``dim`` cut back to its first ``n`` (undoes
    :func:`pad` on outputs); tensors of other shapes are left alone."""
    if isinstance(obj, torch.Tensor):
        if n == size or obj.dim() == 0 or not -obj.dim() <= dim < obj.dim() or obj.shape[dim] != size:
            return obj
        return obj.narrow(dim, 0, n)
    kids = _children(obj)
    if kids is None:
        return obj
    return _rebuild(obj, [trim(kid, n, size, dim) for kid in kids])


def gather(outputs: list, dim: int) -> Any:
    """One output from the outputs of consecutive chunks: tensors concatenated along ``dim`` in order; tuples,
    lists, dicts and None keep their structure; other leaves come back once if all chunks agree, else as a list."""
    if not outputs:
        raise ValueError("nothing to gather")
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(o, torch.Tensor) for o in outputs):
            raise ValueError(f"the chunks' outputs differ in kind: {[type(o).__name__ for o in outputs]}")
        if all(o.dim() == 0 for o in outputs):
            warnings.warn(SCALAR_WARNING, stacklevel=3)
            return torch.stack(outputs)
        if len(outputs) == 1:
            return first
        return torch.cat(outputs, dim)
    if first is None:
        return None
    kids = _children(first)
    if kids is not None:
        if isinstance(first, dict):
            keys = list(first.keys())
            for o in outputs:
                if not isinstance(o, dict) or list(o.keys()) != keys:
                    raise ValueError(f"the chunks' outputs are dicts with different keys: "
                                     f"{[list(o) if isinstance(o, dict) else type(o).__name__ for o in outputs]}")
            return _rebuild(first, [gather([o[k] for o in outputs], dim) for k in keys])
        for o in outputs:
            if not isinstance(o, (list, tuple)) or len(o) != len(kids):
                raise ValueError("the chunks' outputs are sequences of different lengths")
        return _rebuild(first, [gather([o[i] for o in outputs], dim) for i in range(len(kids))])
    if all(o == first for o in outputs):
        return first
    return list(outputs)
