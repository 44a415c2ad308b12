"""One row per core: device, state, owner, lease age, models, memory (also: neuron-ls).

Sends ping, then status, on the broker's socket (replies: pong, status_reply) and lists each core: its index, device
and host CPUs, state, owner pid and command, lease age, models (name, replicas, state) and its worker's memory.
Ownership is per core: a process owns cores, not devices. The broker knows the models loaded on its workers, so a
model's state is "loaded"; a lazy or asynchronous load still in progress in a client shows up once it lands.
"replicas" counts the cores of the same owner holding a model of that name. With --json it prints the neuron-ls
document (schema 2; JSON Schema: broker/schemas/ls.schema.json), whose field names are the status document's.
Never starts a broker.

Examples:
  neuron-ls
  neuron-ls -j | jq '.processes'
  neuron-broker ls --json | jq '.processes'

Exit codes: 0, 1 when no broker answers (neuron-ls: 2 when the directory is not private).
"""
from __future__ import annotations

import argparse


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("-j", "--json", "--json-output", dest="json", action="store_true",
                   help="print the neuron-ls document as JSON instead of a table (-j/--json-output: AWS neuron-ls's "
                        "names)")
    s.add_argument("-w", "--wide", action="store_true",
                   help="every column in full (a terminal's table fits its width: commands and models are cut "
                        "first, devices left out; piped output is never cut)")


def run(args) -> int:
    from .. import ls

    return ls.run(args.dir, args.json, args.wide)
