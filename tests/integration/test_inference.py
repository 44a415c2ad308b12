"""Inference through real workers: nesting, shared memory, model errors, status, and the broker CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_roundtrip_shm_and_model_errors(broker, spawn_app, models_dir):
    out = spawn_app(broker, "roundtrip", models_dir, env={"NEURON_RT_VISIBLE_CORES": "2"}).finish()[0]
    assert out["ok_nested"]
    assert out["ok_big"]
    assert out["segments"] >= 1  # the 4 MiB tensors went through shared memory
    assert out["raised"] is not None
    assert "neuroncore 2" in out["raised"] and "index" in out["raised"].lower()
    assert out["after_ok"]  # the worker kept serving after the model raised


def test_client_segments_removed_after_kill(broker, spawn_app, models_dir):
    from neuron_client.wire import shm

    app = spawn_app(broker, "hold", models_dir, "1", env={"NEURON_RT_VISIBLE_CORES": "0"})
    app.next()
    # a segment named after the app's pid, as if it had sent a large tensor, then the app dies
    seg = shm.Segment(f"nrt-{app.pid}-abc-0", 4096, create=True)
    seg.close()
    app.kill()
    broker.wait_for(lambda d: d.cores[0].owner is None, 5, "core 0 reclaimed")
    assert shm.segments_of(app.pid) == []


def test_status_shows_owner_models_and_requests(broker, spawn_app, models_dir):
    app = spawn_app(broker, "hold", models_dir, "1", env={"NEURON_RT_VISIBLE_CORES": "5"})
    app.next()
    doc = broker.wait_for(lambda d: d.cores[5].models, 5, "model listed on core 5")
    core = doc.cores[5]
    assert core.state == "owned"
    assert core.owner.pid == app.pid and "apps.py hold" in core.owner.cmd
    assert core.owner.lease_age_s >= 0
    assert core.models[0].name == "affine.pt"
    assert core.worker.pid > 0 and core.worker.memory_bytes > 0
    assert doc.cores[4].state == "free" and doc.cores[4].owner is None

    env = dict(broker.env)
    table = subprocess.run([sys.executable, "-m", "broker", "status"], env=env, capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("nc5 "))
    assert "owned" in row and str(app.pid) in row and "affine.pt" in row
    js = subprocess.run([sys.executable, "-m", "broker", "status", "--json"], env=env, capture_output=True,
                        text=True, timeout=60, cwd=ROOT)
    doc = json.loads(js.stdout)
    assert doc["schema"] == 2 and len(doc["cores"]) == 8 and doc["timestamp"].endswith("Z")
    assert {"index", "state", "device", "cpus", "worker", "owner", "models", "requests"} <= set(doc["cores"][0])
    assert doc["cores"][5]["owner"]["lease_age_s"] >= 0 and doc["cores"][5]["worker"]["memory_bytes"] > 0


def test_requests_counted_per_core(broker, spawn_app, models_dir):
    before = broker.status().cores[0].requests
    spawn_app(broker, "load2", models_dir).finish()  # one call on nc0
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


def test_autostart_once_under_a_race_and_opt_out(tmp_path, spawn_app, models_dir):
    directory = str(tmp_path / "auto")
    env = {"NEURON_BROKER_AUTOSTART": "1", "NEURON_RT_NUM_CORES": "1"}
    try:
        n = min(2, os.cpu_count())  # the autostarted broker has one core per CPU
        apps = [spawn_app(None, "hold", env=env, directory=directory) for _ in range(n)]
        owned = sorted(a.next(90)["owned"][0] for a in apps)
        assert len(set(owned)) == n  # n processes started together, n distinct cores, one broker
        with open(os.path.join(directory, "broker.log")) as f:
            assert f.read().count("serving") == 1
        from neuron_client.wire.broker_client import BrokerClient

        with BrokerClient(f"ipc://{directory}/broker.sock") as client:
            pong = client.ping(5)
        assert pong.cores == os.cpu_count()
    finally:
        subprocess.run([sys.executable, "-m", "broker", "stop"], env=dict(os.environ, NEURON_BROKER_DIR=directory),
                       capture_output=True, timeout=60, cwd=ROOT)
    out = spawn_app(None, "acquire_error", env={"NEURON_BROKER_AUTOSTART": "0"},
                    directory=str(tmp_path / "off")).finish()[0]
    assert out["error"] == "BrokerUnavailableError" and "NEURON_BROKER_AUTOSTART=0" in out["message"]
