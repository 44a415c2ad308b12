"""Benchmark tensor parallelism on all-MiniLM-L6-v2 (batch 1, sequence 128): latency of TP=1 and TP=2 through the
runtime against the model in-process on the CPU, and what weight separation saves on disk and at load time.

Starts its own broker (``--cores 2``: cores 0 and 1 pinned to distinct CPUs on a 2-CPU host) in a temporary
NEURON_BROKER_DIR, in its own process group, and kills that group at the end.

    python scripts/bench_tp.py [--calls 40] [--rounds 5] [--load-rounds 5]

Rows:

* ``in-process eager / traced, T threads``: the unsharded model in this process (transformers eager, and its
  ``torch.jit.trace``), ``torch.set_num_threads(T)``; no runtime;
* ``runtime TP=1``: the model traced with ``tp_degree=1`` on one core (one worker, one CPU);
* ``runtime TP=2 inline / separated``: two ranks on two cores (one CPU each), one all-reduce per layer (gloo);
  seed 003 splits the attention only, so each rank still computes the whole feed-forward block;
* ``runtime TP=2 sep, +MLP split``: the feed-forward block split too (Megatron-style, two all-reduces per layer);
* ``in-process TP=2 +MLP rank 0 alone``: that model's rank 0 in this process, one thread, collectives stubbed out:
  one rank's share of the compute;
* ``runtime TP=2, 6 all-reduces only``: a TP=2 model doing nothing but MiniLM's 6 all-reduces of [1, 128, 384]
  (1.5 MB in all) between the two workers: the collectives' floor;
* latencies are medians (and p90) of ``--calls`` back-to-back calls per round, over ``--rounds`` interleaved rounds;
* saved bytes: the directory ``parallel_model_save`` wrote; load: ``parallel_model_load`` from reading the files to
  every rank loaded (median over ``--load-rounds``), inline weights vs separated.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from broker.embedded import EmbeddedBroker  # noqa: E402


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def timed_calls(fn, args, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t0)
    return out


def p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--load-rounds", type=int, default=5)
    opts = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        broker = EmbeddedBroker(2, directory=os.path.join(tmp, "broker"))
        os.environ.update(NEURON_BROKER_DIR=broker.directory, NEURON_BROKER_AUTOSTART="0")
        for var in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES", "NEURON_BROKER_ADDRESS"):
            os.environ.pop(var, None)
        try:
            run(tmp, opts)
        finally:
            import neuron_client

            neuron_client.shutdown()
            broker.stop()


def run(tmp: str, opts) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    from neuron_client.distributed import trace
    from neuron_client.distributed.examples import minilm

    tok = minilm.tokenizer()
    x = minilm.encode(tok, minilm.SENTENCES[0], max_length=128, batch_size=1)
    ckpt = minilm.save_checkpoint(os.path.join(tmp, "minilm.pt"))
    cpu = minilm.cpu_model()
    with torch.no_grad():
        want = cpu(*x)
        cpu_traced = torch.jit.trace(cpu, x)

    dirs, sizes = {}, {}
    variants = (("TP=1", 1, True, False), ("TP=2 inline", 2, True, False), ("TP=2 separated", 2, False, False),
                ("TP=2 sep, +MLP split", 2, False, True))
    for name, tp, inline, mlp in variants:
        model = trace.parallel_model_trace(minilm.get_model_fn(ckpt, mlp=mlp), x, tp_degree=tp,
                                           inline_weights_to_neff=inline)
        dirs[name] = os.path.join(tmp, name.replace(" ", "_").replace("=", ""))
        trace.parallel_model_save(model, dirs[name])
        sizes[name] = dir_bytes(dirs[name])
        del model

    # The collective floor: a TP=2 model that only all-reduces MiniLM's hidden states once per layer (6 times).
    from neuron_client.distributed.parallel_layers import mappings, parallel_state

    class AllReduces(torch.nn.Module):
        def forward(self, h):
            for _ in range(6):
                h = mappings.reduce_from_tensor_model_parallel_region(h) * 0.5
            return h

    hidden = torch.randn(1, 128, 384)
    ar_only = trace.parallel_model_trace(lambda: (AllReduces(), {}), hidden, tp_degree=2)
    # One rank's own work: rank 0 of TP=2 (feed-forward split too) with stand-in collectives, in this process.
    with parallel_state.rank_context(0, 2):
        rank0, _ = minilm.get_model(ckpt, mlp=True)
        with torch.no_grad():
            rank0 = torch.jit.trace(rank0, x)

    load_s: dict[str, list[float]] = {k: [] for k in dirs}
    for _ in range(opts.load_rounds):
        for name, d in dirs.items():
            m = trace.parallel_model_load(d)
            load_s[name].append(m.load_s)
            m.unload()

    models = {name: trace.parallel_model_load(d) for name, d in dirs.items()}
    for name, m in models.items():
        diff = max(float((a - b).abs().max()) for a, b in zip(m(*x), want))
        assert diff < 1e-4, f"{name} differs from the CPU model by {diff}"

    def in_process(fn, threads):
        def call(*args):
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    return fn(*args)
            finally:
                torch.set_num_threads(prev)
        return call

    cases = {
        "in-process eager, 1 thread": in_process(cpu, 1),
        "in-process eager, 2 threads": in_process(cpu, 2),
        "in-process traced, 1 thread": in_process(cpu_traced, 1),
        "in-process traced, 2 threads": in_process(cpu_traced, 2),
        "in-process TP=2 +MLP rank 0 alone": in_process(rank0, 1),
        **{f"runtime {name}": m for name, m in models.items()},
        "runtime TP=2, 6 all-reduces only": lambda *_: ar_only(hidden),
    }
    lat: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        timed_calls(fn, x, 5)  # warm up
    names = list(cases)
    for r in range(opts.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: drift hits all alike
            lat[name] += timed_calls(cases[name], x, opts.calls)

    print(f"\nall-MiniLM-L6-v2, batch 1, sequence 128, {os.cpu_count()} CPUs; {opts.rounds} rounds x {opts.calls} "
          "calls\n")
    print(f"{'case':36} {'median ms':>10} {'p90 ms':>8}")
    for name in names:
        print(f"{name:36} {statistics.median(lat[name]) * 1e3:10.2f} {p90(lat[name]) * 1e3:8.2f}")
    print(f"\n{'saved model':22} {'files':>6} {'MB on disk':>11} {'tp_0.pt MB':>11} {'load s (median)':>16}")
    for name, d in dirs.items():
        files = sum(len(fs) for _, _, fs in os.walk(d))
        graph_mb = os.path.getsize(os.path.join(d, "tp_0.pt")) / 1e6
        load = statistics.median(load_s[name])
        print(f"{name:22} {files:6d} {sizes[name] / 1e6:11.1f} {graph_mb:11.2f} {load:16.3f}")


if __name__ == "__main__":
    main()
