"""asyncio calls and the request batcher with real processes: the module's client process (``python -m
tests.procs.batch``) owns global cores 2-3 of the shared 8-core broker; its models have a replica on each. The
example server (scripts/serve_batched.py) runs as a real process on the same broker, owning two cores, and serves the
demo model through the batcher over real HTTP to concurrent clients."""
from __future__ import annotations

import importlib.util
import json
import os
import selectors
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.helpers import ROOT, wait_status

SLOW = 10_000_000  # µs: a queue delay no test waits out; batches go when they are full


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("batch_models"))


@pytest.fixture
def app(broker, kept):
    with kept.lend(broker, "batch") as a:
        assert a.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "2-3"})["cores"] == [2, 3]
        yield a


def assert_all_same(callers):
    assert all(c.get("same") for c in callers), callers


@pytest.mark.parametrize("dp", [False, True])
def test_acall_gives_the_blocking_result_concurrently_over_the_replicas(app, models, dp):
    model = app.ok("batch_model", name="slow", directory=models, dp=dp)["model"]
    out = app.ok("acall_many", model=model, rows=[64] * 6 if not dp else [64, 128, 32], bad=[1])
    good = [c for i, c in enumerate(out["calls"]) if i != 1]
    assert_all_same(good)
    assert out["cores"] == [2, 3]  # spread over both replicas
    assert out["max_in_flight"] >= 2  # calls ran at once: the event loop was not blocked by any of them
    assert out["calls"][1]["error"] == out["blocking"]["error"] == "InputShapeError", out
    assert out["calls"][1]["message"] == out["blocking"]["message"]


def test_a_cancelled_acall_drops_its_reply_and_leaves_the_core_free(app, models):
    model = app.ok("batch_model", name="slow", directory=models)["model"]
    out = app.ok("acall_cancel", model=model)
    assert out == {"cancelled": True, "in_flight": 0, "same": True}


def test_concurrent_threads_are_coalesced_and_each_gets_its_own_rows(app, models, broker):
    model = app.ok("batch_model", name="mlp", directory=models)["model"]
    served = app.ok("batched", model=model, max_queue_delay_us=SLOW)
    assert served["max_batch_size"] == served["traced_size"] == 8
    out = app.ok("served_threads", served=served["served"], rows=[1] * 16)
    assert_all_same(out["callers"])
    assert all(c["rows"] == [1] for c in out["callers"])
    st = out["stats"]
    assert (st["requests"], st["served"], st["executions"], st["rows"]) == (16, 16, 2, 16), st
    assert out["shapes"] == [[[8, 8]], [[8, 8]]]  # two full batches of the traced shape
    assert st["queue_s"] > 0 and st["compute_s"] > 0 and st["waiting"] == 0
    # the owner reports the counters on its lease link: the broker shows them in status
    pid = app.pid
    doc, _ = wait_status(broker.directory, lambda d: any(
        b.served == 16 for le in d.leases if le.pid == pid for b in le.batchers), what="the batcher's report")
    (b,) = [b for le in doc.leases if le.pid == pid for b in le.batchers]
    assert (b.requests, b.executions, b.rows, b.max_queue_delay_us) == (16, 2, 16, SLOW)
    assert b.model.startswith("batch-mlp")


def test_asyncio_callers_nested_outputs_and_the_static_batch_padding(app, models):
    model = app.ok("batch_model", name="nested", directory=models)["model"]
    served = app.ok("batched", model=model, max_queue_delay_us=SLOW)["served"]
    out = app.ok("served_async", served=served, rows=[1, 2, 1, 3, 1])  # in order: [1, 2, 1], then [3, 1]
    assert_all_same(out["callers"])
    assert [c["rows"] for c in out["callers"]] == [[1], [2], [1], [3], [1]]
    assert out["callers"][0]["kinds"] == {
        "tuple": ["tensor", {"dict": {"s": "tensor", "m": "tensor"}}, {"list": ["tensor"]}]}
    assert out["stats"]["executions"] == 2 and out["stats"]["rows"] == 8
    assert all(s == [[4, 3], [4, 3]] for s in out["shapes"]), out["shapes"]


def test_a_data_parallel_model_is_batched_on_its_replicas(app, models):
    model = app.ok("batch_model", name="mlp", directory=models, dp=True)["model"]
    served = app.ok("batched", model=model, max_queue_delay_us=SLOW)["served"]
    out = app.ok("served_async", served=served, rows=[2, 2, 4, 8])  # [2, 2, 4], then [8]
    assert_all_same(out["callers"])
    assert (out["stats"]["executions"], out["stats"]["rows"]) == (2, 16)
    assert set(out["cores"]) <= {2, 3} and out["shapes"] == [[[8, 8]], [[8, 8]]]


def test_preferred_batch_sizes_cut_the_batches(app, models):
    model = app.ok("batch_model", name="mlp", directory=models)["model"]
    served = app.ok("batched", model=model, max_queue_delay_us=SLOW, preferred_batch_sizes=[4])["served"]
    out = app.ok("served_async", served=served, rows=[1, 1, 1, 1, 2, 2])  # 8 rows: cut at 4, and 4 again
    assert_all_same(out["callers"])
    assert (out["stats"]["executions"], out["stats"]["rows"]) == (2, 8), out["stats"]


def test_delay_0_runs_what_is_waiting_without_waiting_for_more(app, models):
    model = app.ok("batch_model", name="mlp", directory=models)["model"]
    served = app.ok("batched", model=model)["served"]  # max_queue_delay_us=0, the default
    for _ in range(3):  # one caller at a time: each request runs alone, at once, padded to the traced batch
        out = app.ok("served_async", served=served, rows=[3])
        assert_all_same(out["callers"])
    assert out["stats"]["executions"] == 3 and out["stats"]["rows"] == 9
    assert out["shapes"] == [[[8, 8]]] * 3


def test_a_replica_busy_with_other_calls_leaves_the_batches_to_a_free_one(app, models):
    model = app.ok("batch_model", name="mlp", directory=models)["model"]
    served = app.ok("batched", model=model)["served"]
    out = app.ok("served_beside_busy", served=served)
    assert out["same"] and len(out["cores"]) == 4
    assert set(out["cores"]) == {2, 3} - {out["busy"]}, out


def test_a_bad_request_fails_its_caller_only(app, models):
    model = app.ok("batch_model", name="mlp", directory=models)["model"]
    served = app.ok("batched", model=model, max_queue_delay_us=SLOW, max_batch_size=4)["served"]
    bad = {1: "shape", 3: "dtype", 4: "rows", 5: "none"}
    out = app.ok("served_async", served=served, rows=[1, 1, 2, 1, 1, 1, 1], bad=bad)
    callers = out["callers"]
    assert_all_same([callers[i] for i in (0, 2, 6)])  # 1 + 2 + 1 rows: one full batch of 4
    assert all(callers[i]["error"] == "InputShapeError" for i in bad), callers
    assert "float32[1..4, 8]" in callers[1]["message"] and "float32[1, 7]" in callers[1]["message"]
    assert "float64[1, 8]" in callers[3]["message"]
    assert "100 rows" in callers[4]["message"] and "max_batch_size" in callers[4]["message"]
    assert "no tensor inputs" in callers[5]["message"]
    st = out["stats"]
    assert (st["requests"], st["executions"], st["served"]) == (3, 1, 3), st


def test_a_failing_batch_fails_each_of_its_callers_naming_the_core(app, models):
    model = app.ok("batch_model", name="lookup", directory=models)["model"]
    served = app.ok("batched", model=model, max_queue_delay_us=SLOW)["served"]
    out = app.ok("served_async", served=served, rows=[1, 2, 1, 2, 2], bad={1: "index"})
    first, second = out["callers"][:3], out["callers"][3:]
    for c in first:  # one row past the table fails the batch it is in
        assert c["error"] == "ModelExecutionError", c
        assert "a batch of 3 requests (4 rows)" in c["message"] and "neuroncore" in c["message"]
        assert "global core 2" in c["message"] or "global core 3" in c["message"]
    assert_all_same(second)  # the next batch is not affected
    assert out["stats"]["failed"] == 3 and out["stats"]["served"] == 2


def test_a_full_queue_and_an_expired_request_are_refused_and_close_fails_the_rest(app, models):
    model = app.ok("batch_model", name="mlp", directory=models)["model"]
    served = app.ok("batched", model=model, max_queue_delay_us=SLOW, max_queue_size=3)["served"]
    out = app.ok("served_pending", served=served, n=4)["requests"]
    assert all("pending" in r for r in out[:3]), out
    assert out[3]["error"] == "QueueFullError" and "max_queue_size=3" in out[3]["message"], out[3]
    assert app.ok("stats", served=served)["refused"] == 1
    closed = app.ok("close_served", served=served)
    assert closed["threads"] == []  # the dispatcher and the execution threads ended
    for r in out[:3]:
        got = app.do("outcome", pending=r["pending"])
        assert got["error"] == "NeuronRuntimeError" and "was closed before this request ran" in got["message"]

    timed = app.ok("batched", model=model, max_queue_delay_us=SLOW, queue_timeout_s=0.2)["served"]
    (req,) = app.ok("served_pending", served=timed, n=1)["requests"]
    got = app.do("outcome", pending=req["pending"])
    assert got.get("error") == "QueueTimeoutError" and "timeout_s=0.2" in got["message"], got
    assert "RequestTimeoutError" in got["types"]
    st = app.ok("stats", served=timed)
    assert (st["timed_out"], st["executions"]) == (1, 0)


# -- the example server ------------------------------------------------------------------------------------------
SCRIPT = os.path.join(ROOT, "scripts", "serve_batched.py")
START_TIMEOUT_S = 90.0


def example():
    spec = importlib.util.spec_from_file_location("serve_batched", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def server(broker):
    pytest.importorskip("aiohttp", reason="the example server needs the [serve] extra (aiohttp)")
    env = dict(broker.env, NEURON_RT_NUM_CORES="2", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, SCRIPT, "--port", "0", "--max-queue-delay-us", "2000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, f"the server did not start: {proc.stderr.read1(10000)!r}"
            if sel.select(min(left, 1.0)):
                chunk = proc.stdout.read1(4096)
                line += chunk
        text = line.decode()
        assert text.startswith("serving demo_mlp.pt on http://127.0.0.1:"), text
        yield proc, text.split()[3], text
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def post(url: str, body) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_example_server_answers_concurrent_http_clients_with_the_local_result(server, broker):
    proc, url, line = server
    assert "(cores [" in line and line.count(",") == 1  # a replica on each of its two cores
    model = example().demo_model(0)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.rand(1 + i % 3, 16, generator=gen) for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda x: post(f"{url}/infer", {"inputs": x.tolist()}), inputs))
    with torch.no_grad():
        for x, (status, body) in zip(inputs, answers):
            assert status == 200, body
            assert torch.allclose(torch.tensor(body["outputs"]), model(x), atol=1e-5)
    status, bad = post(f"{url}/infer", {"inputs": [[1.0] * 15]})
    assert status == 400 and bad["error"] == "InputShapeError" and "float32[1, 15]" in bad["message"]
    with urllib.request.urlopen(f"{url}/stats", timeout=30) as r:
        stats = json.loads(r.read())
    assert stats["requests"] == stats["served"] == 24 and stats["rows"] == sum(len(x) for x in inputs)
    assert 1 <= stats["executions"] <= 24
    doc, _ = wait_status(broker.directory, lambda d: any(b.served == 24 for le in d.leases if le.pid == proc.pid
                                                         for b in le.batchers), what="the server's batcher report")
    proc.terminate()
    assert proc.wait(30) == 0
