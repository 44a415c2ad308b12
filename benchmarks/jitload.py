"""Section: plain ``torch.jit.load`` (the self-placing saved form) against ``neuron_client.jit.load``.

1. Load: one file loaded and dropped by each path, interleaved round by round. Both place the model on the
   process's core 0 (a 1 MiB linear layer: reading the file, the load into the worker, the reply); ``torch.jit.load``
   also deserializes the small TorchScript module around the graph and runs its ``__setstate__``.
2. Calls: the same loaded model called through the TorchScript module ``torch.jit.load`` returns (its ``forward``
   calls the ``neuron_client::run`` op) and through the ``NeuronModel`` behind it (the old path), a 1 KiB float32
   input to an identity-like model, interleaved.
"""
from __future__ import annotations

import contextlib
import gc

import torch

from .harness import (SectionResult, Variant, client_of, fmt_ratio, fmt_spread, fmt_us, interleave, md_table, ratio,
                      round_ratio)

LOAD_ROUNDS, LOAD_BATCH = (10, 3), (5, 2)
CALL_ROUNDS, CALL_BATCH = (20, 4), (200, 50)


def run(ctx) -> SectionResult:
    import neuron_client
    from neuron_client.tracing import script

    res = SectionResult("jitload", "torch.jit.load of the self-placing form vs neuron_client.jit.load")
    with contextlib.ExitStack() as stack:
        broker = ctx.start_broker("jitload", cores=1)
        stack.callback(broker.stop)
        stack.enter_context(client_of(broker, "0"))
        big = ctx.tmp / "linear.pt"
        torch.jit.save(neuron_client.trace(torch.nn.Linear(512, 512), torch.rand(1, 512)), str(big))
        small = ctx.tmp / "scale.pt"
        torch.jit.save(neuron_client.trace(torch.nn.Identity(), torch.rand(1, 256)), str(small))

        def torch_load():
            m = torch.jit.load(str(big))
            script.model_of(m).unload()
            del m

        def client_load():
            neuron_client.jit.load(str(big)).unload()

        task = ctx.progress.task("loads", ctx.n_rounds(*LOAD_ROUNDS))
        loads = interleave([Variant("neuron_client.jit.load (baseline)", client_load),
                            Variant("torch.jit.load", torch_load)],
                           ctx.n_rounds(*LOAD_ROUNDS), LOAD_BATCH[1] if ctx.quick else LOAD_BATCH[0], warmup=1,
                           task=task, rng=ctx.rng)
        gc.collect()
        scripted = torch.jit.load(str(small))
        placed = script.model_of(scripted)
        x = torch.rand(1, 256)
        task = ctx.progress.task("calls", ctx.n_rounds(*CALL_ROUNDS))
        calls = interleave([Variant("NeuronModel call (baseline)", lambda: placed(x)),
                            Variant("torch.jit.load module call", lambda: scripted(x))],
                           ctx.n_rounds(*CALL_ROUNDS), CALL_BATCH[1] if ctx.quick else CALL_BATCH[0], warmup=20,
                           task=task, rng=ctx.rng)
    figs = {}
    for label, m in (("load", loads), ("call", calls)):
        names = list(m)
        base, var = m[names[0]], m[names[1]]
        figs[label] = {"baseline": names[0], "variant": names[1], "baseline_p50_us": base.summary()["p50_us"],
                       "variant_p50_us": var.summary()["p50_us"],
                       "p50_ratio": ratio(var.summary()["p50_us"], base.summary()["p50_us"]),
                       "p99_ratio": ratio(var.summary()["p99_us"], base.summary()["p99_us"]),
                       "round_ratio": round_ratio(var, base)}
    res.figures = figs
    # the variant, then the baseline, in every row (as every section of the report)
    res.lines += md_table(["measure", "variant", "baseline", "variant p50", "baseline p50", "variant / baseline p50",
                           "p99 ratio", "round spread"],
                          [[k, f["variant"], f["baseline"], fmt_us(f["variant_p50_us"]), fmt_us(f["baseline_p50_us"]),
                            fmt_ratio(f["p50_ratio"]), fmt_ratio(f["p99_ratio"]), fmt_spread(f["round_ratio"])]
                           for k, f in figs.items()])
    res.lines.append("")
    res.notes.append("Both loads place the model on the same core of a 1-core broker and unload it before the next.")
    return res
