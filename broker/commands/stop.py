"""Stop the broker and its workers.

Reads the broker's pid from <dir>/broker.pid and sends stop on its socket (reply: ok); the broker ends every lease,
stops its workers and exits. If it has not exited within 15 s it is sent SIGTERM, then SIGKILL. Owners' next calls
fail; their processes keep running.

Examples:
  neuron-broker stop
  neuron-broker --dir /run/neuron-broker stop

Exit codes: 0 stopped, or no broker was running.
"""
from __future__ import annotations

import argparse

STOP_WAIT_S = 15.0
STOP_REQUEST_TIMEOUT_S = 5.0


def add_arguments(s: argparse.ArgumentParser) -> None:
    pass


def run(args) -> int:
    import os
    import time

    from neuron_client.runtime import autostart
    from neuron_client.wire.errors import NeuronRuntimeError

    from . import _shared

    pid = autostart.running_pid(args.dir)
    if not pid:
        print(f"neuron-broker: not running in {args.dir}")
        return 0
    try:
        with _shared.client(args.dir) as broker:
            broker.stop(STOP_REQUEST_TIMEOUT_S)
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
