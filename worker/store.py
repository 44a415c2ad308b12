"""The models a worker holds for its core's owner."""
from __future__ import annotations

import ctypes
import gc
import io
import itertools
import time
from dataclasses import dataclass

import torch

from neuron_client.errors import ModelLoadError, UnknownModelError


@dataclass
class Entry:
    model_id: int
    name: str
    module: torch.jit.ScriptModule
    nbytes: int
    requests: int = 0


def _trim_heap() -> None:
    """Give freed memory back to the OS (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - non-glibc
        pass


class ModelStore:
    def __init__(self, core: int, device: str):
        self.core = core
        self.device = device
        self.models: dict[int, Entry] = {}
        self._ids = itertools.count(1)

    def load(self, name: str, data: bytes) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            module = torch.jit.load(io.BytesIO(data), map_location=self.device)
        except Exception as exc:
            raise ModelLoadError(
                f"core {self.core} could not load {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                " (is it a TorchScript file saved with torch.jit.save?)"
            ) from None
        module.eval()
        model_id = next(self._ids)
        self.models[model_id] = Entry(model_id, name, module, len(data))
        return model_id, time.monotonic() - t0

    def get(self, model_id: int) -> Entry:
        entry = self.models.get(model_id)
        if entry is None:
            raise UnknownModelError(
                f"core {self.core} holds no model {model_id} (loaded: {sorted(self.models) or 'none'}); "
                "it was unloaded or the worker restarted: load it again"
            )
        return entry

    def unload(self, model_id: int) -> None:
        self.get(model_id)
        del self.models[model_id]
        gc.collect()
        _trim_heap()

    def clear(self) -> None:
        if self.models:
            self.models.clear()
            gc.collect()
            _trim_heap()

    def info(self) -> list[dict]:
        return [{"id": e.model_id, "name": e.name, "requests": e.requests, "bytes": e.nbytes}
                for e in self.models.values()]
