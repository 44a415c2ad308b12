"""``neuron-ls``: one row per core of the host's broker, and the ``neuron-ls --json`` document (:class:`Listing`).

The command's help is :mod:`broker.commands.ls`'s docstring (``neuron-ls`` and ``neuron-broker ls`` are the same
command). The listing is derived from the broker's status document: its owner and worker parts are the status
document's records, so that both documents name every field alike (``broker/schemas/ls.schema.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from neuron_client.wire import config
from neuron_client.wire.cores import format_visible
from neuron_client.wire.errors import NeuronRuntimeError
from neuron_client.wire.status import OwnerStatus, StatusDoc, WorkerStatus, record, to_json

from .status import _age, _bytes, _cut, distinguishing, short_command, table

SCHEMA = 2  # 1: index / lease_age_s / memory_bytes (then status said core / age_s / rss); 2: status's names, a timestamp
HEADERS = ["NC", "DEVICE", "STATE", "OWNER PID", "COMMAND", "LEASE AGE", "MODELS", "MEMORY"]
# at 80 columns: commands and models are cut first (keeping the part that tells owners apart), then devices left out
FLEXIBLE = {"DEVICE": (12, 1), "COMMAND": (12, 3), "MODELS": (14, 3)}  # MEMORY: the worker's


@record
class LsBroker:
    pid: int
    backend: str
    cores: int
    address: str
    draining: bool


@record
class LsModel:
    """A model name on a core: ``copies`` of it there, ``replicas`` (cores of the same owner holding one)."""

    name: str
    state: str  # always "loaded": the broker knows only the models its workers hold
    copies: int
    bytes: int
    requests: int
    replicas: int


@record
class LsCore:
    index: int
    device: str
    gpu: typing.Optional[int]
    cpus: list[int]
    state: str
    owner: typing.Optional[OwnerStatus]  # the status document's parts, field for field
    models: list[LsModel]
    worker: WorkerStatus


@record
class LsProcess:
    pid: int
    cmd: str
    cores: list[int]
    lease_age_s: float


@record
class Listing:
    """The ``neuron-ls --json`` document (``broker/schemas/ls.schema.json``)."""

    schema: int = SCHEMA
    timestamp: str  # the status document's: when the broker built it
    broker: LsBroker
    cores: list[LsCore]
    processes: list[LsProcess]


def listing(doc: StatusDoc) -> Listing:
    """The ``neuron-ls --json`` document of a broker status document."""
    holding: dict[tuple[int, str], set[int]] = {}  # (owner pid, model name) -> cores holding it
    for c in doc.cores:
        if c.owner:
            for m in c.models:
                holding.setdefault((c.owner.pid, m.name), set()).add(c.index)
    cores = []
    for c in doc.cores:
        owner = c.owner
        models: dict[str, LsModel] = {}
        for m in c.models:
            entry = models.get(m.name)
            if entry is None:
                entry = models[m.name] = LsModel(
                    name=m.name, state="loaded", copies=0, bytes=0, requests=0,
                    replicas=len(holding.get((owner.pid, m.name), ())) if owner else 1)
            entry.copies += 1
            entry.bytes += m.bytes
            entry.requests += m.requests
        cores.append(LsCore(index=c.index, device=c.device, gpu=c.gpu, cpus=list(c.cpus), state=c.state,
                            owner=owner, models=list(models.values()), worker=c.worker))
    processes = [LsProcess(pid=lease.pid, cmd=lease.cmd, cores=sorted(lease.cores), lease_age_s=lease.lease_age_s)
                 for lease in doc.leases]
    b = doc.broker
    return Listing(timestamp=doc.timestamp,
                   broker=LsBroker(pid=b.pid, backend=b.backend, cores=b.cores, address=b.address,
                                   draining=b.draining),
                   cores=cores, processes=sorted(processes, key=lambda p: (p.cores or [-1])[0]))


def _device(core: LsCore) -> str:
    if core.device == "cpu":
        cpus = f"cpus {format_visible(core.cpus)}" if core.cpus else ""
        return f"{core.device} {cpus}".strip()
    w = core.worker  # a GPU: its memory held by this core's worker and the driver's utilisation
    util = w.device_util_percent
    return f"{core.device} {_bytes(w.device_memory_bytes or 0)} {'?' if util is None else f'{util:.0f}'}% util"


def _models(core: LsCore) -> str:
    parts = []
    for m in core.models:
        copies = f"*{m.copies}" if m.copies > 1 else ""
        parts.append(f"{m.name}{copies} x{m.replicas} {m.state}")
    return ", ".join(parts) or "-"


def render(ls: Listing, width: int | None = None) -> str:
    """The table, fitted to ``width`` columns (None: nothing cut; else commands keep what tells them apart)."""
    command = short_command if width is None else distinguishing
    rows = []
    for c in ls.cores:
        owner, w = c.owner, c.worker
        rows.append([
            f"nc{c.index}",
            _device(c),
            c.state if w.ready or c.state == "failed" else f"{c.state} (worker starting)",
            str(owner.pid) if owner else "-",
            command(owner.cmd) if owner else "-",
            _age(owner.lease_age_s) if owner else "-",
            _models(c),
            _bytes(w.memory_bytes) if w.memory_bytes else "-",
        ])
    b = ls.broker
    owned = sum(1 for c in ls.cores if c.owner)
    head = (f"{b.cores} NeuronCores ({b.backend} backend), {owned} owned by {len(ls.processes)} "
            f"process(es) · broker pid {b.pid}{' · DRAINING' if b.draining else ''}")
    return "\n".join([head if width is None else _cut(head, width), table(HEADERS, rows, width, FLEXIBLE)])


def fetch(directory: str, timeout_s: float = config.BROKER_REQUEST_TIMEOUT_S) -> StatusDoc | None:
    """The broker's status document, or None when no broker answers within the timeouts (never starts one)."""
    from neuron_client.wire.broker_client import BrokerClient
    from neuron_client.wire.errors import RequestTimeoutError

    # verified first: never talk to whatever another user planted there
    with BrokerClient.of_dir(directory, timeout_s) as broker:
        if broker.ping(min(timeout_s, config.BROKER_PING_TIMEOUT_S)) is None:
            return None
        try:
            return broker.status()
        except RequestTimeoutError:
            return None


def not_running(prog: str, directory: str) -> int:
    print(f"{prog}: no broker answers at {config.broker_address(directory)}; start one with 'neuron-broker start' "
          f"(or point {config.ENV_BROKER_DIR} / --dir at the broker's directory)", file=sys.stderr)
    return 1


def run(directory: str, as_json: bool, wide: bool = False) -> int:
    from .status import output_width

    doc = fetch(directory)
    if doc is None:
        return not_running("neuron-ls", directory)
    ls = listing(doc)
    print(json.dumps(to_json(ls), indent=2) if as_json else render(ls, output_width(wide)))
    return 0


def main(argv=None) -> int:
    from neuron_client.tools.cli import guarded

    return guarded(_main, argv)


def _main(argv=None) -> int:
    from neuron_client.tools.cli import Formatter, add_version

    from . import commands

    command = commands.load("ls")
    p = argparse.ArgumentParser(prog="neuron-ls", description=commands.description(command),
                                formatter_class=Formatter)
    add_version(p)
    command.add_arguments(p)
    p.add_argument("--dir", default=None, help=commands.DIR_HELP)
    args = p.parse_args(argv)
    try:
        return run(os.path.abspath(args.dir or config.broker_dir()), args.json, args.wide)
    except NeuronRuntimeError as exc:  # a squatted directory
        print(f"neuron-ls: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
