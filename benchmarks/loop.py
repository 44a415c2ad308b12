"""Co-located processes, each calling a model back to back (parts 4 and 5 of the dispatch section).

4. Closed-loop throughput: one process per core, each calling a small MLP back to back, all at once; the
   **in-process** variant (``torch.jit.load`` of the graph, the process pinned to one CPU, one torch thread) is the
   machine's ceiling; the **neuron_client** variants own one core each through a broker, and their environment selects
   the path (the fast path with or without the client's spin, or the socket path). Each process also reports the CPU
   it used, and the worker's, so that the report says where a call's CPU goes.
5. A model's speed in a worker: one process at a time calls a compute-bound MLP (a few milliseconds a call), either
   in a plain process pinned to a CPU or through the core whose worker is pinned to that CPU: does the worker run the
   model as fast as a plain process does?

Each process is a persistent child (this module run as a script) that loads the model once, then answers ``run S``
on its stdin with the calls it made in S seconds, so that every process of a variant runs the same S seconds at
once and start-up costs are never timed.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 180.0
RUN_SLACK_S = 60.0

LOOP_SECONDS = (2.0, 0.5)  # per variant and round (full, quick)
LOOP_ROUNDS = (8, 3)
TARGET_LOOP_RATIO = 0.4  # calls/s through neuron_client at least 0.4x in-process, one process per CPU
INPROC_LOOP = "in-process, one process per CPU"
SMALL_MLP = ([8, 256], [256, 256])  # input shape, layer widths
BIG_MLP = ([64, 1024], [1024, 1024, 1024])  # a few ms a call on one CPU thread
SPEED_SECONDS = (2.0, 0.6)
SPEED_ROUNDS = (8, 3)
COUNTERS_WAIT_S = 10.0
TARGET_SPEED_RATIO = 1.05  # time per call of the big MLP through a worker at most 1.05x a plain pinned process's
PLAIN = "plain process, pinned"
IN_WORKER = "neuron_client (the core's worker, pinned)"


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of ``pid``, or of this process."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class LoopChild:
    """One child process: ``mode`` "inproc" (pinned to ``cpu``) or "neuron" (owning core ``cpu`` of the broker in
    ``env``), calling the model at ``path`` with inputs of ``shape``."""

    def __init__(self, mode: str, path: str, cpu: int, env: dict, shape=SMALL_MLP[0]):
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.loop", mode, path, str(cpu)], cwd=ROOT,
                                     env={**env, "PYTHONPATH": ROOT, "LOOP_INPUT_SHAPE": json.dumps(list(shape))},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        from .harness import CHILDREN

        CHILDREN.add_group(self.proc)
        self.ready = self._read(START_TIMEOUT_S)

    def _read(self, timeout_s: float) -> dict:
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if r else ""
        if not line:
            raise RuntimeError(f"a loop child ({self.proc.args[3:]}) did not answer within {timeout_s:.0f}s "
                               f"(exit code {self.proc.poll()})")
        return json.loads(line)

    def start(self, seconds: float) -> None:
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()

    def result(self, seconds: float) -> dict:
        return self._read(seconds + RUN_SLACK_S)

    def close(self) -> None:
        from .harness import CHILDREN

        CHILDREN.kill_group(self.proc)
        if self.proc in CHILDREN.groups:
            CHILDREN.groups.remove(self.proc)


def run_together(children: list[LoopChild], seconds: float) -> dict:
    """``children`` running at once for ``seconds``: calls per second of them all, and CPU per call (the calling
    processes', and their workers')."""
    for c in children:
        c.start(seconds)
    got = [c.result(seconds) for c in children]
    calls = sum(g["calls"] for g in got)
    return {"calls": calls, "calls_per_s": sum(g["calls"] / g["seconds"] for g in got),
            "s_per_call": statistics.mean(g["seconds"] / g["calls"] for g in got),
            "client_cpu_us": sum(g["cpu_s"] for g in got) / calls * 1e6,
            "worker_cpu_us": sum(g["worker_cpu_s"] for g in got) / calls * 1e6}


def save_mlp(directory: str, spec=SMALL_MLP) -> str:
    import torch

    import neuron_client

    (shape, widths) = spec
    torch.manual_seed(0)
    layers, width = [], shape[-1]
    for w in widths:
        layers += [torch.nn.Linear(width, w), torch.nn.ReLU()]
        width = w
    mlp = torch.nn.Sequential(*layers[:-1]).eval()
    path = os.path.join(directory, f"mlp-{'x'.join(map(str, shape))}-{len(widths)}.pt")
    torch.jit.save(neuron_client.trace(mlp, torch.rand(*shape)), path)
    return path


def _spread(ratios: list[float]) -> dict:
    """A ratio over rounds: its median and quartiles (as :func:`benchmarks.harness.round_ratio`)."""
    from .harness import percentile

    return {"median": percentile(ratios, 50), "p25": percentile(ratios, 25), "p75": percentile(ratios, 75)}


def _rounds(ctx, groups: dict, seconds: float, rounds: int, task) -> tuple[list, list]:
    """Per round, each group's :func:`run_together` (variants in a fresh order each round); the 1-min load."""
    per_round, load = [], []
    for _ in range(rounds):
        order = list(groups)
        ctx.rng.shuffle(order)
        per_round.append({name: run_together(groups[name], seconds) for name in order})
        load.append(os.getloadavg()[0])
        task.advance()
    task.finish()
    return per_round, load


def _children(ctx, stack, name: str, path: str, cpus: list[int], env: dict | None, shape) -> list[LoopChild]:
    """One child per CPU in ``cpus``: in-process where ``env`` is None, else owning that core of a new broker of one
    core per CPU (each worker pinned to one CPU, torch with one thread, as the in-process children)."""
    if env is None:
        kids = [LoopChild("inproc", path, i, dict(os.environ), shape) for i in cpus]
    else:
        broker = ctx.start_broker(name, cores=max(1, min(8, os.cpu_count() or 1)))
        stack.callback(broker.stop)
        kids = [LoopChild("neuron", path, i, {**broker.env, **env}, shape) for i in cpus]
        for k in kids:
            k.broker = broker
    for k in kids:
        stack.callback(k.close)
    return kids


def part_closed_loop(ctx, stack: contextlib.ExitStack, res, paths: dict, default: str) -> None:
    """Part 4. ``paths``: neuron_client variant name -> its environment; ``default`` names the one with the target."""
    from .harness import fmt_ratio, fmt_spread, md_table, verdict

    p = ctx.progress
    n = max(1, min(8, os.cpu_count() or 1))
    path = save_mlp(str(ctx.tmp))
    p.note(f"closed loop: {n} processes per variant (one per core and CPU), a small MLP ([8, 256] -> 256 -> 256); "
           f"one broker of {n} cores per neuron_client variant")
    groups = {INPROC_LOOP: _children(ctx, stack, "", path, list(range(n)), None, SMALL_MLP[0])}
    for i, (name, env) in enumerate(paths.items()):
        groups[name] = _children(ctx, stack, f"loop-{i + 1}", path, list(range(n)), env, SMALL_MLP[0])
    rounds = ctx.n_rounds(*LOOP_ROUNDS)
    seconds = LOOP_SECONDS[1] if ctx.quick else LOOP_SECONDS[0]
    per_round, load = _rounds(ctx, groups, seconds, rounds, p.task(f"closed loop ({len(groups)} variants x "
                                                                   f"{seconds:g}s)", rounds))
    table, figures = [], {}
    base_cpu = statistics.median(r[INPROC_LOOP]["client_cpu_us"] for r in per_round)
    for name in groups:
        spread = _spread([r[name]["calls_per_s"] / r[INPROC_LOOP]["calls_per_s"] for r in per_round])
        med = {k: statistics.median(r[name][k] for r in per_round) for k in per_round[0][name]}
        figures[name] = {**med, "ratio_to_inproc": spread["median"], "ratio_p25": spread["p25"],
                         "ratio_p75": spread["p75"]}
        total = med["client_cpu_us"] + med["worker_cpu_us"]
        table.append([name, f"{med['calls_per_s']:,.0f}", fmt_ratio(spread["median"]),
                      fmt_spread(spread), f"{med['client_cpu_us']:.0f} µs",
                      f"{med['worker_cpu_us']:.0f} µs" if name != INPROC_LOOP else "-",
                      f"{total:.0f} µs", fmt_ratio(total / base_cpu)])
    best = figures[default]["ratio_to_inproc"]
    res.figures["closed_loop"] = {"processes": n, "seconds": seconds, "rounds": rounds, "variants": figures,
                                  "load_avg_1m": load, "inproc_calls_per_s": figures[INPROC_LOOP]["calls_per_s"],
                                  "target": {"goal": f">= {TARGET_LOOP_RATIO}x", "value": best,
                                             "met": best >= TARGET_LOOP_RATIO}}
    d = figures[default]
    over = d["client_cpu_us"] + d["worker_cpu_us"] - base_cpu
    L = res.lines
    L += ["### Closed-loop throughput, one process per core", "",
          f"{n} processes at once, each calling a small MLP ([8, 256] through two 256-wide layers) back to back for "
          f"{seconds:g} s, in {rounds} rounds (variants in a fresh order each round): in-process (each pinned to one "
          f"CPU, one torch thread: the machine's ceiling) against processes owning one core each of a {n}-core "
          "broker (one broker per variant). Load average (1 min) during the rounds: "
          f"{', '.join(f'{v:.1f}' for v in load)}. CPU per call: the calling processes' (all threads) and their "
          "workers', over the calls of all processes (medians of the rounds).", ""]
    L += md_table(["variant", "calls/s (all processes)", "vs in-process", "round spread", "caller CPU / call",
                   "worker CPU / call", "CPU / call", "CPU vs in-process"], table)
    L += ["", f"Target: neuron_client (default path) >= {TARGET_LOOP_RATIO}x in-process: "
          f"{fmt_ratio(best)} {verdict(best >= TARGET_LOOP_RATIO)}. Where its CPU goes: "
          f"{d['client_cpu_us']:.0f} µs in the caller and {d['worker_cpu_us']:.0f} µs in the worker per call, "
          f"{over:.0f} µs more than the in-process call's {base_cpu:.0f} µs; with {n} CPUs busy the throughput is "
          "about their number over the CPU per call.", ""]


def _speed_of(ctx, stack, spec, env: dict, name: str) -> dict:
    """One MLP, one process at a time: a plain pinned process against the core whose worker is pinned alike."""
    shape, widths = spec
    path = save_mlp(str(ctx.tmp), spec)
    groups = {PLAIN: _children(ctx, stack, "", path, [0], None, shape),
              IN_WORKER: _children(ctx, stack, f"speed-{name}", path, [0], env, shape)}
    rounds = ctx.n_rounds(*SPEED_ROUNDS)
    seconds = SPEED_SECONDS[1] if ctx.quick else SPEED_SECONDS[0]
    broker = groups[IN_WORKER][0].broker

    def counters(least: int = 0):  # the worker reports its counters every 50-500 ms: wait for those of the calls
        doc = broker.wait_for(lambda d: d.cores[0].models and d.cores[0].models[0].requests >= least,
                              COUNTERS_WAIT_S, "the worker's counters of the model")
        return doc.cores[0].models[0]

    before = counters()
    per_round, load = _rounds(ctx, groups, seconds, rounds,
                              ctx.progress.task(f"worker speed, {name} MLP (2 variants x {seconds:g}s)", rounds))
    after = counters(before.requests + sum(r[IN_WORKER]["calls"] for r in per_round))
    med = {n: {k: statistics.median(r[n][k] for r in per_round) for k in per_round[0][n]} for n in groups}
    return {"model": {"input": shape, "widths": widths}, "seconds": seconds, "rounds": rounds, "load_avg_1m": load,
            "time_ratio": _spread([r[IN_WORKER]["s_per_call"] / r[PLAIN]["s_per_call"] for r in per_round]),
            "plain_s": med[PLAIN]["s_per_call"], "worker_s": med[IN_WORKER]["s_per_call"],
            "model_s": (after.compute_s - before.compute_s) / max(1, after.requests - before.requests),
            "plain_cpu_us": med[PLAIN]["client_cpu_us"], "worker_cpu_us": med[IN_WORKER]["worker_cpu_us"],
            "caller_cpu_us": med[IN_WORKER]["client_cpu_us"]}


def part_worker_speed(ctx, stack: contextlib.ExitStack, res, env: dict) -> None:
    """Part 5: a small and a compute-bound MLP, one process at a time, in a plain pinned process and through a worker
    pinned alike; the target is the compute-bound one's."""
    from .harness import fmt_ratio, fmt_spread, fmt_us, md_table, verdict

    ctx.progress.note("a worker's speed: two MLPs, one process at a time on CPU 0, plain and through a worker")
    figs = {"small": _speed_of(ctx, stack, SMALL_MLP, env, "small"), "big": _speed_of(ctx, stack, BIG_MLP, env, "big")}
    table = []
    for name, f in figs.items():
        label = f"{f['model']['input']} through {len(f['model']['widths'])} x {f['model']['widths'][0]}"
        t = f["time_ratio"]
        table.append([label, fmt_us(f["plain_s"] * 1e6), fmt_us(f["worker_s"] * 1e6),
                      f"{fmt_ratio(t['median'])} ({fmt_spread(t)})", fmt_us(f["model_s"] * 1e6),
                      fmt_ratio(f["model_s"] / f["plain_s"]), fmt_us(f["worker_cpu_us"]), fmt_us(f["caller_cpu_us"])])
    big = figs["big"]
    value = big["time_ratio"]["median"]
    met = value <= TARGET_SPEED_RATIO
    res.figures["worker_speed"] = {**figs, "target": {"goal": f"<= {TARGET_SPEED_RATIO}x", "value": value,
                                                      "met": met, "model": "big"}}
    L = res.lines
    L += ["### A model's speed in a worker against a plain pinned process", "",
          f"Each MLP is called back to back for {big['seconds']:g} s by one process at a time, in {big['rounds']} "
          "rounds (variants in a fresh order each round): a plain process pinned to CPU 0 with one torch thread "
          "running the traced graph itself, against a process calling it through the core whose worker is pinned "
          "to CPU 0 (torch with one thread too). \"The model's time\" is the worker's own count of the model's "
          "forward alone (over all rounds); the worker's CPU includes its copies and spins, the caller's is the "
          "calling process's. Load average (1 min) during the rounds: "
          f"{', '.join(f'{v:.1f}' for v in figs['small']['load_avg_1m'] + big['load_avg_1m'])}.", ""]
    L += md_table(["MLP", "plain, per call", "through the worker", "ratio (round spread)", "the model's time",
                   "model's time / plain", "worker CPU / call", "caller CPU / call"], table)
    L += ["", f"Target: the compute-bound MLP's time per call through the worker <= {TARGET_SPEED_RATIO}x the plain "
          f"process's: {fmt_ratio(value)} {verdict(met)}; its forward alone takes "
          f"{fmt_ratio(big['model_s'] / big['plain_s'])} the plain process's time per call, the rest is the "
          "tensors' way in and out (copies between the CPUs' caches) and the hand-offs.", ""]


def _main() -> None:
    import time

    import torch

    mode, path, cpu = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    x = torch.rand(*json.loads(os.environ.get("LOOP_INPUT_SHAPE", "[8, 256]")))
    worker = None
    if mode == "inproc":
        os.sched_setaffinity(0, {cpu})
        torch.set_grad_enabled(False)
        from neuron_client.tracing.script import load_here

        model = load_here(path)
    else:
        import neuron_client
        from neuron_client.runtime.lease import get_runtime

        os.environ["NEURON_RT_VISIBLE_CORES"] = str(cpu)
        model = neuron_client.jit.load(path)
        model(x)
        worker = get_runtime().worker(cpu).pid
    for _ in range(20):
        model(x)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        seconds = float(line)
        w0 = _cpu_s(worker) if worker else 0.0
        n, c0, t0 = 0, _cpu_s(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += 1
        t1, c1 = time.perf_counter(), _cpu_s()
        w1 = _cpu_s(worker) if worker else 0.0
        print(json.dumps({"calls": n, "seconds": t1 - t0, "cpu_s": c1 - c0, "worker_cpu_s": w1 - w0}), flush=True)


if __name__ == "__main__":
    _main()
