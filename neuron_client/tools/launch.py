"""``neuron-run``: launch N inference processes, each on its own NeuronCores (like torchrun for NeuronCores).

Usage:

    neuron-run --nproc-per-node N [--cores-per-proc K | --num-cores K] [--first-core C] [--max-restarts R]
               [--log-dir DIR [--tee]] -- CMD ARGS...

Rank r gets NEURON_RT_VISIBLE_CORES with the K consecutive cores C+r*K .. C+r*K+K-1 (--cores-per-proc, the default
with K=1), or NEURON_RT_NUM_CORES=K (--num-cores: the broker picks K free contiguous cores, first fit). Every process
also gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (as torchrun sets them),
NEURON_RUN_RESTARTS and TORCHELASTIC_RESTART_COUNT (how often this rank was restarted) and NEURON_BROKER_DIR. A
broker is started if none runs. Asking for more cores than the broker has, for cores other processes hold (unless
NEURON_RT_ACQUIRE_TIMEOUT lets the processes wait for them), or a draining broker, fails before anything starts.

Each output line of a process is prefixed with its rank ("[rank 0] ..."), or with --log-dir DIR written to
DIR/rank{r}/stdout.log and stderr.log (--tee: both); neuron-run's own lines start with "[neuron-run]" and go to
stderr. SIGINT and SIGTERM are forwarded to every process (a second one kills them). A process
that fails is restarted up to R times (after the broker took its cores back); when one fails for good, the others are
stopped (SIGTERM, then SIGKILL after --stop-timeout) and neuron-run exits with the failed process's exit code
(128+N for a signal N), after a failure summary naming each failed rank, its exit code and the last lines of its
stderr. Exit codes: that, 0 when all succeed, 2 for a request that cannot be met.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from neuron_client.runtime import autostart
from neuron_client.wire import config
from neuron_client.wire.broker_client import BrokerClient
from neuron_client.wire.cores import format_cores, format_visible
from neuron_client.wire.errors import NeuronRuntimeError
from neuron_client.wire.status import StatusDoc

EXIT_BAD_REQUEST = 2
POLL_S = 0.05
STATUS_TIMEOUT_S = 2.0
READY_POLL_S = 0.5
READY_WATCH_S = 300.0  # report "all ready" if the processes take their cores within this long
RECLAIM_WAIT_S = 5.0  # before a restart, wait at most this long for the broker to take the failed process's cores back
DEFAULT_STOP_TIMEOUT_S = 10.0
TAIL_LINES = 10  # of each failed rank's stderr, in the failure summary


class LaunchError(Exception):
    """A request neuron-run cannot meet; the message says what was asked, what is there, and what to do."""


@dataclass
class Rank:
    rank: int
    env: dict
    cores: list[int] | None  # None with --num-cores: the broker picks them
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    done: bool = False
    holds: bool = False  # its process was seen holding cores
    pumps: list = field(default_factory=list)
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    failures: list = field(default_factory=list)  # (exit code, last stderr lines) of each failed attempt


OUT_LOCK = threading.Lock()  # one line at a time on the launcher's stdout and stderr


def _say(text: str) -> None:
    with OUT_LOCK:
        sys.stderr.buffer.write(f"[neuron-run] {text}\n".encode())
        sys.stderr.buffer.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(directory: str) -> StatusDoc | None:
    with BrokerClient(config.broker_address(directory), STATUS_TIMEOUT_S) as broker:
        try:
            return broker.status()
        except NeuronRuntimeError:
            return None


def plan(nproc: int, per_proc: int, num_cores: bool, first: int, total: int, backend: str,
         address: str) -> list[list[int] | None]:
    """Each rank's cores (None per rank with ``num_cores``); raises LaunchError when the broker has too few."""
    if nproc < 1 or per_proc < 1 or first < 0:
        raise LaunchError(f"--nproc and cores per process must be at least 1 and --first-core at least 0 "
                          f"(got --nproc {nproc}, {per_proc} cores per process, --first-core {first})")
    need = nproc * per_proc
    if num_cores:
        if need > total:
            raise LaunchError(
                f"--nproc {nproc} x --num-cores {per_proc} needs {need} cores, but the broker at {address} has "
                f"{total} {backend} cores (nc0-nc{total - 1}); use fewer processes or cores per process, or start "
                f"the broker with more cores ('neuron-broker stop; neuron-broker start --cores {need}')")
        return [None] * nproc
    if first + need > total:
        raise LaunchError(
            f"--nproc {nproc} x --cores-per-proc {per_proc} from core {first} needs cores "
            f"{format_cores(range(first, first + need))}, but the broker at {address} has {total} {backend} cores "
            f"({format_cores(range(total))}); use fewer processes or cores per process "
            f"(at most {(total - first) // per_proc} processes of {per_proc}), or start the broker with more cores "
            f"('neuron-broker stop; neuron-broker start --cores {first + need}')")
    return [list(range(first + r * per_proc, first + (r + 1) * per_proc)) for r in range(nproc)]


def check_free(cores_per_rank: list, per_proc: int, doc: StatusDoc | None) -> None:
    """Fail early when cores the ranks need are held by other processes (they would fail to start anyway)."""
    if doc is None or os.environ.get(config.ENV_ACQUIRE_TIMEOUT, "").strip():
        return
    owner = {c.index: c.owner for c in doc.cores if c.owner}
    free = [c.index for c in doc.cores if c.state == "free"]
    if cores_per_rank[0] is None:
        need = per_proc * len(cores_per_rank)
        if len(free) < need:
            raise LaunchError(
                f"{len(cores_per_rank)} processes x {per_proc} cores need {need} free cores, but only "
                f"{format_cores(free) or 'none'} are free; see neuron-ls, stop the owners, or set "
                f"{config.ENV_ACQUIRE_TIMEOUT}=<seconds> to let the processes wait")
        return
    held: dict[int, tuple[list[int], set[int], str]] = {}  # owner pid -> (cores, ranks wanting them, command)
    for rank, cores in enumerate(cores_per_rank):
        for c in cores:
            if c in owner:
                entry = held.setdefault(owner[c].pid, ([], set(), owner[c].cmd))
                entry[0].append(c)
                entry[1].add(rank)
    busy = [f"{format_cores(cs)} (for rank {', '.join(map(str, sorted(ranks)))}) held by pid {pid} {cmd[:60]!r}"
            for pid, (cs, ranks, cmd) in held.items()]
    if busy:
        raise LaunchError(
            f"cores are not free: {'; '.join(busy)}. Stop those processes ('neuron-broker release --pid P' takes "
            f"their cores back), start at other cores with --first-core, or set {config.ENV_ACQUIRE_TIMEOUT}="
            "<seconds> to let the processes wait")


def _pump(stream, out, prefix: bytes, lock: threading.Lock, log=None, tail=None) -> None:
    """Copy a child's output line by line: to ``out`` (None: not), each line prefixed with its rank; to the file
    ``log`` as it is; the last lines into the deque ``tail``."""
    try:
        for line in iter(stream.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            if tail is not None:
                tail.append(line)
            if log is not None:
                log.write(line)
                log.flush()
            if out is not None:
                with lock:
                    out.write(prefix + line)
                    out.flush()
    except (OSError, ValueError):
        pass
    finally:
        stream.close()
        if log is not None:
            log.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class Launcher:
    """``neuron-run``'s ranks: starts each with its cores in its environment, forwards signals, restarts a failed
    rank up to ``max_restarts`` times, and stops the rest when one fails for good.

    Owns the rank processes and their restart counts. Only :func:`main` drives it (one per ``neuron-run``).
    """

    def __init__(self, cmd: list[str], ranks: list[Rank], max_restarts: int, stop_timeout_s: float,
                 directory: str, log_dir: str | None = None, tee: bool = False):
        self.cmd = cmd
        self.log_dir = log_dir
        self.tee = tee
        self.ranks = ranks
        self.max_restarts = max_restarts
        self.stop_timeout_s = stop_timeout_s
        self.directory = directory
        self.out_lock = OUT_LOCK
        self.signalled = 0
        self.failure: tuple[Rank, int] | None = None
        self.watch_until = 0.0
        self.next_watch = 0.0
        self.reported_holding = -1

    # -- processes -------------------------------------------------------------------------------------------
    def log_files(self, r: Rank) -> tuple:
        """The rank's (stdout, stderr) files under --log-dir (``rank{r}/stdout.log``, appended over restarts), or
        (None, None)."""
        if not self.log_dir:
            return None, None
        d = os.path.join(self.log_dir, f"rank{r.rank}")
        os.makedirs(d, exist_ok=True)
        files = tuple(open(os.path.join(d, name), "ab") for name in ("stdout.log", "stderr.log"))
        for f in files:
            f.write(f"--- neuron-run: rank {r.rank}, attempt {r.restarts + 1} ---\n".encode())
            f.flush()
        return files

    def start(self, r: Rank) -> None:
        env = dict(r.env, NEURON_RUN_RESTARTS=str(r.restarts), TORCHELASTIC_RESTART_COUNT=str(r.restarts))
        r.proc = subprocess.Popen(self.cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True)
        r.started_at, r.done, r.holds = time.monotonic(), False, False
        r.stderr_tail.clear()
        prefix = f"[rank {r.rank}] ".encode()
        echo = not self.log_dir or self.tee
        logs = self.log_files(r)
        r.pumps = [threading.Thread(target=_pump, args=(stream, out if echo else None, prefix, self.out_lock, log,
                                                        tail), daemon=True)
                   for stream, out, log, tail in ((r.proc.stdout, sys.stdout.buffer, logs[0], None),
                                                  (r.proc.stderr, sys.stderr.buffer, logs[1], r.stderr_tail))]
        for t in r.pumps:
            t.start()

    def signal_all(self, sig: int) -> None:
        for r in self.ranks:
            if r.proc is not None and r.proc.poll() is None:
                try:
                    os.killpg(r.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def stop_all(self) -> None:
        """SIGTERM every running process, SIGKILL what is left after the stop timeout, and collect them."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline and any(r.proc and r.proc.poll() is None for r in self.ranks):
            time.sleep(POLL_S)
        left = [r for r in self.ranks if r.proc and r.proc.poll() is None]
        if left:
            _say(f"ranks {', '.join(str(r.rank) for r in left)} did not stop within {self.stop_timeout_s:g}s; "
                 "killing them")
            self.signal_all(signal.SIGKILL)
        for r in self.ranks:
            if r.proc is not None:
                try:
                    r.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                r.done = True
        self.drain_output()

    def drain_output(self) -> None:
        for r in self.ranks:
            for t in r.pumps:
                t.join(1.0)

    def on_signal(self, signum, frame) -> None:
        if self.signalled:  # a second one: no more patience
            self.signal_all(signal.SIGKILL)
            return
        self.signalled = signum
        self.signal_all(signum)

    def summary(self, first: Rank) -> None:
        """Name each failed rank (the one that ended the run first), its exit and the last lines of its stderr."""
        failed = [r for r in self.ranks if r.failures]
        lines = [f"failure summary: {len(failed)} of {len(self.ranks)} rank(s) failed; rank {first.rank} failed "
                 "for good and ended the run"]
        for r in failed:
            for attempt, (code, tail) in enumerate(r.failures, 1):
                where = (f"; its output: {os.path.join(self.log_dir, f'rank{r.rank}')}/" if self.log_dir else "")
                lines.append(f"  rank {r.rank} (attempt {attempt}): {_describe_exit(code)} "
                             f"(exit code {_exit_code(code)}){where}")
                lines += [f"    | {line}" for line in tail] or ["    (no output on stderr)"]
        _say("\n".join(lines))

    # -- the broker's view -----------------------------------------------------------------------------------
    def wait_reclaimed(self, pid: int) -> None:
        """Until the broker no longer lists ``pid`` as an owner (it checks liveness every ~0.1 s)."""
        deadline = time.monotonic() + RECLAIM_WAIT_S
        while time.monotonic() < deadline:
            doc = _status(self.directory)
            if doc is None or all(lease.pid != pid for lease in doc.leases):
                return
            time.sleep(0.1)

    def watch_ready(self, now: float) -> None:
        """Report, while starting, how many processes hold their cores."""
        if now < self.next_watch or now > self.watch_until:
            return
        self.next_watch = now + READY_POLL_S
        live = [r for r in self.ranks if r.proc is not None and not r.done]
        if not live or all(r.holds for r in live):
            return
        doc = _status(self.directory)
        if doc is None:
            return
        owners = {lease.pid: lease.cores for lease in doc.leases}
        for r in live:
            if not r.holds:
                r.holds = any(pid in owners for pid in _tree(r.proc.pid))
        holding = sum(1 for r in self.ranks if r.holds)
        if holding != self.reported_holding:
            self.reported_holding = holding
            if holding == len(self.ranks):
                cores = sorted(c for r in self.ranks for pid in _tree(r.proc.pid) for c in owners.get(pid, []))
                _say(f"all {len(self.ranks)} processes ready: they hold {format_cores(cores)}")
            elif holding:
                _say(f"{holding}/{len(self.ranks)} processes hold their cores")

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.on_signal)
        try:
            for r in self.ranks:
                self.start(r)
        except OSError as exc:
            _say(f"cannot run {' '.join(self.cmd)!r}: {exc.strerror or exc}; check the command after '--'")
            self.stop_all()
            return 127
        _say(f"started {len(self.ranks)} processes: "
             + ", ".join(f"rank {r.rank} pid {r.proc.pid}" for r in self.ranks) + "; waiting for them to take "
             "their cores ...")
        self.watch_until = time.monotonic() + READY_WATCH_S
        while True:
            if self.signalled:
                _say(f"got {signal.Signals(self.signalled).name}; forwarded it to every process, waiting for them")
                self.stop_all()
                return 128 + self.signalled
            for r in self.ranks:
                if r.done or r.proc is None:
                    continue
                code = r.proc.poll()
                if code is None:
                    continue
                r.done = True
                if code == 0:
                    _say(f"rank {r.rank} (pid {r.proc.pid}) finished")
                    continue
                for t in r.pumps:
                    t.join(1.0)
                r.failures.append((code, [line.decode(errors="replace").rstrip("\n") for line in r.stderr_tail]))
                if r.restarts < self.max_restarts and not self.signalled:
                    r.restarts += 1
                    _say(f"rank {r.rank} (pid {r.proc.pid}) failed with {_describe_exit(code)}; restarting it "
                         f"(restart {r.restarts} of {self.max_restarts})")
                    for t in r.pumps:
                        t.join(1.0)
                    self.wait_reclaimed(r.proc.pid)
                    self.start(r)
                    self.watch_until = max(self.watch_until, time.monotonic() + READY_WATCH_S)
                    self.reported_holding = -1
                    continue
                others = sum(1 for o in self.ranks if not o.done)
                _say(f"rank {r.rank} (pid {r.proc.pid}) failed with {_describe_exit(code)}"
                     + (f" after {r.restarts} restart(s)" if r.restarts else "")
                     + (f"; stopping the other {others} process(es)" if others else ""))
                self.failure = (r, code)
                self.stop_all()
                self.summary(r)
                _say(f"exiting with code {_exit_code(code)} (rank {r.rank})")
                return _exit_code(code)
            if all(r.done for r in self.ranks):
                self.drain_output()
                _say(f"all {len(self.ranks)} processes finished successfully")
                return 0
            now = time.monotonic()
            self.watch_ready(now)
            time.sleep(POLL_S)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a command like ``bash -c 'python app.py'`` owns cores from a child)."""
    import psutil

    try:
        return [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [pid]


def parser() -> argparse.ArgumentParser:
    from .cli import Formatter, add_version, plain

    p = argparse.ArgumentParser(prog="neuron-run", description=plain(__doc__), formatter_class=Formatter)
    add_version(p)
    p.add_argument("--nproc", "--nproc-per-node", dest="nproc", type=int, required=True,
                   help="number of processes to launch (--nproc-per-node: torchrun's name)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--cores-per-proc", type=int, default=None,
                     help="K consecutive cores per process via NEURON_RT_VISIBLE_CORES (default 1)")
    how.add_argument("--num-cores", type=int, default=None,
                     help="K cores per process via NEURON_RT_NUM_CORES (the broker picks them)")
    p.add_argument("--first-core", type=int, default=0, help="first core of rank 0 with --cores-per-proc")
    p.add_argument("--max-restarts", type=int, default=0, help="restart a failed process up to R times")
    p.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT_S,
                   help="seconds a process gets to exit after SIGTERM before it is killed")
    p.add_argument("--log-dir", default=None,
                   help="write each rank's output to DIR/rank{r}/stdout.log and stderr.log (appended across "
                        "restarts) instead of the terminal")
    p.add_argument("--tee", action="store_true", help="with --log-dir, also show the output on the terminal")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command to run (after --)")
    return p


def main(argv=None) -> int:
    from .cli import guarded

    return guarded(_main, argv)


def _main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the command to run after '--', e.g. neuron-run --nproc 2 -- python serve.py")
    if args.max_restarts < 0:
        p.error(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.tee and not args.log_dir:
        p.error("--tee copies the output that --log-dir writes to files: give --log-dir DIR too")
    if cmd[0].endswith(".py") and not os.access(cmd[0], os.X_OK):
        cmd = [sys.executable, *cmd]
    per_proc = next(k for k in (args.num_cores, args.cores_per_proc, 1) if k is not None)
    directory = config.broker_dir()
    try:
        pong = autostart.ensure_broker(directory)
        address = config.broker_address(directory)
        cores_per_rank = plan(args.nproc, per_proc, args.num_cores is not None, args.first_core, pong.cores,
                              pong.backend, address)
        doc = _status(directory)
        if doc is not None and doc.broker.draining:
            raise LaunchError(f"the broker at {address} is draining: it grants no new leases, so no rank could take "
                              "its cores; resume it with 'neuron-broker drain --cancel' (or wait for the operator "
                              "who drains it)")
        check_free(cores_per_rank, per_proc, doc)
    except (LaunchError, NeuronRuntimeError) as exc:
        print(f"neuron-run: {exc}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    base = dict(os.environ)
    for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES"):
        base.pop(var, None)
    base.setdefault(config.ENV_BROKER_DIR, directory)
    base.setdefault("MASTER_ADDR", "127.0.0.1")
    base.setdefault("MASTER_PORT", str(_free_port()))
    base["PYTHONUNBUFFERED"] = "1"  # lines appear as they are printed, not when a buffer fills
    ranks = []
    for r, cores in enumerate(cores_per_rank):
        env = dict(base, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(args.nproc),
                   LOCAL_WORLD_SIZE=str(args.nproc))
        if cores is None:
            env["NEURON_RT_NUM_CORES"] = str(per_proc)
        else:
            env["NEURON_RT_VISIBLE_CORES"] = format_visible(cores)
        ranks.append(Rank(r, env, cores))
    if args.num_cores is not None:
        _say(f"starting {args.nproc} processes with {per_proc} cores each (NEURON_RT_NUM_CORES={per_proc}) on the "
             f"broker's {pong.cores} {pong.backend} cores ...")
    else:
        all_cores = [c for cores in cores_per_rank for c in cores]
        _say(f"starting {args.nproc} processes on cores {format_visible(all_cores)} ({per_proc} each: "
             + ", ".join(f"rank {r} {format_cores(c)}" for r, c in enumerate(cores_per_rank)) + ") ...")
    return Launcher(cmd, ranks, args.max_restarts, args.stop_timeout, directory,
                    os.path.abspath(args.log_dir) if args.log_dir else None, args.tee).run()


if __name__ == "__main__":
    sys.exit(main())
