"""Start the test processes (``python -m tests.procs.<name>``) by fork from a process that has imported torch.

A fresh interpreter spends seconds of CPU importing torch, and the suite starts a hundred such processes on a 2-CPU
machine; the broker starts its workers the same way (a forkserver that preloads them). Each process is still a real,
separate process: its own session, stdin, stdout and stderr, environment, working directory and command line (set
with setproctitle, so that the broker's status names it as it would name ``python -m tests.procs.<name>``), fresh
random seeds, and a normal exit (its threads joined, its atexit hooks run, its exit code reported).

The zygote is one process per test session (:func:`spawn` starts it at need); it dies with the session's process.
``NRT_TEST_ZYGOTE=0`` starts every process with ``subprocess.Popen`` instead, as does any failure to reach it.

Protocol, over an AF_UNIX stream per process: the request (a JSON map: module, env, cwd) with three file descriptors
(stdin, stdout, stderr) by ``SCM_RIGHTS``; the answer ``{"pid": n}``; later ``{"exit": code}`` when the process
ends, after which the zygote closes the connection.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ENV_SWITCH = "NRT_TEST_ZYGOTE"
START_TIMEOUT_S = 120.0  # the zygote imports torch: seconds on a loaded 2-CPU machine
REQUEST_TIMEOUT_S = 10.0


class ZygoteProc:
    """The part of ``subprocess.Popen`` the tests use, for a process the zygote forked: ``pid``, ``stdin``,
    ``stdout``, ``returncode``, :meth:`poll`, :meth:`wait`."""

    def __init__(self, conn: socket.socket, pid: int, stdin, stdout, stderr=None, received: bytes = b""):
        self.conn = conn
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode = None
        self._buffer = received  # what the zygote sent after the pid (its exit line, for a process that ended)

    def _take(self, timeout_s: float | None) -> None:
        """Read the exit code, waiting at most ``timeout_s`` (None: as long as it takes)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.returncode is None and b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.conn.settimeout(left)
            try:
                chunk = self.conn.recv(4096)
            except (BlockingIOError, socket.timeout):
                raise subprocess.TimeoutExpired(f"tests.procs pid {self.pid}", timeout_s or 0.0) from None
            if chunk:
                self._buffer += chunk
                continue
            # the zygote went away before it told: the process ends unreaped by it (init reaps it). Imported here:
            # the zygote itself imports nothing of the runtime, which its children import afresh.
            from neuron_client.wire.procs import pid_running

            while pid_running(self.pid):
                if deadline is not None and time.monotonic() >= deadline:
                    raise subprocess.TimeoutExpired(f"tests.procs pid {self.pid}", timeout_s or 0.0)
                time.sleep(0.05)
            self.returncode = -signal.SIGKILL
        if self.returncode is None:
            self.returncode = json.loads(self._buffer.split(b"\n", 1)[0])["exit"]
        self.conn.close()

    def poll(self):
        try:
            self._take(0.0)
        except subprocess.TimeoutExpired:
            pass
        return self.returncode

    def wait(self, timeout=None):
        self._take(timeout)
        return self.returncode

    def communicate(self, timeout=None) -> tuple[str, str]:
        """Close stdin, read stdout and stderr to their end and wait for the exit (text, as ``text=True``)."""
        import selectors

        self.stdin.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        got = {self.stdout.fileno(): [], self.stderr.fileno(): []}
        with selectors.DefaultSelector() as sel:
            for fd in got:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(f"tests.procs pid {self.pid}", timeout)
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        got[key.fd].append(chunk)
                    else:
                        sel.unregister(key.fd)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        out, err = (b"".join(got[f.fileno()]).decode(errors="replace") for f in (self.stdout, self.stderr))
        self.stdout.close()
        self.stderr.close()
        return out, err


def _enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


class _Zygote:
    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None
        self.address = None
        self.failed = False

    def start(self) -> None:
        """Start the zygote process (it imports torch in the background of the caller)."""
        with self.lock:
            if self.failed or not _enabled():
                return
            if self.proc is not None and self.proc.poll() is None:
                return
            directory = tempfile.mkdtemp(prefix="nrt-zygote-")
            self.address = os.path.join(directory, "zygote.sock")
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote", self.address, str(os.getpid())],
                                         env=env, cwd=root, stdin=subprocess.DEVNULL, start_new_session=True)
            atexit.register(self.stop)

    def _ready(self) -> bool:
        self.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.proc is not None and not os.path.exists(self.address):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.failed = True
                self.stop()
                break
            time.sleep(0.02)
        return not self.failed and self.proc is not None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.address is not None:
            shutil.rmtree(os.path.dirname(self.address), ignore_errors=True)

    def spawn(self, module: str, env: dict, cwd: str, stderr_fd: int | None, argv=()) -> ZygoteProc | None:
        if not _enabled() or not self._ready():  # read at each start: a test may turn it off
            return None
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r = None
        if stderr_fd is None:  # a pipe of its own
            err_r, stderr_fd = os.pipe()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            conn.settimeout(REQUEST_TIMEOUT_S)
            conn.connect(self.address)
            socket.send_fds(conn, [json.dumps({"module": module, "env": env, "cwd": cwd, "argv": list(argv)}).encode()],
                            [in_r, out_w, stderr_fd])
            answer = b""
            while b"\n" not in answer:
                chunk = conn.recv(4096)
                if not chunk:
                    raise OSError("the test zygote closed the connection")
                answer += chunk
            line, rest = answer.split(b"\n", 1)
            pid = json.loads(line)["pid"]
        except (OSError, ValueError, KeyError):
            conn.close()
            for fd in (in_w, out_r) if err_r is None else (in_w, out_r, err_r):
                os.close(fd)
            return None
        finally:
            os.close(in_r)
            os.close(out_w)
            if err_r is not None:
                os.close(stderr_fd)
        return ZygoteProc(conn, pid, open(in_w, "wb", buffering=0), open(out_r, "rb", buffering=0),
                          open(err_r, "rb", buffering=0) if err_r is not None else None, rest)


ZYGOTE = _Zygote()
start = ZYGOTE.start


def spawn(module: str, env: dict, cwd: str, stderr_fd: int | None = None, argv=()) -> ZygoteProc | None:
    """``python -m module *argv`` forked from the zygote, or None where it cannot be (then start it with Popen).
    Its stdin and stdout are pipes; its stderr goes to ``stderr_fd``, or to a pipe of its own (``stderr``)."""
    return ZYGOTE.spawn(module, env, cwd, stderr_fd, argv)


# -- the zygote process -------------------------------------------------------------------------------------------


def _child(conn: socket.socket, listener: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked process: become ``python -m <module>`` and run it; never returns."""
    code = 1
    try:
        listener.close()
        conn.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()
        module, argv = request["module"], request.get("argv") or []
        import setproctitle  # before the environment changes: it finds argv's memory next to environ's

        setproctitle.setproctitle(" ".join([sys.executable, "-m", module, *argv]))
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        env = request["env"]
        os.environ.clear()
        os.environ.update(env)
        cwd = request["cwd"]
        os.chdir(cwd)
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [cwd] + [p for p in extra if p not in sys.path] + [p for p in sys.path[1:] if p != cwd]
        import random
        import runpy

        import torch

        random.seed()
        torch.seed()

        try:
            sys.argv = [module, *argv]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except KeyboardInterrupt:
            code = -signal.SIGINT
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        threading._shutdown()  # as an interpreter's exit: non-daemon threads joined, then atexit hooks
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF if code >= 0 else 1)


def _serve(address: str, parent: int) -> None:
    import importlib
    import selectors

    importlib.import_module("torch")  # the import every test process would otherwise pay

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address + ".tmp")
    os.rename(address + ".tmp", address)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select(1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                conn.settimeout(REQUEST_TIMEOUT_S)
                try:
                    msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
                    request = json.loads(msg)
                    if len(fds) != 3:
                        raise ValueError("expected stdin, stdout and stderr")
                except (OSError, ValueError):
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(conn, listener, request, fds)
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                try:
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                except OSError:
                    pass
            else:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass
                conn.close()
        if os.getppid() != parent:  # the test session ended: nothing more to start
            for conn in children.values():
                conn.close()
            os._exit(0)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
