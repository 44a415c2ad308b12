"""Backends map a core index to real compute. A backend is small: where a core runs, and how to set a worker up.

* ``cpu``: core i is pinned to a set of host CPUs; more cores than CPUs is allowed (virtual cores share CPUs).
* ``cuda``: core i runs on GPU ``i // cores_per_gpu`` (see :class:`CudaBackend`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def host_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return list(range(os.cpu_count() or 1))


def cpus_for_core(core: int, n_cores: int, cpus: list[int]) -> list[int]:
    """The host CPUs of ``core``: an even, disjoint split when there are enough CPUs, else round-robin sharing."""
    n_cpus = len(cpus)
    if n_cores <= n_cpus:
        lo, hi = core * n_cpus // n_cores, (core + 1) * n_cpus // n_cores
        return cpus[lo:hi]
    return [cpus[core % n_cpus]]


@dataclass
class CpuBackend:
    name = "cpu"
    n_cores: int
    cpus: list[int]

    @classmethod
    def create(cls, n_cores: int, cores_per_gpu: int = 1) -> "CpuBackend":
        return cls(n_cores=n_cores, cpus=host_cpus())

    def placement(self, core: int) -> dict:
        """What status shows for the core, and what its worker needs to set itself up."""
        return {"device": "cpu", "cpus": cpus_for_core(core, self.n_cores, self.cpus)}

    @staticmethod
    def setup_worker(placement: dict) -> str:
        """Pin this (worker) process and size torch's thread pools; returns the torch device."""
        import psutil
        import torch

        cpus = placement["cpus"]
        try:
            psutil.Process().cpu_affinity(cpus)
        except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
            pass
        torch.set_num_threads(len(cpus))
        try:
            torch.set_num_interop_threads(max(1, len(cpus)))
        except RuntimeError:  # already set in this process
            pass
        return "cpu"


@dataclass
class CudaBackend:
    name = "cuda"
    n_cores: int
    cores_per_gpu: int
    n_gpus: int

    @classmethod
    def create(cls, n_cores: int, cores_per_gpu: int = 1) -> "CudaBackend":
        import torch

        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus == 0:
            raise RuntimeError(
                "--backend cuda needs a CUDA GPU, but torch sees none (torch.cuda.is_available() is False); "
                "use --backend cpu on this host, or install a CUDA build of torch on a machine with a GPU"
            )
        if cores_per_gpu < 1:
            raise RuntimeError(f"--cores-per-gpu must be at least 1, got {cores_per_gpu}")
        if n_cores > n_gpus * cores_per_gpu:
            raise RuntimeError(
                f"--cores {n_cores} with --cores-per-gpu {cores_per_gpu} needs {-(-n_cores // cores_per_gpu)} GPUs "
                f"but this host has {n_gpus}; use --cores {n_gpus * cores_per_gpu} or raise --cores-per-gpu"
            )
        return cls(n_cores=n_cores, cores_per_gpu=cores_per_gpu, n_gpus=n_gpus)

    def placement(self, core: int) -> dict:
        gpu = core // self.cores_per_gpu
        return {"device": f"cuda:{gpu}", "gpu": gpu, "memory_fraction": 1.0 / self.cores_per_gpu,
                "cpus": cpus_for_core(core, self.n_cores, host_cpus())}

    @staticmethod
    def setup_worker(placement: dict) -> str:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(placement["gpu"])
        import torch

        CpuBackend.setup_worker(placement)
        torch.cuda.set_device(0)
        torch.cuda.set_per_process_memory_fraction(placement["memory_fraction"], 0)
        return "cuda:0"


BACKENDS = {"cpu": CpuBackend, "cuda": CudaBackend}


def setup_worker(backend: str, placement: dict) -> str:
    return BACKENDS[backend].setup_worker(placement)
