"""Inference through real workers: nesting, shared memory, model errors, status, and the broker CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_roundtrip_shm_and_model_errors(client, models_dir):
    from neuron_client.wire import shm

    assert client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "2"})["cores"] == [2]
    nested = client.ok("load", path=os.path.join(models_dir, "nested.pt"))["model"]
    out = client.ok("call", model=nested, ref="nested", args=[
        {"rand": [3]}, {"a": {"rand": [3]}}, [{"rand": [2, 2]}, {"arange": 5, "dtype": "int32"}]])
    assert out["same"]  # values, dtypes (int32 in, int64 and bool out) and structure as the model run here
    assert out["kinds"] == {"tuple": ["tensor", {"dict": {"double": "tensor"}}, {"list": ["tensor", "tensor"]},
                                      "tensor"]}

    big = client.ok("load", path=os.path.join(models_dir, "big.pt"))["model"]
    # twice: the mailbox grows to fit the first call, so both calls' 4 MiB tensors go through shared memory
    out = client.ok("call", model=big, ref="big", args=[{"rand": [1024, 1024], "seed": 1}], times=2)
    assert out["same"]
    assert out["paths"]["2"]["mailbox_capacity"] >= 4 << 20 and out["paths"]["2"]["mailbox_calls"] >= 2
    # with the fast path off, through the socket path's segments, named for the client
    off = client.ok("call_in_thread", model=big, ref="big", args=[{"rand": [1024, 1024], "seed": 1}], times=2,
                    env={"NEURON_FAST_PATH": "0"})
    assert off["same"] and off["paths"]["2"]["mailbox_calls"] == 0
    assert len(shm.segments_of(client.pid)) >= 1

    gather = client.ok("load", path=os.path.join(models_dir, "gather.pt"))["model"]
    raised = client.do("call", model=gather, args=[{"rand": [4, 3]}, {"tensor": [0, 9]}])
    assert raised.get("error") == "ModelExecutionError", raised
    assert "neuroncore 2" in raised["message"] and "index" in raised["message"].lower()
    # the worker kept serving after the model raised
    assert client.ok("call", model=gather, ref="gather", args=[{"rand": [4, 3]}, {"tensor": [3, 1]}])["same"]


def test_client_segments_removed_after_kill(broker, apps, models_dir):
    from neuron_client.wire import shm

    app = apps(broker)
    app.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "0"})
    app.ok("load", path=os.path.join(models_dir, "affine.pt"))
    # a segment named after the app's pid, as if it had sent a large tensor, then the app dies
    seg = shm.Segment(f"nrt-{app.pid}-abc-0", 4096, create=True)
    seg.close()
    app.kill()
    broker.wait_for(lambda d: d.cores[0].owner is None, 5, "core 0 reclaimed")
    # the broker unlinks them at its next liveness tick (0.1 s) once the process is gone, which may come just after
    # the status that shows core 0 free
    broker.wait_for(lambda d: shm.segments_of(app.pid) == [], 2, "the dead client's segments removed")
    assert shm.segments_of(app.pid) == []


def test_status_shows_owner_models_and_requests(broker, client, models_dir):
    client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "5"})
    affine = client.ok("load", path=os.path.join(models_dir, "affine.pt"))["model"]
    gather = client.ok("load", path=os.path.join(models_dir, "gather.pt"))["model"]
    client.ok("call", model=affine, args=[{"rand": [2, 4]}], times=3)  # 3 calls of 2 items each
    client.ok("call_in_thread", model=affine, args=[{"rand": [2, 4]}], env={"NEURON_FAST_PATH": "0"})
    assert client.do("call", model=gather, args=[{"rand": [4, 3]}, {"tensor": [0, 9]}])["error"]
    doc = broker.wait_for(lambda d: sum(m.requests for m in d.cores[5].models) == 5, 5, "both models' calls counted")
    by_name = {m.name: m for m in doc.cores[5].models}
    # per model, on either path: executions, items, failures, and time waiting vs running (Triton's split)
    a, g = by_name["affine.pt"], by_name["gather.pt"]
    assert (a.requests, a.inferences, a.failures) == (4, 8, 0) and (g.requests, g.failures) == (1, 1)
    assert a.compute_s > 0 and a.queue_s >= 0 and g.compute_s > 0
    core = doc.cores[5]
    assert core.state == "owned"
    assert core.owner.pid == client.pid and "-m tests.procs.inference" in core.owner.cmd
    assert core.owner.lease_age_s >= 0
    assert [m.name for m in core.models] == ["affine.pt", "gather.pt"]
    assert core.worker.pid > 0 and core.worker.memory_bytes > 0
    assert doc.cores[4].state == "free" and doc.cores[4].owner is None

    env = dict(broker.env)
    table = subprocess.run([sys.executable, "-m", "broker", "status"], env=env, capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("nc5 "))
    assert "owned" in row and str(client.pid) in row and "affine.pt" in row
    js = subprocess.run([sys.executable, "-m", "broker", "status", "--json"], env=env, capture_output=True,
                        text=True, timeout=60, cwd=ROOT)
    doc = json.loads(js.stdout)
    assert doc["schema"] == 2 and len(doc["cores"]) == 8 and doc["timestamp"].endswith("Z")
    assert {"index", "state", "device", "cpus", "worker", "owner", "models", "requests"} <= set(doc["cores"][0])
    assert doc["cores"][5]["owner"]["lease_age_s"] >= 0 and doc["cores"][5]["worker"]["memory_bytes"] > 0


def test_requests_counted_per_core(broker, client, models_dir):
    before = broker.status().cores[0].requests
    client.ok("acquire")
    m = client.ok("load", path=os.path.join(models_dir, "affine.pt"))
    assert m["cores"] == [0]
    client.ok("call", model=m["model"], shape=[2, 4])  # one call on nc0
    broker.wait_for(lambda d: d.cores[0].requests == before + 1, 5, "one more request on core 0")


def test_status_without_broker_says_how_to_start(tmp_path):
    env = dict(os.environ, NEURON_BROKER_DIR=str(tmp_path / "none"))
    out = subprocess.run([sys.executable, "-m", "broker", "status"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 1
    assert "neuron-broker start" in out.stderr


def test_cli_start_status_stop_as_daemon(tmp_path):
    env = dict(os.environ, NEURON_BROKER_DIR=str(tmp_path / "d"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "broker", *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=90, cwd=ROOT)
    try:
        started = run("start", "--cores", "2")
        assert started.returncode == 0, started.stderr
        assert "started pid" in started.stdout
        again = run("start", "--cores", "2")
        assert "already running" in again.stdout
        status = run("status", "--json")
        assert json.loads(status.stdout)["broker"]["cores"] == 2
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0 and "stopped pid" in stopped.stdout
    assert run("status").returncode == 1
    assert not os.path.exists(tmp_path / "d" / "broker.pid")


def test_autostart_once_under_a_race_and_opt_out(tmp_path, apps):
    directory = str(tmp_path / "auto")
    env = {"NEURON_BROKER_AUTOSTART": "1"}
    try:
        n = min(2, os.cpu_count())  # the autostarted broker has one core per CPU
        clients = [apps(None, "owner", env=env, directory=directory, wait=False) for _ in range(n)]
        for c in clients:  # every process is ready before any asks: the acquires race
            c.wait_ready()
        for c in clients:
            c.send("acquire", env={"NEURON_RT_NUM_CORES": "1"})
        got = [c.read(90) for c in clients]
        assert all("cores" in g for g in got), got
        owned = sorted(g["cores"][0] for g in got)
        assert len(set(owned)) == n  # n processes asking together, n distinct cores, one broker
        with open(os.path.join(directory, "broker.log")) as f:
            assert f.read().count("serving") == 1
        from neuron_client.wire.broker_client import BrokerClient

        with BrokerClient(f"ipc://{directory}/broker.sock") as client:
            pong = client.ping(5)
        assert pong.cores == os.cpu_count()
    finally:
        subprocess.run([sys.executable, "-m", "broker", "stop"], env=dict(os.environ, NEURON_BROKER_DIR=directory),
                       capture_output=True, timeout=60, cwd=ROOT)
    out = clients[0].do("acquire", env={"NEURON_BROKER_AUTOSTART": "0", "NEURON_BROKER_DIR": str(tmp_path / "off")})
    assert out.get("error") == "BrokerUnavailableError" and "NEURON_BROKER_AUTOSTART=0" in out["message"], out
