"""Core ownership across real processes: the seed 001 examples, conflicts, malformed requests, dead owners."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import wait_free


def test_default_owns_all_cores_and_places_linearly(broker, spawn_app, models_dir):
    out = spawn_app(broker, "load2", models_dir).finish()[0]
    assert out["owned"] == list(range(8))
    assert out["m0"] == [0] and out["m1"] == [1]
    assert out["ok"] and out["last_core"] == 0


def test_num_cores_two_processes_get_disjoint_contiguous_pairs(broker, spawn_app, models_dir):
    env = {"NEURON_RT_NUM_CORES": "2"}
    first = spawn_app(broker, "hold", models_dir, "1", env=env)
    a = first.next()
    second = spawn_app(broker, "hold", models_dir, "1", env=env)
    b = second.next()
    assert a["owned"] == [0, 1] and a["model_cores"] == [0]
    assert b["owned"] == [2, 3] and b["model_cores"] == [2]  # its nc0 is global core 2
    owners = broker.owners()
    assert owners[0] == owners[1] == first.pid
    assert owners[2] == owners[3] == second.pid
    assert all(owners[c] is None for c in range(4, 8))


def test_visible_cores_range_places_on_those_cores(broker, spawn_app, models_dir):
    out = spawn_app(broker, "load2", models_dir, env={"NEURON_RT_VISIBLE_CORES": "4-5"}).finish()[0]
    assert out["owned"] == [4, 5]
    assert out["m0"] == [4] and out["m1"] == [5]


def test_visible_cores_comma_list_and_priority_over_num_cores(broker, spawn_app, models_dir):
    env = {"NEURON_RT_VISIBLE_CORES": "0,2,4-5", "NEURON_RT_NUM_CORES": "1"}
    out = spawn_app(broker, "load2", models_dir, env=env).finish()[0]
    assert out["owned"] == [0, 2, 4, 5]
    assert out["m0"] == [0] and out["m1"] == [2]


def test_conflict_names_the_owner(broker, spawn_app, models_dir):
    holder = spawn_app(broker, "hold", env={"NEURON_RT_VISIBLE_CORES": "4-5"})
    holder.next()
    out = spawn_app(broker, "acquire_error", env={"NEURON_RT_VISIBLE_CORES": "5-6"}).finish()[0]
    assert not out["ok"] and out["is_unavailable"]
    assert out["error"] == "NeuronCoreUnavailableError"
    msg = out["message"]
    assert msg.startswith("NeuronCore(s) not available - Requested:nc5-nc6 Available:nc0-nc3,nc6-nc7")
    assert f"nc5 held by pid {holder.pid}" in msg and "apps.py hold" in msg
    # the default request (all cores) fails too, all or nothing
    out = spawn_app(broker, "acquire_error").finish()[0]
    assert out["error"] == "NeuronCoreUnavailableError" and "Requested:nc0-nc7 " in out["message"]
    # a contiguous count that fits elsewhere succeeds: first fit
    out = spawn_app(broker, "acquire_error", env={"NEURON_RT_NUM_CORES": "4"}).finish()[0]
    assert out["ok"] and out["owned"] == [0, 1, 2, 3]
    out = spawn_app(broker, "acquire_error", env={"NEURON_RT_NUM_CORES": "5"}).finish()[0]
    assert out["error"] == "NeuronCoreUnavailableError" and "Requested:5 contiguous" in out["message"]


@pytest.mark.parametrize("env, fragment", [
    ({"NEURON_RT_VISIBLE_CORES": "4-2"}, "runs backwards"),
    ({"NEURON_RT_VISIBLE_CORES": "-1"}, "not a core index"),
    ({"NEURON_RT_VISIBLE_CORES": "x"}, "not a core index"),
    ({"NEURON_RT_VISIBLE_CORES": "7-9"}, "this host has 8 cores"),
    ({"NEURON_RT_NUM_CORES": "9"}, "this host has 8 cores"),
    ({"NEURON_RT_NUM_CORES": "two"}, "not a whole number"),
    ({"NEURON_RT_ACQUIRE_TIMEOUT": "soon"}, "NEURON_RT_ACQUIRE_TIMEOUT"),
])
def test_malformed_requests_get_clear_errors(broker, spawn_app, env, fragment):
    out = spawn_app(broker, "acquire_error", env=env).finish()[0]
    assert not out["ok"]
    assert out["error"] == "NeuronCoreSpecError" and out["is_value_error"]
    assert fragment in out["message"]
    assert "Traceback" not in out["message"]


def test_kill_9_owner_frees_cores_within_about_a_second(broker, spawn_app, models_dir):
    holder = spawn_app(broker, "hold", models_dir, "1", env={"NEURON_RT_VISIBLE_CORES": "6-7"})
    holder.next()
    doc = broker.wait_for(lambda d: d.cores[6].models, 5, "model on core 6")
    assert doc.cores[6].owner.pid == holder.pid
    killed_at = time.monotonic()
    holder.kill(signal.SIGKILL)
    doc = broker.wait_for(lambda d: d.cores[6].owner is None and d.cores[7].owner is None, 5,
                          "cores 6-7 reclaimed")
    reclaim_s = time.monotonic() - killed_at
    assert reclaim_s < 1.5, f"reclaimed after {reclaim_s:.2f}s"
    # the worker dropped the dead owner's model
    broker.wait_for(lambda d: not d.cores[6].models, 5, "model unloaded from core 6")
    # and another process can take the cores at once
    out = spawn_app(broker, "acquire_error", env={"NEURON_RT_VISIBLE_CORES": "6-7"}).finish()[0]
    assert out["ok"] and out["owned"] == [6, 7]


def test_stopped_owner_keeps_its_cores_by_default(broker, spawn_app):
    """A live process keeps its cores however long it is silent (the reference runtime's behaviour)."""
    holder = spawn_app(broker, "hold", env={"NEURON_RT_VISIBLE_CORES": "3"})
    holder.next()
    assert broker.owners()[3] == holder.pid
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        time.sleep(3.0)
        assert broker.owners()[3] == holder.pid
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    assert broker.owners()[3] == holder.pid


def test_opt_in_policy_reclaims_an_owner_stopped_by_a_signal(fresh_broker, spawn_app):
    b = fresh_broker(2, extra=["--lease-timeout", "1"])
    holder = spawn_app(b, "hold", env={"NEURON_RT_VISIBLE_CORES": "1"})
    holder.next()
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        b.wait_for(lambda d: d.cores[1].owner is None, 10, "core 1 reclaimed from a stopped owner")
        assert time.monotonic() - stopped_at >= 1.0
    finally:
        os.kill(holder.pid, signal.SIGCONT)


def test_opt_in_wait_gets_cores_when_the_owner_exits(broker, spawn_app):
    holder = spawn_app(broker, "hold", env={"NEURON_RT_VISIBLE_CORES": "1"})
    holder.next()
    waiter = spawn_app(broker, "acquire_error", env={"NEURON_RT_VISIBLE_CORES": "1", "NEURON_RT_ACQUIRE_TIMEOUT": "30"})
    broker.wait_for(lambda d: d.pending, 30, "a waiting acquire")
    holder.kill()
    out = waiter.finish()[0]
    assert out["ok"] and out["owned"] == [1]
    # without enough time, the wait ends in the conflict error
    holder2 = spawn_app(broker, "hold", env={"NEURON_RT_VISIBLE_CORES": "1"})
    holder2.next()
    out = spawn_app(broker, "acquire_error",
                    env={"NEURON_RT_VISIBLE_CORES": "1", "NEURON_RT_ACQUIRE_TIMEOUT": "0.5"}).finish()[0]
    assert out["error"] == "NeuronCoreUnavailableError" and "waited" in out["message"]


def test_pid_reuse_guard(broker8):
    """A lease is tied to (pid, start time): the same pid with another start time is a different process."""
    from broker.server import process_alive
    import psutil

    me = psutil.Process()
    assert process_alive(me.pid, me.create_time())
    assert not process_alive(me.pid, me.create_time() - 100.0)
    wait_free(broker8)
