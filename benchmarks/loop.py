"""Closed-loop throughput of co-located processes: one process per core, each calling a small MLP back to back.

Each process is a persistent child (this module run as a script) that loads the model once, then answers ``run S``
on its stdin with the calls it made in S seconds, so that every process of a variant runs the same S seconds at
once and start-up costs are never timed. Variants: **in-process** (``torch.jit.load`` of the graph, the process pinned
to one CPU, one torch thread: the ceiling), and **neuron_client** (the process owns one core through the broker;
its environment selects the path: the fast path with or without the client's spin, or the socket path).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 180.0
RUN_SLACK_S = 60.0


class LoopChild:
    """One child process: ``mode`` "inproc" (pinned to ``cpu``) or "neuron" (owning core ``cpu`` of the broker in
    ``env``)."""

    def __init__(self, mode: str, path: str, cpu: int, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.loop", mode, path, str(cpu)], cwd=ROOT,
                                     env={**env, "PYTHONPATH": ROOT}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)
        from .harness import CHILDREN

        CHILDREN.add_group(self.proc)
        self.ready = self._read(START_TIMEOUT_S)

    def _read(self, timeout_s: float) -> dict:
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if r else ""
        if not line:
            raise RuntimeError(f"a loop child ({self.proc.args[3:]}) did not answer within {timeout_s:.0f}s "
                               f"(exit code {self.proc.poll()})")
        return json.loads(line)

    def start(self, seconds: float) -> None:
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()

    def result(self, seconds: float) -> dict:
        return self._read(seconds + RUN_SLACK_S)

    def close(self) -> None:
        from .harness import CHILDREN

        CHILDREN.kill_group(self.proc)
        if self.proc in CHILDREN.groups:
            CHILDREN.groups.remove(self.proc)


def run_together(children: list[LoopChild], seconds: float) -> float:
    """Calls per second of ``children`` running at once for ``seconds``."""
    for c in children:
        c.start(seconds)
    got = [c.result(seconds) for c in children]
    return sum(g["calls"] / g["seconds"] for g in got)


def _main() -> None:
    import time

    import torch

    mode, path, cpu = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    x = torch.rand(*json.loads(os.environ.get("LOOP_INPUT_SHAPE", "[8, 256]")))
    if mode == "inproc":
        os.sched_setaffinity(0, {cpu})
        torch.set_grad_enabled(False)
        from neuron_client.tracing.script import load_here

        model = load_here(path)
    else:
        import neuron_client

        os.environ["NEURON_RT_VISIBLE_CORES"] = str(cpu)
        model = neuron_client.jit.load(path)
    for _ in range(20):
        model(x)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        seconds = float(line)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += 1
        print(json.dumps({"calls": n, "seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    _main()
