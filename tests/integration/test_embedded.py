"""broker.embedded.EmbeddedBroker: the broker a script embeds goes with the script."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

SCRIPT = ("from broker.embedded import EmbeddedBroker\n"
          "b = EmbeddedBroker(1)\n"
          "print(b.proc.pid, flush=True)\n"
          "raise RuntimeError('the script fails before it stops its broker')\n")


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(120)
def test_a_script_that_raises_leaves_no_broker_or_worker_behind():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=100,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 1 and "the script fails" in done.stderr, done.stderr[-2000:]
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not _group_gone(pid) and time.monotonic() < deadline:  # the broker ran in a process group of its own
        time.sleep(0.1)
    try:
        assert _group_gone(pid), f"broker {pid} or its workers outlived the script"
    finally:
        try:
            os.killpg(pid, 9)
        except ProcessLookupError:
            pass
