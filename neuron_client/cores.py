"""Core sets: parsing ``NEURON_RT_VISIBLE_CORES`` / ``NEURON_RT_NUM_CORES`` and printing core ranges.

Pure functions, no I/O. Both the client and the broker use them, so a spec means the same on both sides.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import NeuronCoreSpecError

_ITEM = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")


def parse_visible_cores(text: str) -> list[int]:
    """Parse ``3``, ``4-5`` or ``0,2,4-5`` into a sorted list of distinct core indices.

    Ranges are inclusive. Ray's comma lists (``"0,1,2"``) parse too. Raises :class:`NeuronCoreSpecError`
    on anything else (``4-2``, ``-1``, ``x``, empty items, duplicates).
    """
    if text is None or not str(text).strip():
        raise NeuronCoreSpecError(
            "NEURON_RT_VISIBLE_CORES is empty: give core indices such as '3', '4-5' or '0,2,4-5'"
        )
    cores: list[int] = []
    for item in str(text).split(","):
        m = _ITEM.fullmatch(item)
        if not m:
            raise NeuronCoreSpecError(
                f"NEURON_RT_VISIBLE_CORES={text!r}: {item.strip()!r} is not a core index or an inclusive "
                "range; use forms such as '3', '4-5' or '0,2,4-5'"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise NeuronCoreSpecError(
                f"NEURON_RT_VISIBLE_CORES={text!r}: range {lo}-{hi} runs backwards; write it as {hi}-{lo}"
            )
        cores.extend(range(lo, hi + 1))
    if len(set(cores)) != len(cores):
        raise NeuronCoreSpecError(f"NEURON_RT_VISIBLE_CORES={text!r} names a core more than once")
    return sorted(cores)


def parse_num_cores(text: str) -> int:
    """Parse ``NEURON_RT_NUM_CORES``: a whole number >= 0 (0 means all cores)."""
    try:
        if not re.fullmatch(r"\s*-?[0-9]+\s*", str(text)):
            raise ValueError
        n = int(str(text).strip())
    except ValueError:
        raise NeuronCoreSpecError(
            f"NEURON_RT_NUM_CORES={text!r} is not a whole number; give a count such as '2' (0 means all cores)"
        ) from None
    if n < 0:
        raise NeuronCoreSpecError(f"NEURON_RT_NUM_CORES={text!r} is negative; give a count >= 0 (0 means all cores)")
    return n


def format_cores(cores) -> str:
    """``[0,1,2,3,6,7]`` -> ``nc0-nc3,nc6-nc7`` (the runtime's style); empty -> ``0``."""
    cores = sorted(set(cores))
    if not cores:
        return "0"
    parts = []
    start = prev = cores[0]
    for c in cores[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(f"nc{start}" if start == prev else f"nc{start}-nc{prev}")
        if c is not None:
            start = prev = c
    return ",".join(parts)


def format_visible(cores) -> str:
    """``[4,5,7]`` -> ``4-5,7``: the ``NEURON_RT_VISIBLE_CORES`` form of a core list."""
    return format_cores(cores).replace("nc", "") if cores else ""


@dataclass(frozen=True)
class CoreRequest:
    """What a process asks the broker for: exact cores, a contiguous count, or (both None) all cores."""

    visible: tuple[int, ...] | None = None
    count: int | None = None

    def describe(self) -> str:
        if self.visible is not None:
            return format_cores(self.visible)
        if self.count:
            return f"{self.count} contiguous NeuronCore(s)"
        return "all NeuronCores"


def request_from_env(env) -> CoreRequest:
    """The core request that a process's environment makes (VISIBLE_CORES wins over NUM_CORES)."""
    visible = env.get("NEURON_RT_VISIBLE_CORES")
    if visible is not None and visible.strip() != "":
        return CoreRequest(visible=tuple(parse_visible_cores(visible)))
    num = env.get("NEURON_RT_NUM_CORES")
    if num is not None and num.strip() != "":
        n = parse_num_cores(num)
        return CoreRequest(count=n or None)
    return CoreRequest()
