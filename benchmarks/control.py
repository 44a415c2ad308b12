"""Section 2, control: the broker's side of a process's life.

1. Acquire+release per second, interleaved with the baseline, a bare ping round trip to the broker over a
   connected channel: the raw protocol (a lease link opened, ``Acquire`` and ``Release`` on it) and the whole
   client path (``neuron_client.runtime.Runtime()`` then ``.close()``: broker check, lease link, acquire, lease
   thread, release). Each grant includes a fresh worker taking its owner.
2. Reclaiming a killed owner's cores: a process owning every core is killed with ``kill -9`` and ``status`` is
   polled until its cores are free. The baseline, interleaved trial by trial, is an orderly release (the owner is
   told to close its runtime) timed the same way.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time

from .harness import (CHILDREN, ROOT, BenchError, Plot, SectionResult, Variant, broker_env, dots_p50_p99, fmt_ratio,
                      fmt_spread, fmt_us, interleave, md_table, percentile, ratio, round_ratio, verdict)

OPS_ROUNDS = (25, 5)
OPS_BATCH = (25, 8)
RECLAIM_TRIALS = (10, 3)  # of each kind
OWNER_READY_TIMEOUT_S = 120.0
RECLAIM_TIMEOUT_S = 30.0
STATUS_POLL_S = 0.002
TARGET_RECLAIM_S = 1.0

PING = "ping (baseline)"
PROTO = "Acquire+Release (protocol)"
RUNTIME = "Runtime() + close()"
KILL = "kill -9"
GRACEFUL = "orderly release (baseline)"

# An owner process: takes every core, says so, releases them when told to, then waits for its end.
OWNER = r"""
import sys
from neuron_client.runtime import Runtime
rt = Runtime()
print("ready", rt.cores, flush=True)
sys.stdin.readline()
rt.close()
print("released", flush=True)
sys.stdin.readline()
"""


def run(ctx) -> SectionResult:
    res = SectionResult("control", "2. Control plane: acquire/release, and reclaiming a killed owner's cores")
    with contextlib.ExitStack() as stack:
        broker = ctx.start_broker("control", cores=2)
        stack.callback(broker.stop)
        stack.enter_context(broker_env(broker))
        _part_ops(ctx, broker, res)
        _part_reclaim(ctx, broker, res)
    res.notes += [
        "Each `Runtime()` registers its `close` with `atexit`; the loop unregisters it after closing, so that "
        "hundreds of cycles leave nothing behind.",
        "Owner processes start (and import torch) before the clock starts; the clock runs from the `kill -9` (or from "
        "writing the release command to the owner's stdin) until a `status` reply shows the cores free.",
        "The broker sees a killed owner's end through its lease link and its pidfd, at once.",
    ]
    return res


# ----------------------------------------------------------------------------------------------------------------


def _part_ops(ctx, broker, res: SectionResult) -> None:
    from neuron_client.runtime.lease import Runtime
    from neuron_client.wire import lease_link, messages
    from neuron_client.wire.broker_client import BrokerClient

    ping_client = BrokerClient(broker.address)
    cmd = "scripts/bench (control)"

    def ping():
        if ping_client.ping(10.0) is None:
            raise BenchError("the broker did not answer a ping within 10 s")

    def proto():
        link = lease_link.LeaseLink(broker.directory, 10.0)
        try:
            granted = link.request(messages.Acquire(cmd=cmd, visible=[1]), 30.0)
            link.request(messages.Release(lease_id=granted.lease_id), 10.0)
        finally:
            link.close()

    def runtime_cycle():
        rt = Runtime(env={"NEURON_RT_VISIBLE_CORES": "1"})
        rt.close()
        atexit.unregister(rt.close)  # closed already: keep the exit handlers from piling up

    try:
        rounds, batch = ctx.n_rounds(*OPS_ROUNDS), OPS_BATCH[1] if ctx.quick else OPS_BATCH[0]
        task = ctx.progress.task("acquire+release vs ping", rounds)
        m = interleave([Variant(PING, ping), Variant(PROTO, proto), Variant(RUNTIME, runtime_cycle)], rounds, batch,
                       warmup=3, task=task, rng=ctx.rng)
    finally:
        ping_client.close()
    base = m[PING].summary()
    ops = {}
    for name, meas in m.items():
        s = meas.summary()
        ops[name] = {**s, "ops_per_s": 1e6 / s["mean_us"] if s["mean_us"] else None,
                     "p50_ratio_to_ping": ratio(s["p50_us"], base["p50_us"]),
                     "mean_ratio_to_ping": ratio(s["mean_us"], base["mean_us"]),
                     "round_ratio_to_ping": round_ratio(meas, m[PING]),
                     "round_p50_us": [v / 1e3 for v in meas.round_p50]}
    task.finish(f"Runtime()+close() {ops[RUNTIME]['ops_per_s']:.0f}/s, "
                f"{fmt_ratio(ops[RUNTIME]['p50_ratio_to_ping'])} of a ping")
    res.figures["acquire_release"] = {"rounds": rounds, "calls_per_batch": batch, "variants": ops}
    L = res.lines
    L += ["### Acquire + release per second", "",
          f"**{PROTO}**: a lease link opened, one `Acquire` on it (the grant waits for the core's fresh worker to "
          f"take its owner), the link closed (the release). **{RUNTIME}**: the whole client path, `neuron_client.runtime.Runtime()` then `.close()` (it "
          "pings the broker, opens a lease link, acquires, starts the lease thread, closes the link). Baseline: **{PING}**, one `Ping` round trip on a connected channel. "
          "ops/s is 1 / mean time of one operation.", ""]
    L += md_table(["operation", "p50", "p99", "ops/s", "p50 / ping", "mean / ping", "round spread", "n"],
                  [[name, fmt_us(o["p50_us"]), fmt_us(o["p99_us"]), f"{o['ops_per_s']:,.0f}",
                    fmt_ratio(o["p50_ratio_to_ping"]), fmt_ratio(o["mean_ratio_to_ping"]),
                    fmt_spread(o["round_ratio_to_ping"]), o["n"]] for name, o in ops.items()])
    L.append("")
    res.plots.append(Plot("control_ops.png", "Control operations vs a ping", lambda plt, path: _draw_ops(plt, path,
                                                                                                          ops)))


def _draw_ops(plt, path, ops):
    names = list(ops)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ys = range(len(names))
    dots_p50_p99(ax, [ops[n]["p50_us"] for n in names], [ops[n]["p99_us"] for n in names],
                 ["tab:gray", "tab:orange", "tab:red"][:len(names)])
    for y, n in zip(ys, names):
        ax.annotate(f"{ops[n]['ops_per_s']:,.0f}/s", (ops[n]["p50_us"], y), xytext=(0, 7),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time per operation (µs, log)")
    ax.set_title("Control plane: one operation (dots p50, ticks p99)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------------------


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if sel.select(timeout_s):
            return proc.stdout.readline()
        return ""
    finally:
        sel.close()


def _start_owner(ctx, log) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES"):
        env.pop(k, None)  # the owner takes every core
    proc = CHILDREN.add_group(subprocess.Popen([sys.executable, "-c", OWNER], env=env, stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                                               start_new_session=True, cwd=str(ROOT)))
    line = _read_line(proc, OWNER_READY_TIMEOUT_S)
    if not line.startswith("ready"):
        CHILDREN.kill_group(proc)
        raise BenchError(f"the owner process did not get its cores (said {line!r}); see its log {log.name}")
    return proc


def _free_time(client, pid: int, t0: float) -> float:
    """Seconds from ``t0`` until ``status`` shows no core owned by ``pid``."""
    deadline = t0 + RECLAIM_TIMEOUT_S
    while True:
        doc = client.status()
        now = time.perf_counter()
        if all(not c.owner or c.owner.pid != pid for c in doc.cores):
            return now - t0
        if now > deadline:
            raise BenchError(f"the cores of pid {pid} were still owned {RECLAIM_TIMEOUT_S:.0f}s later")
        time.sleep(STATUS_POLL_S)


def _trial(ctx, broker, kind: str, log) -> dict:
    proc = _start_owner(ctx, log)
    client = broker.client()
    try:
        doc = broker.status()
        owned = [c.index for c in doc.cores if c.owner and c.owner.pid == proc.pid]
        if not owned:
            raise BenchError(f"the owner pid {proc.pid} said it was ready but owns no core in status")
        if kind == KILL:
            t0 = time.perf_counter()
            os.kill(proc.pid, signal.SIGKILL)
        else:
            t0 = time.perf_counter()
            proc.stdin.write("release\n")
            proc.stdin.flush()
        dt = _free_time(client, proc.pid, t0)
        return {"kind": kind, "seconds": dt, "cores": owned}
    finally:
        client.close()
        with contextlib.suppress(Exception):
            proc.stdin.close()
        CHILDREN.kill_group(proc)
        with contextlib.suppress(Exception):
            proc.stdout.close()
        if proc in CHILDREN.groups:
            CHILDREN.groups.remove(proc)


def _part_reclaim(ctx, broker, res: SectionResult) -> None:
    n = RECLAIM_TRIALS[1] if ctx.quick else RECLAIM_TRIALS[0]
    kinds = []
    for _ in range(n):  # interleaved: each pair in a random order
        pair = [KILL, GRACEFUL]
        ctx.rng.shuffle(pair)
        kinds += pair
    task = ctx.progress.task(f"kill -9 reclaim ({n} + {n} trials)", len(kinds))
    trials = []
    with open(os.path.join(broker.directory, "owners.log"), "a") as log:
        for kind in kinds:
            trials.append(_trial(ctx, broker, kind, log))
            task.advance()
    by = {k: [t["seconds"] for t in trials if t["kind"] == k] for k in (KILL, GRACEFUL)}
    stats = {k: {"n": len(v), "median_s": percentile(v, 50), "min_s": min(v), "max_s": max(v), "trials_s": v}
             for k, v in by.items()}
    kill_med = stats[KILL]["median_s"]
    rel = ratio(kill_med, stats[GRACEFUL]["median_s"])
    per_pair = sorted(a / b for a, b in zip(by[KILL], by[GRACEFUL]) if b)
    spread = {"median": percentile(per_pair, 50), "p25": percentile(per_pair, 25), "p75": percentile(per_pair, 75)}
    task.finish(f"kill -9 median {kill_med * 1000:.0f} ms, {fmt_ratio(rel)} of an orderly release")
    target = {"what": "kill -9 of the owner -> its cores free in status, median", "value_s": kill_med,
              "goal": f"< {TARGET_RECLAIM_S:g} s", "met": kill_med < TARGET_RECLAIM_S}
    from broker.server import LIVENESS_CHECK_S

    res.figures["reclaim"] = {"trials": trials, "stats": stats, "kill_over_orderly_median": rel,
                              "pair_ratio_spread": spread, "target": target,
                              "broker_liveness_check_s": LIVENESS_CHECK_S, "status_poll_s": STATUS_POLL_S}
    L = res.lines
    L += ["### Reclaiming a killed owner's cores", "",
          f"A process owning every core (2) is killed with `kill -9`; `status` is polled every "
          f"{STATUS_POLL_S * 1000:g} ms until no core is owned by it. Baseline, interleaved trial by trial: the same "
          "owner told to close its runtime (an orderly `Release`), timed the same way from the moment it is told. "
          "The broker sees the owner's end at once: its lease link closes and its pidfd becomes readable.",
          ""]
    L += md_table(["target", "measured", "goal", "verdict"],
                  [[target["what"], f"{kill_med * 1000:.0f} ms", target["goal"], verdict(target["met"], ctx.quick)]])
    L.append("")
    L += md_table(["how the owner ends", "median", "min", "max", "trials"],
                  [[k, f"{s['median_s'] * 1000:.1f} ms", f"{s['min_s'] * 1000:.1f} ms", f"{s['max_s'] * 1000:.1f} ms",
                    s["n"]] for k, s in stats.items()])
    L += ["", f"kill -9 / orderly release, medians: **{fmt_ratio(rel)}** (pair by pair: {fmt_spread(spread)})", ""]
    res.plots.append(Plot("control_reclaim.png", "Time until a departed owner's cores are free",
                          lambda plt, path: _draw_reclaim(plt, path, by)))


def _draw_reclaim(plt, path, by):
    fig, ax = plt.subplots(figsize=(7, 3.0))
    for y, (kind, vals) in enumerate(by.items()):
        ax.scatter([v * 1000 for v in vals], [y] * len(vals), alpha=0.7, s=40,
                   color="tab:red" if kind == KILL else "tab:gray")
        med = percentile(vals, 50) * 1000
        ax.plot([med, med], [y - 0.25, y + 0.25], color="black")
    ax.axvline(TARGET_RECLAIM_S * 1000, color="tab:green", linestyle="--", label=f"target {TARGET_RECLAIM_S:g} s")
    ax.set_yticks(range(len(by)), list(by), fontsize=8)
    ax.set_ylim(-0.6, len(by) - 0.4)
    ax.set_xlabel("time until the cores are free in status (ms)")
    ax.set_xlim(left=0)
    ax.legend(fontsize=8)
    ax.set_title("Reclaiming a departed owner's cores (dots trials, bars medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
