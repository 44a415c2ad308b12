"""Figures for neuron_client under Ray, on a local ray.cluster_utils.Cluster (a head without neuron_cores and two
nodes of --cores neuron_cores each, every node with its own broker):

1. placement: 2 x --cores single-core actors; which node and core each got, and how long until all held their cores;
2. reclaim: ray.kill of each of those actors -> its cores free in the node broker's status (seconds);
3. throughput on one node: --cores single-core actors calling a model (inside the actors, and driven call by call
   from the Ray driver) against the same number of processes launched by ``neuron-run --nproc`` on the same broker.

    python scripts/bench_ray.py [--cores 2] [--seconds 5] [--batch 16] [--hidden 512] [--json]

Everything it starts (Ray, brokers) is stopped at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_model(batch: int, hidden: int):
    import torch

    import neuron_client

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                torch.nn.ReLU(), torch.nn.Linear(hidden, hidden)).eval()
    x = torch.rand(batch, hidden)
    buf = io.BytesIO()
    torch.jit.save(neuron_client.trace(model, x), buf)
    return buf.getvalue(), x


def worker_main(model_path: str, seconds: float, batch: int, hidden: int) -> int:
    """A neuron-run rank: load the model on its core and call it back to back, as the actors do."""
    import torch

    import neuron_client

    m = neuron_client.jit.load(model_path)
    x = torch.rand(batch, hidden)
    m(x)  # warm
    calls, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        m(x)
        calls += 1
    print(json.dumps({"calls": calls, "seconds": time.monotonic() - t0, "cores": m.cores}), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=2, help="neuron_cores per Ray node (two nodes)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", nargs=1, metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker[0], args.seconds, args.batch, args.hidden)

    import ray
    from ray.cluster_utils import Cluster

    from neuron_client.integrations import ray as nray
    from neuron_client.runtime import autostart
    from tests.helpers import local_status, wait_status
    from tests.procs.ray_actors import pinned

    base = tempfile.mkdtemp(prefix="nray-bench-")
    figures: dict = {"cores_per_node": args.cores, "model": f"3 x Linear({args.hidden}), batch {args.batch}"}
    cluster = None
    brokers: list[dict] = []
    try:
        t0 = time.monotonic()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        nodes = [cluster.add_node(num_cpus=1, resources={"neuron_cores": args.cores}) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="error",
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}})
        figures["ray_cluster_start_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        brokers = nray.ensure_brokers(base_dir=base)
        figures["ensure_brokers_s"] = round(time.monotonic() - t0, 1)
        dirs = {b["node_id"]: b["directory"] for b in brokers}
        data, x = make_model(args.batch, args.hidden)
        Server = ray.remote(resources={"neuron_cores": 1}, num_cpus=0)(nray.NeuronModelServer)

        # 1. placement
        t0 = time.monotonic()
        servers = [Server.remote(data) for _ in range(2 * args.cores)]
        infos = ray.get([s.neuron_info.remote() for s in servers], timeout=300)
        figures["actors_ready_s"] = round(time.monotonic() - t0, 1)
        placed: dict[str, dict] = {}
        for info in infos:
            placed.setdefault(info["node_id"][:8], {})[f"nc{info['cores'][0]}"] = info["pid"]
        figures["actors_placed"] = len(infos)
        figures["placement"] = placed
        brokers_owned = {n[:8]: sum(1 for o in nray.owners(local_status(d)).values() if o)
                         for n, d in dirs.items()}
        figures["cores_owned_per_node_broker"] = brokers_owned

        # 2. reclaim after ray.kill
        reclaim = []
        for s, info in zip(servers, infos):
            d = dirs[info["node_id"]]
            core = info["cores"][0]
            t0 = time.monotonic()
            ray.kill(s)
            wait_status(d, lambda doc: nray.owners(doc)[core] is None, timeout_s=15, what="reclaim")
            reclaim.append(time.monotonic() - t0)
        figures["reclaim_after_ray_kill_s"] = {"median": round(statistics.median(reclaim), 3),
                                               "max": round(max(reclaim), 3), "samples": len(reclaim)}

        # 3. throughput on node A: N actors vs N neuron-run processes
        node_a = nodes[0].node_id
        dir_a = dirs[node_a]
        n = args.cores
        actors = [Server.options(scheduling_strategy=pinned(node_a)).remote(data) for _ in range(n)]
        ray.get([a.infer.remote(x) for a in actors], timeout=300)  # ready and warm
        runs = ray.get([a.run_for.remote(args.seconds, x) for a in actors], timeout=300)
        in_actor = sum(r["calls"] / r["seconds"] for r in runs)
        calls, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < args.seconds:  # driven from the driver: one call in flight per actor
            ray.get([a.infer.remote(x) for a in actors])
            calls += n
        driven = calls / (time.monotonic() - t0)
        for a in actors:
            ray.kill(a)
        wait_status(dir_a, lambda doc: all(o is None for o in nray.owners(doc).values()), what="free")

        model_path = os.path.join(base, "model.pt")
        with open(model_path, "wb") as f:
            f.write(data)
        neuron_run = os.path.join(os.path.dirname(sys.executable), "neuron-run")
        cmd = [neuron_run] if os.path.exists(neuron_run) else [
            sys.executable, "-c", "import sys; from neuron_client.tools.launch import main; sys.exit(main())"]
        env = dict(os.environ, NEURON_BROKER_DIR=dir_a, NEURON_BROKER_AUTOSTART="0", PYTHONWARNINGS="ignore",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run(cmd + ["--nproc", str(n), "--", sys.executable, os.path.abspath(__file__), "--seconds",
                                    str(args.seconds), "--batch", str(args.batch), "--hidden", str(args.hidden),
                                    "--worker", model_path], env=env, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise SystemExit(f"neuron-run failed ({out.returncode}): {out.stderr[-3000:]}")
        ranks = [json.loads(line.split("] ", 1)[1]) for line in out.stdout.splitlines() if "] {" in line]
        launched = sum(r["calls"] / r["seconds"] for r in ranks)
        figures["throughput_calls_per_s"] = {
            f"{n} Ray actors, calls inside the actors": round(in_actor, 1),
            f"{n} Ray actors, each call a Ray task from the driver": round(driven, 1),
            f"{n} processes under neuron-run": round(launched, 1),
        }
        figures["ray_vs_neuron_run_in_actor_ratio"] = round(in_actor / launched, 3) if launched else None
    finally:
        try:
            ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
            nray.stop_local_brokers(brokers, timeout_s=5.0)
            for root, _dirs, files in os.walk(base):  # brokers started by actors themselves
                pid = autostart.running_pid(root) if "broker.pid" in files else 0
                if pid:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
