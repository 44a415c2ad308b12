"""Start the broker (a daemon unless --foreground).

Starts "python -P -m broker start --foreground" in a session of its own, in the broker's directory, logging to
<dir>/broker.log, and waits until it answers a ping (reply: pong, with its pid, core count and backend); then prints
where it listens (and, with --metrics-port, the metrics URL, read from a status reply). If a broker already answers
in the directory, says so (with its pid, cores and backend) and starts nothing. With --foreground the broker runs in this process until SIGTERM,
SIGINT or 'neuron-broker stop'.

Examples:
  neuron-broker start --cores 8
  neuron-broker start --backend cuda --cores-per-gpu 2
  neuron-broker start --foreground --metrics-port 9400 --listen tcp://127.0.0.1:7700

Exit codes: 0 started or already running, 1 it did not start (the last lines of its log are printed) or one runs with
other cores or another backend than asked for (it says which), 2 bad arguments or no such backend here,
3 (--foreground) another broker holds the directory.
"""
from __future__ import annotations

import argparse
import os
import sys

from neuron_client.wire import config

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_MAX_BYTES = 10 << 20  # broker.log is rotated at this size ...
LOG_BACKUPS = 3  # ... keeping this many old files (broker.log.1 ...)


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--cores", type=int, default=0, help="number of cores (default: the CPU count)")
    s.add_argument("--backend", choices=["cpu", "cuda"], default=None,
                   help="where cores run: host CPUs or GPUs (default: cpu)")
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
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="the broker's log level (its log: <dir>/broker.log, rotated at "
                        f"{LOG_MAX_BYTES >> 20} MiB, {LOG_BACKUPS} old files kept)")
    s.add_argument("--metrics-show-cmdline", action="store_true",
                   help="label owners in metrics with their command lines (which may hold secrets, and every local "
                        "user can read the metrics) instead of only their executable's name")


def run(args) -> int:
    from neuron_client.runtime import autostart
    from neuron_client.wire.errors import NeuronRuntimeError

    from .. import backends
    from . import _shared

    if args.cores < 0:
        print("neuron-broker: --cores must be positive", file=sys.stderr)
        return 2
    cores = args.cores or os.cpu_count() or 1
    asked_backend, args.backend = args.backend, args.backend or "cpu"
    if not args.foreground and autostart.running_pid(args.dir):
        with _shared.client(args.dir) as broker:
            pong = broker.ping()
        if pong is not None:
            return already_running(args.dir, args.cores, asked_backend, pong)
    try:
        backend = backends.BACKENDS[args.backend].create(
            cores, args.cores_per_gpu, backends.Threads(args.intra_op_threads, args.inter_op_threads))
    except RuntimeError as exc:
        print(f"neuron-broker: {exc}", file=sys.stderr)
        return 2
    if args.foreground:
        from .. import metrics
        from ..server import run_foreground
        from ..supervisor import RestartPolicy

        metrics.SHOW_CMDLINE = args.metrics_show_cmdline  # run_foreground's metrics.serve() reads it
        log_setup(args.dir, args.log_level)
        policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window)
        return run_foreground(args.dir, backend, args.lease_timeout, None, policy,
                              int(args.max_message_mb * (1 << 20)), args.metrics_port, args.metrics_host,
                              shm_threshold=args.shm_threshold, listen=args.listen)
    extra = ["--backend", args.backend, "--cores-per-gpu", str(args.cores_per_gpu),
             "--intra-op-threads", str(args.intra_op_threads), "--inter-op-threads", str(args.inter_op_threads),
             "--lease-timeout", str(args.lease_timeout), "--max-restarts", str(args.max_restarts),
             "--restart-window", str(args.restart_window), "--max-message-mb", str(args.max_message_mb),
             "--shm-threshold", str(args.shm_threshold), "--log-level", args.log_level] + (["--listen", args.listen] if args.listen else [])
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
        print(f"neuron-broker: metrics at {_shared.fetch_status(args.dir).broker.metrics or '(not served)'}")
    return 0


def already_running(directory: str, cores: int, backend: str | None, pong) -> int:
    """A broker answers in the directory: 0 if it has the cores and backend asked for (or none were asked for), else
    1, naming what runs and what was asked."""
    asked = []
    if cores and cores != pong.cores:
        asked.append(f"{cores} cores")
    if backend and backend != pong.backend:
        asked.append(f"the {backend} backend")
    running = f"pid {pong.pid} with {pong.cores} {pong.backend} cores"
    if not asked:
        print(f"neuron-broker: already running in {directory} ({running}); started nothing")
        return 0
    print(f"neuron-broker: already running in {directory} ({running}); you asked for {' and '.join(asked)}. "
          "It keeps its settings: stop it first ('neuron-broker stop', which ends every lease) and start it again "
          "to change them", file=sys.stderr)
    return 1


def log_setup(directory: str, level: str) -> None:
    """The foreground broker's logging: stderr, and when it is the daemon (stderr is its log, <dir>/broker.log), a
    handler that rotates that file (see :class:`broker.server.RotatingLog`)."""
    from ..server import configure_logging

    configure_logging(directory, level.upper(), LOG_MAX_BYTES, LOG_BACKUPS)
