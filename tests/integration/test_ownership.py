"""Core ownership across real processes: the seed 001 examples, conflicts, malformed requests, dead owners."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.helpers import wait_free

PROCS_CMD = "-m tests.procs.inference"  # how the clients' command lines read in the broker's messages


def load2(client, models_dir) -> tuple[dict, dict]:
    """Seed 001: two plain loads (nc0, then nc1 of the process)."""
    path = os.path.join(models_dir, "affine.pt")
    return client.ok("load", path=path), client.ok("load", path=path)


def test_default_owns_all_cores_and_places_linearly(client, models_dir):
    assert client.ok("acquire")["cores"] == list(range(8))
    m0, m1 = load2(client, models_dir)
    assert m0["cores"] == [0] and m1["cores"] == [1]
    out = client.ok("call", model=m0["model"], args=[{"rand": [2, 4]}], ref="affine")
    assert out["same"] and out["last_core"] == 0


def test_num_cores_two_processes_get_disjoint_contiguous_pairs(broker, client, apps, models_dir):
    env = {"NEURON_RT_NUM_CORES": "2"}
    second = apps(broker, wait=False)
    assert client.ok("acquire", env=env)["cores"] == [0, 1]
    assert client.ok("load", path=os.path.join(models_dir, "affine.pt"))["cores"] == [0]
    assert second.ok("acquire", env=env)["cores"] == [2, 3]
    assert second.ok("load", path=os.path.join(models_dir, "affine.pt"))["cores"] == [2]  # its nc0 is global core 2
    owners = broker.owners()
    assert owners[0] == owners[1] == client.pid
    assert owners[2] == owners[3] == second.pid
    assert all(owners[c] is None for c in range(4, 8))


def test_visible_cores_range_places_on_those_cores(client, models_dir):
    assert client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "4-5"})["cores"] == [4, 5]
    m0, m1 = load2(client, models_dir)
    assert m0["cores"] == [4] and m1["cores"] == [5]


def test_visible_cores_comma_list_and_priority_over_num_cores(client, models_dir):
    env = {"NEURON_RT_VISIBLE_CORES": "0,2,4-5", "NEURON_RT_NUM_CORES": "1"}
    assert client.ok("acquire", env=env)["cores"] == [0, 2, 4, 5]
    m0, m1 = load2(client, models_dir)
    assert m0["cores"] == [0] and m1["cores"] == [2]


def test_conflict_names_the_owner(broker, client, apps):
    holder = apps(broker)
    holder.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "4-5"})
    out = client.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "5-6"})
    assert out.get("error") == "NeuronCoreUnavailableError", out
    msg = out["message"]
    assert msg.startswith("NeuronCore(s) not available - Requested:nc5-nc6 Available:nc0-nc3,nc6-nc7")
    assert f"nc5 held by pid {holder.pid}" in msg and PROCS_CMD in msg
    # the default request (all cores) fails too, all or nothing
    out = client.do("acquire")
    assert out.get("error") == "NeuronCoreUnavailableError" and "Requested:nc0-nc7 " in out["message"], out
    # a contiguous count that fits elsewhere succeeds: first fit
    assert client.ok("acquire", env={"NEURON_RT_NUM_CORES": "4"})["cores"] == [0, 1, 2, 3]
    client.ok("release")
    out = client.do("acquire", env={"NEURON_RT_NUM_CORES": "5"})
    assert out.get("error") == "NeuronCoreUnavailableError" and "Requested:5 contiguous" in out["message"], out


@pytest.mark.parametrize("env, fragment", [
    ({"NEURON_RT_VISIBLE_CORES": "4-2"}, "runs backwards"),
    ({"NEURON_RT_VISIBLE_CORES": "-1"}, "not a core index"),
    ({"NEURON_RT_VISIBLE_CORES": "x"}, "not a core index"),
    ({"NEURON_RT_VISIBLE_CORES": "7-9"}, "this host has 8 cores"),
    ({"NEURON_RT_NUM_CORES": "9"}, "this host has 8 cores"),
    ({"NEURON_RT_NUM_CORES": "two"}, "not a whole number"),
    ({"NEURON_RT_ACQUIRE_TIMEOUT": "soon"}, "NEURON_RT_ACQUIRE_TIMEOUT"),
])
def test_malformed_requests_get_clear_errors(client, env, fragment):
    out = client.do("acquire", env=env)
    assert out.get("error") == "NeuronCoreSpecError" and "ValueError" in out["types"], out
    assert fragment in out["message"]
    assert "Traceback" not in out["message"]


def test_kill_9_owner_frees_cores_within_about_a_second(broker, client, apps, models_dir):
    holder = apps(broker)
    holder.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "6-7"})
    holder.ok("load", path=os.path.join(models_dir, "affine.pt"))
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
    assert client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "6-7"})["cores"] == [6, 7]


def test_stopped_owner_keeps_its_cores_by_default(broker, client):
    """A live process keeps its cores however long it is silent (the reference runtime's behaviour)."""
    client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "3"})
    assert broker.owners()[3] == client.pid
    os.kill(client.pid, signal.SIGSTOP)
    try:
        time.sleep(3.0)
        assert broker.owners()[3] == client.pid
    finally:
        os.kill(client.pid, signal.SIGCONT)
    assert broker.owners()[3] == client.pid


def test_opt_in_policy_reclaims_an_owner_stopped_by_a_signal(fresh_broker, apps):
    b = fresh_broker(2, extra=["--lease-timeout", "1"])
    holder = apps(b)
    holder.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "1"})
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        b.wait_for(lambda d: d.cores[1].owner is None, 10, "core 1 reclaimed from a stopped owner")
        assert time.monotonic() - stopped_at >= 1.0
    finally:
        os.kill(holder.pid, signal.SIGCONT)


def test_opt_in_wait_gets_cores_when_the_owner_exits(broker, client, apps):
    holder, other = apps(broker, wait=False), apps(broker, wait=False)
    holder.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "1"})
    client.send("acquire", env={"NEURON_RT_VISIBLE_CORES": "1", "NEURON_RT_ACQUIRE_TIMEOUT": "30"})
    broker.wait_for(lambda d: d.pending, 30, "a waiting acquire")
    holder.kill()
    assert client.read(60).get("cores") == [1]
    # without enough time, the wait ends in the conflict error (the client holds core 1 now)
    out = other.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "1", "NEURON_RT_ACQUIRE_TIMEOUT": "0.5"})
    assert out.get("error") == "NeuronCoreUnavailableError" and "waited" in out["message"], out


def test_pid_reuse_guard(broker8):
    """A lease is tied to (pid, start time): the same pid with another start time is a different process."""
    import psutil

    from broker.server import process_alive

    me = psutil.Process()
    assert process_alive(me.pid, me.create_time())
    assert not process_alive(me.pid, me.create_time() - 100.0)
    wait_free(broker8)
