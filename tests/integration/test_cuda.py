"""The cuda backend (issue 10): cores on GPUs. The GPU tests need one and skip, saying so, where there is none; the
clear failure of ``--backend cuda`` without a GPU is tested where there is none."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

HAS_GPU = torch.cuda.is_available() and torch.cuda.device_count() > 0
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU here (torch.cuda.is_available() is False): the cuda "
                                                   "backend's tests need an NVIDIA GPU and a CUDA build of torch")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the no-GPU failure cannot be shown here")
def test_cuda_backend_without_a_gpu_fails_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "broker", "start", "--foreground", "--backend", "cuda", "--cores", "1",
                          "--dir", str(tmp_path / "b")], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=dict(os.environ, NEURON_BROKER_DIR=str(tmp_path / "b")))
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr and "--backend cpu" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "b" / "broker.sock").exists()


@needs_gpu
def test_cores_sliced_from_one_gpu(fresh_broker, apps, models_dir, tmp_path):
    b = fresh_broker(2, extra=["--backend", "cuda", "--cores-per-gpu", "2"])
    doc = b.status()
    assert [c.device for c in doc.cores] == ["cuda:0", "cuda:0"]
    assert all(c.memory_fraction == 0.5 for c in doc.cores)
    app = apps(b)
    app.ok("acquire", env={"NEURON_RT_NUM_CORES": "2"})
    loaded = app.ok("load", path=os.path.join(models_dir, "affine.pt"), context="multicore")
    assert loaded["cores"] == [0, 1]
    m = loaded["model"]
    out = app.ok("call", model=m, args=[{"rand": [2, 4]}], ref="affine", times=2, timeout_s=180)
    assert out["same"] and out["device"] == "cpu"  # outputs arrive on the host
    app.ok("output_device", model=m, device="cuda:0")
    assert app.ok("call", model=m, shape=[2, 4])["device"].startswith("cuda")
    hog = app.ok("load", path=app.ok("save_hog", directory=str(tmp_path))["path"])["model"]
    total = app.ok("gpu_memory")["total"]
    # 75 % of the GPU: over this core's half
    oom = app.do("call", model=hog, args=[{"zeros": [1]}, {"tensor": int(total * 0.75 / 4)}], timeout_s=180)
    assert oom.get("error") == "ModelExecutionError" and "out of memory" in oom["message"].lower(), oom
    assert app.ok("call", model=hog, args=[{"zeros": [1]}, {"tensor": 1000}])["sum"] == 0  # the core still serves
    doc = b.wait_for(lambda d: d.cores[0].worker.device_memory_bytes > 0, 10, "device memory reported")
    assert doc.cores[0].worker.device_memory_bytes > 0
