"""Lazy package faces (PEP 562): a package names what it exports, and a name's module is imported on first use.

``import neuron_client`` then costs almost nothing: torch, ZeroMQ and the runtime load when the first name that needs
them is touched, and a process that only needs the wire kernel (the broker, the operator commands) never loads them.
"""
from __future__ import annotations

import importlib


def exports(package: str, names: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps an exported name to ``"module"`` (a submodule,
    relative to the package) or ``"module:attr"``."""

    def __getattr__(name: str):
        target = names.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        value = importlib.import_module(f"{package}.{module}")
        if attr:
            value = getattr(value, attr)
        importlib.import_module(package).__dict__[name] = value  # cached: the next lookup is a plain attribute
        return value

    def __dir__():
        return sorted(set(names) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__
