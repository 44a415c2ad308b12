"""The seed pages' examples (scripts/seeds/), with only their imports changed, against a real 8-core broker: each runs
as its own process (tests/procs/seed.py) with the page's environment, and the behaviour the page states is checked
from what the process did (where each model went, which core served each call) and from the broker's status.

Models come from plain ``torch.jit.load`` of files written by ``torch.jit.save(neuron_client.trace(...))``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests import zygote
from tests.conftest import ROOT

SEEDS = os.path.join(ROOT, "scripts", "seeds")
RUN_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    """seed 001's ``model.pt``: traced with trace(), for ``[1, 3, 224, 224]`` images (the page's example input)."""
    import neuron_client
    from neuron_client.examples import models

    path = tmp_path_factory.mktemp("seed_models") / "model.pt"
    torch.jit.save(neuron_client.trace(models.resnet50().eval(), torch.rand(1, 3, 224, 224)), str(path))
    return str(path)


def start(broker, example: str, cwd, env=None, then: str = "") -> subprocess.Popen:
    full = dict(broker.env, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    for k in ("NEURON_RT_NUM_CORES", "NEURON_RT_VISIBLE_CORES"):
        full.pop(k, None)
    full.update(env or {})
    argv = [os.path.join(SEEDS, example)] + (["--then", then] if then else [])
    # forked from the test zygote (torch imported once for the session), else a fresh interpreter
    return zygote.spawn("tests.procs.seed", full, str(cwd), argv=argv) or subprocess.Popen(
        [sys.executable, "-m", "tests.procs.seed", *argv], env=full, cwd=str(cwd), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)


def report(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"the example did not finish within {RUN_TIMEOUT_S:.0f}s; stderr:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}; stderr:\n{err[-3000:]}"
    return json.loads(lines[-1])


def run(broker, example: str, cwd, env=None, then: str = "") -> dict:
    got = report(start(broker, example, cwd, env, then))
    assert got["error"] is None, got.get("trace")
    return got


def in_dir(tmp_path, model_pt=None):
    if model_pt:
        shutil.copy(model_pt, tmp_path / "model.pt")
    return tmp_path


def cores_of_calls(got: dict, name: str) -> list[int]:
    model = got["models"][name]["model"]
    return [c["core"] for c in got["calls"] if c["model"] == model]


# -- seed 001: placement --------------------------------------------------------------------------------------------


def test_001_default_takes_every_core_and_places_linearly(broker, tmp_path, model_pt):
    got = run(broker, "001_default.py", in_dir(tmp_path, model_pt))
    assert got["owned"] == list(range(8))
    assert got["models"]["m0"]["cores"] == [0] and got["models"]["m1"]["cores"] == [1]
    assert got["models"]["m0"]["state"] == "loaded"


def test_001_num_cores_takes_the_first_free_two(broker, tmp_path, model_pt):
    got = run(broker, "001_num_cores.py", in_dir(tmp_path, model_pt), {"NEURON_RT_NUM_CORES": "2"})
    assert got["owned"] == [0, 1]
    assert (got["models"]["m0"]["cores"], got["models"]["m1"]["cores"]) == ([0], [1])


def test_001_visible_cores_places_on_exactly_those(broker, tmp_path, model_pt):
    got = run(broker, "001_visible_cores.py", in_dir(tmp_path, model_pt), {"NEURON_RT_VISIBLE_CORES": "4-5"})
    assert got["owned"] == [4, 5]
    assert (got["models"]["m0"]["cores"], got["models"]["m1"]["cores"]) == ([4], [5])


def test_001_multiple_processes_get_disjoint_cores(broker, tmp_path, model_pt):
    """The script run twice at once, NEURON_RT_NUM_CORES=2: one process on nc0-nc1, the other on nc2-nc3. Each
    holds its cores until it exits, so the two are started together and both report while both live."""
    hold = "import time; seen_cores = __import__('neuron_client').get_runtime().cores; time.sleep(3)"
    a = start(broker, "001_multiple_processes.py", in_dir(tmp_path, model_pt), {"NEURON_RT_NUM_CORES": "2"}, hold)
    b = start(broker, "001_multiple_processes.py", in_dir(tmp_path, model_pt), {"NEURON_RT_NUM_CORES": "2"}, hold)
    ra, rb = report(a), report(b)
    assert ra["error"] is None and rb["error"] is None
    assert sorted([ra["owned"], rb["owned"]]) == [[0, 1], [2, 3]]
    for r in (ra, rb):
        assert (r["models"]["m0"]["cores"], r["models"]["m1"]["cores"]) == ([r["owned"][0]], [r["owned"][1]])


def test_001_manual_core_selection(broker, tmp_path, model_pt):
    """The page's placements hold (m0 on nc3, m1 on nc0 and nc1); its comments on the calls swap m0 and m1: m1's
    calls alternate over its replicas nc0, nc1, and m0's all run on nc3."""
    got = run(broker, "001_manual_core_selection.py", in_dir(tmp_path, model_pt), {"NEURON_RT_NUM_CORES": "4"})
    assert got["models"]["m0"]["cores"] == [3] and got["models"]["m1"]["cores"] == [0, 1]
    assert cores_of_calls(got, "m1") == [0, 1]
    assert cores_of_calls(got, "m0") == [3, 3, 3]


def test_001_automatic_multicore_replicates_on_every_core_and_serves_round_robin(broker, tmp_path, model_pt):
    got = run(broker, "001_automatic_multicore.py", in_dir(tmp_path, model_pt), {"NEURON_RT_NUM_CORES": "8"})
    assert got["models"]["m0"]["cores"] == list(range(8))
    assert cores_of_calls(got, "m0") == [0, 1]


# -- seed 000: lazy and asynchronous loading ------------------------------------------------------------------------


def test_000_lazy_load_places_nothing_until_the_first_call(broker, tmp_path):
    got = run(broker, "000_lazy_load.py", in_dir(tmp_path), {"NEURON_RT_NUM_CORES": "1"},
              then="seen_before = str(__import__('neuron_client.tracing.script', fromlist=['x'])"
                   ".model_of(neuron_model).state)\n"
                   "out = neuron_model(inputs)\n"
                   "seen_after = str(__import__('neuron_client.tracing.script', fromlist=['x'])"
                   ".model_of(neuron_model).state)")
    assert got["values"]["seen_before"] == "lazy"
    assert got["values"]["seen_after"] == "loaded" and got["models"]["neuron_model"]["cores"] == [0]


def test_000_async_load_returns_at_once_and_the_first_call_waits(broker, tmp_path):
    got = run(broker, "000_async_load.py", in_dir(tmp_path), {"NEURON_RT_NUM_CORES": "2"})
    m1, m2 = got["models"]["neuron_model1"], got["models"]["neuron_model2"]
    assert m1["state"] == m2["state"] == "loaded" and {m1["cores"][0], m2["cores"][0]} == {0, 1}
    assert [c["core"] for c in got["calls"]] == [m1["cores"][0], m2["cores"][0]]


def test_000_lazy_and_async_flags_are_saved_together(broker, tmp_path):
    from neuron_client.tracing import meta as trace_meta

    run(broker, "000_lazy_and_async.py", in_dir(tmp_path), {"NEURON_RT_NUM_CORES": "1"})
    meta = trace_meta.read_meta((tmp_path / "my_model").read_bytes())
    assert meta["lazy_load"] is True and meta["async_load"] is True


# -- seed 002: DataParallel -----------------------------------------------------------------------------------------


def batches(got: dict, dim: int = 0) -> list[tuple[int, int]]:
    return [(c["core"], c["shape"][dim]) for c in got["calls"]]


def rows_per_core(got: dict) -> dict[int, int]:
    out: dict[int, int] = {}
    for core, n in batches(got):
        out[core] = out.get(core, 0) + n
    return out


def test_002_default_replicates_on_every_owned_core_and_splits_dim_0(broker, tmp_path):
    got = run(broker, "002_default.py", in_dir(tmp_path), {"NEURON_RT_NUM_CORES": "4"})
    dp = got["models"]["model_parallel"]
    assert dp["device_ids"] == [0, 1, 2, 3] and dp["cores"] == [0, 1, 2, 3] and dp["dynamic_batching"]
    assert rows_per_core(got) == {0: 2, 1: 1, 2: 1, 3: 1}  # 5 over 4 cores: divmod, the first chunk larger
    assert all(n == 1 for _, n in batches(got))  # each chunk runs at the traced batch size (dynamic batching)


def test_002_device_ids_use_the_first_three_cores(broker, tmp_path):
    got = run(broker, "002_device_ids.py", in_dir(tmp_path), {"NEURON_RT_NUM_CORES": "4"})
    assert got["models"]["model_parallel"]["cores"] == [0, 1, 2]
    assert rows_per_core(got) == {0: 2, 1: 2, 2: 1}


def test_002_dim_2_splits_along_dim_2_without_dynamic_batching(broker, tmp_path):
    got = run(broker, "002_dim.py", in_dir(tmp_path), {"NEURON_RT_NUM_CORES": "4"})
    assert got["models"]["model_parallel"]["dynamic_batching"] is False
    assert sorted(batches(got, dim=2)) == [(0, 8), (1, 8), (2, 8), (3, 8)]


def test_002_dynamic_batching_runs_every_batch_size(broker, tmp_path):
    got = run(broker, "002_dynamic_batching.py", in_dir(tmp_path), {"NEURON_RT_NUM_CORES": "4"})
    assert sum(n for _, n in batches(got)) == 2 + 3 + 4 + 5 + 6
    assert all(n == 1 for _, n in batches(got))  # every chunk padded or cut to the traced batch of 1


def test_002_dynamic_batching_disabled_runs_the_exact_multiple(broker, tmp_path):
    got = run(broker, "002_dynamic_batching_disabled.py", in_dir(tmp_path), {"NEURON_RT_NUM_CORES": "4"},
              then="try:\n    model_parallel(torch.rand([8, 3, 224, 224]))\nexcept Exception as e:\n"
                   "    seen_error = type(e).__name__ + ': ' + str(e)\n")
    assert got["models"]["model_parallel"]["dynamic_batching"] is False
    assert sorted(batches(got)) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert "InputShapeError" in got["values"]["seen_error"]


# -- DataParallel of a loaded model ---------------------------------------------------------------------------------


def test_data_parallel_of_a_lazy_async_model_does_not_block_and_the_first_call_waits(broker, tmp_path):
    """seed 000: with both flags, the load DataParallel starts runs in the background."""
    then = ("import time\n"
            "big = torch_neuronx.trace(torch.nn.Linear(4096, 4096), torch.rand(1, 4096))\n"
            "torch_neuronx.lazy_load(big)\ntorch_neuronx.async_load(big)\ntorch.jit.save(big, 'big.pt')\n"
            "m = torch.jit.load('big.pt')\n"
            "dp = torch_neuronx.DataParallel(m, device_ids=[0, 1])\n"
            "seen_state_after_dp = str(dp.module.state)\n"
            "out = dp(torch.rand(4, 4096))\n"
            "seen_state_after_call = str(dp.module.state)\n"
            "seen_shape = list(out.shape)\n")
    got = run(broker, "000_lazy_and_async.py", in_dir(tmp_path), {"NEURON_RT_NUM_CORES": "2"}, then)
    assert got["values"]["seen_state_after_dp"] == "loading"
    assert got["values"]["seen_state_after_call"] == "loaded" and got["values"]["seen_shape"] == [4, 4096]


def test_two_data_parallel_wrappers_of_one_model_keep_their_own_cores(broker, tmp_path, model_pt):
    then = ("m = torch.jit.load('model.pt')\n"
            "dp1 = torch_neuronx.DataParallel(m, device_ids=[0, 1])\n"
            "dp2 = torch_neuronx.DataParallel(m, device_ids=[2, 3])\n"
            "x = torch.rand(2, 3, 224, 224)\n"
            "for _ in range(3):\n    dp1(x)\n    dp2(x)\n")
    got = run(broker, "001_num_cores.py", in_dir(tmp_path, model_pt), {"NEURON_RT_NUM_CORES": "4"}, then)
    dp1, dp2 = got["models"]["dp1"], got["models"]["dp2"]
    assert dp1["cores"] == [0, 1] and dp2["cores"] == [2, 3] and dp1["model"] != dp2["model"]
    assert sorted(c["core"] for c in got["calls"] if c["model"] == dp1["model"]) == [0, 0, 0, 1, 1, 1]
    assert sorted(c["core"] for c in got["calls"] if c["model"] == dp2["model"]) == [2, 2, 2, 3, 3, 3]
    # the script's m0 and m1, m itself, then each wrapper's two replicas once: no reload per call
    assert len(got["loads"]) == 2 + 1 + 2 + 2


def test_a_loaded_module_is_a_torchscript_module_the_placement_apis_take(broker, tmp_path, model_pt):
    then = ("from neuron_client.tracing import script\n"
            "m0 = m0.eval()\n"
            "torch.jit.save(m0, 'again.pt')\n"
            "again = torch.jit.load('again.pt')\n"
            "seen_again = script.model_of(again).cores\n"
            "ens = torch.jit.script(Ensemble(m0, m1))\n"
            "x = torch.rand(1, 3, 224, 224)\n"
            "seen_ensemble = bool(torch.allclose(ens(x), m0(x) + m1(x), atol=1e-5))\n"
            "torch_neuronx.experimental.set_neuron_cores(m1, 2, 2)\n"
            "seen_moved = script.model_of(m1).cores\n"
            "torch_neuronx.experimental.set_multicore(again)\n"
            "seen_multicore = script.model_of(again).cores\n"
            "try:\n"
            "    torch_neuronx.experimental.set_neuron_cores(m1, -2, 1)\n"
            "except ValueError as e:\n"
            "    seen_range = str(e)\n")
    got = run(broker, "001_num_cores.py", in_dir(tmp_path, model_pt), {"NEURON_RT_NUM_CORES": "4"}, then)
    v = got["values"]
    assert v["seen_again"] == [2]  # the least-used core when it was loaded again
    assert v["seen_ensemble"] is True
    assert v["seen_moved"] == [2, 3] and v["seen_multicore"] == [0, 1, 2, 3]
    assert "0..3" in v["seen_range"]
