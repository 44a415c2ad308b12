"""Ray actors and helpers that tests/integration/test_ray.py and scripts/bench_ray.py use.

Ray workers import this module by name, so the Ray job must have the repository root on ``PYTHONPATH`` (the tests
pass it in the job's ``runtime_env``).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import ray
import torch

from neuron_client.integrations import ray as nray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Affine(torch.nn.Module):
    def forward(self, x):
        return x * 2 + 1


def affine_bytes() -> bytes:
    """A saved TorchScript model (x -> 2x + 1) as bytes, ready to send to actors."""
    import neuron_client

    buf = io.BytesIO()
    torch.jit.save(neuron_client.trace(Affine(), torch.rand(2, 4)), buf)
    return buf.getvalue()


def local_status(directory: str) -> dict | None:
    """A broker's status document read from this machine (None when none answers)."""
    from neuron_client.wire import config
    from neuron_client.wire.broker_client import BrokerClient

    with BrokerClient(config.broker_address(directory)) as broker:
        return broker.status() if broker.ping(1.0) is not None else None


def wait_status(directory: str, predicate, timeout_s: float = 15.0, what: str = "condition") -> tuple[dict, float]:
    """Poll a local broker's status until ``predicate(doc)``; (doc, seconds waited)."""
    t0 = time.monotonic()
    doc = None
    while time.monotonic() - t0 < timeout_s:
        doc = local_status(directory)
        if doc is not None and predicate(doc):
            return doc, time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} in {directory}; last status: {doc}")


def pinned(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


class Probe(nray.NeuronActor):
    """Records what Ray put in the environment before attaching, then attaches."""

    def __init__(self):
        self.env_before = {k: os.environ.get(k) for k in ("NEURON_RT_VISIBLE_CORES", "NEURON_BROKER_DIR",
                                                          "RAY_EXPERIMENTAL_NOSET_NEURON_RT_VISIBLE_CORES")}
        super().__init__()

    def info(self) -> dict:
        return dict(self.neuron_info(), env_before=self.env_before)


@ray.remote(num_cpus=0)
class PlainActor:
    """A plain Ray actor that was given NEURON_RT_VISIBLE_CORES by hand, not through Ray's resource: Ray starts it
    whatever other actors hold (its reservation is logical), and it would run on those cores."""

    def plain_view(self) -> dict:
        return {"pid": os.getpid(), "visible": os.environ.get("NEURON_RT_VISIBLE_CORES"),
                "ray_cores": nray.assigned_cores(), "node_id": ray.get_runtime_context().get_node_id()}

    def acquire(self) -> dict:
        """Take the cores through the node's broker, as a neuron_client process does."""
        import neuron_client

        try:
            rt = neuron_client.get_runtime()
            return {"ok": True, "cores": list(rt.cores)}
        except neuron_client.NeuronRuntimeError as exc:
            return {"ok": False, "error": type(exc).__name__, "message": str(exc)}


def outside_process(directory: str, visible: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """A process on the host, outside Ray, that takes ``visible`` from the broker in ``directory`` and one call."""
    env = dict(os.environ, NEURON_BROKER_DIR=directory, NEURON_RT_VISIBLE_CORES=visible, NEURON_BROKER_AUTOSTART="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    code = "import neuron_client; print(neuron_client.get_runtime().cores)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s)


if __name__ == "__main__":  # python tests/ray_apps.py hold: take the environment's cores, say so, hold them
    import json

    import neuron_client

    if sys.argv[1:] == ["hold"]:
        print(json.dumps({"cores": neuron_client.get_runtime().cores}), flush=True)
        time.sleep(120)
