"""Where the broker lives and the named time limits of the runtime.

Every timeout is a named constant with its unit in the name; every path comes from here.
"""
from __future__ import annotations

import os
import stat

from neuron_client.wire.errors import ConfigError, NeuronRuntimeError

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
# On the socket path (not the fast path's mailbox), tensors this large travel through shared memory: 16 KiB, the
# crossover `scripts/bench --only dispatch` measured (shared memory 1.13x faster at 16 KiB, a tie at 4 KiB); the README
# states the same number.
SHM_THRESHOLD_BYTES = 16 * 1024
ENV_SHM_THRESHOLD = "NEURON_SHM_THRESHOLD_BYTES"
MAX_MESSAGE_BYTES = 1 << 30  # a worker refuses (with an error reply) data messages larger than this


# -- environment variables ---------------------------------------------------------------------------------------
# Each is parsed and checked when first read; a bad value raises ConfigError naming the variable, the value and an
# example. The parsed value is kept with the text it came from, so that the call path does not parse again (an
# accessor costs one environment lookup) and a changed variable is read afresh.
_parsed: dict[str, tuple[str | None, object]] = {}
_BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _setting(name: str, parse, env=None):
    """``parse(text or None)`` of variable ``name``, cached per text (``env``: another mapping, not cached)."""
    if env is not None:
        return parse(env.get(name))
    raw = os.environ.get(name)
    hit = _parsed.get(name)
    if hit is not None and hit[0] == raw:
        return hit[1]
    value = parse(raw)
    _parsed[name] = (raw, value)
    return value


def parse_seconds(name: str, text: str | None, default: float, minimum: float = 0.0, allow_minimum: bool = True,
                  error=None) -> float:
    """Seconds in ``text`` (``30``, ``2.5``, ``10s``, ``500ms``); ``default`` when unset or empty."""
    text = (text or "").strip()
    if not text:
        return default
    low = text.lower()
    scale, number = (1e-3, low[:-2]) if low.endswith("ms") else (1.0, low[:-1]) if low.endswith("s") else (1.0, low)
    try:
        value = float(number) * scale
    except ValueError:
        value = float("nan")
    if not (value > minimum or (allow_minimum and value == minimum)) or value != value or value == float("inf"):
        bound = f">= {minimum:g}" if allow_minimum else f"> {minimum:g}"
        raise (error or ConfigError)(
            f"{name}={text!r} is not a number of seconds {bound}; set it like {name}=30 (or 30s, 500ms), or unset "
            f"it for the default ({default:g})")
    return value


def parse_bytes(name: str, text: str | None, default: int) -> int:
    """A byte count in ``text`` (``65536``, ``64k``, ``64KiB``, ``1M``); ``default`` when unset or empty."""
    text = (text or "").strip()
    if not text:
        return default
    low = text.lower().replace(" ", "")
    digits = low.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = low[len(digits):]
    try:
        value = float(digits) * _BYTE_UNITS[unit]
    except (ValueError, KeyError):
        value = -1.0
    if value < 0 or value != value or value == float("inf") or value != int(value):
        raise ConfigError(f"{name}={text!r} is not a size in bytes; set it like {name}=65536 (or 64k, 1MiB), or "
                          f"unset it for the default ({default})")
    return int(value)


def parse_flag(name: str, text: str | None, default: bool) -> bool:
    text = (text or "").strip().lower()
    if not text:
        return default
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{name}={text!r} is not a yes/no setting; set it like {name}=0 (or 1, true, false, yes, "
                      f"no, on, off), or unset it for the default ({'1' if default else '0'})")


def shm_threshold_bytes() -> int:
    """A client's shared-memory threshold: ``NEURON_SHM_THRESHOLD_BYTES``, else the measured default."""
    return _setting(ENV_SHM_THRESHOLD, lambda t: parse_bytes(ENV_SHM_THRESHOLD, t, SHM_THRESHOLD_BYTES))


def call_timeout_s() -> float:
    """Seconds a call may take: ``NEURON_CALL_TIMEOUT`` (> 0), else :data:`DEFAULT_CALL_TIMEOUT_S`. Cheap: the
    parsed value is cached."""
    return _setting(ENV_CALL_TIMEOUT, lambda t: parse_seconds(ENV_CALL_TIMEOUT, t, DEFAULT_CALL_TIMEOUT_S,
                                                              allow_minimum=False))


def acquire_timeout_s(env=None) -> float:
    """Seconds an acquire waits for busy cores: ``NEURON_RT_ACQUIRE_TIMEOUT`` (>= 0; default 0, fail at once). A bad
    value is a :class:`NeuronCoreSpecError` (it is part of the core request)."""
    from neuron_client.wire.errors import NeuronCoreSpecError

    return _setting(ENV_ACQUIRE_TIMEOUT, lambda t: parse_seconds(ENV_ACQUIRE_TIMEOUT, t, 0.0,
                                                                 error=NeuronCoreSpecError), env)


def validate_env() -> None:
    """Read (and so check) every variable of the runtime: a process fails at its start, not at its first call."""
    shm_threshold_bytes()
    call_timeout_s()
    acquire_timeout_s()
    autostart_enabled()
    broker_address()
    broker_dir()
    fast_path_enabled()
    fast_path_spin_us()


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


def _parse_address(text: str | None) -> str:
    text = (text or "").strip()
    if text and not text.startswith(("ipc://", "tcp://")):
        raise ConfigError(f"{ENV_BROKER_ADDRESS}={text!r} is not a broker address; set it like "
                          f"{ENV_BROKER_ADDRESS}=tcp://10.0.0.5:7700 (or ipc:///path/broker.sock), or unset it to use "
                          "the broker directory's socket")
    return text


def broker_address(directory: str | None = None) -> str:
    explicit = _setting(ENV_BROKER_ADDRESS, _parse_address)
    return explicit or f"ipc://{os.path.join(directory or broker_dir(), 'broker.sock')}"


def workers_address(directory: str) -> str:
    return f"ipc://{os.path.join(directory, 'workers.sock')}"


def worker_address(directory: str, core: int) -> str:
    return f"ipc://{os.path.join(directory, f'core-{core}.sock')}"


def pid_file(directory: str) -> str:
    return os.path.join(directory, "broker.pid")


def log_file(directory: str) -> str:
    return os.path.join(directory, "broker.log")


def autostart_enabled() -> bool:
    return _setting(ENV_AUTOSTART, lambda t: parse_flag(ENV_AUTOSTART, t, True))


# -- the co-located fast path (neuron_client.wire.mailbox) ---------------------------------------------------------
ENV_FAST_PATH = "NEURON_FAST_PATH"  # "0": every call takes the socket path
ENV_FAST_PATH_SPIN_US = "NEURON_FAST_PATH_SPIN_US"  # a client's spin before it blocks (default: its worker's)
FAST_PATH_SPIN_US = 100  # a worker's spin after a reply, where cores have CPUs of their own (0 where they share)


def fast_path_enabled() -> bool:
    """``NEURON_FAST_PATH``: calls to a worker on this host go through a mailbox (default 1)."""
    return _setting(ENV_FAST_PATH, lambda t: parse_flag(ENV_FAST_PATH, t, True))


def _parse_spin(text: str | None) -> int | None:
    text = (text or "").strip().lower()
    if not text:
        return None
    try:
        spin = float(text[:-2]) if text.endswith("us") else float(text)
    except ValueError:
        spin = -1.0
    if not 0 <= spin < 1e6:
        raise ConfigError(f"{ENV_FAST_PATH_SPIN_US}={text!r} is not a number of microseconds from 0 to 999999; set "
                          f"it like {ENV_FAST_PATH_SPIN_US}=50 (0: never spin), or unset it for the worker's "
                          f"({FAST_PATH_SPIN_US} where cores have CPUs of their own, else 0)")
    return int(spin)


def fast_path_spin_us() -> int | None:
    """The client's spin budget from ``NEURON_FAST_PATH_SPIN_US``; None: its worker's."""
    return _setting(ENV_FAST_PATH_SPIN_US, _parse_spin)
