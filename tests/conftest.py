"""Fixtures that start real brokers and real client processes (tests.helpers), and always tear them down."""
from __future__ import annotations

import sys

import pytest
import torch

from tests import zygote
from tests.helpers import ROOT, App, BrokerProc, KeptApps, wait_free


def pytest_sessionstart(session):
    zygote.start()  # it imports torch while the tests are collected


@pytest.fixture
def apps():
    """Start client processes private to a test: ``apps(broker, "inference", env=...)`` is a ready
    :class:`tests.helpers.App` (``wait=False``: started, not waited for); all are killed at teardown."""
    started: list[App] = []

    def start(broker, procs: str = "inference", env=None, directory=None, wait: bool = True) -> App:
        app = App(broker, procs, env=env, directory=directory, wait=False)
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
    def start(broker, env=None) -> App:
        return apps(broker, "owner", env=env)

    return start


@pytest.fixture(scope="module")
def kept():
    """Client processes kept across a module's tests (tests.helpers.KeptApps); all are killed at its end."""
    k = KeptApps()
    yield k
    k.close()


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


@pytest.fixture
def broker(broker8):
    wait_free(broker8)
    yield broker8
    wait_free(broker8)


@pytest.fixture
def client(broker, kept):
    """The module's client process (``python -m tests.procs.inference``) on the shared 8-core broker, holding
    nothing; reset after the test, and replaced if the test killed it or left it unable to reset."""
    with kept.lend(broker, "inference") as app:
        yield app


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
