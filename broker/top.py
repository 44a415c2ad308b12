"""``neuron-top``: a live view of the host's NeuronCores: per-core utilisation (now and a short history), requests
per second, p50/p99 call latency, queue depth and worker memory (PSS and USS), and the same per owning process.

Usage:

    neuron-top [--interval S] [--dir DIR]   # live, refreshing every S seconds (default 1)
    neuron-top --once [--interval S]        # one frame on stdout, for scripts (two samples S seconds apart)

Keys (live): h or ? help; s sort (core, utilisation, requests/s, memory); up/down (or k/j) select a process;
r release the selected process's cores (asks y/n: 'neuron-broker release --pid'); q or Ctrl-C quit.

Utilisation is the share of wall time the core's worker spent running models between two samples; requests per
second likewise. Latency is measured in the worker, from a request's receipt to its reply, over its last 512 calls
(within 60 s). Queue is the number of requests waiting behind the running one. Memory is the worker's PSS (its
share of memory, shared pages divided among the processes mapping them) and USS (what its exit would free): RSS
counts the pages all workers share with the forkserver in every one of them. The table fits the terminal: the
bar, the USS column and the history go before owners and models do, and owners keep the part of their command that
tells them apart. It works in any terminal (over ssh too); colours are left out where the terminal has none. Exit
codes: 0, 1 when no broker answers.

Batched models (``neuron_client.batched``) get a section of their own: requests per second, mean batch size, mean
queue time per request and compute time per batch between the two samples, requests waiting, in total and refused.
"""
from __future__ import annotations

import argparse
import os
import select
import sys
import time
from dataclasses import dataclass, field

from neuron_client.wire import config
from neuron_client.wire.errors import NeuronRuntimeError
from neuron_client.wire.status import StatusDoc

from .ls import fetch, not_running
from .status import _age, _bytes, _cut, distinguishing, fit, short_command

DEFAULT_INTERVAL_S = 1.0
LIVE_FETCH_TIMEOUT_S = 2.0  # the live view stays responsive (q) when the broker is slow
BAR_WIDTH = 10


@dataclass
class Sample:
    doc: StatusDoc
    at: float  # monotonic


@dataclass
class CoreRate:
    util: float | None  # 0..1, None before two samples
    rps: float | None


def rates(prev: Sample | None, cur: Sample) -> dict[int, CoreRate]:
    """Per-core utilisation and requests per second between two samples (None where unknown, e.g. a new worker)."""
    out = {}
    before = {c.index: c for c in prev.doc.cores} if prev else {}
    dt = cur.at - prev.at if prev else 0.0
    for c in cur.doc.cores:
        p = before.get(c.index)
        if p is None or dt <= 0 or p.worker.pid != c.worker.pid:
            out[c.index] = CoreRate(None, None)
            continue
        busy = c.perf.busy_s - p.perf.busy_s
        reqs = c.requests - p.requests
        out[c.index] = CoreRate(min(1.0, max(0.0, busy / dt)), max(0.0, reqs / dt))
    return out


def bar(util: float | None) -> str:
    """``[|||||     ]`` for 50% (ASCII, so that any terminal shows it)."""
    filled = 0 if util is None else round(util * BAR_WIDTH)
    return f"[{'|' * filled}{' ' * (BAR_WIDTH - filled)}]"


def _ms(value: float, window: int) -> str:
    if not window:
        return "-"
    return f"{value:.2f}ms" if value < 10 else f"{value:.0f}ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fit_table(columns, rows, width: int, selected: int = -1):
    """A rich table of ``rows`` (lists of ``(text, style)``) that fits ``width`` (:func:`broker.status.fit`: fixed
    columns keep their width; the flexible ones share what is left, cut with an ellipsis, the lightest left out when
    too narrow). ``columns`` are ``(header, justify, weight)`` or ``(header, justify, weight, minimum)``; row
    ``selected`` is shown reversed."""
    from rich.table import Table
    from rich.text import Text

    spec = [(c[0], c[3] if len(c) > 3 else 8, c[2]) for c in columns]
    widths = fit(spec, [[text for text, _ in r] for r in rows], width)
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False, header_style="bold reverse")
    for (header, justify, *_), w in zip(columns, widths):
        if w is not None:
            table.add_column(header, justify=justify, no_wrap=True, width=w, overflow="ellipsis")
    for n, r in enumerate(rows):
        table.add_row(*(Text(_cut(text, w), style=style) for (text, style), w in zip(r, widths) if w is not None),
                      style="reverse" if n == selected else None)
    return table


SPARKS = " ▁▂▃▄▅▆▇█"
HISTORY = 12  # samples of utilisation kept per core
SORTS = ("core", "util", "req/s", "memory")
HELP = """neuron-top keys

  h, ?        this help (any key closes it)
  s           sort cores and processes by: core, utilisation, requests/s, memory (PSS)
  up, down    select a process (also k, j)
  r           release the selected process's cores (asks y/n; its next call fails with LeaseLostError)
  q, Ctrl-C   quit

UTIL is the share of the last interval the core's worker ran models; HISTORY its last {n} intervals. """
"""PSS and USS are the worker's memory: its share of pages it shares with other workers, and what its exit would free."""


def sparkline(values) -> str:
    """``▁▃█`` for utilisations 0..1 (None: a blank)."""
    return "".join(" " if v is None else SPARKS[1 + min(7, int(v * 8))] if v > 0 else SPARKS[1] for v in values)


def worker_memory(pids) -> dict[int, tuple[int, int]]:
    """(PSS, USS) in bytes of each worker pid that can be read (psutil ``memory_full_info``; same user)."""
    import psutil

    out = {}
    for pid in pids:
        if not pid:
            continue
        try:
            info = psutil.Process(pid).memory_full_info()
            out[pid] = (getattr(info, "pss", info.uss), info.uss)
        except (psutil.Error, OSError, AttributeError):
            pass
    return out


@dataclass
class View:
    """What the live view remembers between frames: history, sort, selection, help, a pending confirmation."""

    history: dict = field(default_factory=dict)  # core -> deque of utilisation
    sort: str = "core"
    selected: int = 0  # index into the (sorted) process rows
    help: bool = False
    confirm: int = 0  # pid awaiting y/n
    message: str = ""
    pids: list = field(default_factory=list)  # the process rows' pids, in display order
    live: bool = False  # show the selection

    def record(self, r: dict[int, "CoreRate"]) -> None:
        from collections import deque

        for core, rate in r.items():
            self.history.setdefault(core, deque(maxlen=HISTORY)).append(rate.util)


def frame(prev: Sample | None, cur: Sample, width: int = 160, problem: str = "", view: View | None = None,
          memory: dict | None = None):
    """The rich renderable of one frame, ``width`` columns wide at most. ``view``: the live view's state (history,
    sort, selection, help); ``memory``: worker pid -> (PSS, USS) (default: read now)."""
    from rich.console import Group
    from rich.text import Text

    from neuron_client.wire.cores import format_cores

    view = view or View()
    doc = cur.doc
    b = doc.broker
    r = rates(prev, cur)
    memory = worker_memory(c.worker.pid for c in doc.cores) if memory is None else memory
    known = [x for x in r.values() if x.util is not None]
    total_rps = sum(x.rps for x in known) if known else None
    mean_util = sum(x.util for x in known) / len(known) if known else None
    owned = sum(1 for c in doc.cores if c.owner)
    head = Text()
    head.append("neuron-top", style="bold")
    head.append(f"  broker pid {b.pid} · {b.backend} · {b.cores} cores, {owned} owned · "
                f"util {'-' if mean_util is None else f'{mean_util * 100:.0f}%'} · "
                f"{_rate(total_rps)} req/s · up {_age(b.uptime_s)} · {time.strftime('%H:%M:%S')}")
    if b.draining:
        head.append("  DRAINING", style="bold yellow")
    head.append(f"  sort: {view.sort} · h help · q quits", style="dim")
    head.truncate(width, overflow="ellipsis")
    parts = [head]
    if problem:
        parts.append(Text(problem, style="bold red"))
    if view.help:
        parts.append(Text(HELP.format(n=HISTORY)))
        return Group(*parts)

    def mem(pid: int, which: int) -> int:
        return memory.get(pid, (0, 0))[which]

    def core_key(c):
        rate = r[c.index]
        return {"core": (c.index,), "util": (-(rate.util or 0), c.index), "req/s": (-(rate.rps or 0), c.index),
                "memory": (-mem(c.worker.pid, 0), c.index)}[view.sort]

    state_style = {"free": "dim", "owned": "green", "failed": "bold red"}
    rows = []
    for c in sorted(doc.cores, key=core_key):
        perf = c.perf
        rate = r[c.index]
        owner = c.owner
        pss, uss = mem(c.worker.pid, 0), mem(c.worker.pid, 1)
        rows.append([
            (f"nc{c.index}", ""),
            (c.state, state_style.get(c.state, "")),
            ("-" if rate.util is None else f"{rate.util * 100:.0f}%", ""),
            (bar(rate.util), "cyan" if rate.util else ""),
            (sparkline(view.history.get(c.index, ())).rjust(HISTORY), "cyan"),
            (_rate(rate.rps), ""),
            (_ms(perf.p50_ms, perf.window), ""),
            (_ms(perf.p99_ms, perf.window), ""),
            (str(perf.queue), ""),
            (_bytes(pss) if pss else "-", ""),
            (_bytes(uss) if uss else "-", ""),
            (f"{owner.pid} {distinguishing(owner.cmd)}" if owner else "-", ""),
            (", ".join(sorted({m.name for m in c.models})) or "-", ""),
        ])
    # what goes first when the terminal is narrow: the bar, USS, the history; owners and models last
    parts.append(fit_table([("NC", "left", 0), ("STATE", "left", 0), ("UTIL", "right", 0), ("", "left", 1, BAR_WIDTH + 2),
                            ("HISTORY", "left", 3, HISTORY), ("REQ/S", "right", 0), ("P50", "right", 0),
                            ("P99", "right", 0), ("QUEUE", "right", 0), ("PSS", "right", 0),
                            ("USS", "right", 2, 6), ("OWNER", "left", 8, 12), ("MODELS", "left", 6, 8)], rows, width))

    by_core = {c.index: c for c in doc.cores}
    procs = []
    for lease in doc.leases:
        mine = [by_core[n] for n in lease.cores if n in by_core]
        utils = [r[c.index].util for c in mine if r[c.index].util is not None]
        rps = [r[c.index].rps for c in mine if r[c.index].rps is not None]
        procs.append((lease, mine, utils, rps, sum(mem(c.worker.pid, 0) for c in mine)))
    order = {"core": lambda p: ((p[0].cores or [-1])[0],), "util": lambda p: (-(sum(p[2]) / len(p[2]) if p[2] else 0),),
             "req/s": lambda p: (-sum(p[3]),), "memory": lambda p: (-p[4],)}[view.sort]
    procs.sort(key=lambda p: (*order(p), p[0].pid))
    view.pids = [p[0].pid for p in procs]
    view.selected = min(view.selected, max(0, len(procs) - 1))
    rows = []
    for lease, mine, utils, rps, pss in procs:
        p99 = max((c.perf.p99_ms for c in mine), default=0.0)
        window = sum(c.perf.window for c in mine)
        rows.append([(str(lease.pid), "bold"), (format_cores(lease.cores), ""),
                     (f"{sum(utils) / len(utils) * 100:.0f}%" if utils else "-", ""),
                     (_rate(sum(rps)) if rps else "-", ""), (_ms(p99, window), ""),
                     (_bytes(pss) if pss else "-", ""), (_age(lease.lease_age_s), ""),
                     (distinguishing(lease.cmd), "")])
    parts.append(Text(""))
    parts.append(Text(f"processes ({len(doc.leases)})" + ("  ↑/↓ select · r release" if procs else ""),
                      style="bold"))
    if rows:
        parts.append(fit_table([("PID", "right", 0), ("CORES", "left", 0), ("UTIL", "right", 0),
                                ("REQ/S", "right", 0), ("P99", "right", 0), ("PSS", "right", 0),
                                ("LEASE AGE", "right", 0), ("COMMAND", "left", 1, 12)], rows, width,
                               selected=view.selected if view.live else -1))
    else:
        parts.append(Text("  no process holds cores", style="dim"))
    parts += batcher_parts(prev, cur, width)
    if doc.pending:
        parts.append(Text("waiting: " + "; ".join(f"pid {p.pid} for {p.requested} ({p.waited_s:.1f}s)"
                                                  for p in doc.pending)))
    if view.confirm:
        lease = next((p[0] for p in procs if p[0].pid == view.confirm), None)
        what = f" ({short_command(lease.cmd)!r}, {format_cores(lease.cores)})" if lease else ""
        parts.append(Text(f"release pid {view.confirm}{what}? its next call fails with LeaseLostError [y/N]",
                          style="bold yellow"))
    elif view.message:
        parts.append(Text(view.message, style="bold"))
    return Group(*parts)


def batcher_rows(prev: Sample | None, cur: Sample) -> list[list[str]]:
    """One row per batched model of every owner (``leases[].batchers``, as the owners last reported them): pid, model,
    requests per second and the batches' size, queue and compute time between the two samples (since the batcher was
    made for the first frame), requests waiting, refused and timed out."""
    before = {(le.pid, b.model): b for le in prev.doc.leases for b in le.batchers} if prev else {}
    dt = cur.at - prev.at if prev else 0.0
    rows = []
    for lease in sorted(cur.doc.leases, key=lambda x: (x.cores or [-1])[0]):
        for b in lease.batchers:
            p = before.get((lease.pid, b.model))
            if p is None or p.requests > b.requests:  # new (or made again): its totals so far
                p = None
            d = {k: getattr(b, k) - (getattr(p, k) if p else 0)
                 for k in ("requests", "executions", "rows", "queue_s", "compute_s", "served", "failed")}
            done = d["served"] + d["failed"]
            rows.append([str(lease.pid), b.model, _rate(d["requests"] / dt) if p and dt > 0 else "-",
                         f"{d['rows'] / d['executions']:.1f}" if d["executions"] else "-",
                         f"{d['queue_s'] / done * 1000:.2f}ms" if done else "-",
                         f"{d['compute_s'] / d['executions'] * 1000:.2f}ms" if d["executions"] else "-",
                         str(b.waiting), str(b.requests), str(b.refused + b.timed_out)])
    return rows


def batcher_parts(prev: Sample | None, cur: Sample, width: int) -> list:
    """The ``batched models`` section of a frame (nothing when no owner has one)."""
    from rich.text import Text

    rows = batcher_rows(prev, cur)
    if not rows:
        return []
    columns = [("PID", "right", 0), ("MODEL", "left", 1), ("REQ/S", "right", 0), ("BATCH", "right", 0),
               ("QUEUE T", "right", 0), ("COMPUTE T", "right", 0), ("WAITING", "right", 0), ("REQUESTS", "right", 0),
               ("REFUSED", "right", 0)]
    return [Text(""), Text(f"batched models ({len(rows)})", style="bold"),
            fit_table(columns, [[(text, "") for text in r] for r in rows], width)]


class Keys:
    """Single key presses from a terminal (cbreak mode: Ctrl-C still interrupts), restored on exit."""

    def __init__(self, stream):
        self.fd = stream.fileno() if stream is not None and stream.isatty() else None
        self.saved = None

    def __enter__(self):
        if self.fd is not None:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def wait(self, timeout_s: float) -> str:
        """Keys pressed within ``timeout_s`` ('' if none; without a terminal, just waits)."""
        if self.fd is None:
            time.sleep(timeout_s)
            return ""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return ""
        data = os.read(self.fd, 64)
        return data.decode(errors="replace") if data else "q"  # end of input: quit


def console(live: bool):
    from rich.console import Console

    if live or sys.stdout.isatty():
        return Console()
    return Console(width=int(os.environ.get("COLUMNS") or 160), no_color=True, highlight=False)


def run_once(directory: str, interval_s: float) -> int:
    first = fetch(directory)
    if first is None:
        return not_running("neuron-top", directory)
    prev = Sample(first, time.monotonic())
    time.sleep(interval_s)
    doc = fetch(directory)
    if doc is None:
        return not_running("neuron-top", directory)
    con = console(live=False)
    cur = Sample(doc, time.monotonic())
    view = View()
    view.record(rates(prev, cur))
    con.print(frame(prev, cur, con.width, view=view))
    return 0


def key_presses(data: str) -> list[str]:
    """Single keys of what a terminal sent: characters, and 'up' / 'down' for the arrow keys' escape sequences."""
    keys, i = [], 0
    while i < len(data):
        if data.startswith(("\x1b[A", "\x1bOA"), i):
            keys.append("up")
            i += 3
        elif data.startswith(("\x1b[B", "\x1bOB"), i):
            keys.append("down")
            i += 3
        else:
            keys.append(data[i])
            i += 1
    return keys


def handle(view: View, key: str, directory: str) -> bool:
    """Apply one key to the view; False to quit."""
    if view.confirm:
        pid, view.confirm = view.confirm, 0
        if key in ("y", "Y"):
            view.message = release(directory, pid)
        else:
            view.message = f"pid {pid} keeps its cores"
        return True
    if view.help:
        view.help = False
        return key not in ("q", "Q")
    if key in ("q", "Q"):
        return False
    view.message = ""
    if key in ("h", "?"):
        view.help = True
    elif key == "s":
        view.sort = SORTS[(SORTS.index(view.sort) + 1) % len(SORTS)]
    elif key in ("up", "k"):
        view.selected = max(0, view.selected - 1)
    elif key in ("down", "j"):
        view.selected = min(max(0, len(view.pids) - 1), view.selected + 1)
    elif key == "r":
        if view.pids:
            view.confirm = view.pids[min(view.selected, len(view.pids) - 1)]
        else:
            view.message = "no process holds cores: nothing to release"
    return True


def release(directory: str, pid: int) -> str:
    """Take ``pid``'s cores back (as 'neuron-broker release --pid'); what happened, in words."""
    from neuron_client.wire.broker_client import BrokerClient
    from neuron_client.wire.cores import format_cores

    try:
        with BrokerClient.of_dir(directory, LIVE_FETCH_TIMEOUT_S) as broker:
            reply = broker.release(pid)
    except NeuronRuntimeError as exc:
        return f"could not release pid {pid}: {exc}"
    if not reply.cores:
        return f"pid {pid} holds no cores any more"
    return f"released {format_cores(reply.cores)} of pid {pid}; its next call fails with LeaseLostError"


def run_live(directory: str, interval_s: float) -> int:
    from rich.live import Live

    doc = fetch(directory)
    if doc is None:
        return not_running("neuron-top", directory)
    con = console(live=True)
    view = View(live=True)
    prev, cur = None, Sample(doc, time.monotonic())
    problem = ""
    try:
        with Keys(sys.stdin) as keys, Live(frame(prev, cur, con.width, view=view), console=con, screen=True,
                                           auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
            next_sample = time.monotonic() + interval_s
            while True:
                pressed = keys.wait(max(0.0, next_sample - time.monotonic()))
                for key in key_presses(pressed):
                    if not handle(view, key, directory):
                        return 0
                if pressed and time.monotonic() < next_sample:  # answer a key at once, with the last sample
                    live.update(frame(prev, cur, con.width, problem, view), refresh=True)
                    continue
                next_sample = time.monotonic() + interval_s
                doc = fetch(directory, LIVE_FETCH_TIMEOUT_S)
                if doc is None:
                    problem = (f"the broker at {config.broker_address(directory)} does not answer (retrying every "
                               f"{interval_s:g}s; q quits)")
                else:
                    problem = ""
                    prev, cur = cur, Sample(doc, time.monotonic())
                    view.record(rates(prev, cur))
                live.update(frame(prev, cur, con.width, problem, view), refresh=True)
    except KeyboardInterrupt:
        return 0


def main(argv=None) -> int:
    from neuron_client.tools.cli import guarded

    return guarded(_main, argv)


def _main(argv=None) -> int:
    from neuron_client.tools.cli import Formatter, add_version

    from .commands import plain

    p = argparse.ArgumentParser(prog="neuron-top", description=plain(__doc__), formatter_class=Formatter)
    add_version(p)
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between samples")
    p.add_argument("--dir", default=None, help="broker directory (default: $NEURON_BROKER_DIR or a private one)")
    args = p.parse_args(argv)
    if args.interval <= 0:
        p.error(f"--interval must be > 0 seconds, got {args.interval}")
    directory = os.path.abspath(args.dir or config.broker_dir())
    try:
        config.ensure_private_dir(directory)
    except NeuronRuntimeError as exc:  # a squatted directory: show nothing planted there
        print(f"neuron-top: {exc}", file=sys.stderr)
        return 2
    return run_once(directory, args.interval) if args.once else run_live(directory, args.interval)


if __name__ == "__main__":
    sys.exit(main())
