"""Where the broker lives and the named time limits of the runtime.

Every timeout is a named constant with its unit in the name; every path comes from here.
"""
from __future__ import annotations

import os
import stat

from neuron_client.wire.errors import NeuronRuntimeError

ENV_BROKER_DIR = "NEURON_BROKER_DIR"
ENV_BROKER_ADDRESS = "NEURON_BROKER_ADDRESS"
ENV_BROKER_KEYS = "NEURON_BROKER_KEYS"  # directory of CURVE keys for TCP (default: <broker dir>/curve)
ENV_AUTOSTART = "NEURON_BROKER_AUTOSTART"
ENV_ACQUIRE_TIMEOUT = "NEURON_RT_ACQUIRE_TIMEOUT"
ENV_CALL_TIMEOUT = "NEURON_CALL_TIMEOUT"

# Control plane.
BROKER_PING_TIMEOUT_S = 2.0
# Exit codes of ``neuron-broker`` (the client's autostart reads the second).
EXIT_NOT_RUNNING = 1  # a command found no broker answering
EXIT_ALREADY_RUNNING = 3  # start: another broker holds the directory's instance lock
BROKER_REQUEST_TIMEOUT_S = 10.0
ACQUIRE_TIMEOUT_S = 45.0  # an acquire waits this long for its grant (the broker gives up on slow workers after 30 s)
BROKER_START_TIMEOUT_S = 60.0
HEARTBEAT_INTERVAL_S = 0.2
LEASE_TIMEOUT_S = 0.0  # opt-in (--lease-timeout): reclaim an owner stopped by a signal this long; 0 = never
LEASE_LINK_RETRY_S = 0.1  # an owner whose broker went away tries to re-attach this often
BROKER_TICK_S = 0.05
WORKER_STATS_INTERVAL_S = 0.5
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
    """Create ``path`` (and missing parents) with mode 0700, or verify that the existing one is private.

    Another local user may have planted the directory (``/tmp/neuron-broker-$UID`` is guessable), so nothing is
    assumed: the final component is opened with ``O_NOFOLLOW`` and checked on that descriptor: a real directory,
    owned by us, mode 0700, in a parent that only we or root can change. Anything else raises
    :class:`NeuronRuntimeError` naming the path, its owner and what to do. Returns ``path``.
    """
    real = os.path.abspath(path)  # no trailing slash: O_NOFOLLOW applies to the last component
    created = _make_dirs(real)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        try:
            st = os.lstat(real)
        except OSError:
            raise NeuronRuntimeError(f"cannot open broker directory {path}: {exc.strerror or exc}; "
                                     f"set {ENV_BROKER_DIR} to a directory of your own") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else
                    "not a directory" if not stat.S_ISDIR(st.st_mode) else "not yours")
            raise _not_private(path, st, what) from None
        raise NeuronRuntimeError(f"cannot open broker directory {path}: {exc.strerror or exc}; "
                                 f"run 'chmod 700 {path}' or set {ENV_BROKER_DIR} to a directory of your own") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode) & 0o777
        if st.st_uid != os.getuid():
            raise _not_private(path, st, "not yours")
        if mode != 0o700:
            if not created:
                why = ("writable by others" if mode & 0o022 else "open to others" if mode & 0o077
                       else "you cannot use it")
                raise NeuronRuntimeError(
                    f"refusing broker directory {path}: its mode is {mode:04o}, not 0700 ({why}); "
                    f"run 'chmod 700 {path}' or set {ENV_BROKER_DIR} to a private directory")
            os.fchmod(fd, 0o700)  # we just made it: only the umask differs
    finally:
        os.close(fd)
    _check_parent(real)
    return path


def _make_dirs(path: str) -> bool:
    """Create the missing components of ``path`` one by one, mode 0700; True if we created the last one."""
    parts = path.split(os.sep)
    created = False
    for i in range(2, len(parts) + 1):
        part = os.sep.join(parts[:i])
        created = False
        if os.path.lexists(part):
            continue
        try:
            os.mkdir(part, 0o700)  # never follows a symlink: an existing name, link or not, is left alone
            created = True
        except FileExistsError:
            pass  # someone else made it just now: it is checked like any existing one
        except OSError as exc:
            raise NeuronRuntimeError(f"cannot create broker directory {part}: {exc.strerror or exc}; "
                                     f"set {ENV_BROKER_DIR} to a directory of your own") from None
    return created


def _check_parent(path: str) -> None:
    """Refuse a parent in which another user could replace ``path``: one owned by someone else (root aside), or one
    that every user can write without the sticky bit."""
    parent = os.path.dirname(path)
    st = os.stat(parent)
    if st.st_uid not in (0, os.getuid()):
        raise _not_private(path, st, f"its parent {parent} is not yours", subject=parent)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise NeuronRuntimeError(
            f"refusing broker directory {path}: its parent {parent} is writable by every user (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, no sticky bit), so anyone could replace it; set {ENV_BROKER_DIR} "
            f"to a directory of your own (e.g. {_example_dir()})")


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _not_private(path: str, st: os.stat_result, why: str, subject: str | None = None) -> NeuronRuntimeError:
    subject = subject or path
    return NeuronRuntimeError(
        f"refusing broker directory {path}: {why} ({subject} belongs to {_owner(st.st_uid)}, you are "
        f"{_owner(os.getuid())}); another user may have planted it. Set {ENV_BROKER_DIR} to a directory of your "
        f"own (e.g. {_example_dir()}), or remove {subject} if it is not in use")


def _example_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return f"{ENV_BROKER_DIR}={os.path.join(runtime, 'neuron-broker') if runtime else '$(mktemp -d)/broker'}"


def peer_uid_ok(uid: int) -> bool:
    """Whether a peer (its uid from ``SO_PEERCRED``) may talk to us: only our own user."""
    return isinstance(uid, int) and not isinstance(uid, bool) and uid == os.getuid()


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


# -- the co-located fast path (neuron_client.wire.mailbox) ---------------------------------------------------------
ENV_FAST_PATH = "NEURON_FAST_PATH"  # "0": every call takes the socket path
ENV_FAST_PATH_SPIN_US = "NEURON_FAST_PATH_SPIN_US"  # a client's spin before it blocks (default: its worker's)
FAST_PATH_SPIN_US = 100  # a worker's spin after a reply, where cores have CPUs of their own (0 where they share)


def fast_path_enabled() -> bool:
    value = os.environ.get(ENV_FAST_PATH, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_FAST_PATH}={value!r} is not a switch; use 1 (the default) or 0, e.g. {ENV_FAST_PATH}=0")


def fast_path_spin_us() -> int | None:
    """The client's spin budget from ``NEURON_FAST_PATH_SPIN_US``; None: its worker's."""
    value = os.environ.get(ENV_FAST_PATH_SPIN_US)
    if value is None or value.strip() == "":
        return None
    try:
        spin = int(value)
        if spin < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{ENV_FAST_PATH_SPIN_US}={value!r} is not a number of microseconds >= 0; "
                         f"e.g. {ENV_FAST_PATH_SPIN_US}=50 (0: never spin)") from None
    return spin
