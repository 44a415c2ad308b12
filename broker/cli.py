"""``neuron-broker``: start, stop and inspect the per-host core broker.

Usage::

    neuron-broker start [--cores N] [--backend cpu|cuda] [--cores-per-gpu K] [--foreground]
    neuron-broker status [--json]
    neuron-broker stop

The broker's directory comes from ``--dir``, else ``NEURON_BROKER_DIR``, else a private per-user directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from neuron_client import autostart, config, protocol, transport
from neuron_client.errors import NeuronRuntimeError

from .status import render

EXIT_NOT_RUNNING = 1
STOP_WAIT_S = 15.0


def _request(directory: str, msg, timeout_s: float = config.BROKER_REQUEST_TIMEOUT_S):
    address = config.broker_address(directory)
    ch = transport.Channel(address)
    try:
        return ch.request(msg, timeout_s).msg
    finally:
        ch.close()


def _running(directory: str) -> bool:
    return transport.ping(config.broker_address(directory), config.BROKER_PING_TIMEOUT_S) is not None


def cmd_start(args) -> int:
    from worker.backends import BACKENDS

    cores = args.cores or os.cpu_count() or 1
    try:
        backend = BACKENDS[args.backend].create(cores, args.cores_per_gpu)
    except RuntimeError as exc:
        print(f"neuron-broker: {exc}", file=sys.stderr)
        return 2
    if args.foreground:
        from .server import run_foreground

        return run_foreground(args.dir, backend, args.lease_timeout, None)
    if autostart.running_pid(args.dir) and _running(args.dir):
        print(f"neuron-broker: already running in {args.dir}")
        return 0
    extra = ["--backend", args.backend, "--cores-per-gpu", str(args.cores_per_gpu),
             "--lease-timeout", str(args.lease_timeout)]
    try:
        pong = autostart.spawn_broker(args.dir, cores, extra)
    except NeuronRuntimeError as exc:
        print(f"neuron-broker: {exc}", file=sys.stderr)
        return 1
    print(f"neuron-broker: started pid {pong.pid} with {pong.cores} {pong.backend} cores at "
          f"{config.broker_address(args.dir)} (log: {config.log_file(args.dir)})")
    return 0


def cmd_stop(args) -> int:
    pid = autostart.running_pid(args.dir)
    if not pid:
        print(f"neuron-broker: not running in {args.dir}")
        return 0
    try:
        _request(args.dir, protocol.Stop(), 5.0)
    except NeuronRuntimeError:
        pass
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline and autostart.running_pid(args.dir) == pid:
        time.sleep(0.05)
    if autostart.running_pid(args.dir) == pid:
        os.kill(pid, 15)
        time.sleep(2)
        if autostart.running_pid(args.dir) == pid:
            os.kill(pid, 9)
            print(f"neuron-broker: pid {pid} did not stop; killed it")
            return 0
    print(f"neuron-broker: stopped pid {pid}")
    return 0


def fetch_status(directory: str) -> dict:
    return _request(directory, protocol.Status()).doc


def cmd_status(args) -> int:
    if not _running(args.dir):
        print(f"neuron-broker: no broker answers at {config.broker_address(args.dir)}; "
              "start one with 'neuron-broker start'", file=sys.stderr)
        return EXIT_NOT_RUNNING
    doc = fetch_status(args.dir)
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuron-broker", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=None, help="broker directory (default: $NEURON_BROKER_DIR or a private one)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start the broker (a daemon unless --foreground)")
    s.add_argument("--cores", type=int, default=0, help="number of cores (default: the CPU count)")
    s.add_argument("--backend", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--cores-per-gpu", type=int, default=1, help="cuda backend: cores sharing one GPU")
    s.add_argument("--foreground", action="store_true", help="stay attached instead of daemonising")
    s.add_argument("--lease-timeout", type=float, default=config.LEASE_TIMEOUT_S,
                   help="seconds without a heartbeat before a process loses its cores")
    s.add_argument("--dir", dest="sub_dir", default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_start)
    st = sub.add_parser("status", help="show cores, owners, models and requests")
    st.add_argument("--json", action="store_true", help="print the status document as JSON")
    st.set_defaults(func=cmd_status)
    sp = sub.add_parser("stop", help="stop the broker and its workers")
    sp.set_defaults(func=cmd_stop)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.dir = os.path.abspath(getattr(args, "sub_dir", None) or args.dir or config.broker_dir())
    if args.command == "start" and args.cores is not None and args.cores < 0:
        print("neuron-broker: --cores must be positive", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
