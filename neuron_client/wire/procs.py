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
