"""Benchmark DataParallel: throughput over 1, 2 and 4 cores as ratios to 1 core, and the cost of split and gather.

Starts its own broker (``--cores 4``) in a temporary NEURON_BROKER_DIR, in its own process group, and kills that group
at the end. On the cpu backend with 4 cores on a 2-CPU host, cores 0 and 1 are pinned to distinct CPUs and cores 2
and 3 share them, so 2 cores should approach 2x and 4 cores cannot beat 2 cores there.

    python scripts/bench_data_parallel.py [--batch 64] [--traced 16] [--seconds 0.5] [--rounds 9]

Measured side by side in one run, interleaved over several rounds in rotating order; a ratio is the median over
rounds of the ratio within a round (cases measured seconds apart), which cancels much of the drift of other load:

* ``dp N cores``: DataParallel (dynamic batching) over nc0..nc(N-1), a batch of ``--batch`` through a model traced
  with ``--traced`` rows: items per second and the ratio to 1 core;
* ``one call, whole batch``: the same model traced with the whole batch, called once on nc0 (no pieces);
* ``in-process, core 0's / core 1's / both CPUs``: the traced pieces run in processes pinned to the CPUs of cores 0
  and 1, without the runtime: how fast each CPU is at the moment (other load included) and how far the hardware
  itself scales; DataParallel gives every core the same share, so it goes at the pace of the slower one;
* ``worker CPUs busy``: CPU seconds the case's workers used per second (2.00 = both of 2 CPUs all the time); with
  ``worker CPU ms/call`` it shows whether a shortfall is DataParallel's (uneven work) or the host's (other load);
* DataParallel's own cost: a model with no compute, called directly vs through DataParallel over nc0 (median of
  paired calls), and the in-process split+gather of the batch into 4 chunks.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BROKER_READY_TIMEOUT_S = 60.0
BROKER_STOP_TIMEOUT_S = 10.0


def start_broker(directory: str, cores: int) -> subprocess.Popen:
    from neuron_client import transport

    env = dict(os.environ, NEURON_BROKER_DIR=directory, NEURON_BROKER_AUTOSTART="0")
    for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES", "NEURON_BROKER_ADDRESS"):
        env.pop(var, None)
    with open(os.path.join(directory, "broker.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "broker", "start", "--foreground", "--dir", directory,
                                 "--cores", str(cores)], env=env, stdout=log, stderr=log, cwd=ROOT,
                                start_new_session=True)
    address = f"ipc://{directory}/broker.sock"
    deadline = time.monotonic() + BROKER_READY_TIMEOUT_S
    while transport.ping(address, 0.5) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_broker(proc)
            raise SystemExit(f"the broker did not start; see {directory}/broker.log")
    return proc


def stop_broker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(BROKER_STOP_TIMEOUT_S)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too, whatever happened
    except ProcessLookupError:
        pass
    try:
        proc.wait(BROKER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass


def make_model(channels: int):
    """A small convolutional net: compute-bound (its weights stay in cache, unlike a wide MLP's, whose pieces would
    be bound by memory bandwidth that the cores share)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 10)).eval()


def rate(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after one warm-up call)."""
    return measure(fn, seconds)[0]


def measure(fn, seconds: float, procs=()) -> tuple[float, float]:
    """(calls per second of ``fn``, CPU seconds that ``procs`` used per second of wall time meanwhile)."""
    fn()
    cpu0 = _cpu(procs)
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed, (_cpu(procs) - cpu0) / elapsed


def _cpu(procs) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="items per DataParallel call")
    p.add_argument("--traced", type=int, default=16, help="batch size the model is traced with")
    p.add_argument("--channels", type=int, default=32, help="conv channels (compute per item grows with the square)")
    p.add_argument("--image", type=int, default=32, help="image height and width")
    p.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (medians are reported)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-dp-") as directory:
        broker = start_broker(directory, 4)
        try:
            os.environ["NEURON_BROKER_DIR"] = directory
            os.environ["NEURON_BROKER_AUTOSTART"] = "0"
            for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES", "NEURON_BROKER_ADDRESS"):
                os.environ.pop(var, None)
            run(args, directory)
        finally:
            import neuron_client

            neuron_client.shutdown()
            stop_broker(broker)
    return 0


class Affine:
    """A model with next to no compute (``x * 2 + 1``), to time DataParallel's own work on a call."""

    @staticmethod
    def module():
        import torch

        class M(torch.nn.Module):
            def forward(self, x):
                return x * 2 + 1

        return M().eval()


def _ceiling_child(conn, cpu: int, path: str, shape) -> None:
    """A process pinned to one CPU running the model in-process on command: the hardware's own scaling."""
    import torch

    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    model = torch.jit.load(path).eval()
    x = torch.rand(*shape)
    with torch.inference_mode():
        model(x)
        conn.send("ready")
        while True:
            seconds = conn.recv()
            if seconds is None:
                return
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                model(x)
                n += 1
            conn.send(n / (time.perf_counter() - start))


CEILINGS = {"in-process, core 0's CPU": [0], "in-process, core 1's CPU": [1], "in-process, both CPUs": [0, 1]}


class Ceiling:
    """Two spawned processes pinned to the CPUs of cores 0 and 1, running the traced pieces in-process."""

    def __init__(self, path: str, shape):
        import multiprocessing as mp

        from worker.backends import cpus_for_core, host_cpus

        ctx = mp.get_context("spawn")
        cpus = host_cpus()
        self.children = []
        for core in (0, 1):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_ceiling_child, args=(child, cpus_for_core(core, 4, cpus)[0], path, shape),
                               daemon=True)
            proc.start()
            self.children.append((proc, parent))
        for _, conn in self.children:
            conn.recv()

    def rate(self, which: list[int], seconds: float) -> float:
        """Pieces per second of the children ``which`` running at once."""
        for i in which:
            self.children[i][1].send(seconds)
        return sum(self.children[i][1].recv() for i in which)

    def close(self) -> None:
        for proc, conn in self.children:
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def paired_overhead_ms(direct, other, pairs: int) -> float:
    """Median over alternating calls of (other - direct), in ms: robust to load that drifts."""
    diffs = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        direct()
        t1 = time.perf_counter()
        other()
        t2 = time.perf_counter()
        diffs.append((t2 - t1) - (t1 - t0))
    return statistics.median(diffs) * 1000


def run(args, directory: str) -> None:
    import torch

    import neuron_client
    from neuron_client import batching

    torch.set_num_threads(1)
    module = make_model(args.channels)
    shape = (3, args.image, args.image)
    pieces_path = os.path.join(directory, "conv_pieces.pt")
    whole_path = os.path.join(directory, "conv_whole.pt")
    tiny_path = os.path.join(directory, "affine_whole.pt")
    torch.jit.save(neuron_client.trace(module, torch.rand(args.traced, *shape)), pieces_path)
    torch.jit.save(neuron_client.trace(module, torch.rand(args.batch, *shape)), whole_path)
    torch.jit.save(neuron_client.trace(Affine.module(), torch.rand(args.batch, *shape)), tiny_path)
    x = torch.rand(args.batch, *shape)
    expected = module(x)

    import psutil

    rt = neuron_client.get_runtime()
    workers = [psutil.Process(rt.workers[core]["pid"]) for core in rt.cores]
    cases = {}  # name -> (call, the workers it runs on)
    for n in (1, 2, 4):
        dp = neuron_client.DataParallel(neuron_client.jit.load(pieces_path), device_ids=list(range(n)))
        assert torch.allclose(dp(x), expected, atol=1e-4)
        cases[f"dp {n} core{'s' if n > 1 else ''}"] = ((lambda dp=dp: dp(x)), workers[:n])
    whole = neuron_client.jit.load(whole_path)
    whole.load_onto([0])
    cases["one call, whole batch"] = ((lambda: whole(x)), workers[:1])

    ceiling = Ceiling(pieces_path, (args.traced, *shape))
    try:
        rounds: list[dict] = []  # per round: name -> (calls/s, worker CPUs busy); ceiling n -> pieces/s
        names = list(cases)
        for i in range(args.rounds):
            got = {}
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotate: no case always goes first
                fn, procs = cases[name]
                got[name] = measure(fn, args.seconds, procs)
            for label, which in CEILINGS.items():
                got[label] = (ceiling.rate(which, args.seconds), 0.0)
            rounds.append(got)
    finally:
        ceiling.close()

    # DataParallel's own cost on a call, on a model with next to no compute and the same tensors
    tiny = neuron_client.jit.load(tiny_path)
    tiny.load_onto([0])
    dp_tiny = neuron_client.DataParallel(neuron_client.jit.load(tiny_path), device_ids=[0])
    one_call_ms = 1000 / rate(lambda: tiny(x), 0.5)
    dp_one_piece_ms = paired_overhead_ms(lambda: tiny(x), lambda: dp_tiny(x), 200)

    def split_gather():
        chunks = batching.split((x,), batching.chunk_sizes(args.batch, 4), 0)
        return batching.gather([c[0] for c in chunks], 0)

    split_gather_us = 1e6 / rate(split_gather, 0.5)

    med = statistics.median

    def ratio(name, base):
        return med([r[name][0] / r[base][0] for r in rounds])

    print(f"DataParallel on a 2-conv net ({args.channels} channels, {args.image}x{args.image} images) traced with "
          f"batch {args.traced}; {args.batch} items per call; broker with 4 cores on {len(os.sched_getaffinity(0))} "
          f"CPUs; medians of {args.rounds} interleaved rounds of {args.seconds}s; host load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'case':<30}{'calls/s':>9}{'items/s':>10}{'ms/call':>9}{'vs 1 core':>11}{'worker CPUs busy':>18}"
          f"{'worker CPU ms/call':>20}")
    for name in cases:
        r = med([x[name][0] for x in rounds])
        busy = med([x[name][1] for x in rounds])
        cpu_ms = med([x[name][1] / x[name][0] * 1000 for x in rounds])
        print(f"{name:<30}{r:>9.1f}{r * args.batch:>10.0f}{1000 / r:>9.2f}{ratio(name, 'dp 1 core'):>10.2f}x"
              f"{busy:>18.2f}{cpu_ms:>20.2f}")
    for label in CEILINGS:
        items = med([x[label][0] for x in rounds]) * args.traced
        print(f"{label:<30}{'':>9}{items:>10.0f}{'':>9}{ratio(label, next(iter(CEILINGS))):>10.2f}x")
    print(f"DataParallel's own cost per call (model with no compute, {x.numel() * 4 / 1e6:.1f} MB input): "
          f"one call {one_call_ms:.3f} ms; DataParallel over 1 core adds {dp_one_piece_ms:+.3f} ms (median of "
          f"paired calls); split+gather of the batch into 4 chunks in-process: {split_gather_us:.1f} us")


if __name__ == "__main__":
    sys.exit(main())
