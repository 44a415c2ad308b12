"""What several commands share: the broker's client, its status, and how a missing broker is reported."""
from __future__ import annotations

import sys

from neuron_client.wire import config

EXIT_NOT_RUNNING = config.EXIT_NOT_RUNNING


def client(directory: str):
    """A :class:`BrokerClient` of the broker in ``directory`` (the command line has checked it private)."""
    from neuron_client.wire.broker_client import BrokerClient

    return BrokerClient.of_dir(directory, verify=False)


def running(directory: str) -> bool:
    with client(directory) as broker:
        return broker.ping() is not None


def fetch_status(directory: str):
    """The broker's :class:`~neuron_client.wire.status.StatusDoc`."""
    with client(directory) as broker:
        return broker.status()


def not_running(directory: str) -> int:
    print(f"neuron-broker: no broker answers at {config.broker_address(directory)}; "
          "start one with 'neuron-broker start'", file=sys.stderr)
    return EXIT_NOT_RUNNING


def owners(doc) -> str:
    """``pid 12 'python serve.py' (nc0-nc1, 3.2s); ...``: who holds cores in a status document."""
    from neuron_client.wire.cores import format_cores

    from ..status import short_command

    return "; ".join(f"pid {lease.pid} {short_command(lease.cmd)!r} ({format_cores(lease.cores)}, "
                     f"{lease.lease_age_s:.1f}s)" for lease in doc.leases) or "none"
