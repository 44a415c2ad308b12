"""Fixtures that start real brokers and real client processes, and always tear them down."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from broker.embedded import EmbeddedBroker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(ROOT, "tests", "apps.py")
READY_TIMEOUT_S = 60.0


class BrokerProc(EmbeddedBroker):
    """A broker in the foreground of its own process group (workers included), in the private ``directory``."""

    def __init__(self, directory: str, cores: int, extra=()):
        super().__init__(cores, directory=directory, extra=extra, ready_timeout_s=READY_TIMEOUT_S)


class App:
    """A client process running a scenario of tests/apps.py (or of ``script``); its stdout is JSON lines."""

    def __init__(self, broker: BrokerProc | None, scenario: str, *args, env=None, directory=None, script=APPS):
        full_env = dict(broker.env if broker else os.environ)
        if directory:
            full_env["NEURON_BROKER_DIR"] = directory
        full_env.update(env or {})
        full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["PYTHONWARNINGS"] = "ignore"
        self.proc = subprocess.Popen([sys.executable, script, scenario, *map(str, args)], env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, cwd=ROOT)
        self.lines: list[dict] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def next(self, timeout_s: float = 60.0) -> dict:
        """The next JSON line the app prints."""
        from tests.helpers import next_json_line

        doc = next_json_line(self.proc.stdout, timeout_s)
        if doc is None:
            raise AssertionError(f"app printed nothing more (exit {self.proc.poll()}); stderr:\n{self.stderr()}")
        self.lines.append(doc)
        return doc

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()[-5000:]

    def finish(self, timeout_s: float = 90.0) -> list[dict]:
        """Wait for exit; all JSON lines printed (asserts a zero exit)."""
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"app did not finish within {timeout_s}s")
        self.lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert self.proc.returncode == 0, f"app exited {self.proc.returncode}; stderr:\n{err[-5000:]}"
        return self.lines

    def fail(self, timeout_s: float = 90.0) -> str:
        """Wait for a non-zero exit; its stderr."""
        out, err = self.proc.communicate(timeout=timeout_s)
        assert self.proc.returncode != 0, f"app unexpectedly succeeded: {out}"
        return err

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture
def spawn_app():
    """Start client processes; every one is killed at teardown, even if the test failed."""
    apps: list[App] = []

    def start(broker, scenario, *args, **kwargs) -> App:
        app = App(broker, scenario, *args, **kwargs)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.kill()
        try:
            app.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (app.proc.stdout, app.proc.stderr):
            stream.close()


@pytest.fixture(scope="module")
def broker8(tmp_path_factory):
    """One 8-core broker shared by a test module."""
    b = BrokerProc(str(tmp_path_factory.mktemp("broker8")), 8)
    yield b
    b.stop()


@pytest.fixture
def fresh_broker(tmp_path):
    """Start brokers private to one test."""
    brokers: list[BrokerProc] = []

    def start(cores: int = 4, extra=()) -> BrokerProc:
        b = BrokerProc(str(tmp_path / f"broker{len(brokers)}"), cores, extra)
        brokers.append(b)
        return b

    yield start
    for b in brokers:
        b.stop()


def wait_free(broker: BrokerProc, timeout_s: float = 10.0):
    """Wait until no core is owned (the previous test's clients released or were reclaimed)."""
    return broker.wait_for(lambda d: all(c["owner"] is None for c in d["cores"]), timeout_s, "all cores free")


@pytest.fixture
def broker(broker8):
    wait_free(broker8)
    yield broker8
    wait_free(broker8)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """Saved TorchScript models the clients load: an affine map, a nested-structure model, one that raises, a big one
    (tests.procs.inference.model_zoo)."""
    import neuron_client

    d = tmp_path_factory.mktemp("models")
    sys.path.insert(0, ROOT)
    from tests.procs.inference import model_zoo

    for name, (module, example) in model_zoo().items():
        torch.jit.save(neuron_client.trace(module, example, strict=False), str(d / f"{name}.pt"))
    return str(d)


@pytest.fixture
def apps():
    """Start client processes private to a test: ``apps(broker, "inference", env=...)`` is a ready
    :class:`tests.helpers.App` (``wait=False``: started, not waited for); all are killed at teardown."""
    from tests import helpers

    started: list = []

    def start(broker, procs: str = "inference", env=None, directory=None, wait: bool = True):
        app = helpers.App(broker, procs, env=env, directory=directory, wait=False)
        started.append(app)
        if wait:
            app.wait_ready()
        return app

    yield start
    for app in started:
        app.close()


@pytest.fixture
def owners(apps):
    """Start owner processes (``python -m tests.procs.owner``), ready for commands; all are killed at teardown."""
    def start(broker, env=None):
        return apps(broker, "owner", env=env)

    return start


@pytest.fixture(scope="module")
def kept():
    """Client processes kept across a module's tests (tests.helpers.KeptApps); all are killed at its end."""
    from tests import helpers

    k = helpers.KeptApps()
    yield k
    k.close()


@pytest.fixture
def client(broker, kept):
    """The module's client process (``python -m tests.procs.inference``) on the shared 8-core broker, holding
    nothing; reset after the test, and replaced if the test killed it or left it unable to reset."""
    with kept.lend(broker, "inference") as app:
        yield app
