"""The models a worker holds for its core's owner."""
from __future__ import annotations

import ctypes
import gc
import io
import itertools
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from neuron_client.distributed import collectives
from neuron_client.wire.errors import ModelLoadError, ProtocolError, UnknownModelError
from neuron_client.wire.messages import GroupSpec
from neuron_client.wire.status import ModelStatus

from . import groups
from .weights import restore as restore_weights

GROUP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_GROUP_SIZE = 1024


@dataclass
class Entry:
    model_id: int
    name: str
    module: torch.jit.ScriptModule
    nbytes: int
    requests: int = 0
    failures: int = 0
    inferences: int = 0
    queue_s: float = 0.0
    compute_s: float = 0.0
    group: Any = None  # collectives.Group of a tensor-parallel rank: its collectives run in it
    forward: Any = None  # the module's forward method: a call skips nn.Module.__call__ (a TorchScript module has no
    # Python hooks to run)

    def __post_init__(self):
        if self.forward is None:
            self.forward = getattr(self.module, "forward", self.module)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> None:
    """Keep freed activation buffers in the heap between calls.

    With glibc's defaults a call's large temporaries are mmap'd and unmapped again, and the next call faults them in
    anew: about 12,000 minor page faults per all-MiniLM-L6-v2 call in a worker, against almost none in a long-lived
    process whose thresholds glibc has already raised (scripts/bench, e2e). Unloads still give memory back
    (:func:`_trim_heap`).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    except (OSError, AttributeError):  # pragma: no cover - non-glibc
        pass


def _trim_heap() -> None:
    """Give freed memory back to the OS (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - non-glibc
        pass


class ModelStore:
    """The models loaded in one worker: id -> TorchScript module, its name, its tensor-parallel group, its counters.

    Owns the loaded modules and the process groups their ranks joined. Changed only by the worker's data thread
    (``load``, ``unload``, ``clear`` when the worker stops); the control thread reads :meth:`info` for the stats.
    """

    def __init__(self, core: int, device: str, rendezvous_dir: str | None = None):
        self.core = core
        self.device = device
        self.rendezvous_dir = rendezvous_dir  # where tensor-parallel groups meet (FileStore files)
        self.models: dict[int, Entry] = {}
        self._ids = itertools.count(1)

    def load(self, name: str, data: bytes, weights: dict | None = None, group: GroupSpec | None = None
             ) -> tuple[int, float]:
        """Load a TorchScript file; put separated ``weights`` into it; join tensor-parallel ``group``."""
        t0 = time.monotonic()
        spec = self._group_spec(group) if group is not None else None
        if weights is not None and not (isinstance(weights, dict) and all(isinstance(k, str) for k in weights)):
            raise ProtocolError("load: 'weights' must be a map of names to tensors")
        try:
            module = torch.jit.load(io.BytesIO(data), map_location=self.device)
        except Exception as exc:
            raise ModelLoadError(
                f"core {self.core} could not load {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                " (is it a TorchScript file saved with torch.jit.save?)"
            ) from None
        nbytes = len(data)
        if weights is not None:
            try:
                nbytes += restore_weights(module, weights, self.device)
            except ValueError as exc:
                raise ModelLoadError(f"core {self.core} could not load {name!r}: {exc}") from None
        module.eval()
        pg = self._join(name, spec) if spec is not None else None
        model_id = next(self._ids)
        self.models[model_id] = Entry(model_id, name, module, nbytes, group=pg)
        return model_id, time.monotonic() - t0

    @staticmethod
    def _group_spec(group: GroupSpec) -> tuple[str, int, int]:
        """The group's (name, rank, size); the codec checked their types, this checks their values."""
        ok = isinstance(group, GroupSpec)
        name, rank, size = (group.name, group.rank, group.size) if ok else (None, None, None)
        if not (ok and isinstance(name, str) and GROUP_NAME.match(name) and type(size) is int
                and 1 <= size <= MAX_GROUP_SIZE and type(rank) is int and 0 <= rank < size):
            raise ProtocolError("load: 'group' must be {name: [A-Za-z0-9_-]{1,64}, rank: 0..size-1, "
                                f"size: 1..{MAX_GROUP_SIZE}}}, got {group!r}")
        return name, rank, size

    def _join(self, model: str, spec: tuple[str, int, int]) -> "collectives.Group":
        name, rank, size = spec
        if self.rendezvous_dir is None:
            raise ModelLoadError(f"core {self.core} has no rendezvous directory for tensor-parallel groups")
        path = os.path.join(self.rendezvous_dir, f"tp-{name}.store")  # named by the worker, never by the client
        try:
            group = groups.form_group(name, rank, size, path, self.device)
        except Exception as exc:
            raise ModelLoadError(
                f"core {self.core} could not join process group {name} as rank {rank} of {size} for {model!r} "
                f"within {collectives.COLLECTIVE_TIMEOUT_S:.0f}s: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''} (did every rank's load reach its core?)") from None
        collectives.register(group)
        return group

    def get(self, model_id: int) -> Entry:
        entry = self.models.get(model_id)
        if entry is None:
            raise UnknownModelError(
                f"core {self.core} holds no model {model_id} (loaded: {sorted(self.models) or 'none'}); "
                "it was unloaded or the worker restarted: load it again"
            )
        return entry

    def unload(self, model_id: int) -> None:
        _drop_group(self.get(model_id))
        del self.models[model_id]
        gc.collect()
        _trim_heap()

    def clear(self) -> None:
        if self.models:
            for entry in self.models.values():
                _drop_group(entry)
            self.models.clear()
            gc.collect()
            _trim_heap()

    def info(self) -> list[ModelStatus]:
        return [ModelStatus(id=e.model_id, name=e.name, requests=e.requests, bytes=e.nbytes, failures=e.failures,
                            inferences=e.inferences, queue_s=e.queue_s, compute_s=e.compute_s)
                for e in self.models.values()]


def _drop_group(entry: Entry) -> None:
    if entry.group is not None:
        collectives.unregister(entry.group.name)
        entry.group.close()
        entry.group = None
