"""``neuron-top``: a live view of the host's NeuronCores: per-core utilisation, requests per second, p50/p99 call
latency, queue depth and worker memory, and the same per owning process. Press q (or Ctrl-C) to quit.

Usage::

    neuron-top [--interval S] [--dir DIR]   # live, refreshing every S seconds (default 1)
    neuron-top --once [--interval S]        # one frame on stdout, for scripts (two samples S seconds apart)

Utilisation is the share of wall time the core's worker spent running models between two samples; requests per
second likewise. Latency is measured in the worker, from a request's receipt to its reply, over its last 512 calls
(within 60 s). Queue is the number of requests waiting behind the running one. It works in any terminal (over ssh
too); colours are left out where the terminal has none. Exit codes: 0, 1 when no broker answers.

Batched models (``neuron_client.batched``) get a section of their own: requests per second, mean batch size, mean
queue time per request and compute time per batch between the two samples, requests waiting, in total and refused.
"""
from __future__ import annotations

import argparse
import os
import select
import sys
import time
from dataclasses import dataclass

from neuron_client.wire import config
from neuron_client.wire.errors import NeuronRuntimeError
from neuron_client.wire.status import StatusDoc

from .ls import fetch, not_running
from .status import _age, _bytes, _cut, short_command

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
    """``[|||||     ]  50%`` (ASCII, so that any terminal shows it)."""
    if util is None:
        return "[" + " " * BAR_WIDTH + "]    -"
    filled = round(util * BAR_WIDTH)
    return f"[{'|' * filled}{' ' * (BAR_WIDTH - filled)}] {util * 100:3.0f}%"


def _ms(value: float, window: int) -> str:
    if not window:
        return "-"
    return f"{value:.2f}ms" if value < 10 else f"{value:.0f}ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fit_table(columns, rows, width: int):
    """A rich table of ``rows`` (lists of ``(text, style)``) that fits ``width``: fixed columns keep their width;
    the flexible ones (weight > 0) share what is left, cut with an ellipsis, and are left out when too narrow.

    ``columns`` are ``(header, justify, weight)``.
    """
    from rich.table import Table
    from rich.text import Text

    natural = [max([len(h)] + [len(r[i][0]) for r in rows]) for i, (h, _, _) in enumerate(columns)]
    widths = dict(enumerate(natural))
    keep = set(range(len(columns)))
    flex = [i for i, (_, _, weight) in enumerate(columns) if weight]
    while flex:  # every column takes its width + 1 space
        room = width - sum(natural[i] + 1 for i in keep if i not in flex) - len(flex)
        total = sum(columns[i][2] for i in flex)
        shares = {i: min(natural[i], max(0, room) * columns[i][2] // total) for i in flex}
        too_narrow = [i for i in flex if shares[i] < min(8, natural[i])]
        if not too_narrow:
            widths.update(shares)
            break
        drop = min(too_narrow, key=lambda i: columns[i][2])
        keep.discard(drop)
        flex.remove(drop)
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False,
                  header_style="bold reverse")
    for i, (header, justify, _) in enumerate(columns):
        if i in keep:
            table.add_column(header, justify=justify, no_wrap=True, width=widths[i], overflow="ellipsis")
    for r in rows:
        table.add_row(*(Text(_cut(text, widths[i]), style=style) for i, (text, style) in enumerate(r) if i in keep))
    return table


def frame(prev: Sample | None, cur: Sample, width: int = 160, problem: str = ""):
    """The rich renderable of one frame, ``width`` columns wide at most."""
    from rich.console import Group
    from rich.text import Text

    from neuron_client.wire.cores import format_cores

    doc = cur.doc
    b = doc.broker
    r = rates(prev, cur)
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
    head.append("   q quits", style="dim")
    parts = [head]
    if problem:
        parts.append(Text(problem, style="bold red"))

    state_style = {"free": "dim", "owned": "green", "failed": "bold red"}
    rows = []
    for c in doc.cores:
        perf = c.perf
        rate = r[c.index]
        owner = c.owner
        rows.append([
            (f"nc{c.index}", ""),
            (c.state, state_style.get(c.state, "")),
            (bar(rate.util), "cyan" if rate.util else ""),
            (_rate(rate.rps), ""),
            (_ms(perf.p50_ms, perf.window), ""),
            (_ms(perf.p99_ms, perf.window), ""),
            (str(perf.queue), ""),
            (_bytes(c.worker.memory_bytes) if c.worker.memory_bytes else "-", ""),
            (f"{owner.pid} {short_command(owner.cmd)}" if owner else "-", ""),
            (", ".join(sorted({m.name for m in c.models})) or "-", ""),
        ])
    parts.append(fit_table([("NC", "left", 0), ("STATE", "left", 0), ("UTIL", "left", 0), ("REQ/S", "right", 0),
                            ("P50", "right", 0), ("P99", "right", 0), ("QUEUE", "right", 0), ("MEM", "right", 0),
                            ("OWNER", "left", 2), ("MODELS", "left", 1)], rows, width))

    by_core = {c.index: c for c in doc.cores}
    rows = []
    for lease in sorted(doc.leases, key=lambda x: (x.cores or [-1])[0]):
        mine = [by_core[n] for n in lease.cores if n in by_core]
        utils = [r[c.index].util for c in mine if r[c.index].util is not None]
        rps = [r[c.index].rps for c in mine if r[c.index].rps is not None]
        p99 = max((c.perf.p99_ms for c in mine), default=0.0)
        window = sum(c.perf.window for c in mine)
        rows.append([(str(lease.pid), "bold"), (format_cores(lease.cores), ""),
                     (f"{sum(utils) / len(utils) * 100:.0f}%" if utils else "-", ""),
                     (_rate(sum(rps)) if rps else "-", ""), (_ms(p99, window), ""),
                     (_bytes(sum(c.worker.memory_bytes for c in mine)), ""), (_age(lease.lease_age_s), ""),
                     (short_command(lease.cmd), "")])
    parts.append(Text(""))
    parts.append(Text(f"processes ({len(doc.leases)})", style="bold"))
    if rows:
        parts.append(fit_table([("PID", "right", 0), ("CORES", "left", 0), ("UTIL", "right", 0),
                                ("REQ/S", "right", 0), ("P99", "right", 0), ("MEM", "right", 0),
                                ("LEASE AGE", "right", 0), ("COMMAND", "left", 1)], rows, width))
    else:
        parts.append(Text("  no process holds cores", style="dim"))
    parts += batcher_parts(prev, cur, width)
    if doc.pending:
        parts.append(Text("waiting: " + "; ".join(f"pid {p.pid} for {p.requested} ({p.waited_s:.1f}s)"
                                                  for p in doc.pending)))
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
    con.print(frame(prev, Sample(doc, time.monotonic()), con.width))
    return 0


def run_live(directory: str, interval_s: float) -> int:
    from rich.live import Live

    doc = fetch(directory)
    if doc is None:
        return not_running("neuron-top", directory)
    con = console(live=True)
    prev, cur = None, Sample(doc, time.monotonic())
    try:
        with Keys(sys.stdin) as keys, Live(frame(prev, cur, con.width), console=con, screen=True, auto_refresh=False,
                                           redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                pressed = keys.wait(interval_s)
                if "q" in pressed.lower():
                    return 0
                doc = fetch(directory, LIVE_FETCH_TIMEOUT_S)
                if doc is None:
                    live.update(frame(prev, cur, con.width, f"the broker at {config.broker_address(directory)} does not answer "
                                                 f"(retrying every {interval_s:g}s; q quits)"), refresh=True)
                    continue
                prev, cur = cur, Sample(doc, time.monotonic())
                live.update(frame(prev, cur, con.width), refresh=True)
    except KeyboardInterrupt:
        return 0


def main(argv=None) -> int:
    from .commands import plain

    p = argparse.ArgumentParser(prog="neuron-top", description=plain(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
