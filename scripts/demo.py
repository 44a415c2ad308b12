"""Demo: an embedded broker on the cpu backend, two inference processes sharing its cores, and what it shows.

    bash scripts/demo            # or: .venv/bin/python scripts/demo.py [--cores 4]

1. starts a broker (4 virtual cores) in a private temporary directory;
2. traces a small classifier with neuron_client.trace and saves it;
3. launches two inference processes with NEURON_RT_NUM_CORES=2: each owns two cores, replicates the model on them and
   runs batches through futures;
4. while they hold their cores: a third process asking for an owned core gets the conflict error naming the owner,
   and the status table shows owners, models and requests per core;
5. the processes exit, their cores come back, the broker stops.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def client(model_path: str, name: str) -> None:
    """One inference process: own cores, replicate the model on them, run batches, report, wait for 'exit'."""
    import torch

    import neuron_client
    from neuron_client.experimental import multicore_context

    t0 = time.monotonic()
    with multicore_context():
        model = neuron_client.jit.load(model_path)
    load_s = time.monotonic() - t0
    torch.manual_seed(hash(name) % 1000)
    batches = [torch.randn(8, 64) for _ in range(200)]
    t0 = time.monotonic()
    futures = [model.submit(x) for x in batches]
    outputs = [f.result(60) for f in futures]
    run_s = time.monotonic() - t0
    reference = torch.jit.load(model_path)
    exact = all(torch.allclose(o, reference(x), atol=1e-5) for o, x in zip(outputs, batches))
    classes = torch.cat(outputs).argmax(dim=1)
    rt = neuron_client.get_runtime()
    print(json.dumps({"name": name, "pid": os.getpid(), "owned": rt.cores, "replicas": model.cores,
                      "load_ms": round(load_s * 1000, 1), "requests": len(batches),
                      "per_s": round(len(batches) / run_s), "matches_cpu": exact,
                      "class_counts": torch.bincount(classes, minlength=4).tolist()}), flush=True)
    sys.stdin.readline()  # hold the cores until the demo has shown them


def conflict(core: str) -> None:
    import neuron_client

    try:
        neuron_client.get_runtime()
        print(json.dumps({"error": None}), flush=True)
    except neuron_client.NeuronCoreUnavailableError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=4)
    parser.add_argument("--client", nargs=2, metavar=("MODEL", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--conflict", metavar="CORE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(*args.client)
        return 0
    if args.conflict:
        conflict(args.conflict)
        return 0

    import torch

    import neuron_client
    from broker.status import render

    from broker.embedded import EmbeddedBroker

    work = tempfile.mkdtemp(prefix="neuron-demo-")
    print(f"[demo] starting a broker with {args.cores} cpu-backed cores (one worker process per core)")
    broker = EmbeddedBroker(args.cores, directory=os.path.join(work, "broker"))
    env = dict(broker.env, PYTHONWARNINGS="ignore")
    status = broker.status
    clients: list[subprocess.Popen] = []
    try:
        print(f"[demo] broker ready in {broker.directory}")

        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4)).eval()
        path = os.path.join(work, "classifier.pt")
        torch.jit.save(neuron_client.trace(model, torch.randn(8, 64)), path)
        print(f"[demo] traced a small classifier (input float32[8, 64]) to {path}")

        per_proc = max(1, args.cores // 2)
        for name in ("A", "B"):
            clients.append(subprocess.Popen(
                [sys.executable, __file__, "--client", path, name], cwd=ROOT, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, env=dict(env, NEURON_RT_NUM_CORES=str(per_proc))))
        for proc in clients:
            line = proc.stdout.readline()
            if not line:
                print("[demo] an inference process failed", file=sys.stderr)
                return 1
            r = json.loads(line)
            print(f"[process {r['name']} pid {r['pid']}] owns cores {r['owned']}, model replicas on "
                  f"{r['replicas']} (loaded in {r['load_ms']} ms); {r['requests']} batches at {r['per_s']}/s; "
                  f"outputs match the CPU model: {r['matches_cpu']}; predicted classes {r['class_counts']}")

        busy = status().cores[0].owner.pid
        out = subprocess.run([sys.executable, __file__, "--conflict", "0"], cwd=ROOT, capture_output=True, text=True,
                             env=dict(env, NEURON_RT_VISIBLE_CORES="0"), timeout=120)
        err = json.loads(out.stdout.splitlines()[-1])["error"]
        print(f"[demo] a third process asking for core 0 (held by pid {busy}) is refused:\n  {err}")

        time.sleep(0.6)  # let the workers report their request counts
        print("\n" + render(status()) + "\n")
        for proc in clients:
            proc.stdin.write("exit\n")
            proc.stdin.flush()
            proc.wait(30)
        deadline = time.monotonic() + 5
        while any(c.owner for c in status().cores) and time.monotonic() < deadline:
            time.sleep(0.05)
        free = sum(1 for c in status().cores if c.owner is None)
        print(f"[demo] both processes exited; {free} of {args.cores} cores are free again")
        return 0
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
        broker.stop()
        print("[demo] broker stopped")


if __name__ == "__main__":
    sys.exit(main())
