"""Where the broker lives and the named time limits of the runtime.

Every timeout is a named constant with its unit in the name; every path comes from here.
"""
from __future__ import annotations

import os
import stat

from .errors import NeuronRuntimeError

ENV_BROKER_DIR = "NEURON_BROKER_DIR"
ENV_BROKER_ADDRESS = "NEURON_BROKER_ADDRESS"
ENV_BROKER_KEYS = "NEURON_BROKER_KEYS"  # directory of CURVE keys for TCP (default: <broker dir>/curve)
ENV_AUTOSTART = "NEURON_BROKER_AUTOSTART"
ENV_ACQUIRE_TIMEOUT = "NEURON_RT_ACQUIRE_TIMEOUT"
ENV_CALL_TIMEOUT = "NEURON_CALL_TIMEOUT"

# Control plane.
BROKER_PING_TIMEOUT_S = 2.0
BROKER_REQUEST_TIMEOUT_S = 10.0
BROKER_START_TIMEOUT_S = 60.0
HEARTBEAT_INTERVAL_S = 0.2
LEASE_TIMEOUT_S = 1.0  # a lease with no heartbeat for this long is reclaimed
BROKER_TICK_S = 0.05
WORKER_STATS_INTERVAL_S = 0.5
WORKER_ASSIGN_WAIT_S = 2.0  # how long a worker waits for the broker's word on a lease token it has not seen yet
WORKER_START_TIMEOUT_S = 60.0

# Data plane.
DEFAULT_CALL_TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 600.0
LIVENESS_POLL_S = 0.25  # while waiting for a reply, check this often that the worker is still alive
SHM_THRESHOLD_BYTES = 64 * 1024  # tensors this large travel through shared memory (measured crossover: scripts/bench)
ENV_SHM_THRESHOLD = "NEURON_SHM_THRESHOLD_BYTES"
MAX_MESSAGE_BYTES = 1 << 30  # a worker refuses (with an error reply) data messages larger than this


def shm_threshold_bytes() -> int:
    """A client's shared-memory threshold: ``NEURON_SHM_THRESHOLD_BYTES``, else the measured default."""
    return int(os.environ.get(ENV_SHM_THRESHOLD, SHM_THRESHOLD_BYTES))


def call_timeout_s() -> float:
    return float(os.environ.get(ENV_CALL_TIMEOUT, DEFAULT_CALL_TIMEOUT_S))


def broker_dir() -> str:
    """The private directory holding the broker's sockets, pid file and log."""
    d = os.environ.get(ENV_BROKER_DIR)
    if d:
        return os.path.abspath(d)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "neuron-broker")
    return f"/tmp/neuron-broker-{os.getuid()}"


def ensure_private_dir(path: str) -> str:
    """Create ``path`` with mode 0700, or check that an existing one is ours and closed to others."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise NeuronRuntimeError(
            f"broker directory {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
            f"set {ENV_BROKER_DIR} to a directory of your own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NeuronRuntimeError(
            f"broker directory {path} is writable by others (mode {oct(st.st_mode & 0o777)}); "
            f"run 'chmod 700 {path}' or set {ENV_BROKER_DIR} to a private directory"
        )
    return path


def broker_address(directory: str | None = None) -> str:
    return os.environ.get(ENV_BROKER_ADDRESS) or f"ipc://{os.path.join(directory or broker_dir(), 'broker.sock')}"


def workers_address(directory: str) -> str:
    return f"ipc://{os.path.join(directory, 'workers.sock')}"


def worker_address(directory: str, core: int) -> str:
    return f"ipc://{os.path.join(directory, f'core-{core}.sock')}"


def pid_file(directory: str) -> str:
    return os.path.join(directory, "broker.pid")


def log_file(directory: str) -> str:
    return os.path.join(directory, "broker.log")


def autostart_enabled() -> bool:
    return os.environ.get(ENV_AUTOSTART, "1").strip().lower() not in ("0", "false", "no", "off")
