"""Placement inside a process (issue 3): contexts, replicas, re-placement, concurrency, futures, lazy and async
load, static shapes and inter-op parallelism, each with real broker, worker and client processes."""
from __future__ import annotations


def test_seed001_manual_core_selection(broker, spawn_app, models_dir):
    out = spawn_app(broker, "seed001_manual", models_dir, env={"NEURON_RT_NUM_CORES": "4"}).finish()[0]
    assert out["owned"] == [0, 1, 2, 3]
    assert out["m0"] == [3] and out["m1"] == [0, 1]
    assert out["m1_runs"] == [0, 1, 0]  # m1 alternates nc0, nc1, nc0 (the seed's comments swap the names)
    assert out["m0_runs"] == [3, 3]  # m0 always runs on nc3


def test_seed001_manual_selection_is_relative_to_owned_cores(broker, spawn_app, models_dir):
    out = spawn_app(broker, "seed001_manual", models_dir, env={"NEURON_RT_VISIBLE_CORES": "4-7"}).finish()[0]
    assert out["m0"] == [7] and out["m1"] == [4, 5] and out["m1_runs"] == [4, 5, 4]


def test_seed001_automatic_multicore(broker, spawn_app, models_dir):
    out = spawn_app(broker, "multicore", models_dir, env={"NEURON_RT_NUM_CORES": "8"}).finish()[0]
    assert out["cores"] == list(range(8))
    assert out["runs"] == [0, 1, 2]


def test_contexts_are_per_thread(broker, spawn_app, models_dir):
    out = spawn_app(broker, "thread_contexts", models_dir).finish()[0]
    assert out["a"] == [1, 2]
    assert out["b"] == [5, 6, 7]
    assert out["outside"] == [0]  # no context in the main thread: the least-used core


def test_set_neuron_cores_and_validation(broker, spawn_app, models_dir):
    out = spawn_app(broker, "set_cores", models_dir, env={"NEURON_RT_VISIBLE_CORES": "2-5"}).finish()[0]
    assert out["first"] == [2]
    assert out["second"] == [4, 5]  # start_nc=2 of the process is global core 4
    assert out["loaded_after_move"] == 2  # unloaded from core 2 before loading on 4 and 5
    assert out["third"] == [2, 3, 4, 5]
    assert out["ok"]
    errors = out["errors"]
    assert errors["zero"] == "Cannot be set to 0"
    assert errors["below"] == "Values less than -1 are invalid"
    assert errors["too_many"] == "NeuronCores available: 4"
    assert "start_nc=4" in errors["start_past"] and "NeuronCores available: 4" in errors["start_past"]
    assert "nc3-nc4" in errors["start_plus_count"]
    assert errors["context_zero"] == "Cannot be set to 0"
    assert out["still"] == [2, 3, 4, 5]  # a rejected re-placement leaves the model where it was


def test_replicas_run_concurrently_and_skip_busy_ones(fresh_broker, spawn_app, models_dir):
    b = fresh_broker(2)  # two cores on distinct CPUs where the machine has two
    out = spawn_app(b, "concurrency", models_dir).finish(120)[0]
    assert out["a_core"] == out["busy_core"]
    other = ({0, 1} - {out["busy_core"]}).pop()
    assert out["followers"][0] == other  # the busy replica is skipped, not waited for
    assert {out["b_core"], out["c_core"]} == {0, 1}
    assert out["overlap_s"] > 0  # two calls in flight on two cores at the same time


def test_futures(broker, spawn_app, models_dir):
    out = spawn_app(broker, "futures", models_dir, env={"NEURON_RT_NUM_CORES": "3"}).finish()[0]
    assert out["is_future"] and out["ok"] and len(out["cores"]) == 3


def test_lazy_and_async_load(broker, spawn_app, models_dir):
    out = spawn_app(broker, "lazy_async", models_dir, env={"NEURON_RT_NUM_CORES": "4"}).finish(120)[0]
    assert out["lazy_state"] == "lazy" and out["lazy_loaded"] == 0  # status shows nothing on a core
    assert out["lazy_ok"] and out["lazy_cores"] == [0]
    assert all(s in ("loading", "loaded") for s in out["async_states"])
    assert "loading" in out["async_states"]  # jit.load returned before the load finished
    assert out["async_ok"]
    assert sorted(out["async_cores"]) == [0, 1, 2, 3]  # four models, four cores, loading at once
    assert out["both_state"] == "lazy" and out["both_ok"]


def test_async_load_failure_surfaces_at_first_call(broker, spawn_app, models_dir):
    out = spawn_app(broker, "async_failure", models_dir, env={"NEURON_RT_NUM_CORES": "1"}).finish()[0]
    assert out["state"] in ("loading", "failed")
    assert out["error"] is not None and "could not load" in out["error"] and "broken-" in out["error"]


def test_static_shapes(broker, spawn_app, models_dir):
    out = spawn_app(broker, "static_shapes", models_dir, env={"NEURON_RT_NUM_CORES": "1"}).finish()[0]
    assert "float32[2, 4]" in out["error"] and "float32[3, 4]" in out["error"]
    assert "float64[2, 4]" in out["dtype_error"]


def test_fork_wait_runs_in_a_worker(broker, spawn_app, models_dir):
    out = spawn_app(broker, "fork_lstm", models_dir, env={"NEURON_RT_NUM_CORES": "1"}).finish(120)[0]
    assert out["ok"] and out["graph_forks"]
