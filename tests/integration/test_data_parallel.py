"""DataParallel with real processes: every example of seed 002, each test driving the module's client process
(``python -m tests.procs.dp``), which owns global cores 4-7 of an 8-core broker, so process-relative device ids
differ from global ones."""
from __future__ import annotations

import pytest

TRACED = [1, 3, 16, 16]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dp_models"))


@pytest.fixture
def dp(broker, kept):
    """The module's DataParallel client, owning global cores 4-7 (a fresh lease each test)."""
    with kept.lend(broker, "dp") as app:
        assert app.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "4-7"})["cores"] == [4, 5, 6, 7]
        yield app


def cores_of(calls) -> list[int]:
    return sorted(nc for nc, _ in calls)


def test_default_uses_every_owned_core(dp, models):
    model = dp.ok("dp_model", name="conv", directory=models)
    assert model["replicas"] == [0]  # a plain load, then re-placed onto the DataParallel cores
    par = dp.ok("data_parallel", model=model["model"])
    assert par["device_ids"] == [0, 1, 2, 3] and par["replicas"] == [0, 1, 2, 3]
    assert par["cores"] == [4, 5, 6, 7]
    assert par["models_per_core"] == [1, 1, 1, 1]
    out = dp.ok("dp_call", dp=par["dp"], args=[{"rand": [5, 3, 16, 16]}], ref="conv")
    assert out["same"] and out["shape"] == [5, 10]
    # batch 5 over 4 cores: chunks 2, 1, 1, 1 (the extra item to the first), each call of the traced batch 1
    assert cores_of(out["calls"]) == [0, 0, 1, 2, 3]
    assert all(shapes == [TRACED] for _, shapes in out["calls"])
    assert any("not divisible" in w for w in out.get("warnings", [])), out


def test_submit_keeps_a_window_of_batches_in_flight(dp, models):
    model = dp.ok("dp_model", name="conv", directory=models)["model"]
    par = dp.ok("data_parallel", model=model)
    # six batches submitted at once, of any size (dynamic batching); one with the wrong image size is refused at
    # submit, and the others still come back, each its own batch's result
    shapes = [[5, 3, 16, 16], [8, 3, 16, 16], [1, 3, 16, 16], [4, 3, 8, 8], [7, 3, 16, 16], [2, 3, 16, 16]]
    out = dp.ok("dp_submit", dp=par["dp"], shapes=shapes, ref="conv")
    assert out["is_future"] and out["refused"] == {"3": "InputShapeError"}, out
    assert out["same"] == {str(i): True for i in (0, 1, 2, 4, 5)}


def test_nc_strings_select_and_sort_cores(dp, models):
    model = dp.ok("dp_model", name="conv", directory=models)["model"]
    par = dp.ok("data_parallel", model=model, device_ids=["nc:2", "nc:0", "nc:1"])
    assert par["device_ids"] == [0, 1, 2] and par["replicas"] == [0, 1, 2]
    out = dp.ok("dp_call", dp=par["dp"], args=[{"rand": [5, 3, 16, 16]}], ref="conv")
    assert out["same"]
    assert cores_of(out["calls"]) == [0, 0, 1, 1, 2]  # 5 over 3: chunks 2, 2, 1


def test_dim_2_splits_the_third_dimension(dp, models):
    model = dp.ok("dp_model", name="dim2", directory=models)["model"]
    par = dp.ok("data_parallel", model=model, device_ids=[0, 1, 2, 3], dim=2)
    assert par["dynamic"] is False
    assert any("dim != 0" in w for w in par.get("warnings", [])), par
    # the model on each core's slice of 8, concatenated
    out = dp.ok("dp_call", dp=par["dp"], args=[{"rand": [1, 3, 32, 8]}], ref="dim", split=8, dim=2)
    assert out["same"] and out["shape"] == [1, 3, 24, 6]
    assert cores_of(out["calls"]) == [0, 1, 2, 3]
    assert all(shapes == [[1, 3, 8, 8]] for _, shapes in out["calls"])
    bad = dp.do("dp_call", dp=par["dp"], args=[{"rand": [1, 3, 24, 8]}])
    assert "ValueError" in bad.get("types", []) and "32" in bad["message"] and "24" in bad["message"], bad


def test_dynamic_batching_any_batch_size_lazy_load(dp, models):
    model = dp.ok("dp_model", name="conv_lazy", directory=models, spy_loads=True)
    assert model["state"] == "lazy"
    par = dp.ok("data_parallel", model=model["model"])
    calls = []
    for n in [2, 3, 4, 5, 6]:
        out = dp.ok("dp_call", dp=par["dp"], args=[{"rand": [n, 3, 16, 16]}], ref="conv")
        assert out["same"], n
        calls += out["calls"]
    assert dp.ok("recorded", model=model["model"])["loads"] == [[0, 1, 2, 3]]  # loaded once, onto the DP cores
    assert len(calls) == 2 + 3 + 4 + 5 + 6
    assert all(shapes == [TRACED] for _, shapes in calls)  # the worker only sees the traced batch


def test_dynamic_batching_pads_to_the_traced_batch(dp, models):
    model = dp.ok("dp_model", name="conv4", directory=models)["model"]
    par = dp.ok("data_parallel", model=model, device_ids=[1, 3])
    assert par["replicas"] == [1, 3]
    pieces = {}
    for n in [1, 3, 7, 13]:
        out = dp.ok("dp_call", dp=par["dp"], args=[{"rand": [n, 3, 16, 16]}], ref="conv")
        assert out["same"], n
        pieces[n] = out["calls"]
    out = dp.ok("dp_call", dp=par["dp"], args=[{"rand": [0, 3, 16, 16]}])
    assert out["shape"] == [0, 10]
    pieces[0] = out["calls"]
    assert all(shapes == [[4, 3, 16, 16]] for calls in pieces.values() for _, shapes in calls)
    # pieces: n=1 -> 1; 3 -> 1+1; 7 -> 1+1; 13 -> 2+2; 0 -> 1 (padded, trimmed to nothing)
    assert {n: len(calls) for n, calls in pieces.items()} == {1: 1, 3: 2, 7: 2, 13: 4, 0: 1}


def test_dynamic_batching_disabled(dp, models):
    model = dp.ok("dp_model", name="conv", directory=models)["model"]
    par = dp.ok("data_parallel", model=model, device_ids=[0, 1, 2, 3], dim=0, dynamic=False)
    bad = dp.do("dp_call", dp=par["dp"], args=[{"rand": [8, 3, 16, 16]}])
    assert "ValueError" in bad.get("types", []), bad
    assert "must have 4 items" in bad["message"] and "but it has 8" in bad["message"]
    assert dp.ok("recorded", model=model)["calls"] == []  # refused before anything reached a worker
    out = dp.ok("dp_call", dp=par["dp"], args=[{"rand": [4, 3, 16, 16]}], ref="conv")
    assert out["same"]
    assert cores_of(out["calls"]) == [0, 1, 2, 3]
    other_shape = dp.do("dp_call", dp=par["dp"], args=[{"rand": [4, 3, 8, 8]}])
    assert other_shape.get("error") == "InputShapeError", other_shape  # each chunk still passes the shape check


def test_traced_module_with_nested_inputs_and_outputs(dp):
    """The seed's own spelling: the traced module itself handed to DataParallel."""
    traced = dp.ok("dp_model", name="nested_traced")["model"]
    par = dp.ok("data_parallel", model=traced, device_ids=[0, 1, 2])
    out = dp.ok("dp_call", dp=par["dp"], args=[{"rand": [5, 3]}, {"a": {"rand": [5, 3]}}], ref="nested")
    assert out["same"]
    assert out["kinds"] == {"tuple": ["tensor", {"dict": {"s": "tensor", "m": "tensor"}}, {"list": ["tensor"]}]}
    assert out["calls"] and all(shapes == [[2, 3], [2, 3]] for _, shapes in out["calls"])


def test_error_on_a_core_names_it(dp, models):
    model = dp.ok("dp_model", name="lookup", directory=models)["model"]
    par = dp.ok("data_parallel", model=model, device_ids=[0, 1, 2, 3])
    err = dp.do("dp_call", dp=par["dp"], args=[{"tensor": [[0, 1], [1, 2], [2, 3], [3, 9]]}])
    assert err.get("error") == "ModelExecutionError", err
    assert "on neuroncore 3" in err["message"] and "global core 7" in err["message"]
    assert "index out of range" in err["message"]
    assert dp.ok("dp_call", dp=par["dp"], args=[{"tensor": [[0, 1], [1, 2], [2, 3], [3, 0]]}], ref="lookup")["same"]


def test_scalar_output_unsqueezed(dp, models):
    model = dp.ok("dp_model", name="total", directory=models)["model"]
    par = dp.ok("data_parallel", model=model, device_ids=[0, 1])
    out = dp.ok("dp_call", dp=par["dp"], args=[{"rand": [2, 3]}], ref="row_sums")
    assert out["same"]
    assert any("scalar" in w for w in out.get("warnings", [])), out


def test_bad_device_ids(dp, models):
    model = dp.ok("dp_model", name="conv", directory=models)["model"]
    string = dp.do("data_parallel", model=model, device_ids=["gpu:0"])
    assert string.get("message") == "Expected `nc:#` or an integer, but got: 'gpu:0'", string
    beyond = dp.do("data_parallel", model=model, device_ids=[0, 4])
    assert "ValueError" in beyond.get("types", []) and "owns 4 NeuronCores" in beyond["message"], beyond
