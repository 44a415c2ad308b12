"""Take every core of a process back (operators).

Sends force_release with the process id on the broker's socket; the reply, force_released, names the cores and
leases taken back. Their models are dropped and the process's next call fails with LeaseLostError; the process
itself keeps running (stop it yourself if it should not retry). Before asking, reads the status document, to name
the process's command, or the owners there are when the pid holds no cores.

Examples:
  neuron-broker release --pid 1234

Exit codes: 0 released, 1 the pid holds no cores or no broker answers, 2 a --pid that is no process id.
"""
from __future__ import annotations

import argparse


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--pid", type=int, required=True, help="the owning process")


def run(args) -> int:
    import sys

    from neuron_client.wire.cores import format_cores

    from ..status import short_command
    from . import _shared

    if args.pid <= 0:
        print(f"neuron-broker: --pid must be a process id > 0, got {args.pid}", file=sys.stderr)
        return 2
    with _shared.client(args.dir) as broker:
        if broker.ping() is None:
            return _shared.not_running(args.dir)
        before = broker.status()
        reply = broker.release(args.pid)
    if not reply.cores:
        print(f"neuron-broker: pid {args.pid} holds no cores; owners now: {_shared.owners(before)} "
              "(see neuron-ls)", file=sys.stderr)
        return 1
    cmd = next((lease.cmd for lease in before.leases if lease.pid == args.pid), "")
    print(f"neuron-broker: released {format_cores(reply.cores)} of pid {args.pid}"
          f"{f' ({short_command(cmd)!r})' if cmd else ''}; its next call fails with LeaseLostError")
    return 0
