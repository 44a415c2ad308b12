"""Commands for autobucketing, state kept on the core and speculative decoding (``python -m tests.procs.buckets``),
with those of :mod:`tests.procs.owner`. Whatever is traced is traced once per process and work directory.

* MiniLM bucketed on sequence length with seed 003's kernel (buckets 128 and 512): ``minilm_bucketed`` (``work``)
  -> ``path`` of the packaged model and the saved ``sizes`` (two buckets, one bucket, a plain trace, the weights);
  ``minilm_call`` (``model``, ``n``: tokens, not pre-padded) -> ``diff`` to the CPU model, ``shapes``;
  ``model_meta`` (``model``); ``not_scriptable`` traces with a kernel that is not TorchScript;
* the same at TP=2: ``tp_bucketed`` (``work``, ``inline``) -> ``path`` and sizes; ``tp_load_bucketed`` (``path``)
  -> ``model``, ``cores``; ``paraphrase_argmax`` (``model``) -> ``same``: the seed's check against the CPU model;
* state: ``state_models`` (``work``) -> the ``resident`` and ``carried`` paths of a model with a 4 MB state buffer;
  ``resident_calls`` / ``carried_calls`` (``model``, ``calls``) -> the sums and the bytes counted by
  ``TrafficMeter``;
* decoding: ``gpt2`` (``work``) -> the traced ``paths`` (target, its 2-block draft, target with its caches carried);
  ``gpt2_logits``, ``gpt2_greedy``, ``gpt2_speculative`` (``k``), ``gpt2_decode_bytes``, ``gpt2_generate``.
"""
from __future__ import annotations

import io
import os
import time
from typing import List

import torch

import neuron_client
from neuron_client.generation import decoder, generate as generation
from neuron_client.tracing import io_aliases as state
from tests.procs import harness, owner  # noqa: F401 - owner: the runtime commands

_cache: dict = {}


def once(key, make):
    """``make()``, computed once per process for ``key``."""
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


# -- seed 003's kernel, verbatim but for the names ---------------------------------------------------------------


def sequence_length_bucket_kernel(tensor_list: List[torch.Tensor]):
    x = tensor_list[0]
    bucket_dim = 1
    x_shape = x.shape
    tensor_sequence_length = x_shape[bucket_dim]
    batch_size = x_shape[bucket_dim - 1]
    buckets = [128, 512]
    idx = 0
    num_inputs = 3
    bucket = buckets[0]
    reshaped_tensors: List[torch.Tensor] = []
    bucket_idx = 0
    for idx, bucket in enumerate(buckets):
        if tensor_sequence_length <= bucket:
            bucket_idx = idx
            for tensor in tensor_list:
                if num_inputs == 0:
                    break
                delta = bucket - tensor_sequence_length
                padding_shape: List[int] = [batch_size, delta]
                zeros = torch.zeros(padding_shape, dtype=x.dtype)
                reshaped_tensors.append(torch.cat([tensor, zeros], dim=bucket_dim))
                num_inputs -= 1
            break
    return reshaped_tensors, torch.tensor([bucket_idx])


def get_bucket_kernel(*_):
    return torch.jit.script(sequence_length_bucket_kernel)


def one_bucket_kernel(tensor_list: List[torch.Tensor]):
    return tensor_list, torch.tensor([0])


def not_scriptable_kernel(tensor_list):  # a Python dict of shapes: TorchScript cannot type it
    sizes = {id(t): t.shape for t in tensor_list}
    return tensor_list, torch.tensor([len(sizes) * 0])


def saved_bytes(module) -> int:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return len(buf.getvalue())


# -- MiniLM ----------------------------------------------------------------------------------------------------------

TEXTS = {"minilm": "The company HuggingFace is based in New York City.",
         "tp": "HuggingFace's headquarters are situated in Manhattan."}


def minilm():
    from neuron_client.distributed.examples import minilm as example

    return example


def tok():
    return once("tok", lambda: minilm().tokenizer())


def cpu():
    return once("cpu", lambda: minilm().cpu_model())


def long_input(text: str) -> list:
    """A text of 600 tokens or so: its first n tokens are the input of length n."""
    def make():
        full = tok()(" ".join([TEXTS[text]] * 60), max_length=600, truncation=True, return_tensors="pt")
        full = [full[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
        assert full[0].shape[1] >= 513
        return full

    return once(("long", text), make)


def example(n: int):  # seed 003's encode: padded to the bucket length
    e = tok()(" ".join([TEXTS["minilm"]] * 60), max_length=n, padding="max_length", truncation=True,
              return_tensors="pt")
    return tuple(e[k] for k in ("input_ids", "attention_mask", "token_type_ids"))


@harness.command
def minilm_bucketed(work: str) -> dict:
    def make():
        path = os.path.join(work, "minilm_bucketed.pt")
        t0 = time.monotonic()
        packaged = neuron_client.bucket_model_trace(lambda: (cpu(), {}), [example(128), example(512)],
                                                    neuron_client.BucketModelConfig(get_bucket_kernel))
        trace_s = time.monotonic() - t0
        torch.jit.save(packaged, path)
        one = neuron_client.bucket_model_trace(lambda: (cpu(), {}), [example(128)], neuron_client.BucketModelConfig(
            lambda: torch.jit.script(one_bucket_kernel)))
        plain = neuron_client.trace(cpu(), example(128), strict=False)
        return {"path": path, "sizes": {
            "two_buckets": os.path.getsize(path), "one_bucket": saved_bytes(one), "plain_trace": saved_bytes(plain),
            "weights": sum(p.numel() * p.element_size() for p in cpu().state_dict().values()), "trace_s": trace_s}}

    return once(("minilm_bucketed", work), make)


@harness.command
def minilm_call(model: int, n: int, text: str = "minilm") -> dict:
    x = [t[:, :n].contiguous() for t in long_input(text)]
    with torch.no_grad():
        t0 = time.monotonic()
        got = harness.get(model)(*x)  # first: past the largest bucket, this is what fails (and the CPU model too)
        seconds = time.monotonic() - t0
        want = cpu()(*x)
    return {"diff": max(float((g - w).abs().max()) for g, w in zip(got, want)), "shapes": [list(g.shape) for g in got],
            "seconds": seconds}


@harness.command
def model_meta(model: int) -> dict:
    m = harness.get(model)
    buckets = m.meta.get("buckets")
    return {"cores": m.cores, "bucketed": m.bucketed, "io_aliases": m.meta.get("io_aliases"),
            "meta_buckets": [[s["shape"] for s in b] for b in buckets] if buckets else None}


@harness.command
def not_scriptable() -> dict:
    neuron_client.bucket_model_trace(lambda: (cpu(), {}), [example(128)],
                                     neuron_client.BucketModelConfig(lambda: not_scriptable_kernel))
    return {}


@harness.command
def tp_bucketed(work: str, inline: bool = False) -> dict:
    """Seed 003's autobucketing of a tensor-parallel BERT: parallel_model_trace(..., bucket_config=...) at TP=2."""
    from neuron_client.distributed import trace as nxd_trace

    checkpoint = once(("checkpoint", work), lambda: minilm().save_checkpoint(os.path.join(work, "minilm.pt")))
    paraphrase = minilm().encode(tok(), minilm().SENTENCES[1], minilm().SENTENCES[2])
    paraphrase_long = minilm().encode(tok(), minilm().SENTENCES[1], minilm().SENTENCES[2], max_length=512)
    config = neuron_client.BucketModelConfig(get_bucket_kernel)
    if inline:
        nxd_trace.parallel_model_trace(minilm().get_model_fn(checkpoint), [paraphrase, paraphrase_long],
                                       tp_degree=2, bucket_config=config)
        return {}
    t0 = time.monotonic()
    model = nxd_trace.parallel_model_trace(minilm().get_model_fn(checkpoint), [paraphrase, paraphrase_long],
                                           inline_weights_to_neff=False, bucket_config=config, tp_degree=2)
    trace_s = time.monotonic() - t0
    path = os.path.join(work, "tp_bucketed")
    nxd_trace.parallel_model_save(model, path)
    model.unload()
    weights = os.path.join(path, "weights")
    return {"path": path, "trace_s": trace_s,
            "weight_bytes": sum(os.path.getsize(os.path.join(weights, f)) for f in os.listdir(weights)),
            "rank_file_bytes": os.path.getsize(os.path.join(path, "tp_0.pt"))}


@harness.command
def tp_load_bucketed(path: str) -> dict:
    from neuron_client.distributed import trace as nxd_trace

    model = nxd_trace.parallel_model_load(path)
    return {"model": harness.keep(model), "cores": model.cores}


@harness.command
def paraphrase_argmax(model: int) -> dict:
    """The seed's check: the paraphrase pair's top token as the CPU model's."""
    paraphrase = minilm().encode(tok(), minilm().SENTENCES[1], minilm().SENTENCES[2])
    with torch.no_grad():
        return {"same": bool(torch.argmax(harness.get(model)(*paraphrase)[0]) == torch.argmax(cpu()(*paraphrase)[0]))}


# -- resident state ---------------------------------------------------------------------------------------------

STATE_N = 1024


class Accumulate(torch.nn.Module):
    """A running total of every input, kept as state; returns its sum and the new total."""

    def __init__(self, n: int = STATE_N):
        super().__init__()
        self.register_buffer("total", torch.zeros(n, n))

    def forward(self, x):
        new = self.total + x
        return new.sum(), new


class AccumulateCarried(torch.nn.Module):
    """The same, with the total passed in and returned (nothing resident)."""

    def forward(self, x, total):
        new = total + x
        return new.sum(), new


@harness.command
def state_models(work: str) -> dict:
    def make():
        m = Accumulate()
        x = torch.full((STATE_N,), 0.5)
        paths = {"resident": os.path.join(work, "acc_resident.pt"), "carried": os.path.join(work, "acc_carried.pt")}
        torch.jit.save(neuron_client.trace(m, x, input_output_aliases={m.total: 1}), paths["resident"])
        torch.jit.save(neuron_client.trace(AccumulateCarried(), (x, torch.zeros(STATE_N, STATE_N))),
                       paths["carried"])
        return dict(paths, state_bytes=STATE_N * STATE_N * 4)

    return once(("state", work), make)


@harness.command
def resident_calls(model: int, calls: int) -> dict:
    """``calls`` calls, each adding 0.5 to every element of the resident total: the sums, and the bytes carried."""
    m, x, sums = harness.get(model), torch.full((STATE_N,), 0.5), []
    with state.TrafficMeter() as meter:
        for _ in range(calls):
            out = m(x)
            sums.append(float(out[0]))
    return {"sums": sums, "sent": meter.sent, "received": meter.received, "calls": meter.calls, "outputs": len(out)}


@harness.command
def carried_calls(model: int, calls: int) -> dict:
    m, x, total = harness.get(model), torch.full((STATE_N,), 0.5), torch.zeros(STATE_N, STATE_N)
    with state.TrafficMeter() as meter:
        for _ in range(calls):
            s, total = m(x, total)
    return {"final": float(s), "sent": meter.sent, "received": meter.received, "calls": meter.calls}


# -- speculative decoding ---------------------------------------------------------------------------------------

CACHE = 256 + 64


def hf():
    return once("hf", lambda: decoder.example_gpt2(seed=0))


def prompts(n: int = 12) -> list:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 1000, (1, int(torch.randint(3, 40, (1,), generator=gen))), generator=gen)
            for _ in range(n)]


@harness.command
def gpt2(work: str) -> dict:
    def make():
        paths = {}
        t0 = time.monotonic()
        for name, layers, resident in (("target", None, True), ("draft", range(2), True), ("carried", None, False)):
            dec = decoder.from_hf_gpt2(hf(), layers=layers, cache_length=CACHE)
            paths[name] = os.path.join(work, f"gpt2_{name}.pt")
            torch.jit.save(decoder.trace_decoder(dec, resident=resident), paths[name])
        return {"paths": paths, "seconds": time.monotonic() - t0}

    return once(("gpt2", work), make)


@harness.command
def gpt2_logits(target: int) -> dict:
    ids = prompts()[0]
    with torch.no_grad():
        want = hf()(ids).logits
    got = harness.get(target)(ids, torch.tensor([0]))
    return {"outputs": len(got), "shape": list(got[0].shape), "diff": float((got[0] - want).abs().max()),
            "scale": float(want.abs().max())}


def greedy_refs(target: int, n: int, max_new: int) -> list:
    """The target's greedy outputs on the cores, per prompt (computed once per process and saved model)."""
    m = harness.get(target)
    return once(("greedy", m.name, n, max_new),
                lambda: [generation.generate(p, m, max_new_tokens=max_new) for p in prompts(n)])


@harness.command
def gpt2_greedy(target: int, n: int = 12, max_new: int = 32) -> dict:
    eager = once("eager", lambda: decoder.from_hf_gpt2(hf(), cache_length=CACHE))
    refs, ps, same = greedy_refs(target, n, max_new), prompts(n), 0
    for p, on_core in zip(ps, refs):
        with torch.no_grad():
            local = generation.generate(p, generation.CachedLM(eager, max_length=256, max_tokens_per_call=64),
                                        max_new_tokens=max_new)
        same += int(torch.equal(on_core, local))
    return {"same_as_eager": same, "prompts": len(ps),
            "distinct_new_tokens": [len(set(r[0, p.shape[1]:].tolist())) for r, p in zip(refs, ps)]}


@harness.command
def gpt2_speculative(target: int, draft: int, k: int, n: int = 12, max_new: int = 32) -> dict:
    """Speculative decoding with speculation length ``k`` on every prompt, against the target's greedy output."""
    refs, stats, mismatches = greedy_refs(target, n, max_new), generation.GenerationStats(), []
    t0 = time.monotonic()
    for i, (p, ref) in enumerate(zip(prompts(n), refs)):
        out = neuron_client.generate(p, harness.get(target), draft_model=harness.get(draft), max_new_tokens=max_new,
                                     speculation_length=k, stats=stats)
        if not torch.equal(out, ref):
            mismatches.append(i)
    return dict(stats.as_dict(), mismatches=mismatches, seconds=time.monotonic() - t0, prompts=n,
                max_new_tokens=max_new)


@harness.command
def gpt2_decode_bytes(target: int, carried: int, new: int = 16) -> dict:
    """16 greedy steps with the caches resident, then carried: the bytes each way per call."""
    t, p = harness.get(target), prompts()[0]
    with state.TrafficMeter() as meter:
        a = generation.generate(p, t, max_new_tokens=new)
    resident = {"sent": meter.sent, "received": meter.received, "calls": meter.calls}
    with state.TrafficMeter() as meter:
        b = generation.generate(p, harness.get(carried), max_new_tokens=new)
    carried_ = {"sent": meter.sent, "received": meter.received, "calls": meter.calls}
    ref = greedy_refs(target, 12, 32)[0]
    return {"resident": resident, "carried": carried_,
            "cache_bytes": 2 * 4 * int(torch.tensor(t.meta["decoder"]["cache_shape"]).prod()),
            "same": bool(torch.equal(a, b)) and bool(torch.equal(a[:, :p.shape[1] + new], ref[:, :p.shape[1] + new]))}


@harness.command
def gpt2_generate(target: int, prompt_length: int, new: int) -> dict:
    out = generation.generate(torch.zeros(1, prompt_length, dtype=torch.long), harness.get(target), max_new_tokens=new)
    return {"shape": list(out.shape)}


if __name__ == "__main__":
    harness.serve()
