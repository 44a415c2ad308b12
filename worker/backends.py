"""Backends map a core index to real compute. A backend is small: where a core runs, and how to set a worker up.

* ``cpu``: core i is pinned to a set of host CPUs; more cores than CPUs is allowed (virtual cores share CPUs).
* ``cuda``: core i runs on GPU ``i // cores_per_gpu`` (see :class:`CudaBackend`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("neuron.worker")


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


@dataclass(frozen=True)
class Threads:
    """torch's thread pools in each worker; 0 = as many as the core has CPUs.

    Intra-op threads split one operator (a large matmul); inter-op threads run ``torch.jit.fork`` tasks side by side.
    Small operators (an LSTM cell of a few hundred units) gain nothing from intra-op threads and lose to their
    hand-offs, so a model that forks its work runs best with ``intra=1`` and ``inter`` = the core's CPUs.
    """

    intra: int = 0
    inter: int = 0

    def for_cpus(self, n_cpus: int) -> dict:
        return {"intra_op_threads": self.intra or n_cpus, "inter_op_threads": self.inter or n_cpus}


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


@dataclass
class CpuBackend:
    name = "cpu"
    n_cores: int
    cpus: list[int]
    threads: Threads = Threads()

    @classmethod
    def create(cls, n_cores: int, cores_per_gpu: int = 1, threads: Threads = Threads()) -> "CpuBackend":
        return cls(n_cores=n_cores, cpus=host_cpus(), threads=threads)

    def placement(self, core: int) -> dict:
        """What status shows for the core, and what its worker needs to set itself up."""
        cpus = cpus_for_core(core, self.n_cores, self.cpus)
        return {"device": "cpu", "cpus": cpus, **self.threads.for_cpus(len(cpus))}

    @staticmethod
    def setup_worker(placement: dict) -> str:
        """Set this worker process up for its core; returns the torch device."""
        setup_threads(placement)
        return "cpu"


@dataclass
class CudaBackend:
    name = "cuda"
    n_cores: int
    cores_per_gpu: int
    n_gpus: int
    threads: Threads = Threads()

    @classmethod
    def create(cls, n_cores: int, cores_per_gpu: int = 1, threads: Threads = Threads()) -> "CudaBackend":
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
        return cls(n_cores=n_cores, cores_per_gpu=cores_per_gpu, n_gpus=n_gpus, threads=threads)

    def placement(self, core: int) -> dict:
        gpu = core // self.cores_per_gpu
        cpus = cpus_for_core(core, self.n_cores, host_cpus())
        return {"device": f"cuda:{gpu}", "gpu": gpu, "memory_fraction": 1.0 / self.cores_per_gpu,
                "cpus": cpus, **self.threads.for_cpus(len(cpus))}

    @staticmethod
    def setup_worker(placement: dict) -> str:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(placement["gpu"])
        import torch

        setup_threads(placement)
        torch.cuda.set_device(0)
        torch.cuda.set_per_process_memory_fraction(placement["memory_fraction"], 0)
        return "cuda:0"


BACKENDS = {"cpu": CpuBackend, "cuda": CudaBackend}


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


def setup_worker(backend: str, placement: dict) -> str:
    return BACKENDS[backend].setup_worker(placement)
