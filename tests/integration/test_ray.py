"""neuron_client under a real local Ray cluster (ray.cluster_utils.Cluster): one broker per Ray node, actors owning
exactly the cores Ray assigned, conflicts that plain Ray lets through, reclaim after ray.kill and after a node dies.

The cluster is small (a head without neuron_cores and two nodes of 2 neuron_cores, 1 CPU each) and shared by the
module; every Ray process and every broker it started is stopped at the end, even after a failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' (scripts/setup does it)")

from neuron_client.integrations import ray as nray
from tests.helpers import local_status, wait_status  # noqa: E402
from tests.procs import ray_actors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.timeout(240)


class RayCluster:
    def __init__(self, base: str):
        self.base = base
        self.brokers: list[dict] = []
        self.cluster = None
        self.saved_env: dict = {}

    def start(self) -> None:
        from ray.cluster_utils import Cluster

        # the nodes inherit this process's environment: no broker of the caller's may leak into them
        self.saved_env = {k: os.environ.pop(k) for k in ("NEURON_BROKER_DIR", "NEURON_BROKER_ADDRESS",
                                                         nray.ENV_BROKER_BASE, "NEURON_RT_VISIBLE_CORES",
                                                         "NEURON_RT_NUM_CORES") if k in os.environ}
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        # node A names its broker directory itself (as a host would, in the environment of `ray start`); node B gets
        # one derived from its node id under the base that ensure_brokers is given
        self.dir_a = os.path.join(self.base, "node-a-broker")
        self.node_a = self.cluster.add_node(num_cpus=1, resources={"neuron_cores": 2},
                                            env_vars={"NEURON_BROKER_DIR": self.dir_a})
        self.node_b = self.cluster.add_node(num_cpus=1, resources={"neuron_cores": 2})
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False, logging_level="error",
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}})
        self.a, self.b = self.node_a.node_id, self.node_b.node_id
        self.brokers = nray.ensure_brokers(base_dir=self.base)
        self.dirs = {info["node_id"]: info["directory"] for info in self.brokers}

    def broker_pids(self) -> set[int]:
        """Every broker started under the base directory (also those actors started by themselves)."""
        from neuron_client.runtime import autostart

        pids = set()
        for root, _dirs, files in os.walk(self.base):
            if "broker.pid" in files:
                pid = autostart.running_pid(root)
                if pid:
                    pids.add(pid)
        return pids

    def close(self) -> None:
        import signal

        try:
            ray.shutdown()
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.shutdown()
            finally:
                nray.stop_local_brokers(self.brokers, timeout_s=5.0)
                for pid in self.broker_pids():
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                os.environ.update(self.saved_env)


@pytest.fixture(scope="module")
def rc():
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="nray-")  # short: ipc socket paths must stay under ~100 characters
    c = RayCluster(base)
    try:
        c.start()
        yield c
    finally:  # also when starting failed half way: stop whatever was started
        c.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def model_bytes():
    return ray_actors.affine_bytes()


@pytest.fixture
def outsider(rc, kept):
    """A process on the host outside Ray (``python -m tests.procs.owner``), kept for the module, holding nothing;
    it names a node's broker when it acquires (NEURON_BROKER_DIR)."""
    with kept.lend(None, "owner", env={"NEURON_BROKER_AUTOSTART": "0"}) as app:
        yield app


def all_free(doc) -> bool:
    return all(c.owner is None for c in doc.cores)


def kill_all(actors) -> None:
    for a in actors:
        ray.kill(a)


def test_importing_neuron_client_does_not_import_ray():
    code = ("import sys, neuron_client, neuron_client.jit, neuron_client.experimental; "
            "assert 'ray' not in sys.modules, 'neuron_client imported ray'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_one_broker_per_node_with_the_nodes_cores(rc):
    assert sorted(i["node_id"] for i in rc.brokers) == sorted([rc.a, rc.b]), "the head has no neuron_cores: no broker"
    for info in rc.brokers:
        assert info["cores"] == info["ray_neuron_cores"] == 2
        assert info["started"] is True
    assert rc.dirs[rc.a] == rc.dir_a  # the node's own NEURON_BROKER_DIR
    assert rc.dirs[rc.b] == os.path.join(rc.base, f"node-{rc.b[:16]}")  # derived from its node id
    assert len({i["pid"] for i in rc.brokers}) == 2
    for info in rc.brokers:
        doc = local_status(info["directory"])
        assert doc.broker.pid == info["pid"] and doc.broker.cores == 2
        assert nray.node_status(info["node_id"]).broker.pid == info["pid"]  # the same, asked on the node
    again = nray.ensure_brokers(base_dir=rc.base)  # idempotent: finds them
    assert {(i["node_id"], i["pid"]) for i in again} == {(i["node_id"], i["pid"]) for i in rc.brokers}
    assert not any(i["started"] for i in again)


def test_actors_own_exactly_rays_cores_on_each_node(rc, model_bytes):
    Server = ray.remote(resources={"neuron_cores": 1}, num_cpus=0)(nray.NeuronModelServer)
    servers = [Server.remote(model_bytes) for _ in range(4)]  # 2 nodes x 2 cores: Ray must spread them
    try:
        infos = ray.get([s.neuron_info.remote() for s in servers], timeout=120)
        per_node: dict[str, list] = {}
        for info in infos:
            assert info["cores"] == info["ray_cores"], info  # exactly what Ray assigned...
            assert info["visible"] == ",".join(map(str, info["ray_cores"]))  # ...which Ray set as a comma list
            assert info["broker_dir"] == rc.dirs[info["node_id"]]
            per_node.setdefault(info["node_id"], []).append(info)
        assert sorted(per_node) == sorted([rc.a, rc.b])
        for node_id, infos_here in per_node.items():
            assert sorted(c for i in infos_here for c in i["cores"]) == [0, 1]
            doc = local_status(rc.dirs[node_id])
            assert nray.owners(doc) == {i["cores"][0]: i["pid"] for i in infos_here}  # the broker's view agrees
        x = torch.rand(2, 4)
        for y in ray.get([s.infer.remote(x) for s in servers], timeout=60):
            torch.testing.assert_close(y, x * 2 + 1)
    finally:
        kill_all(servers)
    for d in rc.dirs.values():
        wait_status(d, all_free, what="all cores free after ray.kill")


def test_plain_ray_lets_a_second_process_onto_owned_cores_the_broker_does_not(rc, model_bytes, outsider):
    Server = ray.remote(resources={"neuron_cores": 1}, num_cpus=0)(nray.NeuronModelServer)
    owner = Server.options(scheduling_strategy=ray_actors.pinned(rc.a)).remote(model_bytes)
    plain = None
    try:
        info = ray.get(owner.neuron_info.remote(), timeout=120)
        core = info["cores"][0]
        # plain Ray: an actor told (by hand) to use the same core starts and sees it as its own; Ray's reservation is
        # logical, so nothing stops it from running there next to the owner
        plain = ray_actors.PlainActor.options(
            scheduling_strategy=ray_actors.pinned(rc.a),
            runtime_env={"env_vars": {"NEURON_RT_VISIBLE_CORES": str(core), "PYTHONPATH": ROOT}}).remote()
        view = ray.get(plain.plain_view.remote(), timeout=120)
        assert view["visible"] == str(core) and view["ray_cores"] == [] and view["node_id"] == rc.a
        # ours: the same process asking the node's broker for that core fails, naming the owner
        got = ray.get(plain.acquire.remote(), timeout=60)
        assert got["ok"] is False and got["error"] == "NeuronCoreUnavailableError", got
        assert f"Requested:nc{core}" in got["message"] and f"held by pid {info['pid']}" in got["message"], got
        # a process outside Ray on the host fails the same way
        out = outsider.do("acquire", env={"NEURON_BROKER_DIR": rc.dirs[rc.a], "NEURON_RT_VISIBLE_CORES": str(core)})
        assert out.get("error") == "NeuronCoreUnavailableError" and "NeuronCore(s) not available" in out["message"]
        assert f"held by pid {info['pid']}" in out["message"]
        # and the owner still serves
        x = torch.rand(2, 4)
        torch.testing.assert_close(ray.get(owner.infer.remote(x), timeout=60), x * 2 + 1)
    finally:
        kill_all([owner] + ([plain] if plain is not None else []))
    wait_status(rc.dirs[rc.a], all_free, what="all cores free")


def test_an_actor_given_cores_a_process_outside_ray_holds_fails(rc, outsider):
    """Ray assigns cores by its own bookkeeping; when a process outside Ray already holds them, the actor fails with
    the conflict error naming that process (after a short wait for a reclaim in progress), not silently sharing."""
    got = outsider.ok("acquire", env={"NEURON_BROKER_DIR": rc.dirs[rc.b], "NEURON_RT_VISIBLE_CORES": "0-1"})
    assert got["cores"] == [0, 1]
    Probe = ray.remote(resources={"neuron_cores": 1}, num_cpus=0)(ray_actors.Probe)
    p = Probe.options(scheduling_strategy=ray_actors.pinned(rc.b), runtime_env={"env_vars": {
        "NEURON_RT_ACQUIRE_TIMEOUT": "0.5", "PYTHONPATH": ROOT}}).remote()
    with pytest.raises(ray.exceptions.RayActorError) as info:
        ray.get(p.info.remote(), timeout=120)
    assert "NeuronCoreUnavailableError" in str(info.value) and f"held by pid {outsider.pid}" in str(info.value)
    outsider.ok("release")
    wait_status(rc.dirs[rc.b], all_free, what="the outsider's cores reclaimed")


def test_ray_serve_replicas_own_their_cores_and_scale_without_leaking(rc):
    """scripts/ray_serve_example.py on this cluster (no HTTP proxy): 2 -> 1 replicas of 1 core, then deleted."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "ray_serve_example.py"), "--address",
                          rc.cluster.address, "--replicas", "2,1", "--requests", "4", "--json"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    steps = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    scaled = [s for s in steps if "replicas" in s]
    assert [s["replicas"] for s in scaled] == [2, 1]
    for s in scaled:
        held = [pid for owners in s["owners"].values() for pid in owners.values() if pid is not None]
        assert len(held) == len(set(held)) == s["replicas"]  # one core per replica, no core left to a gone one
        assert {pid for pid, _core in s["served_by"]} <= set(held)
    assert steps[-1] == {"deleted": True, "free": True}
    for d in rc.dirs.values():
        wait_status(d, all_free, what="all cores free after the Serve app")


def test_ray_kill_frees_the_actors_cores_within_a_second_or_two(rc, model_bytes):
    Server = ray.remote(resources={"neuron_cores": 2}, num_cpus=0)(nray.NeuronModelServer)
    s = Server.options(scheduling_strategy=ray_actors.pinned(rc.b)).remote(model_bytes)
    info = ray.get(s.neuron_info.remote(), timeout=120)
    assert info["cores"] == [0, 1]
    assert ray.get(s.load.remote(model_bytes, "twice"), timeout=60) == [0, 1]  # a replica per owned core
    doc = local_status(rc.dirs[rc.b])
    assert nray.owners(doc) == {0: info["pid"], 1: info["pid"]}
    t0 = time.monotonic()
    ray.kill(s)
    _, waited = wait_status(rc.dirs[rc.b], all_free, timeout_s=10, what="cores free after ray.kill")
    reclaim_s = time.monotonic() - t0
    print(f"ray.kill -> cores free in status: {reclaim_s:.2f}s")
    assert reclaim_s < 3.0


def test_without_rays_variable_the_assignment_is_read_from_the_runtime_context(rc):
    """RAY_EXPERIMENTAL_NOSET_NEURON_RT_VISIBLE_CORES=1: Ray leaves the variable alone; attach() sets it."""
    Probe = ray.remote(resources={"neuron_cores": 2}, num_cpus=0)(ray_actors.Probe)
    p = Probe.options(scheduling_strategy=ray_actors.pinned(rc.a), runtime_env={"env_vars": {
        "RAY_EXPERIMENTAL_NOSET_NEURON_RT_VISIBLE_CORES": "1", "PYTHONPATH": ROOT}}).remote()
    try:
        info = ray.get(p.info.remote(), timeout=120)
        assert info["env_before"]["NEURON_RT_VISIBLE_CORES"] is None  # Ray did not set it
        assert info["visible"] == "0,1" and info["cores"] == info["ray_cores"] == [0, 1]
    finally:
        ray.kill(p)
    wait_status(rc.dirs[rc.a], all_free, what="all cores free")


def test_a_task_holds_its_cores_for_the_with_block_only(rc, model_bytes):
    @ray.remote(resources={"neuron_cores": 1}, num_cpus=0)
    def infer(model, x):
        with nray.task_cores() as rt:
            y = nray.load(model)(x)
            return y, list(rt.cores), nray.assigned_cores(), os.getpid()

    x = torch.rand(2, 4)
    y, cores, ray_cores, pid = ray.get(infer.options(scheduling_strategy=ray_actors.pinned(rc.b)).remote(
        model_bytes, x), timeout=120)
    torch.testing.assert_close(y, x * 2 + 1)
    assert cores == ray_cores and len(cores) == 1
    doc = local_status(rc.dirs[rc.b])
    assert all_free(doc), doc.leases  # the task's worker lives on (Ray reuses it) but holds nothing


def test_an_actor_without_neuron_cores_is_refused(rc):
    Probe = ray.remote(num_cpus=0)(ray_actors.Probe)
    p = Probe.remote()
    with pytest.raises(ray.exceptions.RayActorError, match="assigned no neuron_cores"):
        ray.get(p.info.remote(), timeout=120)


def test_removing_a_node_mid_run(rc, model_bytes):
    """A third node joins (ensure_brokers starts its broker); actors on it and on node A serve calls; the node is
    removed: its broker takes the dead actor's cores back, and node A's actor keeps serving."""
    node_c = rc.cluster.add_node(num_cpus=1, resources={"neuron_cores": 2})
    rc.cluster.wait_for_nodes()
    c = node_c.node_id
    actors = []
    try:
        infos = nray.ensure_brokers(base_dir=rc.base)
        rc.brokers += [i for i in infos if i["started"]]
        assert [i["node_id"] for i in infos if i["started"]] == [c]  # only the new node needed one
        dir_c = next(i["directory"] for i in infos if i["node_id"] == c)

        @nray.neuron_actor(num_cores=2, num_cpus=0)
        class Echo:
            def __init__(self, model):
                self.model = self.load_model(model, nc_count=2)

            def run(self, x):
                return self.model(x), self.model.last_core

        on_a = Echo.options(scheduling_strategy=ray_actors.pinned(rc.a)).remote(model_bytes)
        on_c = Echo.options(scheduling_strategy=ray_actors.pinned(c)).remote(model_bytes)
        actors += [on_a, on_c]
        info_a, info_c = ray.get([on_a.neuron_info.remote(), on_c.neuron_info.remote()], timeout=120)
        assert info_c["node_id"] == c and info_c["broker_dir"] == dir_c and info_c["cores"] == [0, 1]
        x = torch.rand(2, 4)
        for y, _core in ray.get([on_a.run.remote(x), on_c.run.remote(x)] * 3, timeout=60):
            torch.testing.assert_close(y, x * 2 + 1)
        assert nray.owners(local_status(dir_c)) == {0: info_c["pid"], 1: info_c["pid"]}

        rc.cluster.remove_node(node_c, allow_graceful=False)
        node_c = None
        _, waited = wait_status(dir_c, all_free, timeout_s=30, what="node C's cores reclaimed")
        print(f"node removed -> its broker reclaimed the cores after {waited:.2f}s")
        cores_seen = set()
        for y, core in ray.get([on_a.run.remote(x) for _ in range(6)], timeout=60):
            torch.testing.assert_close(y, x * 2 + 1)
            cores_seen.add(core)
        assert cores_seen == {0, 1}  # both replicas of node A's actor keep serving
        assert nray.owners(local_status(rc.dirs[rc.a])) == {0: info_a["pid"], 1: info_a["pid"]}
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(on_c.run.remote(x), timeout=60)
    finally:
        kill_all(actors)
        if node_c is not None:
            rc.cluster.remove_node(node_c, allow_graceful=False)
    wait_status(rc.dirs[rc.a], all_free, what="node A's cores free")
