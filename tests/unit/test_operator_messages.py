"""Messages and housekeeping an operator or a new user meets: a torch.save file named as such, the broker's log
rotated with its stderr following, and placement asking for more cores than the process owns."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

import neuron_client
from neuron_client.tracing.meta import saved_kind
from neuron_client.wire.errors import ModelLoadError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_torch_save_file_is_named_with_the_fix(tmp_path):
    model = torch.nn.Linear(3, 2)
    kinds = {}
    for what, write in (("state dict", lambda f: torch.save(model.state_dict(), f)),
                        ("checkpoint", lambda f: torch.save({"model": model.state_dict(), "epoch": 3}, f)),
                        ("module", lambda f: torch.save(model, f)),
                        ("traced", lambda f: torch.jit.save(neuron_client.trace(model, torch.rand(1, 3)), f))):
        buf = io.BytesIO()
        write(buf)
        kinds[what] = saved_kind(buf.getvalue())
    assert kinds == {"state dict": "torch.save", "checkpoint": "torch.save", "module": "torch.save",
                     "traced": "torchscript"}
    assert saved_kind(b"not a model") == "unknown"
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelLoadError) as info:  # before any broker or core is involved
        neuron_client.jit.load(str(path))
    message = str(info.value)
    assert "'weights.pt' was written by torch.save" in message and "corrupt" not in message
    assert "neuron_client.trace(model, example)" in message and "torch.jit.save(traced, 'weights.pt')" in message


def test_the_daemon_log_rotates_and_its_stderr_follows(tmp_path):
    """As the daemon runs: stderr is <dir>/broker.log; after a rollover, both the logger and raw stderr (a
    traceback, a stray print) write into the new file."""
    d = tmp_path / "broker"
    d.mkdir(mode=0o700)
    code = ("import logging, os, sys; from broker.server import configure_logging; "
            f"configure_logging({str(d)!r}, 'INFO', max_bytes=2000, backups=2); log = logging.getLogger('t'); "
            "[log.info('line %d %s', i, 'x' * 60) for i in range(200)]; os.write(2, b'RAW AFTER ROTATION\\n'); "
            "log.debug('hidden at INFO')")
    with open(d / "broker.log", "ab") as log:
        subprocess.run([sys.executable, "-c", code], stderr=log, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       timeout=60, check=True)
    files = sorted(os.listdir(d))
    assert files == ["broker.log", "broker.log.1", "broker.log.2"], files
    assert all(os.path.getsize(d / f) <= 2200 for f in files)  # bounded: old lines dropped, not kept forever
    current = (d / "broker.log").read_text()
    assert "RAW AFTER ROTATION" in current and "line 199" in current and "hidden" not in current
