"""A worker's side of its core's placement: pin it to its CPUs, size torch's thread pools, take its GPU. Where each core
runs is the broker's decision (:mod:`broker.backends`); the worker receives it as a placement dict."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("neuron.worker")


def setup_threads(placement: dict) -> None:
    """Pin this (worker) process to its CPUs and size torch's thread pools."""
    import psutil
    import torch

    cpus = placement["cpus"]
    try:
        psutil.Process().cpu_affinity(cpus)
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        pass
    torch.set_num_threads(placement.get("intra_op_threads") or len(cpus))
    try:
        torch.set_num_interop_threads(placement.get("inter_op_threads") or len(cpus))
    except RuntimeError as exc:  # the pool already started in this process
        log.warning("could not set inter-op threads: %s", exc)
    log.info("pinned to cpus %s; torch intra-op threads %d, inter-op threads %d", cpus, torch.get_num_threads(),
             torch.get_num_interop_threads())


def setup_cuda(placement: dict) -> str:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(placement["gpu"])
    import torch

    setup_threads(placement)
    torch.cuda.set_device(0)
    torch.cuda.set_per_process_memory_fraction(placement["memory_fraction"], 0)
    return "cuda:0"


def setup_worker(backend: str, placement: dict) -> str:
    """Set this worker process up for its core; returns the torch device."""
    if backend == "cuda":
        return setup_cuda(placement)
    setup_threads(placement)
    return "cpu"


def device_stats(device: str) -> dict:
    """Device memory this worker holds and the driver's utilisation of its GPU (cuda); nothing for the cpu."""
    if not device.startswith("cuda"):
        return {}
    import torch

    out = {"device_memory": int(torch.cuda.memory_reserved(0))}
    try:
        out["device_util"] = float(torch.cuda.utilization(0))  # through NVML, when the driver offers it
    except Exception:  # no pynvml / NVML: unknown, not zero
        out["device_util"] = None
    return out
