"""Backends map a core index to real compute: where each core runs (its CPUs, its GPU), as the broker decides and status
shows. How a worker sets itself up on that placement is :mod:`worker.devices`'. The broker never imports torch: the
cuda backend counts GPUs in a short-lived probe process.

* ``cpu``: core i is pinned to a set of host CPUs; more cores than CPUs is allowed (virtual cores share CPUs).
* ``cuda``: core i runs on GPU ``i // cores_per_gpu`` (see :class:`CudaBackend`).
"""
from __future__ import annotations

import os
import subprocess
import sys
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


@dataclass
class CudaBackend:
    name = "cuda"
    n_cores: int
    cores_per_gpu: int
    n_gpus: int
    threads: Threads = Threads()

    @classmethod
    def create(cls, n_cores: int, cores_per_gpu: int = 1, threads: Threads = Threads()) -> "CudaBackend":
        n_gpus = count_gpus()
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


BACKENDS = {"cpu": CpuBackend, "cuda": CudaBackend}

GPU_PROBE = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
GPU_PROBE_TIMEOUT_S = 120.0


def count_gpus() -> int:
    """The CUDA GPUs torch sees on this host (honouring ``CUDA_VISIBLE_DEVICES``), asked of a probe process so that
    torch and the CUDA driver stay out of the broker's own memory."""
    try:
        out = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True,
                             timeout=GPU_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"counting CUDA GPUs took over {GPU_PROBE_TIMEOUT_S:.0f} s (a hung driver?)") from None
    try:
        return int(out.stdout.split()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"counting CUDA GPUs failed: {out.stderr.strip()[-400:] or 'no output'}") from None
