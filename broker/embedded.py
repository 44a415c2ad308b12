"""An embedded broker: a foreground broker in its own process group and private directory, for demos, benchmarks,
stress runs and tests that must start one, talk to it and always tear it down (workers included).

    with EmbeddedBroker(cores=4) as b:
        env = b.env            # give this to client processes
        doc = b.status()       # a neuron_client.wire.status.StatusDoc
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from neuron_client.wire.broker_client import BrokerClient
from neuron_client.wire.status import StatusDoc, to_json

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EmbeddedBroker:
    def __init__(self, cores: int, directory: str | None = None, extra=(), ready_timeout_s: float = READY_TIMEOUT_S):
        self.cores = cores
        self.directory = directory or os.path.join(tempfile.mkdtemp(prefix="neuron-broker-"), "broker")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.env = dict(os.environ, NEURON_BROKER_DIR=self.directory, NEURON_BROKER_AUTOSTART="0")
        for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES", "NEURON_BROKER_ADDRESS"):
            self.env.pop(var, None)
        self.address = f"ipc://{self.directory}/broker.sock"
        self.log_path = os.path.join(self.directory, "broker.log")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "start", "--foreground", "--dir", self.directory, "--cores", str(cores),
             *extra], env=self.env, stdout=self.log, stderr=self.log, start_new_session=True, cwd=ROOT)
        atexit.register(self.stop)  # a script that raises or forgets stop() leaves no broker behind
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.client().ping(0.5) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not start; its log:\n{self.read_log()}")
        self.wait_for(lambda d: all(c.worker.ready for c in d.cores), timeout_s, "workers ready")

    def client(self, timeout_s: float = 10.0) -> BrokerClient:
        """A client of this broker (close it, or use it in a ``with``)."""
        return BrokerClient(self.address, timeout_s)

    def status(self) -> StatusDoc:
        with self.client() as broker:
            return broker.status()

    def wait_for(self, predicate, timeout_s: float = 10.0, what: str = "condition") -> StatusDoc:
        """Poll status until ``predicate(doc)`` holds; the doc, or AssertionError naming ``what``."""
        deadline = time.monotonic() + timeout_s
        doc = None
        while time.monotonic() < deadline:
            doc = self.status()
            if predicate(doc):
                return doc
            time.sleep(0.05)
        last = json.dumps(to_json(doc), indent=1)[:3000] if doc is not None else "none"
        raise AssertionError(f"timed out waiting for {what}; last status: {last}")

    def owners(self) -> dict[int, int | None]:
        return {c.index: (c.owner.pid if c.owner else None) for c in self.status().cores}

    def read_log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-5000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Ask nicely (SIGTERM: the broker stops its workers), then kill the whole process group. Idempotent."""
        atexit.unregister(self.stop)
        if self.log.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()

    def __enter__(self) -> "EmbeddedBroker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
