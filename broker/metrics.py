"""Prometheus metrics of the broker: ``neuron-broker start --metrics-port 9400`` serves ``/metrics``.

The HTTP server (``prometheus_client.start_http_server``, on 127.0.0.1 unless ``--metrics-host`` says otherwise)
runs in a thread of the broker process, but never touches the broker's state: at each scrape, its collector asks the
broker's loop for a fresh status document (:class:`Snapshots`), waits for it briefly, and builds every metric from
that document. The loop answers between two polls, so a scrape costs the broker one ``status_doc()``.

Metrics (labels in braces):

* ``neuron_broker_cores``, ``neuron_broker_draining``, ``neuron_broker_uptime_seconds``
* ``neuron_core_state{core,device,state}`` (1 for the core's state: free, owned, failed), ``neuron_core_owned{core}``
* ``neuron_core_owner_info{core,pid,cmd}`` (1 per owned core)
* ``neuron_core_requests_total{core}``, ``neuron_core_errors_total{core}``, ``neuron_core_busy_seconds_total{core}``
* ``neuron_core_request_duration_seconds{core}`` (histogram: receipt to reply, in the worker)
* ``neuron_core_latency_seconds{core,quantile}`` (a summary: 0.5 and 0.99 over the worker's recent window; its
  ``_sum`` and ``_count`` since the worker started), ``neuron_core_wait_seconds_total{core}`` (time in the worker
  outside the model; ``neuron_core_busy_seconds_total`` is the time in it)
* ``neuron_core_queue_depth{core}``, ``neuron_core_models{core}``
* ``neuron_worker_memory_bytes{core}``, ``neuron_worker_ready{core}``, ``neuron_worker_restarts_total{core}`` (every
  crash since the broker started), ``neuron_worker_recent_crashes{core}`` (those within ``--restart-window``)
* ``neuron_model_loads_total{core}``, ``neuron_model_load_seconds_total{core}``
* ``neuron_model_requests_total{model,core}`` (executions), ``neuron_model_inferences_total`` (items: the calls'
  batch sizes summed), ``neuron_model_failures_total``, ``neuron_model_queue_seconds_total``,
  ``neuron_model_compute_seconds_total``, ``neuron_model_bytes{model,core}`` (per model name, as Triton and
  TorchServe label them)
* ``neuron_build_info{version,python}``
* ``neuron_leases_active``, ``neuron_acquires_waiting``, ``neuron_leases_granted_total``,
  ``neuron_leases_ended_total{reason}`` (reason: a :class:`broker.state.EndReason` value),
  ``neuron_leases_reclaimed_total`` (every reason but released)
* ``neuron_process_cores{pid,cmd}`` (cores per owning process)
* ``neuron_batcher_requests_total{pid,model}``, ``_served_total``, ``_executions_total``, ``_rows_total``,
  ``_queue_seconds_total``, ``_compute_seconds_total``, ``_failed_total``,
  ``_refused_total{reason=queue_full|timed_out}``, ``neuron_batcher_queue_depth``,
  ``neuron_batcher_mean_batch_size``: the batched models of each owner (``neuron_client.batched``), as the owner
  last reported them
* the broker process's own ``process_*`` metrics.

Every local user can read the endpoint, and a command line can hold secrets (tokens, passwords in arguments), so
``cmd`` is only the owner's executable base name (``python``) unless the broker was started with
``--metrics-show-cmdline`` (then the command line itself, cut at :data:`CMDLINE_MAX_CHARS`). The pid stays: operators
need it for ``neuron-broker release --pid``.
"""
from __future__ import annotations

import logging
import os
import threading

from .state import EndReason

log = logging.getLogger("neuron.broker")
SCRAPE_WAIT_S = 2.0  # a scrape waits this long for the broker's loop, then serves the last document it has
END_REASONS = tuple(r.value for r in EndReason)
CMDLINE_MAX_CHARS = 200
SHOW_CMDLINE = False  # the default of serve(); neuron-broker start --metrics-show-cmdline sets it


def command_label(cmd: str, show_cmdline: bool = False) -> str:
    """The ``cmd`` label of an owner: its executable's base name, or (opted in) its command line, cut short."""
    if show_cmdline:
        return cmd[:CMDLINE_MAX_CHARS]
    words = cmd.split(None, 1)
    return os.path.basename(words[0]) if words else ""


class Counters:
    """Lease counters the broker keeps for metrics and status (totals since the broker started)."""

    def __init__(self):
        self.granted = 0
        self.ended = dict.fromkeys(END_REASONS, 0)

    def lease_ended(self, reason: EndReason) -> None:
        self.ended[EndReason(reason).value] += 1


class Snapshots:
    """Status documents handed from the broker's loop (the only thread touching its state) to scrape threads."""

    def __init__(self):
        self.cond = threading.Condition()
        self.wanted = 0
        self.served = 0
        self.doc = None  # the last StatusDoc

    def get(self, timeout_s: float = SCRAPE_WAIT_S):
        """A fresh document (scrape thread); the last one if the loop does not answer within ``timeout_s``."""
        with self.cond:
            self.wanted += 1
            ticket = self.wanted
            self.cond.wait_for(lambda: self.served >= ticket, timeout_s)
            return self.doc

    def publish_if_wanted(self, build) -> None:
        """Build and hand over a document if a scrape waits for one (broker loop; cheap when none does)."""
        if self.wanted == self.served:  # a racy read is fine: a missed request is served at the next tick
            return
        with self.cond:
            target = self.wanted
        doc = build()
        with self.cond:
            self.doc, self.served = doc, target
            self.cond.notify_all()


class BrokerCollector:
    """A prometheus_client collector that builds every metric from a status document."""

    def __init__(self, snapshots: Snapshots, show_cmdline: bool = False):
        self.snapshots = snapshots
        self.show_cmdline = show_cmdline

    def describe(self):
        return []  # metrics are only known at scrape time; no registration-time collect

    def collect(self):
        doc = self.snapshots.get()
        if doc is None:
            return
        yield from families(doc, self.show_cmdline)


def families(doc, show_cmdline: bool = False):
    """Prometheus metric families of a broker status document (``cmd`` labels: see :func:`command_label`)."""
    import platform

    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

    from neuron_client import __version__
    from neuron_client.wire.messages import LATENCY_BUCKETS_S

    b = doc.broker
    build = GaugeMetricFamily("neuron_build_info", "The runtime's version (1)", labels=["version", "python"])
    build.add_metric([__version__, platform.python_version()], 1)
    yield build
    g = GaugeMetricFamily("neuron_broker_cores", "Cores the broker manages", labels=["backend"])
    g.add_metric([b.backend], b.cores)
    yield g
    yield GaugeMetricFamily("neuron_broker_draining", "1 while the broker grants no new leases",
                            value=1 if b.draining else 0)
    yield GaugeMetricFamily("neuron_broker_uptime_seconds", "Seconds since the broker started", value=b.uptime_s)

    state = GaugeMetricFamily("neuron_core_state", "1 for the core's state", labels=["core", "device", "state"])
    owned = GaugeMetricFamily("neuron_core_owned", "1 if a process owns the core", labels=["core"])
    owner = GaugeMetricFamily("neuron_core_owner_info", "The owner of an owned core", labels=["core", "pid", "cmd"])
    requests = CounterMetricFamily("neuron_core_requests", "Calls served by the core's worker", labels=["core"])
    errors = CounterMetricFamily("neuron_core_errors", "Failed requests on the core's worker", labels=["core"])
    busy = CounterMetricFamily("neuron_core_busy_seconds", "Seconds the core spent running models", labels=["core"])
    latency = HistogramMetricFamily("neuron_core_request_duration_seconds",
                                    "Call latency in the worker, from receipt to reply", labels=["core"])
    # a summary: its quantiles over the worker's recent window (the last 512 calls within 60 s), its sum and count
    # since the worker started (as prometheus_client's own summaries, whose quantiles are windowed too)
    quantiles = Metric("neuron_core_latency_seconds", "Call latency in the worker: quantiles over its recent window",
                       "summary")
    wait = CounterMetricFamily("neuron_core_wait_seconds", "Seconds calls spent in the worker outside the model "
                               "(queued behind others, decoding, encoding): the request duration less the compute",
                               labels=["core"])
    model_requests = CounterMetricFamily("neuron_model_requests", "Calls served by a model, by model name and core",
                                         labels=["model", "core"])
    model_bytes = GaugeMetricFamily("neuron_model_bytes", "Bytes of a loaded model (its file and separated weights)",
                                    labels=["model", "core"])
    model_failures = CounterMetricFamily("neuron_model_failures", "Calls of a model that raised, by model name and core",
                                         labels=["model", "core"])
    model_inferences = CounterMetricFamily(
        "neuron_model_inferences", "Items a model served (its calls' batch sizes summed; the executions are "
        "neuron_model_requests_total), by model name and core", labels=["model", "core"])
    model_queue = CounterMetricFamily("neuron_model_queue_seconds", "Seconds a model's calls waited in the worker "
                                      "before they ran", labels=["model", "core"])
    model_compute = CounterMetricFamily("neuron_model_compute_seconds", "Seconds a model's calls ran",
                                        labels=["model", "core"])
    recent = GaugeMetricFamily("neuron_worker_recent_crashes", "Worker crashes of the core within the broker's "
                               "--restart-window (more than --max-restarts fail the core for its lease)",
                               labels=["core"])
    queue = GaugeMetricFamily("neuron_core_queue_depth", "Requests waiting behind the running one", labels=["core"])
    models = GaugeMetricFamily("neuron_core_models", "Models loaded on the core", labels=["core"])
    memory = GaugeMetricFamily("neuron_worker_memory_bytes", "Resident memory of the core's worker", labels=["core"])
    ready = GaugeMetricFamily("neuron_worker_ready", "1 if the core's worker is ready", labels=["core"])
    restarts = CounterMetricFamily("neuron_worker_restarts", "Worker crashes (each followed by a restart) of the core "
                                   "since the broker started", labels=["core"])
    loads = CounterMetricFamily("neuron_model_loads", "Models loaded by the core's worker", labels=["core"])
    load_s = CounterMetricFamily("neuron_model_load_seconds", "Seconds the core's worker spent loading models",
                                 labels=["core"])
    bounds = [str(le) for le in LATENCY_BUCKETS_S] + ["+Inf"]
    for c in doc.cores:
        core = str(c.index)
        perf = c.perf
        for s in ("free", "owned", "failed"):
            state.add_metric([core, c.device, s], 1 if c.state == s else 0)
        owned.add_metric([core], 1 if c.owner else 0)
        if c.owner:
            owner.add_metric([core, str(c.owner.pid), command_label(c.owner.cmd, show_cmdline)], 1)
        requests.add_metric([core], c.requests)
        errors.add_metric([core], c.errors)
        busy.add_metric([core], perf.busy_s)
        counts = perf.latency_hist.counts or [0] * len(bounds)
        cumulative, total = [], 0
        for le, n in zip(bounds, counts):
            total += n
            cumulative.append((le, total))
        latency.add_metric([core], cumulative, perf.latency_sum_s)
        quantiles.add_sample("neuron_core_latency_seconds", {"core": core, "quantile": "0.5"}, perf.p50_ms / 1000)
        quantiles.add_sample("neuron_core_latency_seconds", {"core": core, "quantile": "0.99"}, perf.p99_ms / 1000)
        quantiles.add_sample("neuron_core_latency_seconds_sum", {"core": core}, perf.latency_sum_s)
        quantiles.add_sample("neuron_core_latency_seconds_count", {"core": core}, total)
        wait.add_metric([core], max(0.0, perf.latency_sum_s - perf.busy_s))
        named: dict[str, list[int]] = {}
        for m in c.models:
            entry = named.setdefault(m.name, [0, 0, 0, 0, 0.0, 0.0])
            for i, v in enumerate((m.requests, m.bytes, m.failures, m.inferences, m.queue_s, m.compute_s)):
                entry[i] += v
        for name, (n, nbytes, failed, items, queued, computed) in sorted(named.items()):
            model_requests.add_metric([name, core], n)
            model_bytes.add_metric([name, core], nbytes)
            model_failures.add_metric([name, core], failed)
            model_inferences.add_metric([name, core], items)
            model_queue.add_metric([name, core], queued)
            model_compute.add_metric([name, core], computed)
        recent.add_metric([core], c.worker.recent_crashes)
        queue.add_metric([core], perf.queue)
        models.add_metric([core], len(c.models))
        memory.add_metric([core], c.worker.memory_bytes)
        ready.add_metric([core], 1 if c.worker.ready else 0)
        restarts.add_metric([core], c.worker.restarts)
        loads.add_metric([core], perf.loads)
        load_s.add_metric([core], perf.load_s)
    yield from (state, owned, owner, requests, errors, busy, wait, latency, quantiles, queue, models, memory, ready,
                restarts, recent, loads, load_s, model_requests, model_bytes, model_failures,
                model_inferences, model_queue, model_compute)

    yield GaugeMetricFamily("neuron_leases_active", "Leases held now", value=len(doc.leases))
    yield GaugeMetricFamily("neuron_acquires_waiting", "Acquires waiting for cores", value=len(doc.pending))
    yield CounterMetricFamily("neuron_leases_granted", "Leases granted", value=b.leases_granted)
    ended = CounterMetricFamily("neuron_leases_ended", "Leases ended, by reason", labels=["reason"])
    ended_counts = b.leases_ended
    for reason in END_REASONS:
        ended.add_metric([reason], ended_counts.get(reason, 0))
    yield ended
    yield CounterMetricFamily("neuron_leases_reclaimed", "Leases taken back (owner exited, no heartbeat, operator)",
                              value=sum(n for r, n in ended_counts.items() if r != "released"))
    procs = GaugeMetricFamily("neuron_process_cores", "Cores held by each owning process", labels=["pid", "cmd"])
    for lease in doc.leases:
        procs.add_metric([str(lease.pid), command_label(lease.cmd, show_cmdline)], len(lease.cores))
    yield procs
    yield from batcher_families(doc)


def batcher_families(doc):
    """The ``neuron_batcher_*`` families: one series per batched model (``pid``, ``model``) of every owner, from the
    counters it last reported (``leases[].batchers``)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["pid", "model"]
    counters = [(CounterMetricFamily(f"neuron_batcher_{name}", text, labels=labels), field) for name, text, field in (
        ("requests", "Requests accepted into a batched model's queue", "requests"),
        ("served", "Requests answered with their outputs", "served"),
        ("executions", "Model executions (batches) a batcher ran", "executions"),
        ("rows", "Rows its executions carried (mean batch size: rows / executions)", "rows"),
        ("queue_seconds", "Seconds requests waited in its queue, summed over requests", "queue_s"),
        ("compute_seconds", "Seconds its executions took, summed over executions", "compute_s"),
        ("failed", "Requests failed by their batch's error", "failed"))]
    refused = CounterMetricFamily("neuron_batcher_refused", "Requests refused, by reason",
                                  labels=labels + ["reason"])
    depth = GaugeMetricFamily("neuron_batcher_queue_depth", "Requests waiting in a batcher's queue", labels=labels)
    mean = GaugeMetricFamily("neuron_batcher_mean_batch_size", "Mean rows per execution since the batcher was made",
                             labels=labels)
    for lease in doc.leases:
        for b in lease.batchers:
            key = [str(lease.pid), b.model]
            for family, field in counters:
                family.add_metric(key, getattr(b, field))
            refused.add_metric(key + ["queue_full"], b.refused)
            refused.add_metric(key + ["timed_out"], b.timed_out)
            depth.add_metric(key, b.waiting)
            mean.add_metric(key, b.rows / b.executions if b.executions else 0.0)
    yield from (family for family, _ in counters)
    yield from (refused, depth, mean)


def serve(snapshots: Snapshots, port: int, host: str = "127.0.0.1", show_cmdline: bool | None = None):
    """Start the metrics HTTP server in a thread; returns it (``.shutdown()`` stops it). Raises OSError if the
    address is taken, saying which and what to do. ``show_cmdline`` defaults to :data:`SHOW_CMDLINE`."""
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    registry.register(BrokerCollector(snapshots, SHOW_CMDLINE if show_cmdline is None else show_cmdline))
    try:
        result = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another "
                      "--metrics-port (or stop what listens there)") from None
    server = result[0] if isinstance(result, tuple) else result
    log.info("serving Prometheus metrics at http://%s:%d/metrics", host, server.server_address[1])
    return server


def url_of(server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/metrics"
