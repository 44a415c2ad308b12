"""A Ray Serve deployment whose replicas each own their NeuronCores, scaled up and down without leaking cores.

    python scripts/ray_serve_example.py                      # local Ray (2 CPUs), 4 neuron_cores, replicas 2 -> 4 -> 1
    python scripts/ray_serve_example.py --replicas 1,3,2,0 --cores 4 --cores-per-replica 1
    python scripts/ray_serve_example.py --address auto       # an existing cluster whose nodes advertise neuron_cores
    python scripts/ray_serve_example.py --http               # also serve POST /neuron {"x": [[...4 floats...]]}

Each replica is a ``neuron_client.integrations.ray.NeuronActor``: Ray gives it ``neuron_cores`` ids, the replica acquires exactly
those from its node's broker (started by ``ensure_brokers`` with ``--cores`` = the node's ``neuron_cores``), loads the
model with one replica per owned core and serves calls. After each scaling step the script prints the brokers' view
(core -> owner pid) and checks that exactly the live replicas hold cores: scaled-down replicas' cores come back.
With ``--json`` it prints one JSON line per step (the tests read them).

Ray Serve adds a controller actor (and, with ``--http``, a proxy) to the cluster; without ``--address`` the script
starts a small local Ray (``num_cpus=2``, no dashboard) and a private broker, and stops both at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import ray
import torch
from ray import serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import neuron_client  # noqa: E402
from neuron_client.integrations import ray as nray

APP = "neuron"
SCALE_TIMEOUT_S = 120.0


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def model_bytes() -> tuple[bytes, torch.nn.Module]:
    model = Mlp().eval()
    buf = io.BytesIO()
    torch.jit.save(neuron_client.trace(model, torch.rand(1, 4)), buf)
    return buf.getvalue(), model


@serve.deployment(graceful_shutdown_timeout_s=2, graceful_shutdown_wait_loop_s=0.5, health_check_period_s=2,
                  ray_actor_options={"num_cpus": 0, "resources": {"neuron_cores": 1}})
class NeuronModelDeployment(nray.NeuronActor):
    """One Serve replica: owns the cores Ray assigned (acquired from the node's broker), a model replica on each."""

    def __init__(self, model: bytes):
        super().__init__()
        self.model = self.load_model(model, nc_count=len(self.neuron_cores))

    def infer(self, x: torch.Tensor) -> dict:
        y = self.model(x)
        return {"y": y, "pid": os.getpid(), "core": self.model.last_core,
                "node_id": ray.get_runtime_context().get_node_id()}

    def where(self) -> dict:
        return self.neuron_info()

    async def __call__(self, request) -> dict:  # HTTP: POST {"x": [[a, b, c, d]]}
        body = await request.json()
        out = self.infer(torch.tensor(body["x"], dtype=torch.float32))
        return {"y": out["y"].tolist(), "pid": out["pid"], "core": out["core"]}


def brokers_view(brokers: list[dict]) -> dict[str, dict[int, int | None]]:
    """node id -> {core: owner pid or None}, as each node's broker sees it."""
    return {b["node_id"]: nray.owners(nray.node_status(b["node_id"])) for b in brokers}


def replica_pids(view) -> set[int]:
    return {pid for owners in view.values() for pid in owners.values() if pid is not None}


def scale(handle_app, model: bytes, n: int, per_replica: int, brokers: list[dict]):
    """Deploy ``n`` replicas (in place: existing ones stay) and wait until the brokers show exactly ``n`` owners,
    each holding ``per_replica`` cores; (handle, view, seconds)."""
    t0 = time.monotonic()
    handle = None
    if n:
        app = NeuronModelDeployment.options(num_replicas=n, ray_actor_options={
            "num_cpus": 0, "resources": {"neuron_cores": per_replica}}).bind(model)
        handle = serve.run(app, name=APP, route_prefix="/neuron" if handle_app else None)
    else:
        serve.delete(APP)
    deadline = time.monotonic() + SCALE_TIMEOUT_S
    while True:
        view = brokers_view(brokers)
        held: dict[int, int] = {}
        for owners in view.values():
            for pid in owners.values():
                if pid is not None:
                    held[pid] = held.get(pid, 0) + 1
        if len(held) == n and all(k == per_replica for k in held.values()):
            return handle, view, time.monotonic() - t0
        if time.monotonic() > deadline:
            raise SystemExit(f"the brokers did not show {n} replicas of {per_replica} cores within "
                             f"{SCALE_TIMEOUT_S:.0f}s: {view}")
        time.sleep(0.1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="connect to this Ray cluster instead of starting a local one")
    p.add_argument("--cores", type=int, default=4, help="neuron_cores of the local Ray node (without --address)")
    p.add_argument("--cores-per-replica", type=int, default=1)
    p.add_argument("--replicas", default="2,4,1", help="comma list of replica counts to scale through (0 deletes)")
    p.add_argument("--requests", type=int, default=8, help="requests to send after each step")
    p.add_argument("--base-dir", default=None, help="ensure_brokers(base_dir=...) for clusters of simulated nodes")
    p.add_argument("--http", action="store_true", help="also run Serve's HTTP proxy and send one HTTP request")
    p.add_argument("--json", action="store_true", help="print one JSON line per step")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.replicas.split(",") if s.strip()]

    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    def say(doc: dict, text: str) -> None:
        print(json.dumps(doc) if args.json else text, flush=True)

    own_broker_dir = None
    if args.address is None:
        own_broker_dir = os.path.join(tempfile.mkdtemp(prefix="nray-serve-"), "broker")
        os.environ["NEURON_BROKER_DIR"] = own_broker_dir  # the local node's broker: its raylet inherits this
        ray.init(num_cpus=2, resources={"neuron_cores": args.cores}, include_dashboard=False, log_to_driver=False,
                 logging_level="error", runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    else:
        ray.init(address=args.address, log_to_driver=False, logging_level="error",
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    brokers: list[dict] = []
    try:
        brokers = nray.ensure_brokers(base_dir=args.base_dir)
        say({"brokers": brokers}, "brokers: " + "; ".join(
            f"node {b['node_id'][:8]} {b['cores']} cores in {b['directory']} (pid {b['pid']}"
            f"{', started' if b['started'] else ''})" for b in brokers))
        serve.start(proxy_location="HeadOnly" if args.http else "Disabled")
        data, reference = model_bytes()
        x = torch.rand(1, 4)
        want = reference(x)
        for n in steps:
            handle, view, took = scale(args.http, data, n, args.cores_per_replica, brokers)
            served = []
            if n:
                outs = [handle.infer.remote(x) for _ in range(args.requests)]
                for out in outs:
                    r = out.result(timeout_s=60)
                    torch.testing.assert_close(r["y"], want)
                    served.append((r["pid"], r["core"], r["node_id"]))
            pids = replica_pids(view)
            assert {pid for pid, _c, _n in served} <= pids, (served, view)
            say({"replicas": n, "owners": {k: {str(c): o for c, o in v.items()} for k, v in view.items()},
                 "replica_pids": sorted(pids), "served_by": sorted({(p_, c) for p_, c, _ in served}),
                 "seconds": round(took, 2)},
                f"{n} replica(s) after {took:.1f}s; cores per node: " + "; ".join(
                    f"node {node[:8]}: " + ", ".join(f"nc{c}={o or 'free'}" for c, o in sorted(v.items()))
                    for node, v in view.items())
                + (f"; {len(served)} requests served by pid:core "
                   + ", ".join(sorted({f'{p_}:nc{c}' for p_, c, _ in served})) if served else ""))
        if args.http and steps and steps[-1]:
            import urllib.request

            req = urllib.request.Request("http://127.0.0.1:8000/neuron", data=json.dumps({"x": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
            body = json.loads(urllib.request.urlopen(req, timeout=30).read())
            torch.testing.assert_close(torch.tensor(body["y"]), want)
            say({"http": body}, f"HTTP POST /neuron -> {body}")
        _, view, took = scale(args.http, data, 0, args.cores_per_replica, brokers)
        say({"deleted": True, "free": all(o is None for v in view.values() for o in v.values())},
            f"application deleted: every core free again after {took:.1f}s")
        return 0
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        if own_broker_dir is not None:
            nray.stop_local_brokers([b for b in brokers if b["started"]])
            shutil.rmtree(os.path.dirname(own_broker_dir), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
