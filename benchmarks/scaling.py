"""Section 3, scaling: throughput over cores, and latency under open-loop load.

(a) Throughput over 1, 2 and 4 cores of a CPU-bound model (a small convolutional net: its weights stay in cache, so
    the cores do not contend for memory bandwidth), as a ratio to 1 core:

    * **replicas**: the model loaded on N cores (``neuron_cores_context``), driven by 8 client threads calling it
      back to back (closed loop, enough calls in flight to keep every core busy);
    * **DataParallel**: ``neuron_client.DataParallel`` over nc0..nc(N-1) with dynamic batching, batches of 64 items
      through a model traced with 16 (four pieces per call, spread over the cores);
    * **hardware ceiling** (the baseline that says what N cores *can* give here): N processes pinned to the CPUs of
      cores 0..N-1 running the same traced piece in-process with one thread, no runtime;
    * **one call, whole batch** (a reference for DataParallel): the model traced with all 64 items, called on nc0.

    The cases run interleaved in rounds (rotating order); a ratio is the median over rounds of the ratio within a
    round. DataParallel's own cost is measured apart: a model with no compute, called directly vs through
    DataParallel over one core, and the in-process split + gather of a batch into four chunks.

(b) Open-loop load: a client submits calls with ``model.submit`` at Poisson arrivals of rate lambda (exponential gaps
    drawn in advance, latency timed from each call's *scheduled* arrival, so a late sender does not hide queueing),
    at rising rates given as fractions of the configuration's capacity measured in (a), on one core and on two
    replicas. Reported: p50 and p99 against the offered rate, and the rate from which p99 exceeds 10x the unloaded
    p50 (one call at a time, through the same ``submit`` path, measured just before).

Replaces ``scripts/bench_data_parallel.py`` (its measurements are (a)'s DataParallel rows, ceilings and costs).
"""
from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .e2e import TUNED_MALLOC, malloc_env
from .harness import (CHILDREN, Plot, SectionResult, Variant, client_of, fmt_ratio, fmt_spread, fmt_us, interleave,
                      md_table, percentile, summarize, verdict)

CORES = (1, 2, 4)
BROKER_CORES = max(CORES)
PIECE = 16  # rows the model is traced with
DP_BATCH = 64  # items per DataParallel call
CHANNELS, IMAGE = 32, 32
CLIENT_THREADS = 2 * max(CORES)  # replicas: calls in flight
ROUNDS = (8, 2)
SECONDS = (0.6, 0.25)  # per case per round
OVERHEAD_ROUNDS, OVERHEAD_BATCH = (10, 2), (40, 10)

# (b) open loop: offered rate as a fraction of capacity; each rate runs for SECONDS_PER_RATE or MIN_REQUESTS calls,
# whichever is longer.
LOAD_FRACTIONS = ([0.1, 0.25, 0.4, 0.55, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25], [0.3, 0.8, 1.2])
SECONDS_PER_RATE = (2.5, 0.6)
MIN_REQUESTS = (60, 15)
UNLOADED_CALLS = (40, 8)
CAPACITY_SECONDS = (1.5, 0.4)  # closed-loop throughput measured right before each configuration's sweep
BREAK_FACTOR = 10.0  # p99 "breaks" above this many unloaded p50s
LOAD_CONFIGS = ((1, 2), (1,))  # cores, full and quick


def make_model():
    """A small convolutional net: compute-bound (its weights stay in cache, unlike a wide MLP's, whose pieces would be
    bound by memory bandwidth that the cores share)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, CHANNELS, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(CHANNELS, 10)).eval()


DP_WINDOW = "DataParallel, submit window"  # the same DataParallel, batches kept in flight with submit()
WINDOW = 2  # batches in flight from the one caller
TARGET_DP_2_CORES = 1.8  # DataParallel over 2 cores vs 1 from one caller (the hardware gives 1.80-1.95x here)
KINDS = ("replicas", "DataParallel", DP_WINDOW, "ceiling")
WHOLE = "one call, whole batch, core 0"


def _name(kind: str, n: int, start: int | None = None) -> str:
    """The case's name: ``start`` None is the 1-core figure averaged over the cores measured alone."""
    where = "" if start is None or n > 1 else f" (core {start} alone)"
    if kind == "ceiling":
        return f"in-process ceiling, {n} process{'es' if n > 1 else ''}{where}"
    return f"{kind}, {n} core{'s' if n > 1 else ''}{where}"


def _affine():
    import torch

    class Affine(torch.nn.Module):
        """Next to no compute: DataParallel's own work on a call."""

        def forward(self, x):
            return x * 2 + 1

    return Affine().eval()


def _shape(rows: int) -> tuple:
    return (rows, 3, IMAGE, IMAGE)


# ----------------------------------------------------------------------------------------------------------------
# The hardware ceiling: processes pinned like the workers, running the piece in-process.


def _ceiling_child(conn, cpu: int, rows: int) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    path = conn.recv()  # the model is saved while this process imports torch
    if path is None:
        return
    from neuron_client.tracing.script import load_here  # the graph, run here
    model = load_here(path).eval()
    x = torch.rand(*_shape(rows))
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        conn.send("ready")
        while True:
            msg = conn.recv()
            if msg is None:
                return
            start_at, seconds = msg
            while time.time() < start_at:  # every child starts at the same moment
                time.sleep(0.0005)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                model(x)
                n += 1
            conn.send(n / (time.perf_counter() - t0))


class Ceiling:
    """One spawned process per core, pinned to that core's CPU."""

    def __init__(self, cpus_of_cores: list[int]):
        """Start the processes (they import torch meanwhile); :meth:`load` gives them the model."""
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.children = []
        for cpu in cpus_of_cores:
            parent, child = ctx.Pipe()
            proc = CHILDREN.add_mp(ctx.Process(target=_ceiling_child, args=(child, cpu, PIECE), daemon=True,
                                               name="bench-ceiling"))
            proc.start()
            self.children.append((proc, parent))

    def load(self, path: str) -> None:
        for _, conn in self.children:
            conn.send(path)
        for proc, conn in self.children:
            if not conn.poll(120):
                raise RuntimeError("an in-process ceiling process did not start within 120 s")
            conn.recv()

    def items_per_s(self, which: list[int], seconds: float) -> float:
        """Items per second of the children ``which`` running at once."""
        conns = [self.children[i][1] for i in which]
        start_at = time.time() + 0.02
        for conn in conns:
            conn.send((start_at, seconds))
        return sum(conn.recv() for conn in conns) * PIECE

    def close(self) -> None:
        for proc, conn in self.children:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc, _ in self.children:
            CHILDREN.stop_mp(proc)
            if proc in CHILDREN.mp_procs:
                CHILDREN.mp_procs.remove(proc)


# ----------------------------------------------------------------------------------------------------------------
# Closed-loop measurement.


class Pool:
    """Persistent client threads (each keeps its own worker channels) that call ``fn`` back to back."""

    def __init__(self, n: int):
        self.n = n
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="bench-client")

    def rate(self, fn, seconds: float) -> float:
        """Calls per second of ``n`` threads calling ``fn`` back to back for ``seconds``."""
        barrier = threading.Barrier(self.n + 1)

        def loop():
            barrier.wait()
            deadline = time.perf_counter() + seconds
            k = 0
            while time.perf_counter() < deadline:
                fn()
                k += 1
            return k, time.perf_counter()

        futures = [self.pool.submit(loop) for _ in range(self.n)]
        barrier.wait()
        t0 = time.perf_counter()
        got = [f.result() for f in futures]
        return sum(k for k, _ in got) / (max(t for _, t in got) - t0)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _single_rate(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def _window_rate(dp, x, seconds: float, window: int = WINDOW) -> float:
    """Batches per second of one caller that keeps ``window`` batches in flight through ``dp.submit``."""
    from collections import deque

    n, t0 = 0, time.perf_counter()
    inflight = deque(dp.submit(x) for _ in range(window))
    while time.perf_counter() - t0 < seconds:
        inflight.popleft().result(60)
        n += 1
        inflight.append(dp.submit(x))
    for f in inflight:
        f.result(60)
    return n / (time.perf_counter() - t0)


def _cpu_s(procs) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(Exception):
            t = p.cpu_times()
            total += t.user + t.system
    return total


# ----------------------------------------------------------------------------------------------------------------


def run(ctx) -> SectionResult:
    import torch

    res = SectionResult("scaling", "3. Scaling: throughput over cores, latency under open-loop load")
    prev_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, prev_threads)
        torch.set_num_threads(1)
        from broker.backends import cpus_for_core

        host_cpus = sorted(os.sched_getaffinity(0))
        ceiling_cpus = [cpus_for_core(c, BROKER_CORES, host_cpus)[0] for c in range(BROKER_CORES)]
        ctx.progress.note(f"starting {BROKER_CORES} in-process ceiling processes pinned like the workers of cores "
                          f"0-{BROKER_CORES - 1} (CPUs {ceiling_cpus})")
        # Workers and ceiling processes alike with glibc's malloc thresholds fixed (see section 2): with the
        # defaults, a process's speed on this model depends on the largest block it has freed before (here 2-3x:
        # a worker that once ran the whole batch stops faulting the pieces' activations in on every call), and
        # the comparison would depend on the order of the cases.
        with malloc_env():
            ceiling = Ceiling(ceiling_cpus)
            stack.callback(ceiling.close)
            broker = ctx.start_broker("scaling", cores=BROKER_CORES)
        stack.callback(broker.stop)
        rt = stack.enter_context(client_of(broker, f"0-{BROKER_CORES - 1}"))
        _part_throughput(ctx, stack, broker, rt, res, ceiling)
        _part_open_loop(ctx, rt, res)
    _notes(res, broker)
    return res


def _save_models(directory) -> dict:
    import torch

    import neuron_client

    module = make_model()
    paths = {"piece": os.path.join(directory, "conv-piece.pt"), "whole": os.path.join(directory, "conv-whole.pt"),
             "affine": os.path.join(directory, "affine.pt")}
    torch.jit.save(neuron_client.trace(module, torch.rand(*_shape(PIECE))), paths["piece"])
    torch.jit.save(neuron_client.trace(module, torch.rand(*_shape(DP_BATCH))), paths["whole"])
    torch.jit.save(neuron_client.trace(_affine(), torch.rand(*_shape(DP_BATCH))), paths["affine"])
    return {"module": module, "paths": paths}


def _part_throughput(ctx, stack, broker, rt, res, ceiling) -> None:
    import psutil
    import torch

    import neuron_client
    from neuron_client.experimental import neuron_cores_context
    from neuron_client.models import batching
    p = ctx.progress
    work = ctx.tmp / "scaling"
    work.mkdir(exist_ok=True)
    saved = _save_models(str(work))
    paths = saved["paths"]
    doc = broker.status()
    core_cpus = {c.index: list(c.cpus) for c in doc.cores}
    host_cpus = sorted(os.sched_getaffinity(0))
    workers = [psutil.Process(rt.workers[core].pid) for core in rt.cores]
    me = psutil.Process()  # the client: this process

    x_piece = torch.rand(*_shape(PIECE))
    x_batch = torch.rand(*_shape(DP_BATCH))
    with torch.inference_mode():
        want_piece, want_batch = saved["module"](x_piece), saved["module"](x_batch)

    # name -> (items per second fn(seconds), workers it runs on). One core is measured on core 0 and on core 1
    # (CPU 0 and CPU 1) and the two averaged: on a shared machine the CPUs need not be equally busy (here every
    # broker's core 0, other users' included, lands on CPU 0), and a 1-core baseline on one of them would bias
    # every ratio to it.
    cases = {}
    pool = Pool(CLIENT_THREADS)
    stack.callback(pool.close)
    one = [0, 1] if BROKER_CORES > 1 else [0]
    replicas, dps = {}, {}
    for n in CORES:
        for start in (one if n == 1 else [0]):
            with neuron_cores_context(start_nc=start, nc_count=n):
                m = replicas[n, start] = neuron_client.jit.load(paths["piece"])
            if not torch.allclose(m(x_piece), want_piece, atol=1e-4):
                raise RuntimeError(f"replicas over {n} cores computed something else")
            cases[_name("replicas", n, start)] = (lambda s, m=m: pool.rate(lambda: m(x_piece), s) * PIECE,
                                                  workers[start:start + n])
    for n in CORES:
        for start in (one if n == 1 else [0]):
            ids = list(range(start, start + n))
            dp = dps[n, start] = neuron_client.DataParallel(neuron_client.jit.load(paths["piece"]), device_ids=ids)
            if not torch.allclose(dp(x_batch), want_batch, atol=1e-4):
                raise RuntimeError(f"DataParallel over {n} cores computed something else")
            cases[_name("DataParallel", n, start)] = (
                lambda s, dp=dp: _single_rate(lambda: dp(x_batch), s) * DP_BATCH, workers[start:start + n])
            cases[_name(DP_WINDOW, n, start)] = (
                lambda s, dp=dp: _window_rate(dp, x_batch, s) * DP_BATCH, workers[start:start + n])
    whole = neuron_client.jit.load(paths["whole"])
    whole.load_onto([0])
    cases[WHOLE] = (lambda s: _single_rate(lambda: whole(x_batch), s) * DP_BATCH, workers[:1])
    ceiling.load(paths["piece"])
    for n in CORES:
        for start in (one if n == 1 else [0]):
            cases[_name("ceiling", n, start)] = (
                lambda s, ids=list(range(start, start + n)): ceiling.items_per_s(ids, s), [])

    rounds, seconds = ctx.n_rounds(*ROUNDS), SECONDS[1] if ctx.quick else SECONDS[0]
    for fn, _ in cases.values():  # warm-up: every path once
        fn(0.05)
    names = list(cases)
    task = p.task(f"(a) throughput, {len(names)} cases", rounds)
    per_round = []  # per round: name -> (items/s, worker CPU seconds per second)
    for r in range(rounds):
        got = {}
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, procs = cases[name]
            c0, m0, t0 = _cpu_s(procs), _cpu_s([me]), time.perf_counter()
            items = fn(seconds)
            dt = time.perf_counter() - t0
            got[name] = (items, (_cpu_s(procs) - c0) / dt if procs else None, (_cpu_s([me]) - m0) / dt)
        for kind in KINDS:  # the 1-core figure of the round: the mean over the cores measured
            vals = [got[_name(kind, 1, c)] for c in one]
            busy = [v[1] for v in vals if v[1] is not None]
            got[_name(kind, 1)] = (sum(v[0] for v in vals) / len(vals), sum(busy) / len(busy) if busy else None,
                                   sum(v[2] for v in vals) / len(vals))
        per_round.append(got)
        task.advance()
    names = list(per_round[0])

    def med(xs):
        xs = [v for v in xs if v is not None]
        return percentile(xs, 50) if xs else None

    def ratio_to(name, base):
        rs = sorted(rd[name][0] / rd[base][0] for rd in per_round if rd[base][0])
        return {"median": med(rs), "p25": percentile(rs, 25) if rs else None,
                "p75": percentile(rs, 75) if rs else None}

    def label(kind, n):
        return _name(kind, n)

    table = {}
    for name in names:
        table[name] = {"items_per_s": med([rd[name][0] for rd in per_round]),
                       "worker_cpus_busy": med([rd[name][1] for rd in per_round]),
                       "client_cpus_busy": med([rd[name][2] for rd in per_round])}
    scaling = {}
    for kind in KINDS:
        scaling[kind] = {}
        for n in CORES:
            rr = ratio_to(label(kind, n), label(kind, 1))
            t = table[label(kind, n)]
            scaling[kind][n] = {"items_per_s": t["items_per_s"], "ratio_to_1": rr["median"], "round_spread": rr,
                                "worker_cpus_busy": t["worker_cpus_busy"], "client_cpus_busy": t["client_cpus_busy"]}
    for kind in ("replicas", "DataParallel", DP_WINDOW):
        for n in CORES:
            hw = scaling["ceiling"][n]["ratio_to_1"]
            s = scaling[kind][n]
            s["efficiency_vs_hardware"] = s["ratio_to_1"] / hw if s["ratio_to_1"] and hw else None
            rr = ratio_to(label(kind, n), label("ceiling", n))
            s["ratio_to_ceiling_same_n"] = rr["median"]
    whole_vs_dp1 = ratio_to(WHOLE, _name("DataParallel", 1, 0))  # both on core 0
    asym = {kind: ratio_to(_name(kind, 1, one[-1]), _name(kind, 1, 0)) for kind in KINDS}
    task.finish(f"replicas 2 cores {fmt_ratio(scaling['replicas'][2]['ratio_to_1'])}, DataParallel 2 cores "
                f"{fmt_ratio(scaling['DataParallel'][2]['ratio_to_1'])}, hardware {fmt_ratio(scaling['ceiling'][2]['ratio_to_1'])}")

    # DataParallel's own cost on a call: a model with no compute, directly vs through DataParallel over one core.
    tiny = neuron_client.jit.load(paths["affine"])
    tiny.load_onto([0])
    dp_tiny = neuron_client.DataParallel(neuron_client.jit.load(paths["affine"]), device_ids=[0])
    chunks = batching.chunk_sizes(DP_BATCH, 4)

    def split_gather():
        parts = batching.split((x_batch,), chunks, 0)
        return batching.gather([c[0] for c in parts], 0)

    o_rounds = ctx.n_rounds(*OVERHEAD_ROUNDS)
    o_batch = OVERHEAD_BATCH[1] if ctx.quick else OVERHEAD_BATCH[0]
    om = interleave([Variant("direct", lambda: tiny(x_batch)), Variant("DataParallel", lambda: dp_tiny(x_batch)),
                     Variant("split+gather", split_gather)], o_rounds, o_batch, warmup=3, rng=ctx.rng)
    overhead = {k: v.summary() for k, v in om.items()}
    overhead["dp_extra_p50_us"] = overhead["DataParallel"]["p50_us"] - overhead["direct"]["p50_us"]
    overhead["input_bytes"] = x_batch.numel() * 4
    for m in list(replicas.values()) + [whole, tiny]:
        m.unload()
    for dp in list(dps.values()) + [dp_tiny]:
        dp.module.unload()

    res.figures["throughput"] = {
        "model": f"conv net ({CHANNELS} channels, {IMAGE}x{IMAGE} images), traced with {PIECE} rows",
        "rounds": rounds, "seconds_per_case": seconds, "client_threads": CLIENT_THREADS, "dp_batch": DP_BATCH,
        "host_cpus": host_cpus, "core_cpus": core_cpus, "cases": table, "scaling": scaling,
        "per_round": [{name: {"items_per_s": v[0], "worker_cpus_busy": v[1], "client_cpus_busy": v[2]}
                       for name, v in rd.items()} for rd in per_round],
        "whole_batch_over_dp1": whole_vs_dp1, "dp_overhead": overhead, "core1_over_core0_alone": asym}
    _report_throughput(res, scaling, table, whole_vs_dp1, overhead, core_cpus, host_cpus, asym, ctx.quick)
    res.plots.append(Plot("scaling_throughput.png", "Throughput over cores, as a ratio to 1 core",
                          lambda plt, path: _draw_throughput(plt, path, scaling, len(host_cpus))))


def _report_throughput(res, scaling, table, whole_vs_dp1, overhead, core_cpus, host_cpus, asym,
                       quick: bool = False) -> None:
    L = res.lines
    ncpu = len(host_cpus)
    L += ["### (a) Throughput over cores", "",
          f"A conv net ({CHANNELS} channels, {IMAGE}x{IMAGE} images, about "
          f"{1e3 / (table[_name('replicas', 1)]['items_per_s'] / PIECE):.1f} ms per call of {PIECE} rows on one core) "
          f"on a broker of {BROKER_CORES} cores over this machine's {ncpu} CPUs; each worker runs torch with one "
          f"thread. Core to CPUs: {', '.join(f'{c}: {v}' for c, v in core_cpus.items())}. **Replicas**: "
          f"{CLIENT_THREADS} client threads calling a model replicated over N cores. **DataParallel**: batches of "
          f"{DP_BATCH} items split over N cores (pieces of {PIECE}). **In-process ceiling**: N processes pinned like "
          "the workers of cores 0..N-1 running the traced piece without the runtime: what the hardware gives, the "
          "baseline for the efficiency column. The 1-core figures are the mean of core 0 alone and core 1 alone "
          "(CPU 0 and CPU 1), measured in every round.", ""]
    a = asym["ceiling"]["median"]
    if a and abs(a - 1) > 0.1:
        L += [f"_The CPUs are not equally available: alone, a process on core 1's CPU ran {fmt_ratio(a)} as fast as "
              f"one on core 0's (workers: {fmt_ratio(asym['replicas']['median'])}); other users' brokers put their "
              "core 0 on CPU 0 too. Hence the averaged 1-core baseline; the hardware ceiling for 2 cores then can "
              "exceed 2x of it._", ""]
    if BROKER_CORES > ncpu:
        L += [f"**{BROKER_CORES} cores on {ncpu} CPUs**: cores beyond the first {ncpu} share CPUs with them "
              f"(two workers time-slice each CPU), so {BROKER_CORES} cores cannot beat {ncpu}: the "
              f"{BROKER_CORES}-core rows measure what oversubscription costs (context switches, caches shared by "
              "two workers), not scaling. The ceiling processes are pinned the same way and show the hardware's "
              "own answer.", ""]
    rows = []
    for kind, title in (("replicas", "replicas"), ("DataParallel", "DataParallel"),
                        (DP_WINDOW, f"DataParallel, {WINDOW} batches in flight (submit)"),
                        ("ceiling", "in-process ceiling")):
        for n in CORES:
            s = scaling[kind][n]
            rows.append([title, n, f"{s['items_per_s']:,.0f}", fmt_ratio(s["ratio_to_1"]),
                         f"{s['round_spread']['p25']:.2f}-{s['round_spread']['p75']:.2f}" if s["round_spread"][
                             "p25"] else "-",
                         fmt_ratio(s.get("efficiency_vs_hardware")) if kind != "ceiling" else "-",
                         f"{s['worker_cpus_busy']:.2f}" if s["worker_cpus_busy"] is not None else "-",
                         f"{s['client_cpus_busy']:.2f}" if kind != "ceiling" else "-"])
    L += md_table(["case", "cores", "items/s", "vs 1 core", "round spread", "efficiency vs hardware",
                   "worker CPUs busy", "client CPUs busy"], rows)
    w = table[WHOLE]["items_per_s"]
    L += ["", "Efficiency vs hardware = (N cores / 1 core) / (N ceiling processes / 1 process): 1.00x means the "
          "runtime scales exactly as far as the machine does. \"CPUs busy\": CPU seconds the case's workers, and "
          "this process (the client), used per second of wall time (a shortfall with busy workers is the host's, "
          "with idle workers the runtime's).", "",
          f"One call of the whole batch (traced with {DP_BATCH} rows) on core 0: {w:,.0f} items/s, "
          f"{fmt_ratio(whole_vs_dp1['median'])} of DataParallel on that core (four pieces of {PIECE}).", "",
          f"DataParallel's own cost per call (a model with no compute, {overhead['input_bytes'] / 1e6:.1f} MB input): "
          f"a direct call p50 {fmt_us(overhead['direct']['p50_us'])}, through DataParallel over one core "
          f"{fmt_us(overhead['DataParallel']['p50_us'])} (+{fmt_us(overhead['dp_extra_p50_us'])}); the in-process "
          f"split + gather of the batch into 4 chunks {fmt_us(overhead['split+gather']['p50_us'])}.", ""]
    if 2 in scaling[DP_WINDOW]:
        win, fj = scaling[DP_WINDOW][2], scaling["DataParallel"][2]
        met = verdict(None if win["ratio_to_1"] is None else win["ratio_to_1"] >= TARGET_DP_2_CORES, quick)
        L += [f"Target: DataParallel over 2 cores vs 1, from one caller, >= {TARGET_DP_2_CORES}x: with {WINDOW} "
              f"batches in flight (`submit`) {fmt_ratio(win['ratio_to_1'])} (round spread "
              f"{fmt_spread(win['round_spread'])}) {met}; one batch at a time (fork-join) "
              f"{fmt_ratio(fj['ratio_to_1'])}; the hardware {fmt_ratio(scaling['ceiling'][2]['ratio_to_1'])}.", ""]
        res.figures["dp_window_target"] = {"goal": TARGET_DP_2_CORES, "window": WINDOW,
                                           "ratio_to_1": win["ratio_to_1"], "fork_join_ratio_to_1": fj["ratio_to_1"]}
    for kind in ("replicas", "DataParallel", DP_WINDOW):
        s1, s2 = scaling[kind][1], scaling[kind][2]
        eff = s2.get("efficiency_vs_hardware")
        if eff is None or eff >= 0.9:
            continue
        text = (f"_{kind} at 2 cores reaches {fmt_ratio(s2['ratio_to_1'])} of 1 core where the hardware gives "
                f"{fmt_ratio(scaling['ceiling'][2]['ratio_to_1'])} (efficiency {fmt_ratio(eff)}). ")
        b1, b2 = s1.get("worker_cpus_busy"), s2.get("worker_cpus_busy")
        if b1 and b2:
            c1, c2 = b1 / s1["items_per_s"] * 1e3 * PIECE, b2 / s2["items_per_s"] * 1e3 * PIECE
            cl = s2["client_cpus_busy"] / s2["items_per_s"] * 1e3 * PIECE
            text += (f"Where the time goes: the two workers were busy {b2:.2f} CPUs (one worker alone: {b1:.2f}), "
                     f"at {c2:.2f} ms of worker CPU per {PIECE}-row piece (alone: {c1:.2f} ms), and the client "
                     f"{s2['client_cpus_busy']:.2f} CPUs ({cl:.2f} ms per piece), out of {ncpu}. ")
            if c2 > 1.15 * c1:
                text += ("Each piece cost the workers more CPU than on one core: the two workers slow each other "
                         "down (shared caches and memory bandwidth, or a host that does not give two vCPUs two "
                         "cores' worth of time).")
            elif kind == "DataParallel":
                text += ("Per piece the workers did about the same work, but they waited part of the time: each "
                         "DataParallel call from the one caller is a fork-join (split, send both chunks, wait for "
                         "the slower core, gather), so both workers idle between calls and the faster one idles "
                         f"until the slower finishes; and the client and this machine's other load share the {ncpu} "
                         "CPUs with them. The ceiling processes pay none of this. More callers in flight (or "
                         "larger batches) would hide the gaps.")
            else:
                text += (f"Per piece the workers did about the same work, but they waited for calls part of the "
                         f"time: the client (its threads, one interpreter lock) and this machine's other load share "
                         f"the {ncpu} CPUs with them, and the ceiling processes pay neither.")
        L += [text + "_", ""]


def _draw_throughput(plt, path, scaling, ncpu) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.6))
    styles = {"replicas": ("tab:red", "o-", "replicas (8 client threads)"),
              "DataParallel": ("tab:blue", "s-", f"DataParallel (batch {DP_BATCH})"),
              DP_WINDOW: ("tab:cyan", "d-", f"DataParallel, {WINDOW} in flight (submit)"),
              "ceiling": ("tab:gray", "^--", "in-process ceiling (hardware)")}
    for kind, (color, style, lab) in styles.items():
        ys = [scaling[kind][n]["ratio_to_1"] for n in CORES]
        lo = [scaling[kind][n]["round_spread"]["p25"] or y for n, y in zip(CORES, ys)]
        hi = [scaling[kind][n]["round_spread"]["p75"] or y for n, y in zip(CORES, ys)]
        ax.plot(CORES, ys, style, color=color, label=lab)
        ax.fill_between(CORES, lo, hi, color=color, alpha=0.12)
    ax.plot(CORES, CORES, ":", color="black", alpha=0.5, label="linear")
    ax.axhline(ncpu, color="tab:green", linestyle="-.", alpha=0.6, label=f"{ncpu} CPUs on this machine")
    if max(CORES) > ncpu:
        ax.axvspan(ncpu, max(CORES), color="tab:orange", alpha=0.07)
        ax.text(max(CORES) - 0.05, ncpu + 0.6, f"more cores than CPUs:\ncores share the {ncpu} CPUs", fontsize=8,
                color="tab:orange", va="center", ha="right")
    ax.set_xticks(list(CORES))
    ax.set_xlabel("cores")
    ax.set_ylabel("throughput / throughput on 1 core (items/s ratio)")
    ax.set_ylim(0, max(CORES) + 0.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Throughput scaling with cores\n(median of per-round ratios; band: 25th-75th percentile)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------------------
# (b) Open loop.


def _open_loop(model, x, rate: float, n: int, rng: random.Random) -> dict:
    """``n`` calls submitted at Poisson arrivals of ``rate`` per second; latencies from the scheduled arrivals."""
    gaps = [rng.expovariate(rate) for _ in range(n)]
    lat = [None] * n
    lag = [0.0] * n
    done = threading.Event()
    left = [n]
    lock = threading.Lock()
    pc = time.perf_counter

    def finished(fut, i, sched):
        lat[i] = pc() - sched
        with lock:
            left[0] -= 1
            if not left[0]:
                done.set()

    t0 = pc() + 0.005
    at = t0
    for i in range(n):
        at += gaps[i]
        delay = at - pc()
        if delay > 0:  # no spinning: on a small machine a spinning sender takes CPU from the workers
            time.sleep(delay)
        lag[i] = pc() - at
        fut = model.submit(x)
        fut.add_done_callback(lambda f, i=i, s=at: finished(f, i, s))
    if not done.wait(600):
        raise RuntimeError("open-loop calls did not finish within 600 s")
    errors = sum(1 for v in lat if v is None)
    end = max(at + v for v in lat if v is not None)
    samples = [int(v * 1e9) for v in lat if v is not None]
    return {"offered_per_s": rate, "calls": n, "errors": errors, "span_s": at - t0,
            "achieved_per_s": n / (end - t0), **summarize(samples),
            "sender_lag_p99_us": percentile(lag, 99) * 1e6, "samples_ms": [s / 1e6 for s in samples]}


def _unloaded(model, x, calls: int) -> dict:
    """One call at a time through the same submit path: the latency without queueing."""
    out = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        model.submit(x).result()
        out.append(time.perf_counter_ns() - t0)
    return summarize(out)


def _part_open_loop(ctx, rt, res) -> None:
    import torch

    import neuron_client
    from neuron_client.experimental import neuron_cores_context

    p = ctx.progress
    path = str(ctx.tmp / "scaling" / "conv-piece.pt")
    x = torch.rand(*_shape(PIECE))
    quick = ctx.quick
    fractions = LOAD_FRACTIONS[1 if quick else 0]
    secs, min_n = SECONDS_PER_RATE[1 if quick else 0], MIN_REQUESTS[1 if quick else 0]
    rng = random.Random(ctx.rng.random())
    configs = {}
    load_configs = LOAD_CONFIGS[1 if quick else 0]
    task = p.task(f"(b) open loop, {len(fractions)} rates x {len(load_configs)} configuration(s)",
                  len(fractions) * len(load_configs))
    pool = Pool(CLIENT_THREADS)
    for n in load_configs:
        with neuron_cores_context(start_nc=0, nc_count=n):
            model = neuron_client.jit.load(path)
        for _ in range(5):
            model.submit(x).result()
        cap = pool.rate(lambda: model(x), CAPACITY_SECONDS[1 if quick else 0])
        before = _unloaded(model, x, UNLOADED_CALLS[1 if quick else 0])
        points = []
        for f in fractions:
            rate = f * cap
            calls = max(min_n, int(rate * secs))
            pt = _open_loop(model, x, rate, calls, rng)
            pt["fraction_of_capacity"] = f
            points.append(pt)
            task.advance()
        after = _unloaded(model, x, UNLOADED_CALLS[1 if quick else 0])
        model.unload()
        unloaded_p50 = percentile([before["p50_us"], after["p50_us"]], 50)
        limit_us = BREAK_FACTOR * unloaded_p50
        for pt in points:
            pt["p99_over_unloaded_p50"] = pt["p99_us"] / unloaded_p50
            pt["p50_over_unloaded_p50"] = pt["p50_us"] / unloaded_p50
        over = [pt["p99_us"] > limit_us for pt in points]
        broke = next((pt for pt in points if pt["p99_us"] > limit_us), None)
        for_good = next((points[i] for i in range(len(points)) if all(over[i:])), None)
        held = [pt for pt in points if pt["p99_us"] <= limit_us and (broke is None or pt["offered_per_s"] <
                                                                      broke["offered_per_s"])]
        configs[n] = {"cores": n, "capacity_per_s": cap, "unloaded_before": before, "unloaded_after": after,
                      "unloaded_p50_us": unloaded_p50, "break_limit_us": limit_us, "points": points,
                      "break_rate_per_s": broke["offered_per_s"] if broke else None,
                      "break_fraction": broke["fraction_of_capacity"] if broke else None,
                      "break_for_good_rate_per_s": for_good["offered_per_s"] if for_good else None,
                      "break_for_good_fraction": for_good["fraction_of_capacity"] if for_good else None,
                      "last_held_rate_per_s": held[-1]["offered_per_s"] if held else None,
                      "last_held_fraction": held[-1]["fraction_of_capacity"] if held else None}
    pool.close()
    task.finish()
    res.figures["open_loop"] = {"break_factor": BREAK_FACTOR, "fractions": fractions, "seconds_per_rate": secs,
                                "min_calls_per_rate": min_n, "configs": configs}
    _report_open_loop(res, configs)
    res.plots.append(Plot("scaling_open_loop.png", "Latency against offered load (open loop, Poisson arrivals)",
                          lambda plt, path: _draw_open_loop(plt, path, configs)))


def _report_open_loop(res, configs) -> None:
    L = res.lines
    L += ["### (b) Latency against offered load (open loop)", "",
          "Calls of the same model (one piece of 16 rows) submitted with `model.submit` at Poisson arrivals; the "
          f"offered rate is a fraction of the configuration's capacity, its closed-loop throughput with "
          f"{CLIENT_THREADS} client threads measured right before its sweep. "
          "Latency runs from each call's scheduled arrival to its result. Unloaded p50: one call at a time through "
          "`submit`, just before and after the sweep. The p99 \"breaks\" when it exceeds "
          f"{BREAK_FACTOR:g}x the unloaded p50.", ""]
    summary = []
    for n, c in configs.items():
        brk = (f"{c['break_rate_per_s']:.0f}/s ({c['break_fraction']:.2f} of capacity)" if c["break_rate_per_s"]
               else f"not within the rates tried (up to {c['points'][-1]['offered_per_s']:.0f}/s)")
        good = (f"{c['break_for_good_rate_per_s']:.0f}/s ({c['break_for_good_fraction']:.2f} of capacity)"
                if c["break_for_good_rate_per_s"] else "-")
        summary.append([f"{n} core{'s' if n > 1 else ''}", f"{c['capacity_per_s']:.0f}/s",
                        fmt_us(c["unloaded_p50_us"]), fmt_us(c["break_limit_us"]), brk, good])
    L += md_table(["configuration", "capacity", "unloaded p50", f"p99 limit ({BREAK_FACTOR:g}x)",
                   "p99 first above the limit at", "p99 above the limit from here on"], summary)
    L += [""]
    rows = []
    for n, c in configs.items():
        for pt in c["points"]:
            rows.append([f"{n} core{'s' if n > 1 else ''}", f"{pt['offered_per_s']:.0f}/s",
                         f"{pt['fraction_of_capacity']:.2f}", f"{pt['achieved_per_s']:.0f}/s", fmt_us(pt["p50_us"]),
                         fmt_us(pt["p99_us"]), fmt_ratio(pt["p50_over_unloaded_p50"]),
                         fmt_ratio(pt["p99_over_unloaded_p50"]), fmt_us(pt["sender_lag_p99_us"]), pt["n"]])
    L += md_table(["configuration", "offered", "of capacity", "achieved", "p50", "p99", "p50 / unloaded p50",
                   "p99 / unloaded p50", "sender lag p99", "calls"], rows)
    L += ["", "Where the time goes as the load rises: below capacity the extra latency is queueing behind calls "
          "already in the worker (M/D/1-like: the p99 grows as 1/(1-load)); at and above capacity the queue grows "
          "for as long as the rate lasts, so p99 is set by the run's length. \"sender lag\" is how late the client "
          "submitted against the schedule (it counts in the latency): a large lag means the client itself was "
          "short of CPU.", ""]


def _draw_open_loop(plt, path, configs) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {1: "tab:red", 2: "tab:blue", 4: "tab:purple"}
    for n, c in configs.items():
        color = colors.get(n, "black")
        xs = [pt["offered_per_s"] for pt in c["points"]]
        lab = f"{n} core{'s' if n > 1 else ''}"
        a1.plot(xs, [pt["p50_us"] / 1e3 for pt in c["points"]], "o-", color=color, label=f"{lab} p50")
        a1.plot(xs, [pt["p99_us"] / 1e3 for pt in c["points"]], "s--", color=color, alpha=0.7, label=f"{lab} p99")
        a1.axhline(c["break_limit_us"] / 1e3, color=color, linestyle=":", alpha=0.6,
                   label=f"{lab}: {BREAK_FACTOR:g}x unloaded p50")
        a1.axvline(c["capacity_per_s"], color=color, linestyle="-.", alpha=0.3)
        fr = [pt["fraction_of_capacity"] for pt in c["points"]]
        a2.plot(fr, [pt["p99_over_unloaded_p50"] for pt in c["points"]], "s--", color=color, label=f"{lab} p99")
        a2.plot(fr, [pt["p50_over_unloaded_p50"] for pt in c["points"]], "o-", color=color, alpha=0.7,
                label=f"{lab} p50")
    a1.set_yscale("log")
    a1.set_xlabel("offered rate (calls/s, Poisson); dash-dot: capacity")
    a1.set_ylabel("latency (ms, log)")
    a1.set_title("Latency against offered rate")
    a1.grid(which="both", alpha=0.3)
    a1.legend(fontsize=7)
    a2.axhline(BREAK_FACTOR, color="black", linestyle=":", label=f"p99 limit ({BREAK_FACTOR:g}x)")
    a2.axvline(1.0, color="gray", linestyle="-.", alpha=0.5)
    a2.set_yscale("log")
    for ax in (a1, a2):
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    a2.set_xlabel("offered load (fraction of measured capacity)")
    a2.set_ylabel("latency / unloaded p50 (log)")
    a2.set_title("Normalised: latency in unloaded p50s")
    a2.grid(which="both", alpha=0.3)
    a2.legend(fontsize=7)
    fig.suptitle(f"Open-loop load on a conv net ({PIECE} rows per call)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _notes(res, broker) -> None:
    res.notes += [
        "Throughput cases run interleaved: each round runs every case for the same time in a rotating order, and a "
        "ratio is the median of the per-round ratios (the round spread is their 25th-75th percentile).",
        "The broker's workers and the ceiling processes run with glibc's malloc thresholds fixed ("
        + ", ".join(f"`{k}={int(v) >> 20} MiB`" for k, v in TUNED_MALLOC.items()) + "): with the defaults a "
        "process's speed on this model depends on what it freed before (a worker that had once run the whole batch "
        "of 64 computed pieces 2-3x faster than a fresh one, which faults the activations in again on every call; "
        "see section 2), and the ratios would depend on the order of the cases.",
        "The ceiling processes are started with multiprocessing's spawn method and pinned with "
        "`sched_setaffinity` to the CPU the broker gives each core (`worker.backends.cpus_for_core`); they start "
        "their timed loops at the same instant.",
        "Open loop: the gaps are drawn in advance from an exponential distribution; the sender sleeps until each "
        "arrival and submits; a call's latency runs from its scheduled arrival to the moment its future completes "
        "(a done-callback), so a sender that falls behind does not hide queueing (no coordinated omission). "
        "`model.submit` runs calls on the runtime's thread pool (4 threads per owned core + 4); calls beyond that "
        "wait in the pool's queue, which counts in the latency as it would for an application.",
        "Each rate runs for a fixed time or a minimum number of calls, whichever is longer; above capacity the "
        "backlog, and so the p99, grows with that time.",
    ]
