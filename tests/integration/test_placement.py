"""Placement inside a process (issue 3): contexts, replicas, re-placement, concurrency, futures, lazy and async
load, static shapes and inter-op parallelism, each with real broker, worker and client processes."""
from __future__ import annotations

import os
import time


def affine(models_dir: str) -> str:
    return os.path.join(models_dir, "affine.pt")


def seed001_manual(client, models_dir) -> tuple[dict, dict, list, list]:
    """Seed 001 'manual core selection': m0 in a context at nc3, m1 at nc0 with two replicas; m1 called three
    times, m0 twice: (m0, m1, the cores m0's calls ran on, m1's)."""
    m0 = client.ok("load", path=affine(models_dir), context={"start_nc": 3})
    m1 = client.ok("load", path=affine(models_dir), context={"start_nc": 0, "nc_count": 2})
    m1_runs = client.ok("call", model=m1["model"], shape=[2, 4], times=3)["runs"]
    m0_runs = client.ok("call", model=m0["model"], shape=[2, 4], times=2)["runs"]
    return m0, m1, m0_runs, m1_runs


def test_seed001_manual_core_selection(client, models_dir):
    assert client.ok("acquire", env={"NEURON_RT_NUM_CORES": "4"})["cores"] == [0, 1, 2, 3]
    m0, m1, m0_runs, m1_runs = seed001_manual(client, models_dir)
    assert m0["cores"] == [3] and m1["cores"] == [0, 1]
    assert m1_runs == [0, 1, 0]  # m1 alternates nc0, nc1, nc0 (the seed's comments swap the names)
    assert m0_runs == [3, 3]  # m0 always runs on nc3


def test_seed001_manual_selection_is_relative_to_owned_cores(client, models_dir):
    client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "4-7"})
    m0, m1, _, m1_runs = seed001_manual(client, models_dir)
    assert m0["cores"] == [7] and m1["cores"] == [4, 5] and m1_runs == [4, 5, 4]


def test_seed001_automatic_multicore(client, models_dir):
    client.ok("acquire", env={"NEURON_RT_NUM_CORES": "8"})
    m0 = client.ok("load", path=affine(models_dir), context="multicore")
    assert m0["cores"] == list(range(8))
    assert client.ok("call", model=m0["model"], shape=[2, 4], times=3)["runs"] == [0, 1, 2]


def test_contexts_are_per_thread(client, models_dir):
    client.ok("acquire")
    out = client.ok("thread_contexts", path=affine(models_dir))
    assert out["a"] == [1, 2]
    assert out["b"] == [5, 6, 7]
    assert out["outside"] == [0]  # no context in the main thread: the least-used core


def test_set_neuron_cores_and_validation(broker, client, models_dir):
    client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "2-5"})
    m = client.ok("load", path=affine(models_dir))
    assert m["cores"] == [2]
    m = m["model"]
    assert client.ok("place", model=m, start_nc=2, nc_count=2)["cores"] == [4, 5]  # start_nc=2 of the process
    time.sleep(0.3)  # workers report within ~0.1 s of a change
    doc = broker.status()
    assert sum(len(doc.cores[c].models) for c in range(2, 6)) == 2  # unloaded from 2 before loading on 4, 5
    assert client.ok("place", model=m, multicore=True)["cores"] == [2, 3, 4, 5]
    assert client.ok("call", model=m, args=[{"rand": [2, 4]}], ref="affine")["same"]

    def error(what, **kw) -> str:
        out = client.do(what, **kw)
        assert out.get("error") == "ValueError", out
        return out["message"]

    assert error("place", model=m, start_nc=0, nc_count=0) == "Cannot be set to 0"
    assert error("place", model=m, start_nc=0, nc_count=-2) == "Values less than -1 are invalid"
    over = error("place", model=m, start_nc=0, nc_count=5)
    assert over.startswith("NeuronCores available: 4 (") and "nc_count=5" in over and "nc0-nc3" in over
    msg = error("place", model=m, start_nc=4, nc_count=1)
    assert "start_nc=4" in msg and "NeuronCores available: 4" in msg
    assert "nc3-nc4" in error("place", model=m, start_nc=3, nc_count=2)
    assert error("context", start_nc=0, nc_count=0) == "Cannot be set to 0"
    assert client.ok("describe", model=m)["cores"] == [2, 3, 4, 5]  # a rejected re-placement leaves it where it was


def test_replicas_run_concurrently_and_skip_busy_ones(fresh_broker, apps, tmp_path):
    b = fresh_broker(2)  # two cores on distinct CPUs where the machine has two
    app = apps(b)
    app.ok("acquire")
    out = app.ok("concurrency", path=app.ok("save", name="slow", directory=str(tmp_path))["path"], timeout_s=120)
    assert out["a_core"] == out["busy_core"]
    other = ({0, 1} - {out["busy_core"]}).pop()
    assert out["follower"] == other  # the busy replica is skipped, not waited for
    assert {out["b_core"], out["c_core"]} == {0, 1}
    assert out["overlap_s"] > 0  # two calls in flight on two cores at the same time


def test_futures(client, models_dir):
    client.ok("acquire", env={"NEURON_RT_NUM_CORES": "3"})
    m = client.ok("load", path=affine(models_dir), context="multicore")
    assert len(m["cores"]) == 3
    out = client.ok("submit", model=m["model"], n=8)
    assert out["is_future"] and out["same"]


def test_lazy_and_async_load(broker, client, tmp_path):
    client.ok("acquire", env={"NEURON_RT_NUM_CORES": "4"})
    saved = {kind: client.ok("save", name="wide", directory=str(tmp_path), **flags)["path"]
             for kind, flags in [("lazy", {"lazy": True}), ("async", {"asynchronous": True}),
                                 ("both", {"lazy": True, "asynchronous": True})]}
    x = [{"rand": [1, 2048]}]

    lazy = client.ok("load", path=saved["lazy"])
    assert lazy["state"] == "lazy"
    time.sleep(0.3)  # workers report within ~0.1 s of a change
    doc = broker.status()
    assert sum(len(doc.cores[c].models) for c in range(4)) == 0  # status shows nothing on a core
    assert client.ok("call", model=lazy["model"], args=x, ref="wide", atol=1e-5)["same"]
    assert client.ok("describe", model=lazy["model"])["cores"] == [0]
    client.ok("unload", model=lazy["model"])

    asyncs = [client.ok("load", path=saved["async"]) for _ in range(4)]
    states = [m["state"] for m in asyncs]
    assert all(s in ("loading", "loaded") for s in states)
    assert "loading" in states  # jit.load returned before the load finished
    assert all(client.ok("call", model=m["model"], args=x, ref="wide", atol=1e-5)["same"] for m in asyncs)
    cores = [client.ok("describe", model=m["model"])["cores"][0] for m in asyncs]
    assert sorted(cores) == [0, 1, 2, 3]  # four models, four cores, loading at once
    for m in asyncs:
        client.ok("unload", model=m["model"])

    both = client.ok("load", path=saved["both"])
    assert both["state"] == "lazy"
    assert client.ok("call", model=both["model"], args=x, ref="wide", atol=1e-5)["same"]


def test_async_load_failure_surfaces_at_first_call(client, tmp_path):
    client.ok("acquire", env={"NEURON_RT_NUM_CORES": "1"})
    # a plain traced file: its program is what breaks (a self-placing file's program is the wrapper's)
    good = client.ok("save", name="affine", directory=str(tmp_path), asynchronous=True, graph=True)["path"]
    m = client.ok("load", path=client.ok("broken_copy", path=good)["path"])
    assert m["state"] in ("loading", "failed")
    out = client.do("call", model=m["model"], shape=[2, 4])
    assert out.get("error") == "ModelLoadError", out
    assert "could not load" in out["message"] and "broken-" in out["message"]


def test_static_shapes(client, models_dir):
    client.ok("acquire", env={"NEURON_RT_NUM_CORES": "1"})
    m = client.ok("load", path=affine(models_dir))["model"]
    out = client.do("call", model=m, args=[{"rand": [3, 4]}])
    assert out.get("error") == "InputShapeError", out
    assert "float32[2, 4]" in out["message"] and "float32[3, 4]" in out["message"]
    out = client.do("call", model=m, args=[{"rand": [2, 4], "dtype": "float64"}])
    assert "ValueError" in out.get("types", []), out
    assert "float64[2, 4]" in out["message"]


def test_fork_wait_runs_in_a_worker(client, tmp_path):
    """Seed 004's forked ensemble runs in a worker and gives the same result as the sequential one."""
    client.ok("acquire", env={"NEURON_RT_NUM_CORES": "1"})
    saved = client.ok("save_lstm", directory=str(tmp_path))
    assert saved["graph_forks"]
    m = client.ok("load", path=saved["path"])["model"]
    assert client.ok("call", model=m, args=[{"rand": saved["input"]}], ref="lstm_plain", atol=1e-5,
                     timeout_s=120)["same"]
