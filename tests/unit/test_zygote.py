"""The tests' zygote (tests/zygote.py): a test process forked from it is its own process, as one started fresh."""
from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest

from neuron_client.wire import procs
from tests.helpers import ROOT, App


@pytest.mark.timeout(120)
def test_a_forked_test_process_has_its_own_session_environment_command_line_and_exit_code():
    a = App(None, "owner", env={"NRT_ZYGOTE_PROBE": "a"})
    b = App(None, "owner", env={"NRT_ZYGOTE_PROBE": "b"})
    try:
        assert type(a.proc).__name__ == "ZygoteProc"
        da, db = a.ok("whoami", var="NRT_ZYGOTE_PROBE"), b.ok("whoami", var="NRT_ZYGOTE_PROBE")
        assert (da["pid"], da["sid"], da["var"]) == (a.pid, a.pid, "a")  # a session of its own, its own environment
        assert db["var"] == "b"
        assert da["cwd"] == ROOT and da["path0"] == ROOT  # as `python -m` in the checkout
        assert (da["torch_rand"], da["rand"]) != (db["torch_rand"], db["rand"])  # fresh random seeds
        assert procs.command_line(psutil.Process(a.pid)) == f"{sys.executable} -m tests.procs.owner"
        assert a.alive()
        a.proc.stdin.write(b'{"do": "exit", "id": 0}\n')
        assert a.proc.wait(30) == 0
        b.kill(signal.SIGKILL)
        assert b.proc.wait(30) == -signal.SIGKILL and not b.alive()
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(120)
def test_without_the_zygote_a_test_process_is_a_fresh_interpreter(monkeypatch):
    monkeypatch.setenv("NRT_TEST_ZYGOTE", "0")
    a = App(None, "owner")
    try:
        assert isinstance(a.proc, subprocess.Popen)
        assert a.ok("whoami")["sid"] == a.pid
    finally:
        a.close()
