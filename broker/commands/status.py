"""Show cores, owners, models and requests.

Sends status on the broker's socket; the reply, status_reply, carries the status document (schema 2): the broker
(pid, backend, address, uptime, draining, lease counters), each core with its worker, owner, models, request counts
and perf, the leases, and the acquires waiting for cores. Prints a table, or with --json the document itself
(JSON Schema: broker/schemas/status.schema.json; fields: README, "Status document"). Works over TCP too, with
NEURON_BROKER_ADDRESS=tcp://HOST:PORT and CURVE keys (see start --listen).

Examples:
  neuron-broker status
  neuron-broker status --json | jq '.cores[] | select(.owner) | {index, pid: .owner.pid}'

Exit codes: 0, 1 when no broker answers.
"""
from __future__ import annotations

import argparse


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("-j", "--json", "--json-output", dest="json", action="store_true",
                   help="print the status document as JSON")
    s.add_argument("-w", "--wide", action="store_true",
                   help="every column in full (a terminal's table fits its width: commands and models are cut "
                        "first, devices left out; piped output is never cut)")


def run(args) -> int:
    import json

    from neuron_client.wire.status import to_json

    from ..status import output_width, render
    from . import _shared

    with _shared.client(args.dir) as broker:
        if broker.ping() is None:
            return _shared.not_running(args.dir)
        doc = broker.status()
    print(json.dumps(to_json(doc), indent=2) if args.json else render(doc, output_width(args.wide)))
    return 0
