"""Section batcher: many callers, one model, through ``neuron_client.batched``.

32 callers in this process each send batch-1 requests one after the other (a closed loop) to one model with a
replica on each of 1 or 2 cores: threads calling the model, or asyncio tasks of one event loop awaiting ``acall``
(the example server's way; the MLP is measured both ways). Variants, run interleaved in rounds on the same cores:

* **no batcher**: each caller calls the model (traced with batch 1) itself; the replicas serve round-robin;
* **batcher, delay D** for D in 0, 100 µs, 1 ms, 5 ms: each caller calls ``neuron_client.batched(model,
  max_queue_delay_us=D)`` of the same model traced with batch B (requests padded up to it);
* **in-process** (the ceiling of one core): the graph of the batch-B file run in this process, one batch of B after
  the other, with the workers' thread count (one), in the same rounds.

Models: a small compute-bound MLP (256 -> 512 -> 256, B = 32) and all-MiniLM-L6-v2 + mean pooling (sequence 32,
B = 16). ``--quick``: the MLP only, threads only, one short round. Figures: requests per second, p50/p99 latency of
a request, the mean batch size, and an execution's mean time through the runtime (``compute_s / executions`` of the
batcher's counters: dispatch, transfer and the model) against the in-process time of the same batch-B call, and
against that call made through the runtime from one thread without the batcher (**runtime, 1 caller, batch B**).

Goals: for the small model, >= 3x the unbatched throughput at a p99 no worse than unbatched's (the best delay that
keeps it); and an execution within 1.2x of the in-process time of the same batch.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time

from .harness import BenchError, Plot, SectionResult, fmt_ratio, md_table, percentile, ratio, verdict

CALLERS = 32
DELAYS_US = (0, 100, 1000, 5000)
ROUNDS = (3, 1)  # full, quick
PER_CALLER = (12, 2)  # requests per caller per round
INPROC_CALLS = 10  # in-process batch-B calls per round
THROUGHPUT_GOAL = 3.0
EXECUTION_GOAL = 1.2
NONE = "no batcher"
INPROC = "in-process, batch B"
DIRECT = "runtime, 1 caller, batch B"
THREADS = "threads"
ASYNC = "asyncio tasks"


def batcher_name(delay_us: int) -> str:
    return f"batcher, delay {delay_us} us" if delay_us < 1000 else f"batcher, delay {delay_us // 1000} ms"


def _mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).eval()


def trace_models(work: str, quick: bool, progress) -> list[dict]:
    """Per model: its files traced at batch 1 and at batch B, and a batch-1 request maker."""
    import torch

    import neuron_client

    out = []
    mlp = _mlp()
    files = {}
    for b in (1, 32):
        path = os.path.join(work, f"mlp-b{b}.pt")
        torch.jit.save(neuron_client.trace(mlp, torch.rand(b, 256)), path)
        files[b] = path
    out.append({"name": "small MLP", "b": 32, "files": files, "request": lambda i: (torch.rand(1, 256),),
                "callers": (THREADS, ASYNC)})
    if quick:
        return out
    try:
        from . import e2e

        tok, bert = e2e.load_minilm()
    except BenchError as exc:
        progress.note(f"all-MiniLM-L6-v2 left out: {exc}")
        return out
    import warnings

    embedder = e2e._embedder_class()(bert).eval()
    files = {}
    for b in (1, 16):
        x = e2e.encode(tok, batch=b, seq=32)
        path = os.path.join(work, f"minilm-b{b}.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(neuron_client.trace(embedder, x), path)
        files[b] = path
    one = e2e.encode(tok, batch=1, seq=32)
    out.append({"name": "all-MiniLM-L6-v2", "b": 16, "files": files, "request": lambda i: one, "callers": (THREADS,)})
    progress.note("traced the MLP at batch 1 and 32, all-MiniLM-L6-v2 (sequence 32) at batch 1 and 16")
    return out


def closed_loop_async(obj, requests: list, per_caller: int) -> tuple[list[float], float]:
    """``CALLERS`` asyncio tasks of one event loop, each awaiting ``per_caller`` calls (``obj.acall``) one after the
    other; (latencies in s, wall s)."""
    import asyncio

    lat: list[float] = []

    async def caller(i):
        for k in range(per_caller):
            x = requests[(i * per_caller + k) % len(requests)]
            t0 = time.perf_counter()
            await obj.acall(*x)
            lat.append(time.perf_counter() - t0)

    async def main():
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*[caller(i) for i in range(CALLERS)]), 600)
        return time.perf_counter() - t0

    return lat, asyncio.run(main())


def closed_loop(pool, call, requests: list, per_caller: int) -> tuple[list[float], float]:
    """``CALLERS`` callers, each making ``per_caller`` calls one after the other; (latencies in s, wall s)."""
    lat: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(CALLERS + 1)

    def caller(i):
        mine = []
        start.wait(60)
        for k in range(per_caller):
            x = requests[(i * per_caller + k) % len(requests)]
            t0 = time.perf_counter()
            call(*x)
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    futures = [pool.submit(caller, i) for i in range(CALLERS)]
    start.wait(60)
    t0 = time.perf_counter()
    for f in futures:
        f.result(600)
    return lat, time.perf_counter() - t0


def measure(ctx, spec: dict, cores: int, kind: str, pool, rounds: int, per_caller: int) -> dict:
    import torch

    import neuron_client
    from neuron_client.experimental import neuron_cores_context
    from neuron_client.tracing.script import load_here

    with neuron_cores_context(start_nc=0, nc_count=cores):
        single = neuron_client.jit.load(spec["files"][1])
        full = neuron_client.jit.load(spec["files"][spec["b"]])
    servers = {batcher_name(d): neuron_client.batched(full, max_queue_delay_us=d) for d in DELAYS_US}
    variants = {NONE: single, **servers}
    requests = [spec["request"](i) for i in range(64)]
    stats = {name: {"lat": [], "wall": 0.0, "n": 0} for name in variants}
    local = load_here(spec["files"][spec["b"]]).eval()
    xb = full_batch(spec, requests)
    inproc_times: list[float] = []

    direct_times: list[float] = []

    def inprocess():
        """The in-process variant: batch-B calls with a worker's thread count (one), timed one by one."""
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                timed(lambda: local(*xb), inproc_times)
        finally:
            torch.set_num_threads(prev)

    def direct():
        """The same batch-B calls through the runtime from one thread, without the batcher: its own round trip."""
        timed(lambda: full(*xb), direct_times)

    extra = {INPROC: inprocess, DIRECT: direct}

    task = ctx.progress.task(f"{spec['name']}, {cores} core(s), {kind}", rounds)
    try:
        for name, fn in variants.items():  # warm-up: every replica has run each
            closed_loop(pool, fn, requests, 1)
        for fn in extra.values():
            fn()
        inproc_times.clear()
        direct_times.clear()
        base = {name: s.stats() for name, s in servers.items()}
        for _ in range(rounds):
            order = list(variants) + list(extra)
            ctx.rng.shuffle(order)
            for name in order:
                if name in extra:
                    extra[name]()
                    continue
                if kind == ASYNC:
                    lat, wall = closed_loop_async(variants[name], requests, per_caller)
                else:
                    lat, wall = closed_loop(pool, variants[name], requests, per_caller)
                st = stats[name]
                st["lat"] += lat
                st["wall"] += wall
                st["n"] += len(lat)
            task.advance()
        counters = {name: s.stats() for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.close()
        single.unload()
        full.unload()
    inproc_s = percentile(inproc_times, 50)
    task.finish()
    out = {}
    for name, st in stats.items():
        lat = sorted(st["lat"])
        row = {"rps": st["n"] / st["wall"], "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
               "requests": st["n"]}
        if name in counters:
            c, b0 = counters[name], base[name]
            execs = c.executions - b0.executions
            row.update(executions=execs, mean_batch=(c.rows - b0.rows) / execs if execs else None,
                       execution_ms=(c.compute_s - b0.compute_s) / execs * 1e3 if execs else None,
                       queue_ms=(c.queue_s - b0.queue_s) / max(1, c.served - b0.served) * 1e3)
            row["execution_vs_inproc"] = ratio(row["execution_ms"], inproc_s * 1e3)
        out[name] = row
    direct_s = percentile(direct_times, 50)
    for row in out.values():
        if row.get("execution_ms"):
            row["execution_vs_direct"] = ratio(row["execution_ms"], direct_s * 1e3)
    out[DIRECT] = {"rps": spec["b"] / direct_s, "batch_ms": direct_s * 1e3,
                   "execution_vs_inproc": ratio(direct_s, inproc_s)}
    out[INPROC] = {"rps": spec["b"] / inproc_s, "batch_ms": inproc_s * 1e3, "note": "one core's ceiling"}
    for name, row in out.items():
        row["rps_vs_unbatched"] = ratio(row["rps"], out[NONE]["rps"])
        if "p99_ms" in row:
            row["p99_vs_unbatched"] = ratio(row["p99_ms"], out[NONE]["p99_ms"])
    return out


def timed(fn, into: list) -> None:
    for _ in range(INPROC_CALLS):
        t0 = time.perf_counter()
        fn()
        into.append(time.perf_counter() - t0)


def full_batch(spec: dict, requests: list) -> tuple:
    """B of the requests, concatenated: the batch-B call an execution makes."""
    from neuron_client.models import batching

    return tuple(batching.gather([requests[i % len(requests)] for i in range(spec["b"])], 0))


def run(ctx) -> SectionResult:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from .harness import client_of

    res = SectionResult("batcher", "9. Many callers, one model: the request batcher")
    work = ctx.tmp / "batcher"
    work.mkdir(exist_ok=True)
    rounds = ctx.n_rounds(*ROUNDS)
    per_caller = PER_CALLER[1] if ctx.quick else PER_CALLER[0]
    specs = trace_models(str(work), ctx.quick, ctx.progress)
    results: dict = {}
    prev_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, prev_threads)
        broker = ctx.start_broker("batcher", 2)
        stack.callback(broker.stop)
        pool = ThreadPoolExecutor(max_workers=CALLERS, thread_name_prefix="bench-caller")
        stack.callback(pool.shutdown)
        with client_of(broker, "0-1"):
            for spec in specs:
                for cores in (1, 2):
                    for kind in spec["callers"][:1] if ctx.quick else spec["callers"]:  # quick: threads only
                        results[f"{spec['name']}, {cores} core{'s' if cores > 1 else ''}, {kind}"] = measure(
                            ctx, spec, cores, kind, pool, rounds, per_caller)
    goals = _goals(results)
    res.figures.update(setup={"callers": CALLERS, "delays_us": list(DELAYS_US), "rounds": rounds,
                              "requests_per_caller_per_round": per_caller,
                              "traced_batch": {s["name"]: s["b"] for s in specs}},
                       results=results, goals=goals)
    _report(res, results, goals)
    res.plots.append(Plot("batcher_throughput_latency.png", "Throughput against p99 latency, per batcher setting",
                          lambda plt, path: _draw(plt, path, results)))
    return res


def _goals(results: dict) -> dict:
    out = {}
    for key, rows in results.items():
        if not key.startswith("small MLP"):
            continue
        fair = [(name, r) for name, r in rows.items() if name.startswith("batcher")
                and r["p99_vs_unbatched"] is not None and r["p99_vs_unbatched"] <= 1.0]
        best = max(fair, key=lambda nr: nr[1]["rps_vs_unbatched"], default=None)
        value = best[1]["rps_vs_unbatched"] if best else None
        out[f"throughput, {key}"] = {"what": "best batcher throughput / unbatched, at a p99 <= unbatched's",
                                     "setting": best[0] if best else None, "value": value,
                                     "goal": f">= {THROUGHPUT_GOAL}x",
                                     "met": None if value is None else value >= THROUGHPUT_GOAL}
    for key, rows in results.items():
        ex = [r["execution_vs_inproc"] for name, r in rows.items()
              if name.startswith("batcher") and r.get("execution_vs_inproc") is not None]
        value = min(ex) if ex else None
        out[f"execution, {key}"] = {"what": "an execution's time through the runtime / in-process time of the "
                                            "same batch (the best setting)", "value": value,
                                    "goal": f"<= {EXECUTION_GOAL}x",
                                    "met": None if value is None else value <= EXECUTION_GOAL}
    return out


def _report(res: SectionResult, results: dict, goals: dict) -> None:
    L = res.lines
    L.append(f"{CALLERS} callers (threads, or asyncio tasks of one event loop: `model.acall` without the batcher, "
             "`served.acall` with it), each sending batch-1 requests one after the other. Every ratio compares "
             "variants measured interleaved in the same run; absolute figures are for context.")
    L.append("")
    L += md_table(["goal", "setting", "value", "goal", "verdict"],
                  [[k, g.get("setting") or "-", fmt_ratio(g["value"]), g["goal"], verdict(g["met"])]
                   for k, g in goals.items()])
    for key, rows in results.items():
        L.append("")
        L.append(f"**{key}**")
        L.append("")
        table = []
        for name, r in rows.items():
            table.append([name, f"{r['rps']:.0f}", fmt_ratio(r.get("rps_vs_unbatched")),
                          f"{r['p50_ms']:.2f}" if "p50_ms" in r else "-",
                          f"{r['p99_ms']:.2f}" if "p99_ms" in r else "-", fmt_ratio(r.get("p99_vs_unbatched")),
                          f"{r['mean_batch']:.1f}" if r.get("mean_batch") else "-",
                          f"{r['queue_ms']:.2f}" if r.get("queue_ms") is not None else "-",
                          f"{r['execution_ms']:.2f}" if r.get("execution_ms") else
                          (f"{r['batch_ms']:.2f}" if "batch_ms" in r else "-"),
                          fmt_ratio(r.get("execution_vs_inproc")), fmt_ratio(r.get("execution_vs_direct"))])
        L += md_table(["variant", "req/s", "vs unbatched", "p50 ms", "p99 ms", "p99 vs unbatched", "mean batch",
                       "queue ms", "execution ms", "execution vs in-process", "execution vs runtime call"], table)
    missed = [k for k, g in goals.items() if g["met"] is False]
    if missed:
        L.append("")
        L.append("Where the time goes when a goal is missed: an execution through the runtime is one call of the "
                 "batch through the runtime (compare its time with the '" + DIRECT + "' row: the same batch-B call "
                 "from one thread without the batcher), so it pays the round trip to the worker and back (the "
                 "dispatch section) on top of the model's own time, which dominates a model as small as the MLP; on "
                 "a host with few CPUs the 32 caller threads, the lane threads and the workers also compete for the "
                 "same CPUs, which the in-process baseline does not pay. Missed: " + ", ".join(missed) + ".")


def _draw(plt, path, results: dict) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, rows in results.items():
        names = [n for n in rows if "p99_ms" in rows[n]]
        xs = [rows[n]["p99_ms"] for n in names]
        ys = [rows[n]["rps_vs_unbatched"] for n in names]
        line, = ax.plot(xs, ys, marker="o", label=key)
        for n, x, y in zip(names, xs, ys):
            ax.annotate(n.replace("batcher, delay ", ""), (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("p99 latency of a request (ms, log)")
    ax.set_ylabel("throughput / unbatched throughput (same cores)")
    ax.set_title(f"{CALLERS} callers of batch-1 requests: no batcher vs batcher delays")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
