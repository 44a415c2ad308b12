"""Test helpers: a command-driven owner process (``tests.procs.owner``) and raw socket clients."""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def next_json_line(stream, timeout_s: float) -> dict | None:
    """The next line of ``stream`` that is a JSON object, or None at its end or after ``timeout_s``."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sel.select(max(0.0, deadline - time.monotonic())):
            line = stream.readline()
            if not line:
                return None
            if line.startswith("{"):
                return json.loads(line)
    return None


class Owner:
    """A live client process that runs one command at a time: ``owner.do("acquire", env={...})``."""

    def __init__(self, broker_env: dict, env=None):
        full = dict(broker_env)
        full.update(env or {})
        full["PYTHONPATH"] = ROOT + os.pathsep + full.get("PYTHONPATH", "")
        full["PYTHONWARNINGS"] = "ignore"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.procs.owner"], env=full, cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.pid = self.proc.pid
        self.read(90)

    def read(self, timeout_s: float) -> dict:
        doc = next_json_line(self.proc.stdout, timeout_s)
        if doc is None:
            raise AssertionError(f"owner {self.pid} answered nothing within {timeout_s}s (exit {self.proc.poll()}); "
                                 f"stderr: {self.proc.stderr.read()[-3000:] if self.proc.poll() is not None else ''}")
        return doc

    def do(self, what: str, timeout_s: float = 90.0, **kw) -> dict:
        self.send(what, **kw)
        return self.read(timeout_s)

    def send(self, what: str, **kw) -> None:
        self.proc.stdin.write(json.dumps({"do": what, **kw}) + "\n")
        self.proc.stdin.flush()

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        self.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


def worker_request(endpoint: str, msg, timeout_s: float = 5.0):
    """One request to a worker's socket; the reply's message (error replies raise their exception)."""
    from neuron_client.wire import comm as transport

    ch = transport.Channel(endpoint)
    try:
        return ch.request(msg, timeout_s).msg
    finally:
        ch.close()


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
    lease = status.LeaseStatus(lease_id=owner.lease_id, pid=pid, cmd=cmd, cores=[0], lease_age_s=1.0, state="active")
    return status.StatusDoc(timestamp=status.timestamp(), broker=broker, cores=[core], leases=[lease], pending=[
        status.PendingStatus(pid=pid + 1, cmd="python b.py", requested="nc0", waited_s=0.5)])
