"""Tensor parallelism with real processes on a real BERT (all-MiniLM-L6-v2), seed 003 ported.

One 4-core broker for the module and two client processes (``python -m tests.procs.tp``): the tracer traces TP=2
(inline weights), TP=2 and TP=4 (separated weights) and saves them, each the first time a test needs it; the loader,
which never imports transformers, loads the saved directories, runs TP models on different cores at once, and
streams calls while a test kills one rank's worker.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from neuron_client.wire.procs import pid_running
from tests.helpers import BrokerProc, wait_free

ATOL = 1e-4
TRACE_TIMEOUT_S = 240

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def broker4(tmp_path_factory):
    b = BrokerProc(str(tmp_path_factory.mktemp("tp_broker")), 4)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp_work"))


@pytest.fixture
def tracer(broker4, kept):
    """The module's tracing process, owning the broker's four cores."""
    wait_free(broker4)
    with kept.lend(broker4, "tp", role="tracer") as app:
        app.ok("acquire")
        yield app
    wait_free(broker4)


@pytest.fixture(scope="module")
def saved(broker4, work, kept):
    """``saved(name)``: the tracer's report on ``name``, traced and saved the first time a test asks for it (the
    tracer holds the cores only meanwhile)."""
    docs: dict = {}

    def get(name: str) -> dict:
        if name not in docs:
            wait_free(broker4)
            with kept.lend(broker4, "tp", role="tracer") as app:
                app.ok("acquire")
                docs[name] = app.ok("tp_trace", name=name, work=work, timeout_s=TRACE_TIMEOUT_S)
            wait_free(broker4)
        return docs[name]

    return get


@pytest.fixture
def loader(broker4, kept):
    """The module's loading process: it never imports transformers. Holds nothing until the test acquires."""
    wait_free(broker4)
    with kept.lend(broker4, "tp", role="loader") as app:
        yield app
    wait_free(broker4)


def restarts(broker) -> dict:
    return {c.index: c.worker.restarts for c in broker.status().cores}


@pytest.mark.parametrize("name,tp,cores", [("inline2", 2, [0, 1]), ("sep2", 2, [0, 1]), ("sep4", 4, [0, 1, 2, 3])])
def test_minilm_tensor_parallel_matches_the_cpu_model(saved, name, tp, cores):
    doc = saved(name)
    assert doc["tp"] == tp and doc["cores"] == cores
    assert doc["diff"] < ATOL  # last_hidden_state and pooler_output on four real sentences / pairs
    assert doc["shapes"] == [[1, 128, 384], [1, 384]]
    assert doc["group"].startswith(f"tp{tp}-")


def test_weight_separation_stores_shared_weights_once(saved):
    inline, sep2, sep4 = saved("inline2"), saved("sep2"), saved("sep4")
    assert inline["files"] == ["tp_0.pt", "tp_1.pt"]
    assert sep2["files"] == ["tp_0.pt", "tp_1.pt", "weights/rank0.pt", "weights/rank1.pt", "weights/shared.pt"]
    assert sep4["files"] == [f"tp_{r}.pt" for r in range(4)] + [f"weights/rank{r}.pt" for r in range(4)] + \
        ["weights/shared.pt"]
    assert sep2["graph_bytes"] < 1_000_000 < inline["graph_bytes"]  # the graphs carry no weights
    assert sep2["bytes"] < 0.6 * inline["bytes"]  # embeddings, layer norms, FFN stored once, not per rank
    assert abs(sep4["bytes"] - sep2["bytes"]) < 0.05 * sep2["bytes"]  # more ranks cost (almost) nothing on disk


def test_unsharded_checkpoint_loads_into_the_sharded_model(tracer, work):
    # every trace loads the full checkpoint with parallel_layers.load(sharded=False); here a sharded save reloads
    # (sharded=True) into the same per-rank tensors
    assert tracer.ok("sharded_checkpoint", work=work, timeout_s=TRACE_TIMEOUT_S)["same"] == [True, True]


def test_state_marked_by_get_model_stays_on_the_cores(tracer):
    doc = tracer.ok("tp_state", timeout_s=TRACE_TIMEOUT_S)
    assert doc["steps"] == [0.0, 1.0, 2.0]  # each call saw the state its predecessor left on the core
    assert doc["calls"] == 6  # three calls, two ranks each
    assert doc["received_per_call"] < 16384 and doc["sent_per_call"] < 16384  # 64 KiB of state never travels


@pytest.mark.parametrize("name", ["inline2", "sep2", "sep4"])
def test_saved_model_loads_in_a_fresh_process(saved, loader, work, name):
    saved(name)
    loader.ok("acquire")
    doc = loader.ok("tp_load", name=name, work=work, timeout_s=120)
    assert doc["transformers"] is False
    assert doc["inline"] == (name == "inline2")
    assert doc["diff"] < ATOL
    assert doc["same_as_traced"] < 1e-5


def test_least_used_cores_and_coexisting_models(saved, loader, work):
    for name in ("inline2", "sep2", "sep4"):
        saved(name)
    loader.ok("acquire")
    inline2 = loader.ok("tp_load", name="inline2", work=work, timeout_s=120)
    sep2 = loader.ok("tp_load", name="sep2", work=work, timeout_s=120)
    sep4 = loader.ok("tp_load", name="sep4", work=work, timeout_s=120)
    assert inline2["cores"] == [0, 1]
    assert sep2["cores"] == [2, 3]  # the least-used contiguous pair
    # the two TP=2 models on different cores and the TP=4 one, called from four threads at once, many times
    doc = loader.ok("tp_concurrent", models=[inline2["model"], sep2["model"], inline2["model"], sep4["model"]],
                    calls=6, timeout_s=240)
    assert doc["errors"] == [] and doc["calls"] == 24 and doc["diff"] < ATOL
    assert loader.ok("tp_call", model=sep2["model"], asynchronous=True, timeout_s=120)["diff"] < ATOL  # acall
    context = loader.ok("tp_load", name="sep2", work=work, context={"start_nc": 1}, timeout_s=120)
    assert context["cores"] == [1, 2]  # neuron_cores_context(start_nc=1)
    assert context["diff"] < ATOL


def test_killed_rank_fails_the_call_naming_the_core_then_reforms(saved, loader, work, broker4):
    saved("sep2")
    loader.ok("acquire")
    model = loader.ok("tp_load", name="sep2", work=work, context={"start_nc": 2}, timeout_s=120)
    assert model["cores"] == [2, 3]
    victim = loader.ok("worker", core=3)["pid"]
    before = restarts(broker4)
    loader.send("tp_stream", model=model["model"], seconds=60)
    time.sleep(0.5)  # inside the stream of calls
    os.kill(victim, signal.SIGKILL)
    doc = loader.read(120)
    assert doc["calls"] > 0
    error = doc["error"]
    assert error is not None and error["error"] == "WorkerUnavailableError", doc
    assert "neuroncore 3" in error["message"] and "SIGKILL" in error["message"]
    assert doc["failed_call_s"] < 10  # at once, not after a collective or call timeout
    again = loader.ok("tp_call", model=model["model"], timeout_s=120)
    assert again["diff"] < ATOL  # the next call re-formed the group on the fresh worker
    assert loader.ok("worker", core=3)["pid"] != victim
    assert any("loaded again" in w and "new process group" in w for w in again.get("warnings", [])), again
    leftovers = [f for f in os.listdir(broker4.directory) if f.startswith("tp-")]
    assert leftovers == []  # rendezvous files are removed once every rank has joined
    # only the killed worker restarted; its peer dropped its group cleanly
    after = restarts(broker4)
    assert {c: after[c] - before[c] for c in after} == {0: 0, 1: 0, 2: 0, 3: 1}


def test_rank_killed_between_calls_reforms_at_the_next_call(saved, loader, work, broker4):
    """#21 of the ownership issue: a call made right after a rank's worker died recovers, as a single-core model
    does."""
    saved("sep2")
    loader.ok("acquire")
    model = loader.ok("tp_load", name="sep2", work=work, timeout_s=120)
    assert loader.ok("tp_call", model=model["model"], timeout_s=120)["diff"] < ATOL
    victim_core = model["cores"][0]
    victim = loader.ok("worker", core=victim_core)["pid"]
    before = restarts(broker4)
    os.kill(victim, signal.SIGKILL)
    while pid_running(victim):
        time.sleep(0.001)
    doc = loader.do("tp_call", model=model["model"], timeout_s=120)  # the moment it is gone
    assert "error" not in doc and doc["diff"] < ATOL, doc
    assert any("new process group" in w for w in doc.get("warnings", [])), doc
    after = restarts(broker4)
    assert {c: after[c] - before[c] for c in after} == {c: int(c == victim_core) for c in after}
