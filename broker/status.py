"""The broker's status document (``neuron-broker status``) as a table; its ``perf`` part from worker stats."""
from __future__ import annotations

import os

from neuron_client.wire.cores import format_visible
from neuron_client.wire.status import LatencyHistogram, PerfStatus, StatusDoc


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…" if width > 0 else ""


def perf_status(stats) -> PerfStatus:
    """The ``perf`` part of a core in the status document, from its worker's last stats (zeros before any)."""
    from neuron_client.wire.messages import LATENCY_BUCKETS_S

    n = len(LATENCY_BUCKETS_S) + 1
    if stats is None:
        return PerfStatus(busy_s=0.0, p50_ms=0.0, p99_ms=0.0, window=0, queue=0, loads=0, load_s=0.0,
                          latency_sum_s=0.0, latency_hist=LatencyHistogram(le_s=list(LATENCY_BUCKETS_S),
                                                                           counts=[0] * n))
    counts = (list(stats.latency_buckets or []) + [0] * n)[:n]
    return PerfStatus(busy_s=round(stats.busy_s, 6), p50_ms=round(stats.latency_p50_s * 1000, 3),
                      p99_ms=round(stats.latency_p99_s * 1000, 3), window=stats.latency_window, queue=stats.queue,
                      loads=stats.loads, load_s=round(stats.load_s, 6), latency_sum_s=round(stats.latency_sum_s, 6),
                      latency_hist=LatencyHistogram(le_s=list(LATENCY_BUCKETS_S), counts=counts))


def short_command(cmd: str) -> str:
    """``/opt/venv/bin/python /srv/app/serve.py --port 1`` -> ``python serve.py --port 1``."""
    parts = cmd.split()
    return " ".join(os.path.basename(p) if "/" in p and not p.startswith("-") else p for p in parts)


def core_rows(doc: StatusDoc, fitted: bool = False) -> list[list[str]]:
    command = distinguishing if fitted else short_command
    rows = []
    for c in doc.cores:
        owner, worker = c.owner, c.worker
        models = ", ".join(f"{m.name}#{m.id}" for m in c.models) or "-"
        where = f"{c.device} cpus {format_visible(c.cpus)}" if c.device == "cpu" else c.device
        rows.append([
            f"nc{c.index}",
            c.state,
            where,
            f"{worker.pid}{'' if worker.ready else ' (starting)'}" if worker.pid else "-",
            _bytes(worker.memory_bytes) if worker.memory_bytes else "-",
            f"{owner.pid} {command(owner.cmd)}" if owner else "-",
            _age(owner.lease_age_s) if owner else "-",
            models,
            str(c.requests),
        ])
    return rows


def distinguishing(cmd: str) -> str:
    """The part of a command line that tells processes apart: ``/usr/bin/python3 -u -m app.serve --port 1`` ->
    ``app.serve --port 1``, ``python /srv/serve.py`` -> ``serve.py``; other commands as :func:`short_command`."""
    words = short_command(cmd).split()
    if words and words[0].startswith("python"):
        rest = words[1:]
        while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
            rest = rest[2:] if rest[0] in ("-W", "-X", "--check-hash-based-pycs") else rest[1:]  # and its value
        if rest[:1] == ["-m"]:
            rest = rest[1:]
        if rest:
            return " ".join(rest)
    return " ".join(words)


def output_width(wide: bool = False) -> int | None:
    """How wide a table may be: None (nothing cut) with ``wide`` or when stdout is no terminal and ``COLUMNS`` is
    unset (a pipe, a file: as ps does); else the terminal's width (or ``COLUMNS``)."""
    import shutil
    import sys

    if wide:
        return None
    if os.environ.get("COLUMNS", "").strip().isdigit():
        return int(os.environ["COLUMNS"])
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size((80, 24)).columns


def fit(columns, rows, width: int | None) -> list[int | None]:
    """The width of each column (None: left out) so that the table fits ``width`` (None: every column at its
    natural width). ``columns`` are ``(header, minimum, weight)``: fixed columns (weight 0) keep their width; the
    flexible ones share what is left, in proportion to their weight, and are cut (with an ellipsis) down to their
    minimum; then the lightest is left out, and so on."""
    natural = [max([len(h)] + [len(r[i]) for r in rows]) for i, (h, _, _) in enumerate(columns)]
    if width is None:
        return natural
    widths: list[int | None] = list(natural)
    flex = [i for i, (_, _, weight) in enumerate(columns) if weight]
    while True:
        fixed = sum(natural[i] + 1 for i, w in enumerate(widths) if w is not None and i not in flex)
        room = width - fixed - len(flex)
        need = sum(natural[i] for i in flex)
        if need <= room:
            for i in flex:
                widths[i] = natural[i]
            return widths
        total = sum(columns[i][2] for i in flex)
        shares = {i: min(natural[i], max(0, room) * columns[i][2] // total) for i in flex}
        spare = max(0, room) - sum(shares.values())
        for i in sorted(flex, key=lambda i: -columns[i][2]):  # what a capped column leaves goes to the others
            extra = min(spare, natural[i] - shares[i])
            shares[i] += extra
            spare -= extra
        short = [i for i in flex if shares[i] < min(columns[i][1], natural[i])]
        if not short:
            for i in flex:
                widths[i] = shares[i]
            return widths
        drop = min(short, key=lambda i: (columns[i][2], -i))
        widths[drop] = None
        flex.remove(drop)
        if not flex:
            return widths


def table(headers: list[str], rows: list[list[str]], width: int | None = None, flexible: dict | None = None) -> str:
    """Rows under headers, columns two spaces apart, fitted to ``width`` (see :func:`fit`; ``flexible``: {header:
    (minimum, weight)} of the columns that may be cut or left out)."""
    flexible = flexible or {}
    columns = [(h, *flexible.get(h, (0, 0))) for h in headers]
    widths = fit([(h, m, w) for h, m, w in columns], rows, None if width is None else width - len(headers) + 2)
    keep = [i for i, w in enumerate(widths) if w is not None]
    lines = ["  ".join(_cut(headers[i], widths[i]).ljust(widths[i]) for i in keep).rstrip()]
    for r in rows:
        lines.append("  ".join(_cut(r[i], widths[i]).ljust(widths[i]) for i in keep).rstrip())
    return "\n".join(lines)


HEADERS = ["CORE", "STATE", "DEVICE", "WORKER", "MEMORY", "OWNER (PID COMMAND)", "LEASE AGE", "MODELS", "REQUESTS"]
# at 80 columns: commands and models are cut first (owners keep their distinguishing part), then devices left out
FLEXIBLE = {"DEVICE": (10, 1), "OWNER (PID COMMAND)": (14, 3), "MODELS": (10, 2), "WORKER": (6, 1)}


def render(doc: StatusDoc, width: int | None = None) -> str:
    b = doc.broker
    owned = sum(1 for c in doc.cores if c.state == "owned")
    head = (f"neuron-broker pid {b.pid} · {b.backend} backend · {b.cores} cores ({owned} owned) · "
            f"{b.address} · up {_age(b.uptime_s)}")
    if b.draining:
        head += " · DRAINING (no new leases; 'neuron-broker drain --cancel' resumes)"
    out = [head if width is None else _cut(head, width), table(HEADERS, core_rows(doc, width is not None), width, FLEXIBLE)]
    if doc.pending:
        out.append("waiting: " + "; ".join(f"pid {p.pid} for {p.requested} ({p.waited_s:.1f}s)" for p in doc.pending))
    return "\n".join(out)
