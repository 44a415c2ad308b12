"""Weight separation: TorchScript graphs without their weights, and weights stored apart, shared across ranks once.

A traced module's weights are its parameters and buffers, by dotted name. :func:`strip` replaces each with a
zero-element tensor of its dtype (the graph file then carries no weights), :func:`restore` puts them back (in the
worker, from tensors the client sent). :func:`split_shared` finds the tensors identical on every rank (same name, same
content hash: embeddings, layer norms, replicated biases) so that a saved model stores them once::

    DIR/weights/shared.pt     {name: tensor} identical on every rank
    DIR/weights/rank{r}.pt    {name: tensor} of rank r only (its shards)

both written with ``torch.save`` of plain tensor dicts and read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import os

import torch

WEIGHTS_DIR = "weights"
SHARED_FILE = "shared.pt"


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def named_weights(module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by dotted name (a name held twice is listed once)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        out.setdefault(name, t.detach())
    return out


def _set(module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    module._c.setattr(leaf, value)


def strip(module) -> dict[str, torch.Tensor]:
    """Take the weights out of a ScriptModule (in place); returns them."""
    weights = named_weights(module)
    for name, t in weights.items():
        _set(module, name, torch.empty(0, dtype=t.dtype))
    return weights


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def split_shared(per_rank: list[dict]) -> tuple[dict, list[dict]]:
    """(tensors identical on every rank, each rank's remaining tensors); shared ones are stored once."""
    digests = [{name: digest(t) for name, t in w.items()} for w in per_rank]
    shared = {name: t for name, t in per_rank[0].items()
              if all(name in d and d[name] == digests[0][name] for d in digests[1:])}
    own = [{name: t for name, t in w.items() if name not in shared} for w in per_rank]
    return shared, own


def manifest(shared: dict, own: dict) -> dict:
    """What a rank's graph needs: {name: [dtype, shape, "shared" | "rank"]} (recorded in its metadata)."""
    out = {}
    for where, ws in (("shared", shared), ("rank", own)):
        for name, t in ws.items():
            out[name] = [str(t.dtype).replace("torch.", ""), list(t.shape), where]
    return out


def check_manifest(weights: dict, want: dict, rank: int, where: str) -> None:
    """Raise ValueError unless ``weights`` holds exactly what ``want`` (a manifest) lists, with the same dtypes and
    shapes."""
    missing = sorted(set(want) - set(weights))
    unexpected = sorted(set(weights) - set(want))
    if missing or unexpected:
        raise ValueError(f"rank {rank}'s weights in {where} do not match its graph: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, (dtype, shape, _) in want.items():
        t = weights[name]
        if str(t.dtype).replace("torch.", "") != dtype or list(t.shape) != shape:
            raise ValueError(f"rank {rank}'s weight {name} in {where} is {t.dtype}{list(t.shape)}, "
                             f"its graph expects {dtype}{shape}")


def save_files(directory: str, shared: dict, own: list[dict]) -> list[str]:
    wdir = os.path.join(directory, WEIGHTS_DIR)
    os.makedirs(wdir, exist_ok=True)
    written = [os.path.join(wdir, SHARED_FILE)]
    torch.save(dict(shared), written[0])
    for rank, ws in enumerate(own):
        written.append(os.path.join(wdir, rank_file(rank)))
        torch.save(dict(ws), written[-1])
    return written


def read_file(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} does not hold a dict of named tensors")
    return state
