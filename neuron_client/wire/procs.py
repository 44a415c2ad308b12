"""Processes: is one alive, and stop some (SIGTERM, a grace period, then SIGKILL). Written once, used everywhere."""
from __future__ import annotations

import os
import signal
import time

import psutil

_pid = os.getpid()  # this process's pid, kept current across fork without a system call per use


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current_pid() -> int:
    """``os.getpid()`` without the system call (the call path asks on every call)."""
    return _pid


CPU_FREE_TTL_S = 0.05  # how long a look at the run queue stands
CPU_BUSY_LOOKS = 2  # a host is busy once this many looks in a row found more runnable threads than CPUs
_cpu_free = [0.0, False, CPU_BUSY_LOOKS]  # (when looked, a CPU was free, looks in a row that found the host busy)


def cpu_free(now: float) -> bool:
    """No thread of this host waits for a CPU: at most as many runnable threads as CPUs (``/proc/loadavg``'s running
    count: the caller and the peer it waits for among them), looked at most every :data:`CPU_FREE_TTL_S` (``now``:
    ``time.perf_counter()``). A spin before blocking pays only then; on a busier host it takes a CPU that a runnable
    thread (the peer, maybe) is waiting for.

    One look is a snapshot: a thread that wakes for a moment (a timer, a kernel worker) makes the count exceed the
    CPUs, and the scheduler gives it a CPU at once anyway (a woken thread preempts a spinning one). So the host counts
    as busy only after :data:`CPU_BUSY_LOOKS` looks in a row found it so: at least one TTL of sustained contention,
    which stops a spin within ``CPU_BUSY_LOOKS * CPU_FREE_TTL_S`` of a real load, not for every passing thread."""
    state = _cpu_free
    if now - state[0] < CPU_FREE_TTL_S:
        return state[1]
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
        busy = 0 if running <= (os.cpu_count() or 1) else state[2] + 1
    except (OSError, IndexError, ValueError):
        busy = CPU_BUSY_LOOKS
    state[0], state[1], state[2] = now, busy < CPU_BUSY_LOOKS, busy
    return state[1]


def command_line(proc: psutil.Process) -> str:
    """A process's command line as one string; the empty arguments a process renamed with setproctitle leaves
    (its title, then NULs) are dropped. Raises psutil.Error."""
    return " ".join(arg for arg in proc.cmdline() if arg)


def pid_running(pid: int) -> bool:
    """True if ``pid`` is a process that has not exited (a zombie has)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError, OverflowError):
        return False


def stop_processes(pids, grace_s: float = 2.0, sig: int = signal.SIGTERM, groups: bool = False) -> None:
    """Send ``sig`` to each pid, wait up to ``grace_s`` for them to exit, then SIGKILL the rest. With ``groups``
    (each pid leads its own process group, e.g. a broker and its workers), SIGKILL what is left of each group."""
    pids = [p for p in pids if p]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_running(p) for p in pids):
        time.sleep(0.02)
    for pid in pids:
        if pid_running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for pid in pids if groups else ():
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
