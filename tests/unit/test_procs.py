"""neuron_client.wire.procs: what the broker and the client read of a process."""
from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from neuron_client.wire import procs


@pytest.mark.timeout(30)
def test_command_line_of_a_renamed_process_has_no_trailing_blanks():
    """A process renamed with setproctitle (gunicorn's workers, the tests' zygote children) has its title as one
    argument followed by empty ones: the owner's command the broker shows is the title alone."""
    code = ("import setproctitle, sys, time; setproctitle.setproctitle('my-server --port 8080'); "
            "print('ok', flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code, "a" * 40, "b" * 40], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ok"
        p = psutil.Process(child.pid)
        assert "" in p.cmdline()  # what the kernel shows: the title, then empty arguments
        assert procs.command_line(p) == "my-server --port 8080"
    finally:
        child.kill()
        child.wait(5)


def test_command_line_of_a_plain_process_is_its_argv():
    assert procs.command_line(psutil.Process()) == " ".join(psutil.Process().cmdline())
