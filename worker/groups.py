"""Forming a tensor-parallel model's process group, in the worker that runs one of its ranks.

The group (``torch.distributed``, without ``init_process_group``: gloo for CPU tensors, NCCL for CUDA ones) is
registered with :mod:`neuron_client.distributed.collectives`, whose ops the traced graphs call.
"""
from __future__ import annotations

import datetime
import os

import torch

from neuron_client.distributed.collectives import COLLECTIVE_TIMEOUT_S, CollectiveError, Group


def form_group(name: str, rank: int, size: int, store_path: str, device: str = "cpu",
               timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Group:
    """Join group ``name`` as ``rank`` of ``size`` (blocks until every rank has joined, at most ``timeout_s``)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise CollectiveError("this torch build has no torch.distributed")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.FileStore(store_path, size)
    store.set_timeout(timeout)
    if str(device).startswith("cuda"):
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, size, opts)
    else:
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        pg = dist.ProcessGroupGloo(store, rank, size, opts)
    group = Group(name, rank, size, pg, store_path)
    # Every rank's mesh is complete only once every rank has returned from the constructor: a rank that went on and
    # closed the group before then would fail a slower peer's connection. One collective settles it.
    group.all_reduce(torch.zeros(1, device=device))
    if rank == 0:  # every rank is past the rendezvous: the store's file has served (a FileStore whose file is gone
        try:       # does not recreate it), and no dead rank can leave it behind
            os.unlink(store_path)
        except OSError:
            pass
    return group
