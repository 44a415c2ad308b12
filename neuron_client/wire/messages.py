"""The messages of the wire format: every message type, declared once as a dataclass with its op name.

A field that holds a document is typed by a *record* (a dataclass that is no message): :class:`WorkerInfo`,
:class:`GroupSpec` here, the status document's parts in :mod:`neuron_client.wire.status`. The decoder checks and
builds them like a message's body. How they travel is :mod:`neuron_client.wire.codec`'s; this module imports neither
msgpack nor torch, so the broker and the operator commands can name messages without paying for either.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from .status import BatcherStatus, ModelStatus, StatusDoc, record

PROTOCOL_VERSION = 1

MESSAGES: dict[str, type] = {}


def message(op: str):
    """Register a dataclass as the message type for ``op``."""

    def register(cls):
        cls = dataclass(cls)
        cls.op = op
        MESSAGES[op] = cls
        return cls

    return register


# --------------------------------------------------------------------------------------------------------------
# Records: the typed parts of messages.


@record
class WorkerInfo:
    """What a lease's owner knows of one of its cores' workers (a changed pid means: load your models again)."""

    core: int
    endpoint: str
    pid: int  # 0: no worker serves the lease on this core now
    ready: bool = True
    failed: bool = False  # the core's worker kept dying under this lease: it is restarted no more for it
    last_exit: str = ""  # how the last worker of the core ended ("" if none did)


@record
class GroupSpec:
    """A tensor-parallel rank's process group: the worker joins group ``name`` as ``rank`` of ``size``."""

    name: str
    rank: int
    size: int


# --------------------------------------------------------------------------------------------------------------
# Message types. Control plane: client <-> broker.


@message("ping")
class Ping:
    pass


@message("pong")
class Pong:
    pid: int
    cores: int
    backend: str
    version: int = PROTOCOL_VERSION


@message("acquire")
class Acquire:
    """Sent on a lease link (:mod:`lease_link`). The owner's pid and uid are the kernel's (``SO_PEERCRED``); the
    ``pid`` and ``create_time`` fields are informational and never trusted."""

    cmd: str
    visible: typing.Optional[list] = None  # exact global core ids
    count: typing.Optional[int] = None  # contiguous count; None with visible None = all cores
    wait_s: float = 0.0  # opt-in queueing (NEURON_RT_ACQUIRE_TIMEOUT)
    pid: int = 0
    create_time: float = 0.0


@message("reattach")
class Reattach:
    """On a new lease link after the broker restarted: take back ``lease_id`` (the broker checks the token against
    its journal's hash and the link's kernel pid against the lease's)."""

    lease_id: str
    token: str
    cores: typing.Optional[list] = None  # the cores it holds: claimed back if the broker lost its journal


@message("lease_ended")
class LeaseEnded:
    """Pushed on a lease link when the broker ends the lease (an operator released it); the link closes next."""

    lease_id: str
    reason: str


@message("granted")
class Granted:
    lease_id: str
    token: str
    cores: list  # global core ids, ascending
    workers: list[WorkerInfo]  # in core order
    heartbeat_s: float  # unused since leases live as long as their owner's lease link; kept for older clients
    lease_timeout_s: float  # the broker's opt-in stopped-owner policy (0: off)
    max_message_bytes: int = 0  # the workers' limit for one data message (0: none)


@message("heartbeat")
class Heartbeat:
    lease_id: str


@message("heartbeat_ack")
class HeartbeatAck:
    workers: list[WorkerInfo]  # the lease's cores' workers now


@message("owner_report")
class OwnerReport:
    """Sent by an owner on its lease link every second while it has batched models, never answered: their counters,
    which the broker keeps with the lease for status, neuron-top and the metrics (the empty list when none is left)."""

    batchers: list[BatcherStatus]


@message("release")
class Release:
    lease_id: str


@message("status")
class Status:
    pass


@message("status_reply")
class StatusReply:
    doc: StatusDoc


@message("stop")
class Stop:
    pass


@message("drain")
class Drain:
    """Stop granting new leases (acquires get BrokerDrainingError) until ``resume``; owners keep their cores."""

    resume: bool = False


@message("force_release")
class ForceRelease:
    """An operator takes every core of ``pid`` back (``neuron-broker release --pid``); its next call fails."""

    pid: int


@message("force_released")
class ForceReleased:
    pid: int
    cores: list  # the global core ids taken back, ascending (empty: the pid held none)
    leases: list  # their lease ids


@message("ok")
class Ok:
    pass


@message("error")
class Error:
    code: str
    message: str


# Supervision: broker <-> worker.


@message("worker_ready")
class WorkerReady:
    core: int
    pid: int
    endpoint: str


# Upper bounds (seconds) of the call-latency histogram a worker reports; one more bucket counts slower calls.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@message("worker_stats")
class WorkerStats:
    core: int
    models: list[ModelStatus]
    requests: int
    errors: int
    rss: int
    busy: bool
    # Added for the operator tools; the defaults keep older workers decodable. Totals count since the worker started.
    busy_s: float = 0.0  # seconds spent running calls (the model itself)
    latency_p50_s: float = 0.0  # call latency (receipt to reply) over the recent window, 0 when no call in it
    latency_p99_s: float = 0.0
    latency_window: int = 0  # calls in that window (the last 512 calls within 60 s)
    latency_sum_s: float = 0.0  # total latency of all calls
    latency_buckets: typing.Optional[list] = None  # call counts per LATENCY_BUCKETS_S bucket, plus one for slower
    queue: int = 0  # requests received and waiting behind the one running
    loads: int = 0  # models loaded
    load_s: float = 0.0  # seconds spent loading them
    # Accelerator backends (cuda): the worker's device memory in use and the driver's utilisation (percent, or None).
    device_memory: int = 0
    device_util: typing.Optional[float] = None
    pid: int = 0  # the worker's; stats from a worker the broker has not heard register it (a lost worker_ready)


@message("assign")
class Assign:
    """The core now belongs to ``lease_id``. A worker serves one owner in its life: the broker starts a fresh worker
    for the next one. ``token_hash`` is the SHA-256 hex digest of the owner's token; the worker answers with
    :class:`Assigned` before the owner is told its grant."""

    lease_id: str
    token_hash: str
    owner_pid: int
    owner_uid: int = -1


@message("assigned")
class Assigned:
    core: int
    lease_id: str


@message("shutdown")
class Shutdown:
    pass


# Data plane: client <-> worker.


@message("load")
class Load:
    token: str
    name: str
    data: Any  # uint8 tensor: the TorchScript file's bytes (the worker never opens client-named paths)
    # A tensor-parallel rank. The worker joins that process group (all ranks load at once, so the rendezvous
    # completes) and runs the model's collectives in it.
    group: typing.Optional[GroupSpec] = None
    # Weight separation: {name: tensor} of the weights kept apart from a weight-less graph, put into it on load.
    weights: Any = None


@message("loaded")
class Loaded:
    model_id: int
    load_s: float


@message("unload")
class Unload:
    token: str
    model_id: int


@message("call")
class Call:
    token: str
    model_id: int
    args: Any  # tuple of inputs: any nesting of tensors, tuples, lists, dicts and scalars
    reply_shm: typing.Optional[str] = None  # client segment the worker may write large outputs into
    reply_shm_size: int = 0


@message("result")
class Result:
    outputs: Any


