"""Benchmark autobucketing, resident KV caches and speculative decoding through the runtime.

Starts its own broker (``broker.embedded.EmbeddedBroker``, ``--cores 2``, cpu backend: one worker per core, each
pinned to its own CPUs on this host) in a temporary directory, and stops it (workers included) at the end.

    python scripts/bench_buckets.py [--calls 20] [--tokens 64] [--prompts 6] [--json out.json]

Sections:

* **bucketing** (all-MiniLM-L6-v2, batch 1): median latency of one call at sequence lengths 8 ... 512 through
  the runtime, for the bucketed model (seed 003's kernel, buckets 128 and 512; the input is sent unpadded and padded
  in the worker) and for one model traced at 512 that every input is padded to (the alternative without buckets);
* **KV cache** (the tests' tiny GPT-2: 4 blocks, 128 wide, vocabulary 1024, cache of 320 positions, 1.3 MB of keys
  and values): greedy decoding in tokens per second with the cache resident on the core (``io_aliases``; a step
  sends the token and gets the logits back) and with the cache carried by the client (sent and returned every step);
  bytes per step from ``neuron_client.tracing.io_aliases.TrafficMeter``;
* **speculative** (that GPT-2 as target on core 0, its first two blocks as the draft on core 1): tokens per second
  and target calls of plain greedy decoding against speculative decoding for several k, with the acceptance rate;
  the outputs are checked to be equal. The tiny target costs about as much per call as its draft (a call is mostly
  the round trip), so speculation cannot pay there; a **larger target** (8 blocks, 512 wide, 25 M parameters; the
  draft is its first block) shows where it does.

Numbers are wall-clock on this host and vary with its load; rounds interleave the variants so that load drifts hit
them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def median_ms(xs) -> float:
    return 1000 * statistics.median(xs)


def bench_bucketing(work: str, calls: int) -> dict:
    import torch

    import neuron_client
    from neuron_client.distributed.examples import minilm
    from tests.procs.buckets import get_bucket_kernel

    tok = minilm.tokenizer()
    cpu = minilm.cpu_model()
    text = " ".join(["The company HuggingFace is based in New York City."] * 60)
    enc = tok(text, max_length=512, padding="max_length", truncation=True, return_tensors="pt")
    full = [enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
    bucketed_path, padded_path = os.path.join(work, "minilm_buckets.pt"), os.path.join(work, "minilm_512.pt")
    torch.jit.save(neuron_client.bucket_model_trace(
        cpu, [tuple(t[:, :128] for t in full), tuple(full)],
        neuron_client.BucketModelConfig(get_bucket_kernel)), bucketed_path)
    torch.jit.save(neuron_client.trace(cpu, tuple(full), strict=False), padded_path)
    sizes = {"bucketed_file": os.path.getsize(bucketed_path), "padded_512_file": os.path.getsize(padded_path)}
    del cpu
    from neuron_client.experimental import neuron_cores_context

    with neuron_cores_context(start_nc=0, nc_count=1):  # both on one core: the same CPU, the same contention
        bucketed = neuron_client.jit.load(bucketed_path)
        padded = neuron_client.jit.load(padded_path)

    def pad(x, n):
        return [torch.cat([t, torch.zeros(1, 512 - n, dtype=t.dtype)], 1) for t in x]

    lengths = (8, 32, 128, 129, 300, 512)
    inputs = {n: [t[:, :n].contiguous() for t in full] for n in lengths}
    times = {n: ([], []) for n in lengths}
    for n in lengths:  # warm both (the first calls of a TorchScript graph profile and optimise it)
        for _ in range(3):
            bucketed(*inputs[n])
            padded(*pad(inputs[n], n))
    rounds = 5
    for _ in range(rounds):  # rounds over all lengths, variants interleaved: load drifts hit every row alike
        for n in lengths:
            x, xp = inputs[n], pad(inputs[n], n)
            for _ in range(max(1, calls // rounds)):
                t0 = time.perf_counter()
                bucketed(*x)
                times[n][0].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                padded(*xp)
                times[n][1].append(time.perf_counter() - t0)
    rows = {}
    for n in lengths:
        rows[n] = {"bucketed_ms": median_ms(times[n][0]), "padded_512_ms": median_ms(times[n][1])}
        print(f"  length {n:4d}: bucketed {rows[n]['bucketed_ms']:8.1f} ms   padded to 512 "
              f"{rows[n]['padded_512_ms']:8.1f} ms", flush=True)
    bucketed.unload()
    padded.unload()
    return {"latency": rows, **sizes}


def gpt2_models(work: str, large: bool = False) -> dict:
    import torch

    from neuron_client.generation import decoder

    if large:  # 8 blocks, 512 wide (25 M parameters); the draft is its first block
        hf = decoder.example_gpt2(seed=0, d=512, layers=8, heads=8, damp_upper=0.05, damp_from=1)
        variants = (("target", None, True), ("draft", range(1), True))
    else:
        hf = decoder.example_gpt2(seed=0)
        variants = (("target", None, True), ("draft", range(2), True), ("carried", None, False))
    paths = {}
    for name, layers, resident in variants:
        paths[name] = os.path.join(work, f"gpt2{'_large' if large else ''}_{name}.pt")
        dec = decoder.from_hf_gpt2(hf, layers=layers, cache_length=256 + 64)
        torch.jit.save(decoder.trace_decoder(dec, resident=resident), paths[name])
    return paths


def prompts(n: int):
    import torch

    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 1000, (1, int(torch.randint(4, 24, (1,), generator=gen))), generator=gen)
            for _ in range(n)]


def bench_kv(paths: dict, tokens: int, n_prompts: int, rounds: int = 3) -> dict:
    import neuron_client
    from neuron_client.generation import generate as generation
    from neuron_client.tracing import io_aliases as state

    resident = neuron_client.jit.load(paths["target"])
    carried = neuron_client.jit.load(paths["carried"])
    ps = prompts(n_prompts)
    for m in (resident, carried):  # warm every bucket the runs use
        generation.generate(ps[0], m, max_new_tokens=4)
    out = {}
    times = {"resident": [], "carried": []}
    for _ in range(rounds):
        for name, m in (("resident", resident), ("carried", carried)):
            t0 = time.perf_counter()
            for p in ps:
                generation.generate(p, m, max_new_tokens=tokens)
            times[name].append(time.perf_counter() - t0)
    for name, m in (("resident", resident), ("carried", carried)):
        with state.TrafficMeter() as meter:
            generation.generate(ps[0], m, max_new_tokens=tokens)
        steps = meter.calls
        out[name] = {"tokens_per_s": tokens * n_prompts / statistics.median(times[name]),
                     "bytes_per_step": (meter.sent + meter.received) / steps}
        print(f"  {name:9s}: {out[name]['tokens_per_s']:7.1f} tokens/s   "
              f"{out[name]['bytes_per_step'] / 1024:9.1f} KiB per step", flush=True)
    out["cache_bytes"] = 2 * 4 * 4 * 1 * 4 * 320 * 32
    resident.unload()
    carried.unload()
    return out


def call_latencies(model, lengths, calls: int = 20) -> dict:
    """Median latency (ms) of one call of ``model`` per number of tokens (padded to its buckets in the worker)."""
    import torch

    out = {}
    for t in lengths:
        ids, pos = torch.ones(1, t, dtype=torch.long), torch.tensor([10])
        for _ in range(3):
            model(ids, pos)
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            model(ids, pos)
            ts.append(time.perf_counter() - t0)
        out[t] = median_ms(ts)
    return out


def bench_speculative(paths: dict, tokens: int, n_prompts: int, ks=(2, 4, 6), rounds: int = 5) -> dict:
    import torch

    import neuron_client
    from neuron_client.experimental import neuron_cores_context
    from neuron_client.generation import generate as generation

    with neuron_cores_context(start_nc=0, nc_count=1):
        target = neuron_client.jit.load(paths["target"])
    with neuron_cores_context(start_nc=1, nc_count=1):
        draft = neuron_client.jit.load(paths["draft"])
    ps = prompts(n_prompts)
    variants = [("greedy", 0)] + [(f"k={k}", k) for k in ks]
    for _, k in variants:  # warm every bucket the runs use
        generation.generate(ps[0], target, draft if k else None, max_new_tokens=8, speculation_length=k or 1)
    refs = [generation.generate(p, target, max_new_tokens=tokens) for p in ps]
    times = {name: [] for name, _ in variants}
    stats = {name: generation.GenerationStats() for name, _ in variants}
    equal = True
    for r in range(rounds):
        for name, k in variants:
            t0 = time.perf_counter()
            for p, ref in zip(ps, refs):
                out = generation.generate(p, target, draft if k else None, max_new_tokens=tokens,
                                          speculation_length=max(k, 1), stats=stats[name] if r == 0 else None)
                equal &= bool(torch.equal(out, ref))
            times[name].append(time.perf_counter() - t0)
    out = {"outputs_equal_greedy": equal,
           "call_ms": {"target": call_latencies(target, (1, 2, 4, 8)), "draft": call_latencies(draft, (1,))}}
    print("  one call (ms) by tokens: target " + ", ".join(f"{t}: {v:.1f}" for t, v in out["call_ms"]["target"].items())
          + f"; draft 1: {out['call_ms']['draft'][1]:.1f}", flush=True)
    for name, _ in variants:
        s = stats[name]
        out[name] = dict(s.as_dict(), tokens_per_s=tokens * n_prompts / statistics.median(times[name]))
        out[name].pop("new_tokens")
        print(f"  {name:7s}: {out[name]['tokens_per_s']:7.1f} tokens/s   target calls {s.target_calls:4d}   "
              f"draft calls {s.draft_calls:4d}   acceptance {s.acceptance_rate:5.1%}", flush=True)
    print(f"  speculative output equal to greedy: {equal}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20, help="calls per length (bucketing)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (decoding)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-large", action="store_true", help="skip the larger target's speculative section")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from broker.embedded import EmbeddedBroker

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-buckets-") as work, EmbeddedBroker(cores=2) as broker:
        os.environ.update({k: v for k, v in broker.env.items() if k.startswith("NEURON_")})
        import neuron_client

        try:
            if not args.skip_minilm:
                print("bucketing: all-MiniLM-L6-v2, one call, batch 1", flush=True)
                results["bucketing"] = bench_bucketing(work, args.calls)
            paths = gpt2_models(work)
            print(f"KV cache: greedy decoding, {args.prompts} prompts x {args.tokens} tokens", flush=True)
            results["kv_cache"] = bench_kv(paths, args.tokens, args.prompts)
            print(f"speculative decoding: {args.prompts} prompts x {args.tokens} tokens", flush=True)
            results["speculative"] = bench_speculative(paths, args.tokens, args.prompts)
            if not args.skip_large:
                large = gpt2_models(work, large=True)
                print(f"speculative decoding, larger target (8 blocks, 512 wide; draft: its first block): "
                      f"{args.prompts} prompts x {args.tokens} tokens", flush=True)
                results["speculative_large"] = bench_speculative(large, args.tokens, args.prompts, ks=(1, 2, 3, 5))
        finally:
            neuron_client.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
