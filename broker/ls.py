"""``neuron-ls``: list the host's NeuronCores, one row per core: index, device (and host CPUs), state, owner pid and
command, lease age, models (name, replicas, state), and the memory of the core's worker.

Usage::

    neuron-ls [--json] [--dir DIR]         # also: neuron-broker ls [--json]

Ownership is per core (a process owns cores, not devices). The broker knows the models loaded on its workers, so a
model's state is ``loaded``; a lazy or asynchronous load still in progress in a client shows up once it lands.
``replicas`` counts the cores of the same owner holding a model of the same name. ``--json`` prints a stable
document (README, "neuron-ls --json schema"). Exit codes: 0, 1 when no broker answers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from neuron_client.wire import config
from neuron_client.wire.cores import format_visible
from neuron_client.wire.errors import NeuronRuntimeError

from .status import _age, _bytes, _cut, short_command, table

SCHEMA = 1
HEADERS = ["NC", "DEVICE", "STATE", "OWNER PID", "COMMAND", "LEASE AGE", "MODELS", "WORKER MEMORY"]


def listing(doc: dict) -> dict:
    """The ``neuron-ls --json`` document of a broker status document."""
    holding: dict[tuple[int, str], set[int]] = {}  # (owner pid, model name) -> cores holding it
    for c in doc["cores"]:
        if c["owner"]:
            for m in c["models"]:
                holding.setdefault((c["owner"]["pid"], m["name"]), set()).add(c["core"])
    cores = []
    for c in doc["cores"]:
        owner = c["owner"]
        models: dict[str, dict] = {}
        for m in c["models"]:
            entry = models.setdefault(m["name"], {
                "name": m["name"], "state": "loaded", "copies": 0, "bytes": 0, "requests": 0,
                "replicas": len(holding.get((owner["pid"], m["name"]), ())) if owner else 1})
            entry["copies"] += 1
            entry["bytes"] += m.get("bytes", 0)
            entry["requests"] += m.get("requests", 0)
        cores.append({
            "index": c["core"],
            "device": c.get("device", ""),
            "gpu": c.get("gpu"),
            "cpus": c.get("cpus", []),
            "state": c["state"],
            "owner": None if owner is None else {"pid": owner["pid"], "cmd": owner["cmd"],
                                                 "lease_id": owner["lease_id"], "lease_age_s": owner["age_s"]},
            "models": list(models.values()),
            "worker": {"pid": c["worker"]["pid"], "ready": c["worker"]["ready"],
                       "memory_bytes": c["worker"]["rss"],
                       "device_memory_bytes": c["worker"].get("device_memory", 0),
                       "device_util_percent": c["worker"].get("device_util")},
        })
    processes = [{"pid": lease["pid"], "cmd": lease["cmd"], "cores": sorted(lease["cores"]),
                  "lease_age_s": lease["age_s"]} for lease in doc["leases"]]
    b = doc["broker"]
    return {"schema": SCHEMA,
            "broker": {"pid": b["pid"], "backend": b["backend"], "cores": b["cores"], "address": b["address"],
                       "draining": bool(b.get("draining", False))},
            "cores": cores,
            "processes": sorted(processes, key=lambda p: (p["cores"] or [-1])[0])}


def _device(core: dict) -> str:
    if core["device"] == "cpu":
        cpus = f"cpus {format_visible(core['cpus'])}" if core["cpus"] else ""
        return f"{core['device']} {cpus}".strip()
    w = core["worker"]  # a GPU: its memory held by this core's worker and the driver's utilisation
    util = w.get("device_util_percent")
    mem = _bytes(w.get("device_memory_bytes") or 0)
    return f"{core['device']} {mem} {'?' if util is None else f'{util:.0f}'}% util"


def _models(core: dict) -> str:
    parts = []
    for m in core["models"]:
        copies = f"*{m['copies']}" if m["copies"] > 1 else ""
        parts.append(f"{m['name']}{copies} x{m['replicas']} {m['state']}")
    return ", ".join(parts) or "-"


def render(ls: dict) -> str:
    rows = []
    for c in ls["cores"]:
        owner = c["owner"]
        w = c["worker"]
        rows.append([
            f"nc{c['index']}",
            _device(c),
            c["state"] if w["ready"] or c["state"] == "failed" else f"{c['state']} (worker starting)",
            str(owner["pid"]) if owner else "-",
            _cut(short_command(owner["cmd"]), 40) if owner else "-",
            _age(owner["lease_age_s"]) if owner else "-",
            _cut(_models(c), 60),
            _bytes(w["memory_bytes"]) if w["memory_bytes"] else "-",
        ])
    b = ls["broker"]
    owned = sum(1 for c in ls["cores"] if c["owner"])
    head = (f"{b['cores']} NeuronCores ({b['backend']} backend), {owned} owned by {len(ls['processes'])} "
            f"process(es) · broker pid {b['pid']}{' · DRAINING' if b['draining'] else ''}")
    return "\n".join([head, table(HEADERS, rows)])


def fetch(directory: str, timeout_s: float = config.BROKER_REQUEST_TIMEOUT_S) -> dict | None:
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


def run(directory: str, as_json: bool) -> int:
    doc = fetch(directory)
    if doc is None:
        return not_running("neuron-ls", directory)
    ls = listing(doc)
    print(json.dumps(ls, indent=2) if as_json else render(ls))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="neuron-ls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print a stable JSON document instead of a table")
    p.add_argument("--dir", default=None, help="broker directory (default: $NEURON_BROKER_DIR or a private one)")
    args = p.parse_args(argv)
    try:
        return run(os.path.abspath(args.dir or config.broker_dir()), args.json)
    except NeuronRuntimeError as exc:  # a squatted directory
        print(f"neuron-ls: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
