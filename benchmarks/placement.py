"""Section 3, placement: what placing models on cores buys.

(a) N threads calling one model replicated over N cores, against the same threads calling it on one core
    (throughput ratio; the cores are pinned to distinct CPUs).
(b) loading four models with ``async_load`` (concurrently, in the background) against one after another (wall-time
    ratio), and a ``lazy_load`` model against a plain one: the time until ``jit.load`` returns (the lazy one defers
    its load, so this is no speed-up) and until its first call's result (load and first call, both variants).
(c) seed 004's LSTM ensemble, scaled down: forked members (``torch.jit.fork``) against sequential ones inside one core
    with two CPUs, and the members spread over two cores with futures against all on one core.
Variants alternate round by round.
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from neuron_client.examples.lstm_ensemble import BiLSTM, LSTMEnsemble as Ensemble
from neuron_client.examples.matmul_chain import MatmulChain

from .harness import SectionResult, client_of, fmt_ratio, md_table, percentile, vs

ROUNDS = (8, 2)


def _save(module, example, path: str, lazy: bool = False, asynchronous: bool = False) -> str:
    import neuron_client

    traced = neuron_client.trace(module, example)
    if lazy:
        neuron_client.lazy_load(traced)
    if asynchronous:
        neuron_client.async_load(traced)
    torch.jit.save(traced, path)
    return path


def _alternate(variants: dict, rounds: int, task=None) -> dict[str, list[float]]:
    """Seconds of each variant's run, the variants alternating (and swapping order) round by round."""
    out = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            variants[name]()
            out[name].append(time.perf_counter() - t0)
        if task is not None:
            task.advance()
    return out


def _median(xs) -> float:
    return percentile(xs, 50)


def run(ctx) -> SectionResult:
    import neuron_client
    from neuron_client.experimental import neuron_cores_context

    res = SectionResult("placement", "3. Placement: replicas over cores, asynchronous and lazy loading, fork/wait")
    rounds = ctx.n_rounds(*ROUNDS)
    tmp = str(ctx.tmp)
    cpus = len(os.sched_getaffinity(0))
    n = max(2, min(cpus, 4))
    # (a) replicas --------------------------------------------------------------------------------------------
    with contextlib.ExitStack() as stack:
        broker = ctx.start_broker("placement", cores=n)
        stack.callback(broker.stop)
        stack.enter_context(client_of(broker, f"0-{n - 1}"))
        x = torch.rand(64, 192)
        path = _save(MatmulChain(40, 192), x, os.path.join(tmp, "chain.pt"))
        with neuron_cores_context(start_nc=0, nc_count=1):
            one = neuron_client.jit.load(path)
        with neuron_cores_context(start_nc=0, nc_count=n):
            many = neuron_client.jit.load(path)
        calls = 16 if ctx.quick else 48
        pool = ThreadPoolExecutor(max_workers=n)

        def threads_on(model):
            return lambda: list(pool.map(lambda _: model(x), range(calls)))

        for m in (one, many):
            threads_on(m)()
        task = ctx.progress.task(f"(a) {n} threads, {n} replicas vs one core", rounds)
        t = _alternate({"1 core": threads_on(one), f"{n} replicas": threads_on(many)}, rounds, task)
        task.finish()
        pool.shutdown()
        speedup = _median(t["1 core"]) / _median(t[f"{n} replicas"])
        res.figures["replicas"] = {"threads": n, "calls": calls, "one_core_s": _median(t["1 core"]),
                                   "replicas_s": _median(t[f"{n} replicas"]), "throughput_ratio": speedup}
        one.unload(), many.unload()

        # (b) loading -----------------------------------------------------------------------------------------
        wide = torch.nn.Linear(2048, 2048)
        example = torch.rand(1, 2048)
        plain = _save(wide, example, os.path.join(tmp, "plain.pt"))
        asyn = _save(wide, example, os.path.join(tmp, "async.pt"), asynchronous=True)
        lazy = _save(wide, example, os.path.join(tmp, "lazy.pt"), lazy=True)

        def sequential():
            models = [neuron_client.jit.load(plain) for _ in range(4)]
            for m in models:
                m(example)
            for m in models:
                m.unload()

        def concurrent():
            models = [neuron_client.jit.load(asyn) for _ in range(4)]
            for m in models:
                m(example)  # waits for its own background load
            for m in models:
                m.unload()

        def load_then_call(p):
            """jit.load, then the first call: the whole round is timed (load to first result); the time until
            jit.load returned is kept apart (``go.returned``), since a lazy model's load happens in its first call."""
            def go():
                t0 = time.perf_counter()
                m = neuron_client.jit.load(p)
                go.returned.append(time.perf_counter() - t0)
                m(example)
                go.models.append(m)
            go.models, go.returned = [], []
            return go

        task = ctx.progress.task("(b) 4 models: async_load vs one after another", rounds)
        t_load = _alternate({"sequential": sequential, "async_load": concurrent}, rounds, task)
        task.finish()
        lazy_go, plain_go = load_then_call(lazy), load_then_call(plain)
        t_first = _alternate({"plain": plain_go, "lazy": lazy_go}, rounds)
        for m in lazy_go.models + plain_go.models:
            m.unload()
        res.figures["loading"] = {
            "sequential_s": _median(t_load["sequential"]), "async_s": _median(t_load["async_load"]),
            "async_speedup": _median(t_load["sequential"]) / _median(t_load["async_load"]),
            "plain_jit_load_s": _median(plain_go.returned), "lazy_jit_load_s": _median(lazy_go.returned),
            "plain_first_result_s": _median(t_first["plain"]), "lazy_first_result_s": _median(t_first["lazy"]),
            "lazy_first_result_speedup": _median(t_first["plain"]) / _median(t_first["lazy"])}

        # (c-spread) ensemble members over cores with futures ---------------------------------------------------
        torch.manual_seed(0)
        members, channels = 4, 256
        lstm_x = torch.rand(50, 32, channels)  # large enough that a member's LSTMs take tens of milliseconds
        member_paths = []
        for i in range(members):
            member = torch.jit.script(BiLSTM(channels, fork=False).eval())
            p = os.path.join(tmp, f"member{i}.pt")
            torch.jit.save(member, p)
            member_paths.append(p)
        with neuron_cores_context(start_nc=0, nc_count=1):
            on_one = [neuron_client.jit.load(p) for p in member_paths]
        spread = []
        for i, p in enumerate(member_paths):
            with neuron_cores_context(start_nc=i % n, nc_count=1):
                spread.append(neuron_client.jit.load(p))

        def with_futures(models):
            return lambda: sum(f.result() for f in [m.submit(lstm_x) for m in models])

        task = ctx.progress.task(f"(c) ensemble members spread over {n} cores vs on 1 core", rounds)
        t_spread = _alternate({"one core": with_futures(on_one), "spread": with_futures(spread)}, rounds, task)
        task.finish()
        res.figures["ensemble_spread"] = {
            "cores": n, "one_core_s": _median(t_spread["one core"]), "spread_s": _median(t_spread["spread"]),
            "speedup": _median(t_spread["one core"]) / _median(t_spread["spread"])}
        for m in on_one + spread:
            m.unload()

    # (c-fork) inside one core that has every CPU --------------------------------------------------------------
    with contextlib.ExitStack() as stack:  # one intra-op thread: the members' small LSTM cells gain nothing from more
        broker = ctx.start_broker("fork", cores=1, extra=["--intra-op-threads", "1"])
        stack.callback(broker.stop)
        stack.enter_context(client_of(broker, "0"))
        plain_e = Ensemble(members, channels, fork=False).eval()
        forked_e = Ensemble(members, channels, fork=True).eval()
        forked_e.load_state_dict(plain_e.state_dict())
        paths = {}
        for name, module in (("sequential", plain_e), ("fork", forked_e)):
            paths[name] = os.path.join(tmp, f"ensemble-{name}.pt")
            torch.jit.save(torch.jit.script(module), paths[name])
        seq, frk = neuron_client.jit.load(paths["sequential"]), neuron_client.jit.load(paths["fork"])
        local_seq, local_frk = torch.jit.load(paths["sequential"]), torch.jit.load(paths["fork"])  # plain scripts
        seq(lstm_x), frk(lstm_x)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # in-process as in the worker: one intra-op thread (inter-op: torch's default pool)
        try:
            with torch.no_grad():
                local_seq(lstm_x), local_frk(lstm_x)
                task = ctx.progress.task(f"(c) ensemble in one core ({cpus} CPUs): fork vs sequential", rounds)
                t_fork = _alternate({"sequential": lambda: seq(lstm_x), "fork": lambda: frk(lstm_x),
                                     "in-process sequential": lambda: local_seq(lstm_x),
                                     "in-process fork": lambda: local_frk(lstm_x)}, rounds, task)
        finally:
            torch.set_num_threads(threads)
        task.finish()
        res.figures["ensemble_fork"] = {
            "core_cpus": cpus, "sequential_s": _median(t_fork["sequential"]), "fork_s": _median(t_fork["fork"]),
            "speedup": _median(t_fork["sequential"]) / _median(t_fork["fork"]),
            "in_process_sequential_s": _median(t_fork["in-process sequential"]),
            "in_process_fork_s": _median(t_fork["in-process fork"]),
            "in_process_speedup": _median(t_fork["in-process sequential"]) / _median(t_fork["in-process fork"]),
            "fork_vs_in_process": _median(t_fork["fork"]) / _median(t_fork["in-process fork"])}

    f = res.figures
    fe, fs, fl, fr = f["ensemble_fork"], f["ensemble_spread"], f["loading"], f["replicas"]

    def ms(seconds: float, digits: int = 0) -> str:
        return f"{seconds * 1e3:.{digits}f} ms"

    # every row: the variant, then the baseline (in the measure's name and in the medians); speed-up = baseline time
    # over the variant's (> 1: the variant is faster)
    rows = [
        [f"(a) {n} threads, {fr['calls']} calls: " + vs(f"{n} replicas", "1 core"), ms(fr["replicas_s"]),
         ms(fr["one_core_s"]), fmt_ratio(fr["throughput_ratio"])],
        ["(b) 4 models loaded and called once: " + vs("async_load", "sequential"), ms(fl["async_s"]),
         ms(fl["sequential_s"]), fmt_ratio(fl["async_speedup"])],
        ["(b) one model, jit.load to its first result: " + vs("lazy_load", "plain"), ms(fl["lazy_first_result_s"]),
         ms(fl["plain_first_result_s"]), fmt_ratio(fl["lazy_first_result_speedup"])],
        ["(b) the same, until jit.load returns: " + vs("lazy_load", "plain"), ms(fl["lazy_jit_load_s"], 1),
         ms(fl["plain_jit_load_s"], 1), "none claimed: the lazy load happens in the first call"],
        [f"(c) LSTM ensemble in one core with {cpus} CPUs: " + vs("fork", "sequential"), ms(fe["fork_s"]),
         ms(fe["sequential_s"]), fmt_ratio(fe["speedup"])],
        [f"(c) the same in-process (plain torch, {torch.get_num_interop_threads()} inter-op threads): "
         + vs("fork", "sequential"), ms(fe["in_process_fork_s"]), ms(fe["in_process_sequential_s"]),
         fmt_ratio(fe["in_process_speedup"])],
        ["(c) forked ensemble: " + vs("in the core", "in-process"), ms(fe["fork_s"]), ms(fe["in_process_fork_s"]),
         fmt_ratio(fe["in_process_fork_s"] / fe["fork_s"])],
        ["(c) LSTM ensemble members with futures: " + vs(f"over {n} cores", "1 core"), ms(fs["spread_s"]),
         ms(fs["one_core_s"]), fmt_ratio(fs["speedup"])],
    ]
    res.lines += md_table(["measure: variant vs baseline", "variant (median)", "baseline (median)",
                           "speed-up (baseline / variant)"], rows)
    res.notes += [
        f"Each ratio is the median over {rounds} alternating rounds. Cores are pinned to distinct CPUs when there "
        f"are enough ({cpus} CPUs here). The fork case runs in a one-core broker whose worker has all {cpus} CPUs, "
        f"{cpus} inter-op threads and one intra-op thread (`--intra-op-threads 1`): at this size the LSTM cells "
        "gain nothing from intra-op threads, and with two of them even the sequential ensemble ran twice as slow.",
        "A `lazy_load` model's `jit.load` returns before the model is loaded (its first call loads it), so the "
        "time until it returns is no speed-up; what lazy loading changes is when the load is paid, which the load "
        "to first result row compares.",
    ]
    if ctx.quick:
        res.notes.append(f"--quick: every ratio above comes from {rounds} rounds, a handful of samples: indicative "
                         "only.")
    return res
