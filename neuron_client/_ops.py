"""Registering Python ops with ``torch.library`` that TorchScript graphs call by name (the collectives of tensor
parallelism, the self-placing saved form)."""
from __future__ import annotations

_libraries: dict[str, object] = {}  # a registration lives as long as its library object


def define_ops(namespace: str, ops: dict[str, tuple[str, object]]) -> None:
    """Define ``namespace::name(schema)`` for each ``name: (schema, implementation)``, once per process (a module
    imported twice under two names registers nothing the second time)."""
    import torch

    if namespace in _libraries:
        return
    try:
        getattr(getattr(torch.ops, namespace), next(iter(ops)))  # registered by another copy of the module
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library(namespace, "DEF")
    for name, (schema, fn) in ops.items():
        lib.define(f"{name}{schema}")
        lib.impl(name, fn, "CompositeExplicitAutograd")
    _libraries[namespace] = lib
