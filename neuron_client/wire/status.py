"""The broker's status document (``status_reply``'s ``doc``, ``neuron-broker status --json``), as records.

One dataclass per part: :class:`StatusDoc` holds a :class:`BrokerStatus`, a :class:`CoreStatus` per core (its
:class:`WorkerStatus`, its :class:`OwnerStatus` when owned, its :class:`ModelStatus` list and its
:class:`PerfStatus`), a :class:`LeaseStatus` per lease and a :class:`PendingStatus` per waiting acquire. The codec
checks a received document field by field against these and builds them (:mod:`neuron_client.wire.codec`); the JSON
that ``--json`` prints is the same document (:func:`to_json`), and ``broker/schemas/status.schema.json`` describes it.

Field names are shared with ``neuron-ls --json`` (:mod:`broker.ls`), whose owner and worker parts are these same
records: a core is ``index``, a worker's memory ``memory_bytes``, a lease's age ``lease_age_s``. Within a schema
number fields are only ever added, each with a default, so that a document of an older broker still decodes.

This module imports neither msgpack, zmq nor torch.
"""
from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass, field

SCHEMA = 2  # 1: core/rss/device_memory/device_util/age_s; 2: shared names with neuron-ls, a timestamp

def _eq(self, other):
    if type(other) is not type(self):
        return NotImplemented
    return all(getattr(self, f) == getattr(other, f) for f in self.__dataclass_fields__)


def _repr(self) -> str:
    return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self.__dataclass_fields__)})"


def record(cls):
    """Make ``cls`` a record: a keyword-only dataclass. Its equality and repr are written once, here, instead of
    generated for each class (``dataclass`` generates every method with an ``exec``: that halves the time these
    modules take to import, which every operator command pays)."""
    cls.__eq__, cls.__repr__, cls.__hash__ = _eq, _repr, None  # unhashable, as a dataclass with eq is
    return dataclass(cls, kw_only=True, eq=False, repr=False)


@record
class ModelStatus:
    """A model a worker holds (``worker_stats.models``; a core's ``models`` in the status document)."""

    id: int
    name: str
    requests: int  # calls it served
    bytes: int  # its TorchScript file and separated weights
    failures: int = 0  # calls that raised
    inferences: int = 0  # items served: the calls' batch sizes (dim 0 of the first input; 1 for a scalar) summed
    queue_s: float = 0.0  # seconds its calls waited in the worker between their receipt and their start
    compute_s: float = 0.0  # seconds its calls ran


@record
class OwnerStatus:
    """The process that owns a core: its lease."""

    pid: int
    cmd: str
    lease_id: str
    lease_age_s: float
    state: str  # journaling | assigning | active | orphaned


@record
class WorkerStatus:
    """A core's worker process (pid 0: none running)."""

    pid: int
    ready: bool
    state: str  # fresh | assigning | serving | starting | retiring | down
    memory_bytes: int  # resident memory (0 before its first stats)
    device_memory_bytes: int  # accelerator memory it holds (cuda backend; 0 on cpu)
    device_util_percent: typing.Optional[float]  # the driver's utilisation of its GPU (None where not reported)
    busy: bool  # running a call
    restarts: int  # crashes (each followed by a restart) since the broker started
    last_exit: str  # how its predecessor ended ("" if none did)
    recent_crashes: int = 0  # crashes within the broker's --restart-window


@record
class LatencyHistogram:
    le_s: list[float]  # upper bounds (seconds)
    counts: list[int]  # calls per bucket; one more entry than le_s: slower than the largest bound


@record
class PerfStatus:
    """A core's performance counters (totals across its workers; zeros before the first report)."""

    busy_s: float
    p50_ms: float  # over the worker's recent window
    p99_ms: float
    window: int  # calls in that window
    queue: int  # requests waiting behind the running one
    loads: int
    load_s: float
    latency_sum_s: float
    latency_hist: LatencyHistogram


@record
class CoreStatus:
    index: int  # the global core id
    state: str  # free | owned | failed
    device: str  # cpu | cuda:N
    cpus: list[int]  # host CPUs its worker is pinned to
    gpu: typing.Optional[int] = None  # N of cuda:N
    memory_fraction: typing.Optional[float] = None  # the share of its GPU's memory (cuda backend)
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    worker: WorkerStatus
    owner: typing.Optional[OwnerStatus]
    models: list[ModelStatus]
    requests: int  # calls served, across the fresh workers each owner gets
    errors: int
    perf: PerfStatus


@record
class BatcherStatus:
    """A batched model in an owner's process (``neuron_client.batched``), as its owner last reported it (every
    second, on its lease link). Totals since the batcher was made."""

    model: str  # the batched model's name
    requests: int  # requests accepted into its queue
    served: int  # requests answered with their outputs
    executions: int  # model executions (batches) run
    rows: int  # rows those executions carried (mean batch size: rows / executions)
    queue_s: float  # seconds the executed requests waited in the queue, summed over requests
    compute_s: float  # seconds the executions took, summed over executions
    waiting: int  # requests in the queue now
    refused: int  # requests refused because the queue was full
    timed_out: int  # requests refused after waiting past their timeout
    failed: int  # requests failed by their batch's error
    max_batch_size: int
    max_queue_delay_us: int


@record
class LeaseStatus:
    lease_id: str
    pid: int
    cmd: str
    cores: list[int]
    lease_age_s: float
    state: str
    last_seen_s: float = 0.0  # always 0: a lease lives as long as its owner's lease link, nothing is "seen"
    batchers: list[BatcherStatus] = field(default_factory=list)  # its owner's batched models (owner-reported)


@record
class PendingStatus:
    """An acquire waiting for cores (``NEURON_RT_ACQUIRE_TIMEOUT``)."""

    pid: int
    cmd: str
    requested: str
    waited_s: float


@record
class BrokerStatus:
    pid: int
    backend: str
    cores: int
    address: str
    uptime_s: float
    lease_timeout_s: float  # the opt-in stopped-owner policy (0: off)
    draining: bool
    recovering_s: float  # how long acquires still wait after an unclean restart
    links: int
    pending_total: int
    metrics: str  # the metrics URL ("" when not served)
    leases_granted: int
    leases_ended: dict[str, int]  # by reason: a broker.state.EndReason value


@record
class StatusDoc:
    schema: int = SCHEMA
    timestamp: str  # when the broker built it (RFC 3339, UTC)
    broker: BrokerStatus
    cores: list[CoreStatus]
    leases: list[LeaseStatus]
    pending: list[PendingStatus] = field(default_factory=list)


def timestamp(at: float | None = None) -> str:
    """``2025-01-31T12:00:00.123Z``: ``at`` (seconds since the epoch; default now) in RFC 3339, UTC."""
    at = time.time() if at is None else at
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"


def to_json(doc) -> dict:
    """A record (a :class:`StatusDoc`, or any part) as plain JSON values."""
    return dataclasses.asdict(doc)


def from_json(value: dict, cls=StatusDoc):
    """A record built from JSON values (``--json`` output), checked field by field as the decoder checks it."""
    from neuron_client.wire import codec

    return codec.build(cls, value)
