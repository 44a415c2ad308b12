"""Client programs for autobucketing, resident state and speculative decoding: ``python tests/bucket_apps.py SCENARIO
WORK``. Each prints one JSON line per check, ``{"check": name, ...}``; a check that crashes says so.

* ``minilm``: seed 003's sequence-length kernel (buckets 128 and 512) on all-MiniLM-L6-v2: one packaged model, saved,
  loaded with ``neuron_client.jit.load``, called without pre-padding at lengths 1 ... 513 against the CPU model; the
  file size with one and two buckets; a kernel that is not TorchScript.
* ``state``: a model with a 4 MB state buffer (``input_output_aliases``) against the same model with the state sent
  each call, bytes counted with ``neuron_client.tracing.io_aliases.TrafficMeter``; values checked over several calls.
* ``generate``: a tiny GPT-2 (built from a config with a fixed seed) and its 2-block draft, traced with their KV
  caches resident, on two cores: logits against Hugging Face's model, greedy decoding against the eager model,
  speculative decoding against greedy over many prompts and several k, bytes per step resident vs carried.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
import traceback
from typing import List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import neuron_client  # noqa: E402
from neuron_client.generation import decoder, generate as generation
from neuron_client.tracing import io_aliases as state

LENGTHS = (1, 127, 128, 129, 511, 512)


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def checked(name):
    def wrap(fn):
        def run(*args):
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported to the test
                emit(check=name, crashed=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc()[-3000:])
        return run
    return wrap


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


def scenario_minilm(work: str) -> None:
    from neuron_client.distributed.examples import minilm

    tok = minilm.tokenizer()
    cpu = minilm.cpu_model()
    text = " ".join(["The company HuggingFace is based in New York City."] * 60)
    full = tok(text, max_length=600, truncation=True, return_tensors="pt")
    full = [full[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
    assert full[0].shape[1] >= 513

    def inputs(n):
        return [t[:, :n].contiguous() for t in full]

    def example(n):  # seed 003's encode: padded to the bucket length
        e = tok(text, max_length=n, padding="max_length", truncation=True, return_tensors="pt")
        return tuple(e[k] for k in ("input_ids", "attention_mask", "token_type_ids"))

    path = os.path.join(work, "minilm_bucketed.pt")
    t0 = time.monotonic()
    packaged = neuron_client.bucket_model_trace(lambda: (cpu, {}), [example(128), example(512)],
                                                neuron_client.BucketModelConfig(get_bucket_kernel))
    trace_s = time.monotonic() - t0
    torch.jit.save(packaged, path)
    one = neuron_client.bucket_model_trace(lambda: (cpu, {}), [example(128)],
                                           neuron_client.BucketModelConfig(lambda: torch.jit.script(one_bucket_kernel)))
    plain = neuron_client.trace(cpu, example(128), strict=False)
    emit(check="sizes", two_buckets=os.path.getsize(path), one_bucket=saved_bytes(one), plain_trace=saved_bytes(plain),
         weights=sum(p.numel() * p.element_size() for p in cpu.state_dict().values()), trace_s=trace_s)
    del one, plain, packaged

    @checked("lengths")
    def lengths():
        model = neuron_client.jit.load(path)
        diffs, shapes, times = {}, {}, {}
        with torch.no_grad():
            for n in LENGTHS:
                x = inputs(n)
                want = cpu(*x)
                t1 = time.monotonic()
                got = model(*x)
                times[n] = time.monotonic() - t1
                diffs[n] = max(float((g - w).abs().max()) for g, w in zip(got, want))
                shapes[n] = [list(g.shape) for g in got]
        try:
            model(*inputs(513))
            too_long = None
        except neuron_client.ModelExecutionError as exc:
            too_long = str(exc)
        emit(check="lengths", diffs=diffs, shapes=shapes, times=times, too_long=too_long, cores=model.cores,
             bucketed=model.bucketed, meta_buckets=[[s["shape"] for s in b] for b in model.meta["buckets"]])

    lengths()

    @checked("not_scriptable")
    def not_scriptable():
        try:
            neuron_client.bucket_model_trace(lambda: (cpu, {}), [example(128)],
                                             neuron_client.BucketModelConfig(lambda: not_scriptable_kernel))
            emit(check="not_scriptable", error=None)
        except ValueError as exc:
            emit(check="not_scriptable", error=str(exc))

    not_scriptable()


def scenario_tp(work: str) -> None:
    """Seed 003's autobucketing of a tensor-parallel BERT: parallel_model_trace(..., bucket_config=...) at TP=2."""
    from neuron_client.distributed import trace as nxd_trace
    from neuron_client.distributed.examples import minilm

    tok = minilm.tokenizer()
    cpu = minilm.cpu_model()
    checkpoint = minilm.save_checkpoint(os.path.join(work, "minilm.pt"))
    text = " ".join(["HuggingFace's headquarters are situated in Manhattan."] * 60)
    full = tok(text, max_length=600, truncation=True, return_tensors="pt")
    full = [full[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
    paraphrase = minilm.encode(tok, minilm.SENTENCES[1], minilm.SENTENCES[2])
    paraphrase_long = minilm.encode(tok, minilm.SENTENCES[1], minilm.SENTENCES[2], max_length=512)
    bucket_config = neuron_client.BucketModelConfig(get_bucket_kernel)
    try:
        nxd_trace.parallel_model_trace(minilm.get_model_fn(checkpoint), [paraphrase, paraphrase_long], tp_degree=2,
                                       bucket_config=bucket_config)
        inline_error = None
    except ValueError as exc:
        inline_error = str(exc)
    t0 = time.monotonic()
    model = nxd_trace.parallel_model_trace(minilm.get_model_fn(checkpoint), [paraphrase, paraphrase_long],
                                           inline_weights_to_neff=False, bucket_config=bucket_config, tp_degree=2)
    trace_s = time.monotonic() - t0
    nxd_trace.parallel_model_save(model, os.path.join(work, "tp_bucketed"))
    del model
    model = nxd_trace.parallel_model_load(os.path.join(work, "tp_bucketed"))
    diffs, shapes = {}, {}
    with torch.no_grad():
        for n in (1, 129, 512):
            x = [t[:, :n].contiguous() for t in full]
            want = cpu(*x)
            got = model(*x)
            diffs[n] = max(float((g - w).abs().max()) for g, w in zip(got, want))
            shapes[n] = [list(g.shape) for g in got]
        seed_ok = bool(torch.argmax(model(*paraphrase)[0]) == torch.argmax(cpu(*paraphrase)[0]))
    weights = os.path.join(work, "tp_bucketed", "weights")
    emit(check="tp", inline_error=inline_error, diffs=diffs, shapes=shapes, seed_ok=seed_ok, cores=model.cores,
         trace_s=trace_s, weight_bytes=sum(os.path.getsize(os.path.join(weights, f)) for f in os.listdir(weights)),
         rank_file_bytes=os.path.getsize(os.path.join(work, "tp_bucketed", "tp_0.pt")))


# -- resident state ---------------------------------------------------------------------------------------------


class Accumulate(torch.nn.Module):
    """A running total of every input, kept as state; returns its sum and the new total."""

    def __init__(self, n: int = 1024):
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


def scenario_state(work: str) -> None:
    n, calls = 1024, 6
    m = Accumulate(n)
    x = torch.full((n,), 0.5)  # small: added to every row of the total
    resident_path, carried_path = os.path.join(work, "acc_resident.pt"), os.path.join(work, "acc_carried.pt")
    torch.jit.save(neuron_client.trace(m, x, input_output_aliases={m.total: 1}), resident_path)
    torch.jit.save(neuron_client.trace(AccumulateCarried(), (x, torch.zeros(n, n))), carried_path)
    resident = neuron_client.jit.load(resident_path)
    carried = neuron_client.jit.load(carried_path)
    state_bytes = n * n * 4
    sums = []
    with state.TrafficMeter() as meter:
        for _ in range(calls):
            out = resident(x)
            sums.append(float(out[0]))
    res = {"sent": meter.sent, "received": meter.received, "calls": meter.calls, "outputs": len(out)}
    total = torch.zeros(n, n)
    with state.TrafficMeter() as meter:
        for _ in range(calls):
            s, total = carried(x, total)
    car = {"sent": meter.sent, "received": meter.received, "calls": meter.calls}
    want = [0.5 * n * n * (i + 1) for i in range(calls)]
    emit(check="state", state_bytes=state_bytes, resident=res, carried=car, sums=sums, want=want,
         carried_final=float(s), io_aliases=resident.meta.get("io_aliases"), cores=[resident.cores, carried.cores])
    # a second load of the same file starts from the traced state again (each replica holds its own state)
    again = neuron_client.jit.load(resident_path)
    emit(check="state_fresh", first=float(again(x)[0]), other_next=float(resident(x)[0]))


# -- speculative decoding ---------------------------------------------------------------------------------------


def scenario_generate(work: str, prompts: str = "12", new_tokens: str = "32") -> None:
    n_prompts, max_new = int(prompts), int(new_tokens)
    hf = decoder.example_gpt2(seed=0)
    cache = 256 + 64
    paths = {}
    t0 = time.monotonic()
    for name, layers, resident in (("target", None, True), ("draft", range(2), True), ("carried", None, False)):
        dec = decoder.from_hf_gpt2(hf, layers=layers, cache_length=cache)
        paths[name] = os.path.join(work, f"gpt2_{name}.pt")
        torch.jit.save(decoder.trace_decoder(dec, resident=resident), paths[name])
    emit(check="traced", seconds=time.monotonic() - t0, bytes={k: os.path.getsize(p) for k, p in paths.items()})
    target = neuron_client.jit.load(paths["target"])
    draft = neuron_client.jit.load(paths["draft"])
    eager = decoder.from_hf_gpt2(hf, cache_length=cache)
    gen = torch.Generator().manual_seed(1234)
    prompts_ = [torch.randint(0, 1000, (1, int(torch.randint(3, 40, (1,), generator=gen))), generator=gen)
                for _ in range(n_prompts)]

    @checked("logits")
    def logits():
        ids = prompts_[0]
        with torch.no_grad():
            want = hf(ids).logits
        got = target(ids, torch.tensor([0]))
        emit(check="logits", outputs=len(got), shape=list(got[0].shape), diff=float((got[0] - want).abs().max()),
             scale=float(want.abs().max()), cores=[target.cores, draft.cores])

    logits()

    @checked("greedy")
    def greedy():
        same, refs = 0, []
        for p in prompts_:
            on_core = generation.generate(p, target, max_new_tokens=max_new)
            with torch.no_grad():
                local = generation.generate(p, generation.CachedLM(eager, max_length=256, max_tokens_per_call=64),
                                            max_new_tokens=max_new)
            same += int(torch.equal(on_core, local))
            refs.append(on_core)
        emit(check="greedy", same_as_eager=same, prompts=len(prompts_),
             distinct_new_tokens=[len(set(r[0, p.shape[1]:].tolist())) for r, p in zip(refs, prompts_)])
        return refs

    refs = greedy() or []

    @checked("speculative")
    def speculative():
        results = {}
        for k in (1, 2, 4, 7):
            stats = generation.GenerationStats()
            mismatches = []
            t1 = time.monotonic()
            for i, (p, ref) in enumerate(zip(prompts_, refs)):
                out = neuron_client.generate(p, target, draft_model=draft, max_new_tokens=max_new,
                                             speculation_length=k, stats=stats)
                if not torch.equal(out, ref):
                    mismatches.append(i)
            results[k] = dict(stats.as_dict(), mismatches=mismatches, seconds=time.monotonic() - t1)
        emit(check="speculative", results=results, prompts=len(refs), max_new_tokens=max_new)

    speculative()

    @checked("decode_bytes")
    def decode_bytes():
        carried = neuron_client.jit.load(paths["carried"])
        p = prompts_[0]
        with state.TrafficMeter() as meter:
            a = generation.generate(p, target, max_new_tokens=16)
        resident = {"sent": meter.sent, "received": meter.received, "calls": meter.calls}
        with state.TrafficMeter() as meter:
            b = generation.generate(p, carried, max_new_tokens=16)
        carried_ = {"sent": meter.sent, "received": meter.received, "calls": meter.calls}
        shape = target.meta["decoder"]["cache_shape"]
        cache_bytes = 2 * 4 * int(torch.tensor(shape).prod())
        emit(check="decode_bytes", resident=resident, carried=carried_, cache_bytes=cache_bytes,
             same=bool(torch.equal(a, b)) and bool(torch.equal(a[:, :p.shape[1] + 16], refs[0][:, :p.shape[1] + 16])))

    decode_bytes()

    @checked("too_long")
    def too_long():
        try:
            generation.generate(torch.zeros(1, 250, dtype=torch.long), target, max_new_tokens=10)
            emit(check="too_long", error=None)
        except ValueError as exc:
            emit(check="too_long", error=str(exc))

    too_long()


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    globals()[f"scenario_{name}"](*args)
