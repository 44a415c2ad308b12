"""Core sets: parsing ``NEURON_RT_VISIBLE_CORES`` / ``NEURON_RT_NUM_CORES`` and printing core ranges.

Pure functions, no I/O. Both the client and the broker use them, so a spec means the same on both sides. Every number
is bounded before anything is expanded: no index of :data:`MAX_CORES` or more, no count above it, no number longer
than :data:`MAX_DIGITS` digits, so ``0-10000000`` is refused at once instead of building a list of ten million cores.
A ``bool`` is never a core index or a count, although Python counts ``True`` as the int 1.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from neuron_client.wire.errors import NeuronCoreSpecError

MAX_CORES = 4096  # no host has more NeuronCores (the largest has a few hundred); indices are 0..MAX_CORES-1
MAX_DIGITS = 6  # a number with more digits (leading zeros aside) is refused before int() sees it
MAX_SPEC_CHARS = 64 * 1024  # every core of the largest host listed one by one, with spaces, fits
VISIBLE_EXAMPLES = "'3', '4-5' or '0,2,4-5'"

_ITEM = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")
_COUNT = re.compile(r"\s*(-?)([0-9]+)\s*")


def _shown(text: str, limit: int = 60) -> str:
    """``repr`` of a spec, cut short: an error never echoes megabytes back."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _visible_error(text: str, why: str) -> NeuronCoreSpecError:
    return NeuronCoreSpecError(f"NEURON_RT_VISIBLE_CORES={_shown(text)}: {why}; use forms such as {VISIBLE_EXAMPLES}")


def _number(digits: str) -> int | None:
    """The value of a string of ASCII digits, or None if it has more than :data:`MAX_DIGITS` (leading zeros aside)."""
    significant = digits.lstrip("0")
    return None if len(significant) > MAX_DIGITS else int(significant or "0")


def _index(digits: str, text: str) -> int:
    """A core index from its digits, refused unless below :data:`MAX_CORES`."""
    n = _number(digits)
    if n is None or n >= MAX_CORES:
        shown = digits if len(digits) <= 12 else digits[:12] + "..."
        raise _visible_error(text, f"core {shown} is out of range: a host has at most {MAX_CORES} cores "
                                   f"(indices 0-{MAX_CORES - 1})")
    return n


def parse_visible_cores(text: str) -> list[int]:
    """Parse ``3``, ``4-5`` or ``0,2,4-5`` into a sorted list of distinct core indices.

    Ranges are inclusive. Ray's comma lists (``"0,1,2"``) parse too. Raises :class:`NeuronCoreSpecError`
    on anything else (``4-2``, ``-1``, ``x``, empty items, duplicates, indices of :data:`MAX_CORES` or more).
    """
    if text is None or isinstance(text, bool) or not str(text).strip():
        raise NeuronCoreSpecError(
            f"NEURON_RT_VISIBLE_CORES is empty: give core indices such as {VISIBLE_EXAMPLES}"
        )
    text = str(text)
    if len(text) > MAX_SPEC_CHARS:
        raise _visible_error(text, f"the list is {len(text)} characters long, more than the {MAX_SPEC_CHARS} "
                                   f"that every core of a {MAX_CORES}-core host needs")
    seen: set[int] = set()
    for item in text.split(","):
        m = _ITEM.fullmatch(item)
        if not m:
            raise _visible_error(text, f"{_shown(item.strip(), 20)} is not a core index or an inclusive range")
        lo = _index(m.group(1), text)
        hi = _index(m.group(2), text) if m.group(2) is not None else lo
        if hi < lo:
            raise NeuronCoreSpecError(
                f"NEURON_RT_VISIBLE_CORES={_shown(text)}: range {lo}-{hi} runs backwards; write it as {hi}-{lo}"
            )
        span = range(lo, hi + 1)  # at most MAX_CORES long, and every core in it is new or we stop
        if not seen.isdisjoint(span):
            raise NeuronCoreSpecError(f"NEURON_RT_VISIBLE_CORES={_shown(text)} names a core more than once")
        seen.update(span)
    return sorted(seen)


def parse_num_cores(text: str) -> int:
    """Parse ``NEURON_RT_NUM_CORES``: a whole number from 0 (all cores) to :data:`MAX_CORES`."""
    m = None if isinstance(text, bool) else _COUNT.fullmatch(str(text))
    if not m:
        raise NeuronCoreSpecError(
            f"NEURON_RT_NUM_CORES={_shown(str(text))} is not a whole number; give a count such as '2' "
            "(0 means all cores)"
        )
    sign, digits = m.groups()
    if sign and digits.strip("0"):
        raise NeuronCoreSpecError(
            f"NEURON_RT_NUM_CORES={_shown(str(text))} is negative; give a count >= 0 (0 means all cores)")
    n = _number(digits)
    if n is None or n > MAX_CORES:
        raise NeuronCoreSpecError(
            f"NEURON_RT_NUM_CORES={_shown(str(text))} asks for more cores than a host has (at most {MAX_CORES}); "
            "give a count such as '2' (0 means all cores)")
    return n


def _integer(c, what: str) -> int:
    """``c`` as an int (numpy's integers too), never a bool."""
    if isinstance(c, bool):
        raise NeuronCoreSpecError(f"{what}: {c!r} is a boolean, not a core index or count; give integers such as 2")
    try:
        return operator.index(c)
    except TypeError:
        raise NeuronCoreSpecError(f"{what}: {c!r} is not a core index or count; give integers such as 2") from None


def format_cores(cores) -> str:
    """``[0,1,2,3,6,7]`` -> ``nc0-nc3,nc6-nc7`` (the runtime's style); empty -> ``0``."""
    if isinstance(cores, range) and cores.step == 1:  # printed as it is, however long (error messages)
        return "0" if not cores else (f"nc{cores.start}" if len(cores) == 1 else f"nc{cores.start}-nc{cores[-1]}")
    cores = sorted({_integer(c, "format_cores") for c in cores})
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
    """What a process asks the broker for: exact cores, a contiguous count, or (both None) all cores.

    Indices and the count must be integers, never bools (the broker builds one from a client's message); the
    allocator checks their range against the host.
    """

    visible: tuple[int, ...] | None = None
    count: int | None = None

    def __post_init__(self):
        if self.visible is not None:
            object.__setattr__(self, "visible", tuple(_integer(c, "a core request") for c in self.visible))
        if self.count is not None:
            object.__setattr__(self, "count", _integer(self.count, "a core request's count"))

    def describe(self) -> str:
        if self.visible is not None:
            return format_cores(self.visible)
        if self.count:
            return f"{self.count} contiguous NeuronCore(s)"
        return "all NeuronCores"


def _env_text(env, name: str) -> str | None:
    value = env.get(name)
    if value is None or isinstance(value, str):
        return value
    raise NeuronCoreSpecError(f"{name}={value!r} must be text such as '2' (it is a {type(value).__name__})")


def request_from_env(env) -> CoreRequest:
    """The core request that a process's environment makes (VISIBLE_CORES wins over NUM_CORES)."""
    visible = _env_text(env, "NEURON_RT_VISIBLE_CORES")
    if visible is not None and visible.strip() != "":
        return CoreRequest(visible=tuple(parse_visible_cores(visible)))
    num = _env_text(env, "NEURON_RT_NUM_CORES")
    if num is not None and num.strip() != "":
        n = parse_num_cores(num)
        return CoreRequest(count=n or None)
    return CoreRequest()
