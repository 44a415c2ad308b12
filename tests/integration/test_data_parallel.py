"""DataParallel with real processes: every example of seed 002, run by one client process (tests/dp_apps.py seed002)
that owns global cores 4-7 of an 8-core broker, so process-relative device ids differ from global ones."""
from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT, App, wait_free

DP_APPS = os.path.join(ROOT, "tests", "dp_apps.py")
TRACED = [1, 3, 16, 16]


@pytest.fixture(scope="module")
def seed002(broker8, tmp_path_factory):
    """The JSON line of each example, by name (one client process for the whole module)."""
    wait_free(broker8)
    app = App(broker8, "seed002", str(tmp_path_factory.mktemp("dp_models")), script=DP_APPS,
              env={"NEURON_RT_VISIBLE_CORES": "4-7"})
    try:
        lines = app.finish(timeout_s=110)
    finally:
        app.kill()
        for stream in (app.proc.stdout, app.proc.stderr):
            stream.close()
    wait_free(broker8)
    return {doc["example"]: doc for doc in lines}


def result(seed002, name: str) -> dict:
    doc = seed002[name]
    assert "crashed" not in doc, doc["crashed"]
    return doc


def test_default_uses_every_owned_core(seed002):
    assert result(seed002, "runtime")["owned"] == [4, 5, 6, 7]
    doc = result(seed002, "default")
    assert doc["before"] == [0]  # a plain load, then re-placed onto the DataParallel cores
    assert doc["device_ids"] == [0, 1, 2, 3] and doc["replicas"] == [0, 1, 2, 3]
    assert doc["replica_cores"] == [4, 5, 6, 7]
    assert doc["models_per_core"] == [1, 1, 1, 1]
    assert doc["ok"] and doc["shape"] == [5, 10]
    # batch 5 over 4 cores: chunks 2, 1, 1, 1 (the extra item to the first), each call of the traced batch 1
    assert sorted(nc for nc, _ in doc["calls"]) == [0, 0, 1, 2, 3]
    assert all(shapes == [TRACED] for _, shapes in doc["calls"])
    assert any("not divisible" in w for w in doc["warnings"])


def test_nc_strings_select_and_sort_cores(seed002):
    doc = result(seed002, "nc_strings")
    assert doc["device_ids"] == [0, 1, 2] and doc["replicas"] == [0, 1, 2]
    assert doc["ok"]
    assert sorted(nc for nc, _ in doc["calls"]) == [0, 0, 1, 1, 2]  # 5 over 3: chunks 2, 2, 1


def test_dim_2_splits_the_third_dimension(seed002):
    doc = result(seed002, "dim2")
    assert doc["ok"] and doc["shape"] == [1, 3, 24, 6]
    assert doc["dynamic"] is False
    assert any("dim != 0" in w for w in doc["warnings"])
    assert sorted(nc for nc, _ in doc["calls"]) == [0, 1, 2, 3]
    assert all(shapes == [[1, 3, 8, 8]] for _, shapes in doc["calls"])
    bad = doc["bad"]
    assert bad["is_value_error"] and "32" in bad["message"] and "24" in bad["message"]


def test_dynamic_batching_any_batch_size_lazy_load(seed002):
    doc = result(seed002, "dynamic")
    assert doc["state_before"] == "lazy"
    assert doc["loads"] == [[0, 1, 2, 3]]  # loaded once, straight onto the DataParallel cores
    assert doc["oks"] == {str(n): True for n in [2, 3, 4, 5, 6]}
    assert len(doc["calls"]) == 2 + 3 + 4 + 5 + 6
    assert all(shapes == [TRACED] for _, shapes in doc["calls"])  # the worker only sees the traced batch


def test_dynamic_batching_pads_to_the_traced_batch(seed002):
    doc = result(seed002, "padded")
    assert doc["replicas"] == [1, 3]
    assert doc["oks"] == {str(n): True for n in [1, 3, 7, 13, 0]}
    assert all(shapes == [[4, 3, 16, 16]] for _, shapes in doc["calls"])
    # pieces: n=1 -> 1; 3 -> 1+1; 7 -> 1+1; 13 -> 2+2; 0 -> 1 (padded, trimmed to nothing)
    assert len(doc["calls"]) == 1 + 2 + 2 + 4 + 1


def test_dynamic_batching_disabled(seed002):
    doc = result(seed002, "disabled")
    bad = doc["bad"]
    assert bad["is_value_error"]
    assert "must have 4 items" in bad["message"] and "but it has 8" in bad["message"]
    assert doc["sent_after_bad"] == 0  # refused before anything reached a worker
    assert doc["ok"]
    assert sorted(nc for nc, _ in doc["calls"]) == [0, 1, 2, 3]
    assert doc["other_shape"]["error"] == "InputShapeError"  # each chunk still passes the static shape check


def test_traced_module_with_nested_inputs_and_outputs(seed002):
    doc = result(seed002, "nested")
    assert doc["ok"]
    assert doc["kinds"] == ["tuple", "dict", "list"]
    assert all(shapes == [[2, 3], [2, 3]] for _, shapes in doc["calls"])


def test_error_on_a_core_names_it(seed002):
    doc = result(seed002, "core_error")
    err = doc["err"]
    assert err["error"] == "ModelExecutionError"
    assert "on neuroncore 3" in err["message"] and "global core 7" in err["message"]
    assert "index out of range" in err["message"]
    assert doc["after_ok"]


def test_scalar_output_unsqueezed(seed002):
    doc = result(seed002, "scalar")
    assert doc["ok"]
    assert any("scalar" in w for w in doc["warnings"])


def test_bad_device_ids(seed002):
    doc = result(seed002, "bad_ids")
    assert doc["string"]["message"] == "Expected `nc:#` or an integer, but got: 'gpu:0'"
    assert doc["beyond"]["is_value_error"] and "owns 4 NeuronCores" in doc["beyond"]["message"]
