"""Section: cold start of the operator commands.

Each command runs as a fresh process (the installed console scripts of this interpreter's environment), interleaved
round by round with the baseline, ``python -c pass`` from the same interpreter. Wall time runs from the fork to the
reap; peak RSS is the child's own ``ru_maxrss`` from ``wait4``. ``neuron-ls`` and ``neuron-broker status`` talk to a
running 2-core broker. A second figure says what the broker process imports: the modules of this project, and
whether torch is among them.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

from .harness import ROOT, SectionResult, broker_env, fmt_ratio, md_table, percentile

ROUNDS = (15, 3)
BASELINE = "python -c pass (baseline)"
GOAL_S = 0.3

# What the broker's own process imports: its entry point and its loop.
BROKER_IMPORTS = (
    "import sys, broker.cli, broker.server; "
    "mods = sorted(m for m in sys.modules if m.split('.')[0] in ('broker', 'worker', 'neuron_client')); "
    "print(len(mods), 'torch' in sys.modules, ' '.join(mods))"
)


def _script(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def commands() -> dict[str, list[str]]:
    return {
        BASELINE: [sys.executable, "-c", "pass"],
        "neuron-ls": [_script("neuron-ls")],
        "neuron-broker status": [_script("neuron-broker"), "status"],
        "neuron-broker --help": [_script("neuron-broker"), "--help"],
        "neuron-top --help": [_script("neuron-top"), "--help"],
    }


# Linux keeps a process's peak RSS across exec, so a child forked from this (large) process reports this process's
# peak; a small launcher, itself started fresh, spawns the command and reports the command's own.
RSS_LAUNCHER = ("import os, sys; pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ); "
                "_, st, ru = os.wait4(pid, 0); print(ru.ru_maxrss * 1024)")


def run_once(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, exit status) of one run of ``argv``."""
    t0 = time.perf_counter()
    rc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, timeout=120).returncode
    return time.perf_counter() - t0, rc


def peak_rss(argv: list[str]) -> int:
    out = subprocess.run([sys.executable, "-S", "-c", RSS_LAUNCHER, *argv], capture_output=True, text=True, cwd=ROOT,
                         timeout=120).stdout
    return int(out.split()[-1])


def measure(cmds: dict[str, list[str]], rounds: int, rng: random.Random) -> dict[str, dict]:
    samples = {name: {"wall": [], "rss": [], "rc": set()} for name in cmds}
    for _ in range(rounds):
        order = list(cmds)
        rng.shuffle(order)
        for name in order:
            wall, rc = run_once(cmds[name])
            samples[name]["wall"].append(wall)
            samples[name]["rc"].add(rc)
    for name, argv in cmds.items():
        samples[name]["rss"].append(peak_rss(argv))
    base = percentile(samples[BASELINE]["wall"], 50)
    return {name: {"p50_s": percentile(s["wall"], 50), "p90_s": percentile(s["wall"], 90),
                   "ratio_to_python": percentile(s["wall"], 50) / base if base else None,
                   "peak_rss_bytes": max(s["rss"]), "exit_codes": sorted(s["rc"]), "n": len(s["wall"])}
            for name, s in samples.items()}


def broker_imports() -> dict:
    out = subprocess.run([sys.executable, "-c", BROKER_IMPORTS], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True).stdout.split()
    return {"project_modules": int(out[0]), "torch": out[1] == "True", "modules": out[2:]}


def run(ctx) -> SectionResult:
    res = SectionResult("coldstart", "Cold start of the operator commands")
    broker = ctx.start_broker("coldstart", cores=2)
    try:
        with broker_env(broker):
            rounds = ctx.n_rounds(*ROUNDS)
            task = ctx.progress.task("cold starts", 1)
            figs = measure(commands(), rounds, ctx.rng)
            task.finish()
    finally:
        broker.stop()
    imports = broker_imports()
    res.figures = {"commands": figs, "broker_imports": imports, "rounds": rounds}
    L = res.lines
    L += [f"Each command, from fork to exit, interleaved with the baseline over {rounds} rounds. Goal: under "
          f"{GOAL_S} s each.", ""]
    L += md_table(["command", "p50", "p90", "p50 / python -c pass", "peak RSS", "exit"],
                  [[name, f"{f['p50_s'] * 1e3:.0f} ms", f"{f['p90_s'] * 1e3:.0f} ms", fmt_ratio(f["ratio_to_python"]),
                    f"{f['peak_rss_bytes'] / 2**20:.0f} MiB", ",".join(map(str, f["exit_codes"]))]
                   for name, f in figs.items()])
    L += ["", f"The broker process imports {imports['project_modules']} modules of this project; torch is "
          f"{'among them' if imports['torch'] else 'not among them'}.", ""]
    res.notes.append("Peak RSS is the child's own ru_maxrss (wait4), not the sum of a process tree.")
    return res


if __name__ == "__main__":  # a quick look without the suite: python -m benchmarks.coldstart
    rng = random.Random(0)
    for name, f in measure(commands(), 5, rng).items():
        print(f"{name:28} {f['p50_s'] * 1e3:7.0f} ms  x{f['ratio_to_python']:.1f}  {f['peak_rss_bytes'] / 2**20:6.0f} MiB"
              f"  rc={f['exit_codes']}")
    print(broker_imports()["project_modules"], "broker modules; torch:", broker_imports()["torch"])
