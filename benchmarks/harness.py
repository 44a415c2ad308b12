"""What every section shares: brokers and child processes that are always torn down, a progress display,
interleaved timing, percentiles, the Markdown/JSON report and the plots.

Method. A section measures a few *variants* of one thing (say, a 1 KiB round trip through neuron_client and through
bare pyzmq). :func:`interleave` runs them in rounds -- a short batch of each, in an order that changes from round to
round -- so that the noise of a shared machine (other processes, CPU frequency, page cache) lands on all of them
alike, and every figure the report gives is a ratio of two variants measured side by side in the same run. Absolute
times are reported too, for context only; nothing here asserts on a time.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from broker.embedded import EmbeddedBroker

ROOT = Path(__file__).resolve().parent.parent
BROKER_READY_TIMEOUT_S = 90.0
BROKER_STOP_GRACE_S = 5.0
CHILD_STOP_GRACE_S = 3.0



class BenchError(RuntimeError):
    """A benchmark could not run (not: a figure missed its target -- that is only reported)."""


# ----------------------------------------------------------------------------------------------------------------
# Child processes: every one is registered and killed at the end, also on Ctrl-C or an exception.


class Children:
    """Process groups (subprocess.Popen with start_new_session) and multiprocessing children to tear down."""

    def __init__(self):
        self.groups: list[subprocess.Popen] = []
        self.mp_procs: list = []

    def add_group(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.groups.append(proc)
        return proc

    def add_mp(self, proc):
        self.mp_procs.append(proc)
        return proc

    @staticmethod
    def kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    @staticmethod
    def stop_mp(proc) -> None:
        if proc.is_alive():
            proc.terminate()
            proc.join(CHILD_STOP_GRACE_S)
        if proc.is_alive():
            proc.kill()
            proc.join(CHILD_STOP_GRACE_S)

    def cleanup(self) -> None:
        for proc in self.mp_procs:
            with contextlib.suppress(Exception):
                self.stop_mp(proc)
        self.mp_procs.clear()
        for proc in self.groups:
            self.kill_group(proc)
        self.groups.clear()


CHILDREN = Children()


class Broker(EmbeddedBroker):
    """An embedded broker (its own process group and private directory) registered for clean-up at exit, with the
    benchmark's options: the workers' shared-memory threshold, the lease timeout, torch's thread pools."""

    def __init__(self, directory: str, cores: int, worker_shm_threshold: int | None = None,
                 lease_timeout_s: float | None = None, extra=()):
        args = list(extra)
        if lease_timeout_s is not None:
            args += ["--lease-timeout", str(lease_timeout_s)]
        if worker_shm_threshold is not None:
            args += ["--shm-threshold", str(int(worker_shm_threshold))]
        self.worker_shm_threshold = worker_shm_threshold
        try:
            super().__init__(cores, directory=directory, extra=args, ready_timeout_s=BROKER_READY_TIMEOUT_S)
        except (RuntimeError, AssertionError) as exc:
            raise BenchError(str(exc)) from None
        CHILDREN.add_group(self.proc)

    def stop(self) -> None:
        super().stop()
        if self.proc in CHILDREN.groups:
            CHILDREN.groups.remove(self.proc)


@contextlib.contextmanager
def patched_environ(**values):
    """``os.environ`` with ``values`` set (a value of None: unset) for the block, restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def broker_env(broker: Broker, visible_cores: str | None = None):
    """This process's environment pointed at ``broker`` (no autostart), restored afterwards."""
    return patched_environ(NEURON_BROKER_DIR=broker.directory, NEURON_BROKER_AUTOSTART="0",
                           NEURON_RT_VISIBLE_CORES=visible_cores, NEURON_RT_NUM_CORES=None,
                           NEURON_BROKER_ADDRESS=None)


@contextlib.contextmanager
def client_of(broker: Broker, visible_cores: str = "0"):
    """This process as a neuron_client client of ``broker`` owning ``visible_cores``: the environment is set
    before the runtime is created, and the runtime is shut down (its cores released) before the broker goes."""
    import neuron_client

    with broker_env(broker, visible_cores):
        try:
            yield neuron_client.get_runtime()
        finally:
            neuron_client.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# Progress display (stderr; one updating line on a terminal, a few plain lines otherwise).


class Progress:
    BAR = 24

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.monotonic()
        self.section_name = ""
        self._open_line = False

    def _elapsed(self) -> str:
        s = time.monotonic() - self.started
        return f"{int(s // 60)}:{s % 60:04.1f}"

    def _write(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self._open_line = not final
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _close_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False

    def section(self, name: str, description: str = "") -> None:
        self._close_line()
        self.section_name = name
        self.stream.write(f"== {name}{': ' + description if description else ''}\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        self._close_line()
        self.stream.write(f"   [{self._elapsed()}] {text}\n")
        self.stream.flush()

    def task(self, label: str, total: int) -> "Task":
        return Task(self, label, total)


class Task:
    def __init__(self, progress: Progress, label: str, total: int):
        self.p, self.label, self.total, self.done_n = progress, label, max(1, total), 0
        self.t0 = time.monotonic()
        self._last_plain = -1
        self._show(False)

    def _show(self, final: bool) -> None:
        frac = min(1.0, self.done_n / self.total)
        if self.p.tty:
            fill = int(frac * Progress.BAR)
            bar = "#" * fill + "." * (Progress.BAR - fill)
            self.p._write(f"   [{self.p._elapsed()}] {self.label:<34} [{bar}] {self.done_n}/{self.total}", final)
        else:  # a log: start, each quarter, end
            quarter = int(frac * 4)
            if final or quarter != self._last_plain:
                self._last_plain = quarter
                self.p._write(f"   [{self.p._elapsed()}] {self.label}: {self.done_n}/{self.total}", True)

    def advance(self, n: int = 1) -> None:
        self.done_n += n
        if self.done_n < self.total:
            self._show(False)

    def finish(self, summary: str = "") -> None:
        self.done_n = self.total
        if summary:
            self.label = f"{self.label} - {summary}"
        self._show(True)


# ----------------------------------------------------------------------------------------------------------------
# Timing.


def time_calls(fn: Callable[[], object], n: int) -> list[int]:
    """Nanoseconds of each of ``n`` calls of ``fn``."""
    pc = time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = pc()
        fn()
        out[i] = pc() - t0
    return out


class ThreadRunner:
    """One persistent thread that runs whole timed batches: a neuron_client channel belongs to the thread that made
    it, so a variant with its own channel (shared memory off, say) runs its batches here. The timing happens in that
    thread; the hand-off to it is outside every measured call."""

    def __init__(self, name: str):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(self, fn, *args):
        return self.pool.submit(fn, *args).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


@dataclass
class Variant:
    name: str
    call: Callable[[], object]
    runner: ThreadRunner | None = None  # None: the calling thread

    def batch(self, n: int) -> list[int]:
        if self.runner is not None:
            return self.runner.run(time_calls, self.call, n)
        return time_calls(self.call, n)


@dataclass
class Measured:
    """The samples (ns) of one variant over all rounds, and its median in each round."""

    name: str
    samples: list[int] = field(default_factory=list)
    round_p50: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return summarize(self.samples)


def interleave(variants: list[Variant], rounds: int, batch: int, warmup: int, task: Task | None = None,
               rng: random.Random | None = None) -> dict[str, Measured]:
    """Measure ``variants`` in ``rounds`` rounds of ``batch`` calls each, in a fresh order every round (so no variant
    always runs right after the same neighbour), after ``warmup`` untimed calls of each."""
    rng = rng or random.Random(0)
    out = {v.name: Measured(v.name) for v in variants}
    # The cyclic garbage collector stays off while calls are timed (for every variant alike); it runs between
    # rounds, over only what this measurement allocated (everything older is frozen out of its way).
    gc.collect()
    gc.freeze()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for v in variants:
            if warmup:
                v.batch(warmup)
        for _ in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for v in order:
                s = v.batch(batch)
                out[v.name].samples.extend(s)
                out[v.name].round_p50.append(percentile(s, 50))
            gc.collect()
            if task is not None:
                task.advance()
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
    return out


def percentile(values, q: float) -> float:
    """The ``q``-th percentile with linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(samples_ns) -> dict:
    """p50/p99/mean/min in microseconds, and the sample count."""
    n = len(samples_ns)
    if not n:
        return {"n": 0, "p50_us": None, "p99_us": None, "mean_us": None, "min_us": None}
    return {"n": n, "p50_us": percentile(samples_ns, 50) / 1e3, "p99_us": percentile(samples_ns, 99) / 1e3,
            "mean_us": sum(samples_ns) / n / 1e3, "min_us": min(samples_ns) / 1e3}


def ratio(a, b) -> float | None:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def round_ratio(a: Measured, b: Measured) -> dict:
    """The spread of ``a``/``b`` over rounds (each round's medians): how much the noise moves the ratio."""
    rs = sorted(x / y for x, y in zip(a.round_p50, b.round_p50) if y)
    if not rs:
        return {"median": None, "p25": None, "p75": None}
    return {"median": percentile(rs, 50), "p25": percentile(rs, 25), "p75": percentile(rs, 75)}


# ----------------------------------------------------------------------------------------------------------------
# Formatting.


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def fmt_us(us) -> str:
    if us is None:
        return "-"
    if us >= 10_000:
        return f"{us / 1000:,.1f} ms"
    if us >= 1000:
        return f"{us / 1000:,.2f} ms"
    if us >= 100:
        return f"{us:,.0f} µs"
    return f"{us:,.1f} µs"


def fmt_ratio(r) -> str:
    if r is None:
        return "-"
    if r < 0.01:
        return f"{r:.4f}x"
    if r < 0.1:
        return f"{r:.3f}x"
    return f"{r:.2f}x" if r < 100 else f"{r:,.0f}x"


def fmt_spread(rr: dict | None) -> str:
    if not rr or rr.get("p25") is None:
        return "-"
    return f"{rr['p25']:.2f}-{rr['p75']:.2f}"


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(x) for x in r) + " |")
    return out


QUICK_CAVEAT = "(--quick: from a handful of samples, indicative only)"


def verdict(ok: bool | None, quick: bool = False) -> str:
    """A target's verdict; in a ``--quick`` run (``ctx.quick``) it says that few samples stand behind it."""
    text = "n/a" if ok is None else ("**met**" if ok else "**missed**")
    return f"{text} {QUICK_CAVEAT}" if quick and ok is not None else text


def vs(variant: str, baseline: str) -> str:
    """``variant vs baseline``: every row that compares two figures names (and gives) the variant first."""
    return f"{variant} vs {baseline}"


def dots_p50_p99(ax, p50, p99, colors) -> None:
    """One row per variant on a (log) x axis: a dot at its p50, a tick at its p99, a thin line between. On a log
    axis a bar's length means nothing (it starts wherever the axis does); a dot's position is the value."""
    ys = list(range(len(p50)))
    ax.hlines(ys, p50, p99, color="black", alpha=0.3, linewidth=1)
    ax.scatter(p50, ys, s=45, color=colors, zorder=3, label="p50")
    ax.scatter(p99, ys, marker="|", s=200, color="black", label="p99", zorder=3)


# ----------------------------------------------------------------------------------------------------------------
# Sections and the report.


@dataclass
class Plot:
    filename: str
    title: str
    draw: Callable  # draw(plt, path)


@dataclass
class SectionResult:
    name: str
    title: str
    lines: list[str] = field(default_factory=list)  # Markdown
    figures: dict = field(default_factory=dict)  # JSON
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how it was measured, shown after the section's figures
    wall_s: float = 0.0
    error: str | None = None


@dataclass
class Context:
    quick: bool
    out: Path
    tmp: Path
    progress: Progress
    rng: random.Random
    rounds: int | None = None  # --rounds: overrides every section's round count

    def n_rounds(self, full: int, quick: int) -> int:
        return self.rounds if self.rounds else (quick if self.quick else full)

    def start_broker(self, name: str, cores: int, worker_shm_threshold: int | None = None,
                     lease_timeout_s: float | None = None, extra=()) -> Broker:
        info = "" if worker_shm_threshold is None else f", workers' shm threshold {worker_shm_threshold} B"
        info += "" if lease_timeout_s is None else f", lease timeout {lease_timeout_s:g}s"
        info += f", {' '.join(extra)}" if extra else ""
        self.progress.note(f"starting broker '{name}' ({cores} core{'s' if cores > 1 else ''}{info})")
        # a directory of its own (private, 0700), apart from the section's work files
        return Broker(str(self.tmp / f"broker-{name}"), cores, worker_shm_threshold, lease_timeout_s, extra)


def machine_meta() -> dict:
    meta = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    with contextlib.suppress(OSError):
        meta["cpus_available"] = len(os.sched_getaffinity(0))
    for mod in ("torch", "zmq", "msgpack", "psutil"):
        with contextlib.suppress(Exception):
            meta[mod] = importlib.import_module(mod).__version__
    with contextlib.suppress(Exception):
        meta["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=5).stdout.strip()
    return meta


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _plots(out: Path, results: list[SectionResult], progress: Progress) -> tuple[list[str], str | None]:
    wanted = [p for r in results for p in r.plots]
    if not wanted:
        return [], None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        msg = ("matplotlib is not installed: no plots were drawn (the report and results.json are complete). "
               "Install it with 'pip install matplotlib' to get them.")
        progress.note(msg)
        return [], msg
    made = []
    for p in wanted:
        try:
            plt.close("all")
            p.draw(plt, out / p.filename)
            plt.close("all")
            made.append(p.filename)
        except Exception as exc:  # a broken plot must not cost the report
            progress.note(f"plot {p.filename} failed: {type(exc).__name__}: {exc}")
    return made, None


def write_report(out: Path, meta: dict, results: list[SectionResult], progress: Progress) -> None:
    made, plot_note = _plots(out, results, progress)
    lines = ["# neuron_client benchmark report", ""]
    lines += [f"- mode: **{meta['mode']}**, sections: {', '.join(r.name for r in results)}; "
              f"wall time {meta['wall_s']:.0f}s",
              f"- machine: {meta.get('cpus_available', meta['cpus'])} CPUs, {meta['platform']}, Python "
              f"{meta['python']}, torch {meta.get('torch', '?')}, pyzmq {meta.get('zmq', '?')}; "
              f"git {meta.get('git_commit') or '?'}; {meta['started']}",
              f"- load average at start {meta.get('loadavg_start')}, at end {meta.get('loadavg_end')}; "
              f"the bench process (a client) runs torch with {meta.get('client_torch_threads')} intra-op thread(s)",
              f"- command: `{' '.join(meta['argv'])}`",
              *([f"- {plot_note}"] if plot_note else []),
              "",
              "Every figure is a **ratio of two variants measured side by side in this run**: the variants run in "
              "interleaved rounds (a short batch of each, in a fresh order every round), so machine noise hits "
              "them alike. Absolute times are given for context only and are noisy on a shared machine. "
              "\"round spread\" is the 25th-75th percentile of the ratio computed round by round: a wide spread "
              "means a noisy machine.", ""]
    for i, r in enumerate(results, 1):
        lines.append(f"## {numbered(i, r.title)}")
        lines.append("")
        if r.error:
            lines += ["**This section failed:**", "", "```", r.error.rstrip(), "```", ""]
        lines += r.lines
        shown = [p for p in r.plots if p.filename in made]
        if shown:
            lines.append("")
            for p in shown:
                lines += [f"![{p.title}]({p.filename})", ""]
        if r.notes:
            lines += ["", "Notes on the method:", ""] + [f"- {n}" for n in r.notes] + [""]
        lines.append(f"_Section wall time: {r.wall_s:.1f}s._")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    doc = {"meta": meta, "plots": made, "plots_note": plot_note,
           "sections": {r.name: {"title": r.title, "wall_s": round(r.wall_s, 3), "error": r.error, "notes": r.notes,
                                 **r.figures}
                        for r in results}}
    (out / "results.json").write_text(json.dumps(_plain(doc), indent=2, allow_nan=False) + "\n")


def numbered(i: int, title: str) -> str:
    """``title`` as the report's ``i``-th section (a number a section gives itself is replaced: with --only, or when
    the order of SECTIONS changes, the numbers still run 1, 2, 3)."""
    return f"{i}. " + re.sub(r"^\s*\d+\.\s*", "", title)


def _plain(obj):
    """``obj`` as strict JSON values: NaN and infinities become null, paths and tuples plain."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Entry point.


def parser() -> argparse.ArgumentParser:
    from . import SECTIONS

    p = argparse.ArgumentParser(
        prog="bench", description="Benchmark neuron_client against baselines measured in the same run "
                                  "(every figure is a ratio). Writes report.md, results.json and PNG plots.")
    p.add_argument("--out", default="bench-results", help="output folder (default: ./bench-results)")
    p.add_argument("--quick", action="store_true",
                   help="few rounds and sizes: finishes in about 3 minutes (for CI: it never asserts on times)")
    p.add_argument("--only", action="append", choices=list(SECTIONS), metavar="SECTION",
                   help=f"run only this section (repeatable); one of: {', '.join(SECTIONS)}")
    p.add_argument("--rounds", type=int, default=None, help="override the number of interleaved rounds")
    p.add_argument("--seed", type=int, default=0, help="seed of the round order shuffles (default 0)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads of the bench process, a client (default 1, like each worker the "
                        "suite's brokers start: see the report)")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    return p


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    from . import SECTIONS

    args = parser().parse_args(argv)
    if args.list:
        for name, (_, desc) in SECTIONS.items():
            print(f"{name:10} {desc}")
        return 0
    if args.rounds is not None and args.rounds < 1:
        print("bench: --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.torch_threads < 1:
        print("bench: --torch-threads must be at least 1", file=sys.stderr)
        return 2
    names = [n for n in SECTIONS if not args.only or n in args.only]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    signal.signal(signal.SIGTERM, _on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="nrt-bench-"))
    os.chmod(tmp, 0o700)
    ctx = Context(quick=args.quick, out=out, tmp=tmp, progress=progress, rng=random.Random(args.seed),
                  rounds=args.rounds)
    # Sections that use Ray start a private local instance: never join a cluster that something else on this
    # machine started (ray.init() with no address attaches to one, and then refuses num_cpus).
    os.environ.setdefault("RAY_ADDRESS", "local")
    import torch

    torch.set_num_threads(args.torch_threads)
    meta = machine_meta()
    meta.update(mode="quick" if args.quick else "full", loadavg_start=loadavg(), out=str(out),
                client_torch_threads=args.torch_threads)
    progress.note(f"{meta['mode']} run of {', '.join(names)} -> {out}")
    t_start = time.monotonic()
    results: list[SectionResult] = []
    interrupted = False
    try:
        for name in names:
            mod_name, desc = SECTIONS[name]
            progress.section(name, desc)
            t0 = time.monotonic()
            try:
                res = importlib.import_module(mod_name).run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception:
                res = SectionResult(name, name, error=traceback.format_exc())
                progress.note(f"section {name} FAILED:\n{res.error}")
            res.wall_s = time.monotonic() - t0
            results.append(res)
            CHILDREN.cleanup()  # a section leaves nothing running for the next
            progress.note(f"section {name} done in {res.wall_s:.1f}s")
    except KeyboardInterrupt:
        interrupted = True
        progress.note("interrupted: stopping brokers and child processes")
    finally:
        with contextlib.suppress(Exception):
            import neuron_client

            neuron_client.shutdown()
        CHILDREN.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    meta.update(wall_s=time.monotonic() - t_start, loadavg_end=loadavg(), interrupted=interrupted)
    if results:
        write_report(out, meta, results, progress)
        progress.note(f"wrote {out / 'report.md'} and {out / 'results.json'} in {meta['wall_s']:.0f}s")
    if interrupted:
        return 130
    return 1 if any(r.error for r in results) else 0
