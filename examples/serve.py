"""A small inference server process, the README's ``serve.py``: it takes its cores (``NEURON_RT_VISIBLE_CORES`` or
``NEURON_RT_NUM_CORES``, as ``neuron-run`` sets them, else every core), puts a replica of a model on each, serves
``--requests`` batches round-robin over them and prints what it did.

    python examples/serve.py                      # on every core of the host's broker
    neuron-run --nproc-per-node 2 --cores-per-proc 2 -- python examples/serve.py   # rank r on cores 2r, 2r+1
    python examples/serve.py --until-released &   # serve until an operator takes the cores back:
    neuron-broker release --pid $!                #   the next call fails with LeaseLostError, and it exits 0

It prints ``serving on cores [...]`` once its models are loaded, then one summary line.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import neuron_client
from neuron_client.examples import models
from neuron_client.experimental import set_multicore


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20, help="batches to serve (default 20)")
    p.add_argument("--until-released", action="store_true", help="serve until the cores are taken back")
    args = p.parse_args()
    rank = os.environ.get("RANK", "0")
    example = torch.rand(4, 3, 224, 224)
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "model.pt")
        torch.jit.save(neuron_client.trace(models.resnet50().eval(), example), path)
        model = neuron_client.jit.load(path)
        set_multicore(model)                       # a replica on every core this process owns
    print(f"[serve rank {rank}] serving on cores {model.cores}", flush=True)
    served, cores = 0, set()
    try:
        while args.until_released or served < args.requests:
            model(example)
            served, cores = served + 1, cores | {model.last_core}
            if args.until_released:
                time.sleep(0.05)
    except neuron_client.LeaseLostError as exc:
        print(f"[serve rank {rank}] my cores were taken back after {served} batches: {exc}", flush=True)
        return 0
    print(f"[serve rank {rank}] served {served} batches of 4 images on cores {sorted(cores)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
