"""Grant no new leases and wait for owners to finish.

Sends drain on the broker's socket (reply: ok): from then on every acquire fails with BrokerDrainingError, queued
ones too, while owners keep their cores; 'neuron-broker status' and neuron-ls show DRAINING. Then polls status
(reply: status_reply) until no lease is left, printing who still holds cores at least every 5 s. --timeout 0 only
switches draining on; --cancel sends drain with resume set (reply: ok) and leases are granted again; --stop stops
the broker once drained (see 'neuron-broker stop --help').

Examples:
  neuron-broker drain --timeout 300 --stop
  neuron-broker drain --timeout 0
  neuron-broker drain --cancel

Exit codes: 0 drained (or switched on, or cancelled), 1 timed out (naming who still holds cores; the broker keeps
refusing new leases) or no broker answers.
"""
from __future__ import annotations

import argparse

DRAIN_TIMEOUT_S = 60.0
DRAIN_POLL_S = 0.25
DRAIN_PROGRESS_S = 5.0  # while draining, repeat the progress line at least this often


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--timeout", type=float, default=DRAIN_TIMEOUT_S,
                   help=f"seconds to wait for owners (default {DRAIN_TIMEOUT_S:g}; 0: do not wait)")
    s.add_argument("--cancel", action="store_true", help="resume granting leases")
    s.add_argument("--stop", action="store_true", help="stop the broker once drained")


def run(args) -> int:
    import sys
    import time

    from . import _shared, stop

    with _shared.client(args.dir) as broker:
        if broker.ping() is None:
            return _shared.not_running(args.dir)
        if args.cancel:
            broker.drain(resume=True)
            print("neuron-broker: resumed: new leases are granted again")
            return 0
        broker.drain()
        doc = broker.status()
        print(f"neuron-broker: draining: no new leases are granted until 'neuron-broker drain --cancel'; "
              f"{len(doc.leases)} owner(s) hold cores"
              + (f", waiting up to {args.timeout:g}s for them to finish" if args.timeout > 0 and doc.leases else ""),
              flush=True)
        if args.timeout <= 0:
            return 0
        t0 = time.monotonic()
        last, last_print = None, t0
        while doc.leases:
            now = time.monotonic()
            if now - t0 > args.timeout:
                print(f"neuron-broker: drain timed out after {args.timeout:g}s; still holding cores: "
                      f"{_shared.owners(doc)}. The broker keeps refusing new leases: wait longer, take cores back "
                      "with 'neuron-broker release --pid P', or resume with 'neuron-broker drain --cancel'",
                      file=sys.stderr)
                return 1
            owners = sorted(lease.pid for lease in doc.leases)
            if owners != last or now - last_print >= DRAIN_PROGRESS_S:
                print(f"  waiting ({now - t0:.0f}s) for {len(owners)} owner(s): {_shared.owners(doc)}", flush=True)
                last, last_print = owners, now
            time.sleep(DRAIN_POLL_S)
            doc = broker.status()
    print(f"neuron-broker: drained in {time.monotonic() - t0:.1f}s: no process holds cores"
          + ("" if args.stop else "; the broker keeps refusing new leases until 'neuron-broker drain --cancel'"),
          flush=True)
    if args.stop:
        return stop.run(args)
    return 0
