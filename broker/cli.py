"""``neuron-broker``: start, stop and inspect the per-host core broker.

Usage::

    neuron-broker start [--cores N] [--backend cpu|cuda] [--cores-per-gpu K] [--foreground] [--metrics-port P]
    neuron-broker status [--json]
    neuron-broker ls [--json]                  # one row per core (same as neuron-ls)
    neuron-broker release --pid P              # take every core of process P back (operators)
    neuron-broker drain [--timeout S] [--cancel] [--stop]
    neuron-broker stop

The broker's directory comes from ``--dir``, else ``NEURON_BROKER_DIR``, else a private per-user directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from neuron_client.runtime import autostart
from neuron_client.wire import config
from neuron_client.wire.broker_client import BrokerClient
from neuron_client.wire.errors import NeuronRuntimeError
from neuron_client.wire.status import StatusDoc, to_json

from .status import render

EXIT_NOT_RUNNING = config.EXIT_NOT_RUNNING
STOP_WAIT_S = 15.0
DRAIN_TIMEOUT_S = 60.0
DRAIN_POLL_S = 0.25
DRAIN_PROGRESS_S = 5.0  # while draining, repeat the progress line at least this often


def _client(directory: str) -> BrokerClient:
    return BrokerClient.of_dir(directory, verify=False)  # main() verified the directory


def _running(directory: str) -> bool:
    with _client(directory) as broker:
        return broker.ping() is not None


def cmd_start(args) -> int:
    from .backends import BACKENDS

    cores = args.cores or os.cpu_count() or 1
    try:
        from .backends import Threads

        backend = BACKENDS[args.backend].create(cores, args.cores_per_gpu,
                                                Threads(args.intra_op_threads, args.inter_op_threads))
    except RuntimeError as exc:
        print(f"neuron-broker: {exc}", file=sys.stderr)
        return 2
    if args.foreground:
        from . import metrics
        from .server import run_foreground
        from .supervisor import RestartPolicy

        metrics.SHOW_CMDLINE = args.metrics_show_cmdline  # run_foreground's metrics.serve() reads it
        policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window)
        return run_foreground(args.dir, backend, args.lease_timeout, None, policy,
                              int(args.max_message_mb * (1 << 20)), args.metrics_port, args.metrics_host,
                              shm_threshold=args.shm_threshold, listen=args.listen)
    if autostart.running_pid(args.dir) and _running(args.dir):
        print(f"neuron-broker: already running in {args.dir}")
        return 0
    extra = ["--backend", args.backend, "--cores-per-gpu", str(args.cores_per_gpu),
             "--intra-op-threads", str(args.intra_op_threads), "--inter-op-threads", str(args.inter_op_threads),
             "--lease-timeout", str(args.lease_timeout), "--max-restarts", str(args.max_restarts),
             "--restart-window", str(args.restart_window), "--max-message-mb", str(args.max_message_mb),
             "--shm-threshold", str(args.shm_threshold)] + (["--listen", args.listen] if args.listen else [])
    if args.metrics_port is not None:
        extra += ["--metrics-port", str(args.metrics_port), "--metrics-host", args.metrics_host]
        extra += ["--metrics-show-cmdline"] if args.metrics_show_cmdline else []
    try:
        pong = autostart.spawn_broker(args.dir, cores, extra)
    except NeuronRuntimeError as exc:
        print(f"neuron-broker: {exc}", file=sys.stderr)
        return 1
    print(f"neuron-broker: started pid {pong.pid} with {pong.cores} {pong.backend} cores at "
          f"{config.broker_address(args.dir)} (log: {config.log_file(args.dir)})")
    if args.metrics_port is not None:
        print(f"neuron-broker: metrics at {fetch_status(args.dir).broker.metrics or '(not served)'}")
    return 0


def cmd_stop(args) -> int:
    pid = autostart.running_pid(args.dir)
    if not pid:
        print(f"neuron-broker: not running in {args.dir}")
        return 0
    try:
        with _client(args.dir) as broker:
            broker.stop(5.0)
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


def fetch_status(directory: str) -> StatusDoc:
    with _client(directory) as broker:
        return broker.status()


def cmd_status(args) -> int:
    if not _running(args.dir):
        return _not_running(args.dir)
    doc = fetch_status(args.dir)
    print(json.dumps(to_json(doc), indent=2) if args.json else render(doc))
    return 0


def _owners(doc: StatusDoc) -> str:
    from neuron_client.wire.cores import format_cores

    from .status import short_command

    return "; ".join(f"pid {lease.pid} {short_command(lease.cmd)!r} ({format_cores(lease.cores)}, "
                     f"{lease.lease_age_s:.1f}s)" for lease in doc.leases) or "none"


def cmd_ls(args) -> int:
    from . import ls

    return ls.run(args.dir, args.json)


def cmd_release(args) -> int:
    """Take every core of process --pid back now: its models are dropped and its next call fails with
    LeaseLostError. The process itself keeps running (stop it yourself if it should not retry)."""
    from neuron_client.wire.cores import format_cores

    from .status import short_command

    if args.pid <= 0:
        print(f"neuron-broker: --pid must be a process id > 0, got {args.pid}", file=sys.stderr)
        return 2
    if not _running(args.dir):
        return _not_running(args.dir)
    before = fetch_status(args.dir)
    with _client(args.dir) as broker:
        reply = broker.release(args.pid)
    if not reply.cores:
        print(f"neuron-broker: pid {args.pid} holds no cores; owners now: {_owners(before)} "
              "(see neuron-ls)", file=sys.stderr)
        return 1
    cmd = next((lease.cmd for lease in before.leases if lease.pid == args.pid), "")
    print(f"neuron-broker: released {format_cores(reply.cores)} of pid {args.pid}"
          f"{f' ({short_command(cmd)!r})' if cmd else ''}; its next call fails with LeaseLostError")
    return 0


def cmd_drain(args) -> int:
    """Stop granting new leases (acquires fail with BrokerDrainingError) and wait until every owner has released
    its cores, printing progress. --timeout 0 only switches draining on; --cancel resumes granting; --stop stops
    the broker once drained."""
    if not _running(args.dir):
        return _not_running(args.dir)
    if args.cancel:
        with _client(args.dir) as broker:
            broker.drain(resume=True)
        print("neuron-broker: resumed: new leases are granted again")
        return 0
    with _client(args.dir) as broker:
        broker.drain()
    doc = fetch_status(args.dir)
    print(f"neuron-broker: draining: no new leases are granted; {len(doc.leases)} owner(s) hold cores"
          + (f", waiting up to {args.timeout:g}s for them to finish" if args.timeout > 0 and doc.leases else ""),
          flush=True)
    if args.timeout <= 0:
        return 0
    t0 = time.monotonic()
    last, last_print = None, t0
    while doc.leases:
        now = time.monotonic()
        if now - t0 > args.timeout:
            print(f"neuron-broker: drain timed out after {args.timeout:g}s; still holding cores: {_owners(doc)}. "
                  "The broker keeps refusing new leases: wait longer, take cores back with 'neuron-broker release "
                  "--pid P', or resume with 'neuron-broker drain --cancel'", file=sys.stderr)
            return 1
        owners = sorted(lease.pid for lease in doc.leases)
        if owners != last or now - last_print >= DRAIN_PROGRESS_S:
            print(f"  waiting ({now - t0:.0f}s) for {len(owners)} owner(s): {_owners(doc)}", flush=True)
            last, last_print = owners, now
        time.sleep(DRAIN_POLL_S)
        doc = fetch_status(args.dir)
    print(f"neuron-broker: drained in {time.monotonic() - t0:.1f}s: no process holds cores", flush=True)
    if args.stop:
        return cmd_stop(args)
    return 0


def _not_running(directory: str) -> int:
    print(f"neuron-broker: no broker answers at {config.broker_address(directory)}; "
          "start one with 'neuron-broker start'", file=sys.stderr)
    return EXIT_NOT_RUNNING


def _help(fn) -> str:
    return " ".join(fn.__doc__.split())


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
                   help="opt-in: an owner stopped by a signal (SIGSTOP, a debugger) for this many seconds loses its "
                        "cores; 0 (the default) never takes cores from a live process. A running process, however "
                        "starved, always keeps them; 'neuron-broker release --pid' takes them on purpose")
    s.add_argument("--listen", default=None, metavar="tcp://HOST:PORT",
                   help="also serve ping and status over TCP, CURVE-authenticated (keys in <dir>/curve)")
    s.add_argument("--shm-threshold", type=int, default=config.SHM_THRESHOLD_BYTES,
                   help="workers return outputs of at least this many bytes through shared memory")
    s.add_argument("--intra-op-threads", type=int, default=0,
                   help="torch intra-op threads per worker (default: the core's CPU count)")
    s.add_argument("--inter-op-threads", type=int, default=0,
                   help="torch inter-op threads per worker, for torch.jit.fork (default: the core's CPU count)")
    s.add_argument("--max-restarts", type=int, default=5,
                   help="a core whose worker dies more often than this within --restart-window is marked failed")
    s.add_argument("--restart-window", type=float, default=60.0, help="seconds (see --max-restarts)")
    s.add_argument("--max-message-mb", type=float, default=config.MAX_MESSAGE_BYTES / (1 << 20),
                   help="largest data message a worker accepts over its socket (MiB)")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 9400; 0 picks a free port)")
    s.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics server listens on")
    s.add_argument("--metrics-show-cmdline", action="store_true",
                   help="label owners in metrics with their command lines (which may hold secrets, and every local "
                        "user can read the metrics) instead of only their executable's name")
    s.add_argument("--dir", dest="sub_dir", default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_start)
    st = sub.add_parser("status", help="show cores, owners, models and requests")
    st.add_argument("--json", action="store_true", help="print the status document as JSON")
    st.set_defaults(func=cmd_status)
    ls = sub.add_parser("ls", help="one row per core: device, state, owner, lease age, models, memory")
    ls.add_argument("--json", action="store_true", help="print the neuron-ls document (schema in the README)")
    ls.set_defaults(func=cmd_ls)
    r = sub.add_parser("release", help="take every core of a process back (operators)",
                       description=_help(cmd_release))
    r.add_argument("--pid", type=int, required=True, help="the owning process")
    r.set_defaults(func=cmd_release)
    d = sub.add_parser("drain", help="grant no new leases and wait for owners to finish",
                       description=_help(cmd_drain))
    d.add_argument("--timeout", type=float, default=DRAIN_TIMEOUT_S,
                   help=f"seconds to wait for owners (default {DRAIN_TIMEOUT_S:g}; 0: do not wait)")
    d.add_argument("--cancel", action="store_true", help="resume granting leases")
    d.add_argument("--stop", action="store_true", help="stop the broker once drained")
    d.set_defaults(func=cmd_drain)
    sp = sub.add_parser("stop", help="stop the broker and its workers")
    sp.set_defaults(func=cmd_stop)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.dir = os.path.abspath(getattr(args, "sub_dir", None) or args.dir or config.broker_dir())
    if args.command == "start" and args.cores is not None and args.cores < 0:
        print("neuron-broker: --cores must be positive", file=sys.stderr)
        return 2
    try:
        config.ensure_private_dir(args.dir)  # a squatted directory's pid file or socket is never believed
        return args.func(args)
    except NeuronRuntimeError as exc:
        print(f"neuron-broker {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
