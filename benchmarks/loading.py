"""Section 6, loading: a tensor-parallel model saved with its weights separated from the graphs vs inlined.

all-MiniLM-L6-v2 split over two cores (``neuron_client.distributed``, TP=2: the self-attention of every layer split
Megatron-style, as in seed 003's BERT example) is traced twice with ``parallel_model_trace``: once with
``inline_weights_to_neff=True`` (each rank file carries every weight it uses, replicated ones included) and once with
``False`` (weight-less graphs; weights identical on every rank stored once, each rank's shards apart). Both are saved
with ``parallel_model_save``; the section compares bytes on disk and the time of ``parallel_model_load`` (reading
the files to every rank loaded on its core), the two loads alternating round by round. The baseline is the inlined
model. (Lazy, asynchronous and sequential loading of ordinary models: section 4 (b).)

In ``--quick`` mode the model is cut to its first encoder layer, so that tracing stays short; the figures then
describe that smaller model.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time

from .harness import SectionResult, client_of, fmt_ratio, md_table, percentile

ROUNDS = (6, 1)
BROKER_CORES = max(2, min(8, os.cpu_count() or 1))
TP = 2
SEQ = 128
INLINE = "weights inlined (baseline)"
SEPARATED = "weights separated"


def _dir_bytes(path: str) -> tuple[int, int]:
    total, files = 0, 0
    for d, _, fs in os.walk(path):
        for f in fs:
            total += os.path.getsize(os.path.join(d, f))
            files += 1
    return total, files


def _tp_api():
    """(trace module, minilm example module, parallel_layers.load) or raise ImportError/AttributeError."""
    from neuron_client.distributed import trace
    from neuron_client.distributed.examples import minilm
    from neuron_client.distributed.parallel_layers import load

    for name in ("parallel_model_trace", "parallel_model_save", "parallel_model_load"):
        getattr(trace, name)
    getattr(minilm, "parallelize")
    return trace, minilm, load


def run(ctx) -> SectionResult:
    res = SectionResult("loading", "6. Loading: tensor-parallel weights separated vs inlined")
    try:
        trace, minilm, load = _tp_api()
    except Exception as exc:  # noqa: BLE001 - the TP work is not there (yet): say so, do not fail the suite
        why = f"{type(exc).__name__}: {exc}"
        res.lines += [f"**TODO**: the weight-separated vs inlined loading comparison comes with the tensor-parallel "
                      f"work (`neuron_client.distributed`), which is not usable here ({why}).", ""]
        res.figures["todo"] = why
        return res

    from .e2e import broker_in_background

    with contextlib.ExitStack() as stack:  # the broker starts while the model is traced
        _run(ctx, res, trace, minilm, load, broker_in_background(ctx, stack, "loading", BROKER_CORES))
    return res


def _run(ctx, res, trace, minilm, load, starting) -> None:
    import warnings

    import torch

    from .e2e import encode, load_minilm

    p = ctx.progress
    work = ctx.tmp / "loading"
    work.mkdir(exist_ok=True)
    layers = 1 if ctx.quick else None
    tok, base = load_minilm()
    if layers:
        base.encoder.layer = base.encoder.layer[:layers]
        base.config.num_hidden_layers = layers
    n_layers = len(base.encoder.layer)
    ckpt = str(work / "minilm-full.pt")
    torch.save({"model": base.state_dict()}, ckpt)
    x = encode(tok, batch=1, seq=SEQ)
    with torch.no_grad():
        want = base(*x)[0]

    def get_model():
        model = minilm.parallelize(copy.deepcopy(base))
        load(ckpt, model, sharded=False)
        return model.eval(), {}

    get_model.__name__ = "minilm"
    dirs, trace_s = {}, {}
    p.note(f"tracing all-MiniLM-L6-v2 ({n_layers} layer{'s' if n_layers > 1 else ''}) at TP={TP}, weights inlined "
           "and separated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, inline in ((INLINE, True), (SEPARATED, False)):
            t0 = time.perf_counter()
            model = trace.parallel_model_trace(get_model, x, tp_degree=TP, inline_weights_to_neff=inline)
            trace_s[name] = time.perf_counter() - t0
            dirs[name] = str(work / ("inline" if inline else "separated"))
            trace.parallel_model_save(model, dirs[name])
            del model
    disk = {}
    for name, d in dirs.items():
        total, files = _dir_bytes(d)
        disk[name] = {"bytes": total, "files": files, "tp_0_bytes": os.path.getsize(os.path.join(d, "tp_0.pt"))}

    rounds = ctx.n_rounds(*ROUNDS)
    load_s = {name: [] for name in dirs}
    wall_s = {name: [] for name in dirs}
    diffs = {}
    broker = starting.result()
    with client_of(broker, f"0-{TP - 1}"):
        for name, d in dirs.items():  # once untimed: every rank computes, and the page cache holds the files
            m = trace.parallel_model_load(d)
            out = m(*x)
            diffs[name] = float((out[0] - want).abs().max())
            m.unload()
        bad = {k: v for k, v in diffs.items() if not v < 1e-4}
        if bad:
            raise RuntimeError(f"the tensor-parallel model's output differs from the unsharded model's: {bad}")
        task = p.task("parallel_model_load: separated vs inlined", rounds)
        names = list(dirs)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                m = trace.parallel_model_load(dirs[name])
                wall_s[name].append(time.perf_counter() - t0)
                load_s[name].append(m.load_s if m.load_s is not None else wall_s[name][-1])
                m.unload()
            task.advance()
        med = {k: percentile(v, 50) for k, v in load_s.items()}
        task.finish(f"separated {med[SEPARATED] * 1e3:.0f} ms vs inlined {med[INLINE] * 1e3:.0f} ms")

    pairs = sorted(a / b for a, b in zip(load_s[SEPARATED], load_s[INLINE]) if b)
    figures = {"model": f"all-MiniLM-L6-v2, {n_layers} layer(s), TP={TP}, batch 1 x {SEQ}", "layers": n_layers,
               "rounds": rounds, "disk": disk, "load_s": load_s, "wall_s": wall_s, "trace_s": trace_s,
               "max_abs_diff": diffs,
               "separated_over_inline": {
                   "bytes": disk[SEPARATED]["bytes"] / disk[INLINE]["bytes"],
                   "load_s_median": med[SEPARATED] / med[INLINE],
                   "load_pair_spread": {"p25": percentile(pairs, 25), "p75": percentile(pairs, 75)}}}
    res.figures.update(figures)
    L = res.lines
    L += [f"all-MiniLM-L6-v2{' cut to its first layer (--quick)' if layers else ''} at TP={TP} on cores 0-{TP - 1} "
          "(each rank in its core's worker, one all-reduce per layer), saved with `parallel_model_save` twice. "
          "Load: `parallel_model_load` from reading the files to every rank loaded (`model.load_s`), median over "
          f"{rounds} alternating round(s), after one untimed load of each (so both read from the page cache).", ""]
    rows = []
    for name in (SEPARATED, INLINE):  # the variant, then the baseline (as every section of the report)
        rows.append([name, disk[name]["files"], f"{disk[name]['bytes'] / 1e6:.1f} MB",
                     f"{disk[name]['tp_0_bytes'] / 1e6:.2f} MB", f"{med[name] * 1e3:.0f} ms",
                     f"{percentile(load_s[name], 0) * 1e3:.0f}-{percentile(load_s[name], 100) * 1e3:.0f} ms",
                     f"{trace_s[name]:.1f} s"])
    L += md_table(["saved model", "files", "on disk", "tp_0.pt", "load (median)", "load (min-max)", "trace"], rows)
    so = figures["separated_over_inline"]
    L += ["", f"Separated / inlined: **{fmt_ratio(so['bytes'])}** of the bytes on disk, **{fmt_ratio(so['load_s_median'])}"
          f"** of the load time (round by round: {so['load_pair_spread']['p25']:.2f}-"
          f"{so['load_pair_spread']['p75']:.2f})" + (f" (--quick: {rounds} round(s), indicative only)" if ctx.quick else "")
          + ".", "",
          "Where the bytes go: inlined, every rank file carries the replicated weights (the 30522 x 384 word "
          "embeddings alone are 47 MB, layer norms, biases) as well as its shards; separated, they are stored once "
          "in `weights/shared.pt` and the rank files hold weight-less graphs. At load the client reads the weight "
          "files once and sends each rank its tensors through shared memory, instead of every worker deserialising "
          "a full TorchScript archive.", ""]
    res.notes += ["Both models come from the same checkpoint; before timing, each is loaded once and its rank 0 "
                  "output compared with the unsharded model's (within 1e-4)."]
