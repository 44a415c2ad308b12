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
    return text if len(text) <= width else text[: width - 1] + "…"


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


def core_rows(doc: StatusDoc) -> list[list[str]]:
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
            f"{owner.pid} {_cut(short_command(owner.cmd), 36)}" if owner else "-",
            _age(owner.lease_age_s) if owner else "-",
            _cut(models, 40),
            str(c.requests),
        ])
    return rows


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


HEADERS = ["CORE", "STATE", "DEVICE", "WORKER", "MEMORY", "OWNER (PID COMMAND)", "LEASE AGE", "MODELS", "REQUESTS"]


def render(doc: StatusDoc) -> str:
    b = doc.broker
    owned = sum(1 for c in doc.cores if c.state == "owned")
    head = (f"neuron-broker pid {b.pid} · {b.backend} backend · {b.cores} cores ({owned} owned) · "
            f"{b.address} · up {_age(b.uptime_s)}")
    if b.draining:
        head += " · DRAINING (no new leases; 'neuron-broker drain --cancel' resumes)"
    out = [head, table(HEADERS, core_rows(doc))]
    if doc.pending:
        out.append("waiting: " + "; ".join(f"pid {p.pid} for {p.requested} ({p.waited_s:.1f}s)" for p in doc.pending))
    return "\n".join(out)
