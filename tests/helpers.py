"""Test helpers: real brokers (:class:`BrokerProc`), long-lived client processes driven one command at a time
(:class:`App`, the processes of :mod:`tests.procs`), processes kept across a module's tests (:class:`KeptApps`), and
raw clients of a broker's or a worker's socket."""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time

from broker.embedded import EmbeddedBroker
from tests import zygote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY_TIMEOUT_S = 60.0
START_TIMEOUT_S = 90.0  # a process of tests.procs imports torch first: seconds on a loaded 2-CPU machine
COMMAND_TIMEOUT_S = 60.0


class BrokerProc(EmbeddedBroker):
    """A broker in the foreground of its own process group (workers included), in the private ``directory``."""

    def __init__(self, directory: str, cores: int, extra=()):
        super().__init__(cores, directory=directory, extra=extra, ready_timeout_s=READY_TIMEOUT_S)


def wait_free(broker: BrokerProc, timeout_s: float = 10.0):
    """Wait until no core is owned (the previous test's clients released or were reclaimed)."""
    return broker.wait_for(lambda d: all(c.owner is None for c in d.cores), timeout_s, "all cores free")


class App:
    """A client process, ``python -m tests.procs.<procs>`` (see :mod:`tests.procs.harness`), that runs one command at
    a time: ``app.do("acquire", env={...})`` is its JSON reply, ``app.ok(...)`` the same asserting it is no error.

    Every read has a timeout (``timeout_s``); a process that does not answer in time is killed, so that it cannot
    carry a half-done command into a later test, and the test fails naming the command and the process's stderr. The
    process is in its own session: :meth:`close` kills it and anything it started."""

    _ids = itertools.count(1)

    def __init__(self, broker: BrokerProc | None = None, procs: str = "inference", env=None, directory=None,
                 wait: bool = True):
        full = dict(broker.env if broker is not None else os.environ)
        if directory:
            full["NEURON_BROKER_DIR"] = directory
        full.update(env or {})
        full["PYTHONPATH"] = ROOT + os.pathsep + full.get("PYTHONPATH", "")
        full["PYTHONWARNINGS"] = "ignore"
        self.procs = procs
        self._stderr = tempfile.TemporaryFile()
        # forked from the test zygote (torch imported once for the session), else a fresh interpreter
        self.proc = zygote.spawn(f"tests.procs.{procs}", full, ROOT, self._stderr.fileno()) or subprocess.Popen(
            [sys.executable, "-m", f"tests.procs.{procs}"], env=full, cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0, start_new_session=True)
        self.pid = self.proc.pid
        self._buffer = b""
        self._pending: list[int] = []
        self.ready: dict | None = None
        if wait:
            self.wait_ready()

    def __repr__(self) -> str:
        return f"<tests.procs.{self.procs} pid {self.pid}>"

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> dict:
        """The process's first line, once it has imported what it needs."""
        if self.ready is None:
            self.ready = self._line(timeout_s, "its ready line")
        return self.ready

    # -- commands ---------------------------------------------------------------------------------------------------
    def send(self, what: str, **kw) -> int:
        """Send a command without waiting for its reply (:meth:`read` it later); its id."""
        self.wait_ready()
        cmd_id = next(self._ids)
        try:
            self.proc.stdin.write((json.dumps({"do": what, "id": cmd_id, **kw}) + "\n").encode())
        except (BrokenPipeError, OSError):
            raise AssertionError(f"{self} is gone (exit {self.proc.poll()}), cannot send {what!r}; "
                                 f"stderr:\n{self.stderr()}") from None
        self._pending.append(cmd_id)
        return cmd_id

    def read(self, timeout_s: float = COMMAND_TIMEOUT_S) -> dict:
        """The reply to the oldest command sent and not yet read (replies to commands given up on are skipped)."""
        cmd_id = self._pending.pop(0)
        deadline = time.monotonic() + timeout_s
        while True:
            doc = self._line(max(0.0, deadline - time.monotonic()), f"reply to command #{cmd_id}")
            if doc.pop("id", None) == cmd_id:
                return doc

    def do(self, what: str, timeout_s: float = COMMAND_TIMEOUT_S, **kw) -> dict:
        """Run one command; its reply (an error reply too)."""
        self._pending.clear()  # anything sent and never read is stale now
        self.send(what, **kw)
        return self.read(timeout_s)

    def ok(self, what: str, timeout_s: float = COMMAND_TIMEOUT_S, **kw) -> dict:
        """Run one command that must succeed; its reply."""
        doc = self.do(what, timeout_s, **kw)
        assert "error" not in doc, f"{what} {kw} failed in {self}: {doc['error']}: {doc['message']}\n{doc.get('trace')}"
        return doc

    def _line(self, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                chunk = os.read(fd, 1 << 16) if left > 0 and sel.select(left) else None
                if not chunk:
                    alive = self.proc.poll() is None
                    self.kill()
                    try:
                        self.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
                    state = f"no {what} within {timeout_s:.0f}s; killed it" if alive else \
                        f"it exited ({self.proc.returncode}) before {what}"
                    raise AssertionError(f"{self}: {state}; stderr:\n{self.stderr()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    @property
    def busy(self) -> bool:
        """A command was sent and its reply not read: the process may still be running it."""
        return bool(self._pending)

    # -- the process ------------------------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self, tail: int = 5000) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-tail:]

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Kill the process (and its session) and wait for it."""
        self.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                stream.close()
            except OSError:
                pass


class KeptApps:
    """Client processes kept across the tests of a module (starting one costs seconds: it imports torch).

    ``with kept.lend(broker, procs, env) as app:`` hands a test the running process for that key, or a new one, and
    afterwards resets it (its cores released, its models dropped, its environment restored). One that died, did not
    answer or could not reset is killed, and the next test gets a fresh one: a failure does not reach the next test."""

    def __init__(self):
        self.apps: dict[tuple, App] = {}

    @contextlib.contextmanager
    def lend(self, broker: BrokerProc | None, procs: str = "inference", env=None, directory=None, role: str = ""):
        """The process for (``broker``, ``procs``, ``env``, ``directory``, ``role``: to keep several alike apart)."""
        key = (procs, broker.directory if broker is not None else None, directory, tuple(sorted((env or {}).items())),
               role)
        app = self.apps.get(key)
        if app is None or not app.alive():
            if app is not None:
                app.close()
            app = self.apps[key] = App(broker, procs, env=env, directory=directory)
        try:
            yield app
        finally:
            try:
                if app.busy:  # the test left a command running: do not wait for it
                    raise AssertionError(f"{app} is still busy")
                app.ok("reset", timeout_s=20)
            except AssertionError:  # busy, dead, silent or unable to reset: the next test starts a fresh one
                app.close()

    def close(self) -> None:
        for app in self.apps.values():
            app.close()
        self.apps.clear()


# -- raw clients -------------------------------------------------------------------------------------------------------


def worker_request(endpoint: str, msg, timeout_s: float = 5.0):
    """One request to a worker's socket; the reply's message (error replies raise their exception)."""
    from neuron_client.wire import comm as transport

    ch = transport.Channel(endpoint)
    try:
        return ch.request(msg, timeout_s).msg
    finally:
        ch.close()


def local_status(directory: str):
    """The status document (a neuron_client.wire.status.StatusDoc) of the broker in ``directory`` (None when none
    answers)."""
    from neuron_client.wire import config
    from neuron_client.wire.broker_client import BrokerClient

    with BrokerClient(config.broker_address(directory)) as broker:
        return broker.status() if broker.ping(1.0) is not None else None


def wait_status(directory: str, predicate, timeout_s: float = 15.0, what: str = "condition") -> tuple:
    """Poll the status of the broker in ``directory`` until ``predicate(doc)``; (doc, seconds waited)."""
    t0 = time.monotonic()
    doc = None
    while time.monotonic() - t0 < timeout_s:
        doc = local_status(directory)
        if doc is not None and predicate(doc):
            return doc, time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} in {directory}; last status: {doc}")


def sample_status_doc(cmd: str = "python app.py", pid: int = 4242):
    """A small status document as a broker builds it: one core owned by ``pid`` running ``cmd``, one model."""
    from broker.state import EndReason
    from broker.status import perf_status
    from neuron_client.wire import status

    owner = status.OwnerStatus(pid=pid, cmd=cmd, lease_id="0123456789abcdef", lease_age_s=1.0, state="active")
    worker = status.WorkerStatus(pid=7, ready=True, state="serving", memory_bytes=1 << 20, device_memory_bytes=0,
                                 device_util_percent=None, busy=False, restarts=0, last_exit="")
    core = status.CoreStatus(index=0, device="cpu", cpus=[0], intra_op_threads=1, inter_op_threads=1, state="owned",
                             owner=owner, requests=3, errors=0, perf=perf_status(None), worker=worker,
                             models=[status.ModelStatus(id=1, name="m.pt", requests=3, bytes=100)])
    broker = status.BrokerStatus(pid=1, backend="cpu", cores=1, address="ipc:///tmp/x/broker.sock", uptime_s=1.0,
                                 lease_timeout_s=0.0, draining=False, recovering_s=0.0, links=1, pending_total=0,
                                 metrics="", leases_granted=1,
                                 leases_ended={r.value: 0 for r in EndReason})
    lease = status.LeaseStatus(lease_id=owner.lease_id, pid=pid, cmd=cmd, cores=[0], lease_age_s=1.0, state="active",
                               batchers=[sample_batcher()])
    return status.StatusDoc(timestamp=status.timestamp(), broker=broker, cores=[core], leases=[lease], pending=[
        status.PendingStatus(pid=pid + 1, cmd="python b.py", requested="nc0", waited_s=0.5)])


def sample_batcher(model: str = "m.pt", requests: int = 40):
    """A batched model's counters as its owner reports them (``leases[].batchers``): 40 requests in 10 batches."""
    from neuron_client.wire import status

    return status.BatcherStatus(model=model, requests=requests, served=requests, executions=10, rows=requests,
                                queue_s=0.02, compute_s=0.05, waiting=0, refused=1, timed_out=0, failed=0,
                                max_batch_size=8, max_queue_delay_us=100)
