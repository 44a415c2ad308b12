"""Find the broker, or start one in the background: safely when several processes start at once.

The first client that finds no broker takes ``autostart.lock`` in the broker directory, checks again, and starts
``python -P -m broker start --foreground`` as a detached process logging to ``broker.log``; the others wait on the lock
and then find the broker it started. The directory is verified private (:func:`config.ensure_private_dir`) before
its pid file is read or its socket spoken to, and the broker runs there, never in the caller's working directory.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

from neuron_client.wire import config
from neuron_client.wire.broker_client import BrokerClient
from neuron_client.wire.errors import BrokerUnavailableError
from neuron_client.wire.procs import pid_running


def _ping(address: str, timeout_s: float):
    with BrokerClient(address) as broker:
        return broker.ping(timeout_s)


def running_pid(directory: str) -> int:
    """The pid in the broker's pid file if that process is alive, else 0."""
    try:
        with open(config.pid_file(directory)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0
    return pid if pid > 0 and pid_running(pid) else 0


# Before 3.11 (no -P): drop sys.path[0] (the working directory) before importing the broker.
_RUN_BROKER = ("import sys; sys.path[:1] = []; import runpy; "
               "runpy.run_module('broker', run_name='__main__', alter_sys=True)")


def broker_command(version=sys.version_info) -> list[str]:
    """The interpreter command that runs ``python -m broker`` without putting the working directory on
    ``sys.path`` (a ``broker/`` planted there must never run): ``-P`` on Python 3.11+."""
    if version >= (3, 11):
        return [sys.executable, "-P", "-m", "broker"]
    return [sys.executable, "-c", _RUN_BROKER]


def safe_pythonpath(value: str) -> str:
    """``PYTHONPATH`` for the broker: relative entries made absolute (it runs in its own directory), empty ones
    (which would mean the working directory) dropped."""
    return os.pathsep.join(os.path.abspath(p) for p in value.split(os.pathsep) if p)


LOG_TAIL_LINES = 12


def log_tail(directory: str, lines: int = LOG_TAIL_LINES, since: int = 0) -> str:
    """The last ``lines`` lines of the broker's log written after byte ``since`` (indented), or '' if none."""
    try:
        with open(config.log_file(directory), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(since, size - 64 * 1024) if size >= since else 0)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join("    " + line for line in tail)


def _failed(what: str, directory: str, since: int) -> str:
    tail = log_tail(directory, since=since)
    return (f"{what}; the last lines of {config.log_file(directory)}:\n{tail}" if tail else
            f"{what}; see {config.log_file(directory)}")


def spawn_broker(directory: str, cores: int | None = None, extra_args=(),
                 timeout_s: float = config.BROKER_START_TIMEOUT_S, detach: bool = False):
    """Start a broker in the background and wait until it answers; returns its :class:`protocol.Pong`.

    The broker runs in its own session, in ``directory`` (checked private first; never the caller's working
    directory, see :func:`broker_command`), logging to ``broker.log``. With ``detach`` it is started through
    ``neuron-broker start``, which exits once the broker answers, so the broker is not even a child of this process
    (a supervisor such as Ray kills its workers' children when they exit).
    """
    directory = os.path.abspath(directory)
    config.ensure_private_dir(directory)
    command = ["start", "--dir", directory] if detach else ["start", "--foreground", "--dir", directory]
    args = [*broker_command(), *command]
    if cores:
        args += ["--cores", str(cores)]
    args += list(extra_args)
    env = dict(os.environ, **{config.ENV_BROKER_DIR: directory})
    for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES", "OMP_NUM_THREADS"):  # not the broker's business
        env.pop(var, None)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = safe_pythonpath(env["PYTHONPATH"])
    address = config.broker_address(directory)
    if detach:
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                              timeout=timeout_s, cwd=directory)
        pong = _ping(address, config.BROKER_PING_TIMEOUT_S)
        if pong is None:
            raise BrokerUnavailableError(
                f"could not start the broker in {directory} (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}; see {config.log_file(directory)}")
        return pong
    with open(config.log_file(directory), "ab") as log:
        since = log.tell()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=directory,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        pong = _ping(address, 0.5)
        if pong is not None:
            return pong
        if code is not None:
            if code == config.EXIT_ALREADY_RUNNING:  # another broker won the race; it answers soon
                continue
            raise BrokerUnavailableError(_failed(f"the broker exited with code {code} while starting", directory,
                                                 since))
    raise BrokerUnavailableError(_failed(f"the broker did not answer within {timeout_s:.0f}s of starting",
                                         directory, since))


def ensure_broker(directory: str | None = None, cores: int | None = None, detach: bool = False,
                  autostart: bool | None = None):
    """The broker's :class:`protocol.Pong`, starting one (``cores``, default the CPU count) when none runs.

    Safe when several processes call it at once: the first takes ``autostart.lock`` and starts the broker, the others
    wait on the lock and find it. ``autostart`` defaults to ``NEURON_BROKER_AUTOSTART``.
    """
    directory = directory or config.broker_dir()
    address = config.broker_address(directory)
    explicit = os.environ.get(config.ENV_BROKER_ADDRESS)
    if not explicit:  # before trusting its pid file or talking to its socket: another user may have planted them
        config.ensure_private_dir(directory)
    if explicit or running_pid(directory):
        pong = _ping(address, config.BROKER_PING_TIMEOUT_S)
        if pong is not None:
            return pong
        if explicit:
            raise BrokerUnavailableError(f"no broker answers at {config.ENV_BROKER_ADDRESS}={explicit}; "
                                         "start one there or unset the variable")
    if not (config.autostart_enabled() if autostart is None else autostart):
        raise BrokerUnavailableError(
            f"no broker is running (looked in {directory}) and {config.ENV_AUTOSTART}=0; "
            "start one with 'neuron-broker start' or unset the variable")
    fd = os.open(os.path.join(directory, "autostart.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if running_pid(directory):
            pong = _ping(address, config.BROKER_START_TIMEOUT_S)
            if pong is not None:
                return pong
        return spawn_broker(directory, cores, detach=detach)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
