"""What runs inside Ray's processes in tests/integration/test_ray.py (and scripts/bench_ray.py): actor classes that
Ray workers import by name, so the Ray job must have the repository root on ``PYTHONPATH`` (the tests pass it in the
job's ``runtime_env``). A process outside Ray that holds cores is an ordinary :mod:`tests.procs.owner`.
"""
from __future__ import annotations

import io
import os

import ray
import torch

from neuron_client.integrations import ray as nray


def affine_bytes() -> bytes:
    """A saved TorchScript model (x -> 2x + 1) as bytes, ready to send to actors."""
    import neuron_client
    from tests.procs.inference import Affine

    buf = io.BytesIO()
    torch.jit.save(neuron_client.trace(Affine(), torch.rand(2, 4)), buf)
    return buf.getvalue()


def pinned(node_id: str):
    """A scheduling strategy that puts an actor or task on ``node_id``."""
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
