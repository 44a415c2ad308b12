"""Run something once torch is imported: now if it already is, else right after its import finishes.

``import neuron_client`` must make its TorchScript ops exist (a file saved from ``neuron_client.trace`` calls them
when ``torch.jit.load`` reads it) without importing torch itself: a process that never uses torch (the broker, the
operator commands) must not pay for it. A one-shot import hook on ``torch`` does both.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def when_torch_imported(fn) -> None:
    if "torch" in sys.modules:
        fn()
        return
    sys.meta_path.insert(0, _AfterTorch(fn))


class _AfterTorch(importlib.abc.MetaPathFinder):
    def __init__(self, fn):
        self.fn = fn

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # one shot; the lookup below goes to the real finders
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, fn = spec.loader.exec_module, self.fn

        def exec_module(module):
            run(module)
            fn()

        spec.loader.exec_module = exec_module
        return spec
