"""The broker's decisions, as an I/O-free state machine (after dask's worker state machine).

``BrokerState.handle(event, now)`` takes one event (a lease link opened, a message on it, an owner's process ended,
a worker said something or exited, the clock moved on, an operator asked) and returns the effects to carry out, in
order: replies, messages to workers, journal writes, workers to start or stop. The broker's loop
(:mod:`broker.server`) turns sockets, pidfds and processes into events and effects into I/O, and nothing else. No
socket, clock, file or process is touched here, so every decision is unit-tested without them.

The rules it keeps:

* **A lease lives exactly as long as its owner.** A lease is bound to its owner's lease link and to the owner's
  process (its pid comes from the kernel); the link closing or the process ending ends the lease at once. A live owner
  keeps its cores however starved or silent it is; only an operator (``release --pid``) or the opt-in stopped-owner
  policy (``stopped_owner_s``: an owner stopped by a signal for that long) takes them.
* **Journal first, state second.** A grant is written to the journal before anything else changes for good; a failed
  write undoes the reservation and fails the acquire with the reason.
* **A worker knows its owner before the owner is told.** The grant is sent only after every core's worker has
  acknowledged the assignment, so a worker refuses unknown tokens at once.
* **Nothing crosses owners.** When a lease ends its cores' workers are stopped and fresh ones started; a worker serves
  one owner in its life.
* **Faults are charged to their cause.** Worker crashes under a lease count against that lease (its cores are marked
  failed for it after too many); the next owner gets a fresh, healthy worker. A worker that stops reporting is replaced.
* **Everything is bounded**: links in total and per process, waiting acquires, request sizes.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from neuron_client.wire import config, messages
from neuron_client.wire.cores import CoreRequest, format_cores
from neuron_client.wire.errors import (BrokerDrainingError, LeaseLostError, NeuronCoreSpecError,
                                       NeuronCoreUnavailableError, NeuronRuntimeError, ProtocolError)

from .allocator import CoreAllocator, Denied

log = logging.getLogger("neuron.broker")

MAX_LINKS = 4096  # lease links open at once (each holds a file descriptor)
MAX_LINKS_PER_PID = 64
MAX_PENDING = 1024  # acquires waiting for cores (NEURON_RT_ACQUIRE_TIMEOUT), all processes together
MAX_WAIT_S = 24 * 3600.0
MAX_CMD_CHARS = 4096
MAX_BATCHERS = 64  # batched models kept per lease from its owner's reports
RECENTLY_ENDED_KEPT = 1024
RESTART_GRACE_S = 10.0  # after a broker restart, a journalled lease's live owner has this long to re-attach
GRANT_TIMEOUT_S = 30.0  # a grant waits this long for its cores' workers to take the assignment
WORKER_SILENCE_S = 10.0  # a ready worker that has said nothing for this long is hung: it is replaced
RESTART_BACKOFF_S = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Events


@dataclass
class LinkOpened:
    link: int
    pid: int  # from SO_PEERCRED
    uid: int
    start_time: float  # the process's start time (against pid reuse), read by the loop from /proc
    cmd: str = ""  # its command line, read by the loop


@dataclass
class LinkMessage:
    link: int
    req_id: int
    msg: Any


@dataclass
class LinkClosed:
    link: int


@dataclass
class OwnerExited:
    pid: int
    start_time: float


@dataclass
class OwnerStopped:
    """The opt-in policy's observation: ``pid`` has been stopped by a signal since ``since`` (monotonic)."""

    pid: int
    since: float


@dataclass
class JournalWritten:
    lease_id: str
    error: str = ""  # empty: written


@dataclass
class WorkerStarted:
    core: int
    pid: int


@dataclass
class WorkerMessage:
    core: int
    msg: Any


@dataclass
class WorkerExited:
    core: int
    pid: int
    how: str  # "exit code 1", "signal SIGSEGV"


@dataclass
class WorkerStartFailed:
    core: int
    error: str


@dataclass
class Control:
    """An operator's or a tool's request on the broker's ZeroMQ socket (status, drain, release --pid, stop,
    lease info)."""

    to: Any
    req_id: int
    msg: Any


@dataclass
class Tick:
    pass


# ------------------------------------------------------------------------------------------------------------
# Effects


@dataclass
class Reply:
    to: Any  # ("link", n) or ("zmq", identity)
    req_id: int
    msg: Any  # a message, or an exception for an error reply


@dataclass
class CloseLink:
    link: int


@dataclass
class WatchPid:
    pid: int
    start_time: float


@dataclass
class UnwatchPid:
    pid: int


@dataclass
class JournalRecord:
    lease: "Lease"


@dataclass
class JournalForget:
    lease_id: str


@dataclass
class ToWorker:
    core: int
    msg: Any


@dataclass
class StartWorker:
    core: int


@dataclass
class StopWorker:
    """Stop the core's worker: SIGKILL now, or (``graceful``) ask it to send its last stats and exit, with a
    SIGKILL after a short grace period."""

    core: int
    why: str
    graceful: bool = False


@dataclass
class UnlinkSegments:
    """Remove the shared-memory segments of ``pid`` once it has exited (never those of a live process)."""

    pid: int
    start_time: float = 0.0


# ------------------------------------------------------------------------------------------------------------
# State


class EndReason(str, enum.Enum):
    """Why a lease ended: the ``reason`` label of ``neuron_leases_ended_total`` and the keys of status's
    ``counters.leases_ended``. The words for the owner and the log are separate (``why``)."""

    RELEASED = "released"  # the owner released it or closed its lease link
    OWNER_EXITED = "owner_exited"  # the owner's process ended (or left before its grant)
    OWNER_STOPPED = "owner_stopped"  # stopped by a signal past --lease-timeout
    WORKER_FAILED = "worker_failed"  # a core's worker kept dying while the grant was being assigned
    BROKER_RESTART = "broker_restart"  # not re-attached after a broker restart, or workers not ready in time
    OPERATOR = "operator"  # neuron-broker release


class LeaseState(enum.Enum):
    JOURNALING = "journaling"  # cores reserved, the journal write under way
    ASSIGNING = "assigning"  # journalled; waiting for the cores' workers to take the assignment
    ACTIVE = "active"  # the owner holds its grant
    ORPHANED = "orphaned"  # restored from the journal after a restart; waiting for its owner to re-attach


@dataclass
class Lease:
    lease_id: str
    token_hash: str
    pid: int
    uid: int
    start_time: float
    cmd: str
    cores: list[int]
    granted_at: float  # monotonic
    granted_wall: float = 0.0
    state: LeaseState = LeaseState.JOURNALING
    link: int | None = None
    req_id: int = 0  # the acquire (or reattach) being answered
    token: str = ""  # only until the grant is sent; never stored
    deadline: float = 0.0  # ASSIGNING: when the grant gives up; ORPHANED: when the cores are freed
    reattach: bool = False
    batchers: list = field(default_factory=list)  # the owner's last report (messages.OwnerReport): BatcherStatus

    def age_s(self, now: float) -> float:
        return now - self.granted_at


class SlotState(enum.Enum):
    DOWN = "down"  # no process; starts at ``next_start``
    STARTING = "starting"  # process started, not registered yet
    FRESH = "fresh"  # registered, serves nobody yet
    ASSIGNING = "assigning"  # told its owner, waiting for the acknowledgement
    SERVING = "serving"  # serves its owner
    RETIRING = "retiring"  # stopped after its owner left; a fresh worker follows


@dataclass
class Slot:
    core: int
    state: SlotState = SlotState.DOWN
    pid: int = 0
    lease_id: str = ""  # the lease this worker serves (or is being assigned to)
    since: float = 0.0  # when it entered the state
    heard: float = 0.0  # last message from the worker
    next_start: float = 0.0
    crashes: list[float] = field(default_factory=list)  # under the current lease (or while free)
    restarts: int = 0  # total since the broker started
    failed: bool = False  # too many crashes under the current lease: not restarted until the lease ends
    last_exit: str = ""

    @property
    def ready(self) -> bool:
        return self.state in (SlotState.FRESH, SlotState.ASSIGNING, SlotState.SERVING)


@dataclass
class Link:
    link: int
    pid: int
    uid: int
    start_time: float
    cmd: str
    lease_id: str = ""  # the lease this link holds (at most one)
    pending: bool = False


@dataclass
class Pending:
    link: int
    req_id: int
    request: CoreRequest
    cmd: str
    deadline: float
    since: float


@dataclass(frozen=True)
class Policy:
    max_restarts: int = 5  # a core whose worker dies more than this often within ``window_s`` under one lease fails
    window_s: float = 60.0
    stopped_owner_s: float = 0.0  # opt-in: reclaim an owner stopped by a signal this long (0: never)
    worker_silence_s: float = WORKER_SILENCE_S
    grant_timeout_s: float = GRANT_TIMEOUT_S
    restart_grace_s: float = RESTART_GRACE_S
    worker_start_timeout_s: float = config.WORKER_START_TIMEOUT_S
    max_message_bytes: int = 0  # the workers' data message limit, told to owners so that they check before sending


class BrokerState:
    """Owns every decision of the broker: the core table, the leases, the links, waiting acquires and the workers'
    logical states. Only :meth:`handle` changes it; the loop reads it for status."""

    def __init__(self, n_cores: int, policy: Policy = Policy(), worker_address=lambda core: ""):
        self.alloc = CoreAllocator(n_cores)
        self.policy = policy
        self.worker_address = worker_address
        self.leases: dict[str, Lease] = {}
        self.links: dict[int, Link] = {}
        self.pending: list[Pending] = []
        self.slots = {c: Slot(c) for c in range(n_cores)}
        self.ended: dict[str, str] = {}  # lease id -> why, for clear errors to late questions
        self.draining = False
        self.stopping = False
        self.recovering_until = 0.0  # acquires wait while orphaned leases may still be re-attached
        self.granted = 0
        self.ended_counts: list[EndReason] = []  # reasons of ended leases since the last drain_ended() (for counters)
        self.out: list = []

    # -- entry ---------------------------------------------------------------------------------------------------
    def handle(self, event, now: float) -> list:
        self.out = []
        getattr(self, "on_" + type(event).__name__)(event, now)
        out, self.out = self.out, []
        return out

    def emit(self, *effects) -> None:
        self.out.extend(effects)

    def start(self, now: float, restored: list[dict] = (), recovering: bool = False) -> list:
        """:meth:`start_workers` and :meth:`restore` at once."""
        return self.start_workers(now) + self.restore(now, restored, recovering)

    def start_workers(self, now: float) -> list:
        self.out = []
        for slot in self.slots.values():
            self._start_worker(slot, now)
        out, self.out = self.out, []
        return out

    def restore(self, now: float, restored: list[dict] = (), recovering: bool = False) -> list:
        """Take back the journal's leases whose owners may still run (each record: lease_id, token_hash, pid, uid,
        start_time, cmd, cores, granted_wall, alive); they have the grace period from ``now`` (when the broker serves
        lease links) to re-attach. ``recovering``: the journal may have lost rows (it was unreadable, or the broker
        did not stop cleanly), so acquires wait out the grace period while owners claim their cores back.
        The newest row of a core wins: an older one can only be a release whose removal failed."""
        self.out = []
        for rec in sorted(restored, key=lambda r: -(r.get("granted_wall") or 0.0)):
            if not rec.get("alive"):
                self.emit(JournalForget(rec["lease_id"]), UnlinkSegments(rec["pid"], rec["start_time"]))
                continue
            try:
                picked = self.alloc.grant(CoreRequest(visible=tuple(rec["cores"])), rec["lease_id"])
            except (NeuronCoreSpecError, ValueError) as exc:  # e.g. the broker restarted with fewer cores
                log.warning("journal: lease %s of pid %d cannot be restored: %s", rec["lease_id"], rec["pid"], exc)
                picked = Denied(requested=None)
            if isinstance(picked, Denied):
                self.emit(JournalForget(rec["lease_id"]))
                continue
            lease = Lease(lease_id=rec["lease_id"], token_hash=rec["token_hash"], pid=rec["pid"], uid=rec["uid"],
                          start_time=rec["start_time"], cmd=rec["cmd"], cores=picked, granted_at=now,
                          granted_wall=rec.get("granted_wall") or 0.0, state=LeaseState.ORPHANED,
                          deadline=now + self.policy.restart_grace_s)
            self.leases[lease.lease_id] = lease
            self.emit(WatchPid(lease.pid, lease.start_time))
            log.warning("journal: lease %s of live pid %d holds %s until it re-attaches (%.0fs)", lease.lease_id,
                        lease.pid, format_cores(picked), self.policy.restart_grace_s)
        if recovering:
            self.recovering_until = now + self.policy.restart_grace_s
        out, self.out = self.out, []
        return out

    # -- lease links ---------------------------------------------------------------------------------------------
    def on_LinkOpened(self, ev: LinkOpened, now: float) -> None:
        same_pid = sum(1 for lk in self.links.values() if lk.pid == ev.pid)
        if len(self.links) >= MAX_LINKS or same_pid >= MAX_LINKS_PER_PID:
            log.warning("refused a lease link from pid %d: %d links open (%d of its own)", ev.pid, len(self.links),
                        same_pid)
            self.emit(Reply(("link", ev.link), 0, NeuronCoreUnavailableError(
                f"the broker holds {len(self.links)} lease links ({same_pid} of pid {ev.pid}); at most {MAX_LINKS} "
                f"(and {MAX_LINKS_PER_PID} per process) are served: close runtimes you do not use")),
                CloseLink(ev.link))
            return
        self.links[ev.link] = Link(ev.link, ev.pid, ev.uid, ev.start_time, ev.cmd[:MAX_CMD_CHARS])
        self.emit(WatchPid(ev.pid, ev.start_time))

    def on_LinkMessage(self, ev: LinkMessage, now: float) -> None:
        link = self.links.get(ev.link)
        if link is None:
            return
        to = ("link", ev.link)
        msg = ev.msg
        try:
            if isinstance(msg, messages.Acquire):
                self._acquire(link, ev.req_id, msg, now)
            elif isinstance(msg, messages.Reattach):
                self._reattach(link, ev.req_id, msg, now)
            elif isinstance(msg, messages.Release):
                lease = self.leases.get(link.lease_id)
                if lease is not None and lease.lease_id == msg.lease_id:
                    self._end_lease(lease, EndReason.RELEASED, "released", now)
                self.emit(Reply(to, ev.req_id, messages.Ok()))
            elif isinstance(msg, messages.OwnerReport):  # unanswered; kept for status until the next one
                lease = self.leases.get(link.lease_id)
                if lease is not None:
                    lease.batchers = list(msg.batchers[:MAX_BATCHERS])
            else:
                raise ProtocolError(f"the lease link carries acquire, reattach, release and owner_report, not "
                                    f"{msg.op!r}")
        except NeuronRuntimeError as exc:
            self.emit(Reply(to, ev.req_id, exc))

    def on_LinkClosed(self, ev: LinkClosed, now: float) -> None:
        link = self.links.pop(ev.link, None)
        if link is None:
            return
        self.pending = [p for p in self.pending if p.link != ev.link]
        lease = self.leases.get(link.lease_id)
        if lease is not None and lease.link == ev.link:
            active = lease.state == LeaseState.ACTIVE
            self._end_lease(lease, EndReason.RELEASED if active else EndReason.OWNER_EXITED,
                            "released" if active else "owner left before its grant", now, closed=True)
        self._unwatch(link.pid)

    def on_OwnerExited(self, ev: OwnerExited, now: float) -> None:
        for lease in [le for le in self.leases.values() if le.pid == ev.pid and le.start_time == ev.start_time]:
            self._end_lease(lease, EndReason.OWNER_EXITED, "owner exited", now)
        for lk in [lk for lk in self.links.values() if lk.pid == ev.pid and lk.start_time == ev.start_time]:
            self.pending = [p for p in self.pending if p.link != lk.link]
            # a forked child may hold the link open; it holds no lease: close it
            self.links.pop(lk.link, None)
            self.emit(CloseLink(lk.link))
        self.emit(UnwatchPid(ev.pid))

    def on_OwnerStopped(self, ev: OwnerStopped, now: float) -> None:
        limit = self.policy.stopped_owner_s
        if limit <= 0 or now - ev.since < limit:
            return
        for lease in [le for le in self.leases.values() if le.pid == ev.pid and le.state == LeaseState.ACTIVE]:
            self._end_lease(lease, EndReason.OWNER_STOPPED, f"the owner was stopped by a signal for {now - ev.since:.1f}s (the broker's "
                                   f"--lease-timeout {limit:g}s policy)", now)

    def _unwatch(self, pid: int) -> None:
        if not any(lk.pid == pid for lk in self.links.values()) and not any(
                le.pid == pid for le in self.leases.values()):
            self.emit(UnwatchPid(pid))

    # -- acquire -------------------------------------------------------------------------------------------------
    def _request_of(self, msg: messages.Acquire) -> CoreRequest:
        n = self.alloc.n_cores
        if msg.visible is not None:
            if len(msg.visible) > n or not all(type(c) is int for c in msg.visible):
                raise NeuronCoreSpecError(f"acquire: 'visible' must list at most {n} distinct core indices "
                                          f"(integers 0..{n - 1}); got {str(msg.visible)[:200]}")
            request = CoreRequest(visible=tuple(msg.visible))
        else:
            if msg.count is not None and not 0 <= msg.count <= 1 << 20:
                raise NeuronCoreSpecError(f"NEURON_RT_NUM_CORES={msg.count} is not a count of cores; ask for "
                                          f"1..{n} (0 means all)")
            request = CoreRequest(count=msg.count or None)
        self.alloc.validate(request)
        return request

    def _acquire(self, link: Link, req_id: int, msg: messages.Acquire, now: float) -> None:
        if link.lease_id or link.pending:
            raise ProtocolError("this lease link already holds (or waits for) a lease; open another link")
        if self.stopping:
            raise BrokerDrainingError("the broker is stopping and grants no cores; start it again and retry")
        if self.draining:
            raise BrokerDrainingError("the broker is draining (neuron-broker drain) and grants no new cores; retry "
                                      "after an operator resumes it ('neuron-broker drain --cancel') or restarts it")
        request = self._request_of(msg)
        if not 0 <= msg.wait_s <= MAX_WAIT_S:
            raise NeuronCoreSpecError(f"{config.ENV_ACQUIRE_TIMEOUT}={msg.wait_s} is outside 0..{MAX_WAIT_S:.0f}s")
        recovering = now < self.recovering_until
        denied = None if recovering else self._try_grant(link, req_id, request, now)
        if denied is None and not recovering:
            return
        wait = max(msg.wait_s, self.recovering_until - now) if recovering else msg.wait_s
        if wait > 0 and (recovering or denied.could_succeed_later):
            if len(self.pending) >= MAX_PENDING:
                raise NeuronCoreUnavailableError(
                    f"{len(self.pending)} acquires already wait for cores (the broker's limit is {MAX_PENDING}); "
                    "retry later, or ask for free cores")
            link.pending = True
            self.pending.append(Pending(link.link, req_id, request, msg.cmd, now + wait, now))
            return
        raise NeuronCoreUnavailableError(self.conflict_message(request, denied))

    def _try_grant(self, link: Link, req_id: int, request: CoreRequest, now: float, lease_id: str = "",
                   token: str = "") -> Denied | None:
        """Reserve cores and start the grant (journal, then workers); a :class:`Denied` if they are taken. With
        ``lease_id`` and ``token``: a lease claimed back after the journal was lost."""
        reclaimed = bool(lease_id)
        if not reclaimed:
            lease_id, token = secrets.token_hex(8), secrets.token_urlsafe(32)
        picked = self.alloc.grant(request, lease_id)
        if isinstance(picked, Denied):
            return picked
        lease = Lease(lease_id=lease_id, token_hash=token_hash(token), pid=link.pid, uid=link.uid,
                      start_time=link.start_time, cmd=link.cmd, cores=picked, granted_at=now, link=link.link,
                      req_id=req_id, token=token, state=LeaseState.JOURNALING, reattach=reclaimed)
        self.leases[lease_id] = lease
        link.lease_id = lease_id
        self.emit(JournalRecord(lease))
        return None

    def on_JournalWritten(self, ev: JournalWritten, now: float) -> None:
        lease = self.leases.get(ev.lease_id)
        if lease is None or lease.state != LeaseState.JOURNALING:
            return
        if ev.error:
            self.leases.pop(lease.lease_id)
            self.alloc.release(lease.lease_id)
            link = self.links.get(lease.link)
            if link is not None:
                link.lease_id = ""
                self.emit(Reply(("link", link.link), lease.req_id, NeuronRuntimeError(
                    f"the broker could not record the lease of {format_cores(lease.cores)} in its journal "
                    f"({ev.error}); nothing was granted. Free space in the broker directory (or fix the journal's "
                    "file) and retry")))
            self._serve_pending(now)
            return
        self._begin_assign(lease, now)

    def _begin_assign(self, lease: Lease, now: float) -> None:
        lease.state = LeaseState.ASSIGNING
        lease.deadline = now + self.policy.grant_timeout_s
        for core in lease.cores:
            self._offer(self.slots[core], lease, now)
        self._maybe_granted(lease, now)

    def _offer(self, slot: Slot, lease: Lease, now: float) -> None:
        """Give a fresh worker its owner (a worker that is not fresh is dealt with when it becomes so)."""
        if slot.state == SlotState.FRESH:
            slot.state, slot.lease_id, slot.since = SlotState.ASSIGNING, lease.lease_id, now
            self.emit(ToWorker(slot.core, messages.Assign(lease_id=lease.lease_id, token_hash=lease.token_hash,
                                                          owner_pid=lease.pid, owner_uid=lease.uid)))

    def _maybe_granted(self, lease: Lease, now: float) -> None:
        if lease.state != LeaseState.ASSIGNING:
            return
        if not all(self.slots[c].state == SlotState.SERVING and self.slots[c].lease_id == lease.lease_id
                   for c in lease.cores):
            return
        lease.state = LeaseState.ACTIVE
        if not lease.reattach:
            self.granted += 1
        reply = messages.Granted(lease_id=lease.lease_id, token=lease.token, cores=list(lease.cores),
                                 workers=self.workers_of(lease), heartbeat_s=config.HEARTBEAT_INTERVAL_S,
                                 lease_timeout_s=self.policy.stopped_owner_s,
                                 max_message_bytes=self.policy.max_message_bytes)
        lease.token = ""
        self.emit(Reply(("link", lease.link), lease.req_id, reply))
        log.info("%s %s to pid %d (%s) as lease %s", "re-attached" if lease.reattach else "granted",
                 format_cores(lease.cores), lease.pid, lease.cmd[:60], lease.lease_id)

    def _reattach(self, link: Link, req_id: int, msg: messages.Reattach, now: float) -> None:
        lease = self.leases.get(msg.lease_id)
        if lease is None and now < self.recovering_until and msg.cores:
            self._reclaim_unjournalled(link, req_id, msg, now)
            return
        if (lease is None or lease.state != LeaseState.ORPHANED or lease.pid != link.pid
                or lease.start_time != link.start_time
                or not hmac.compare_digest(lease.token_hash, token_hash(msg.token))):
            why = self.ended.get(msg.lease_id, "this broker holds no such lease for your process")
            raise LeaseLostError(f"lease {msg.lease_id} cannot be re-attached: {why}")
        if link.lease_id:
            raise ProtocolError("this lease link already holds a lease; open another link")
        lease.link, lease.req_id, lease.token, lease.reattach = link.link, req_id, msg.token, True
        link.lease_id = lease.lease_id
        self._begin_assign(lease, now)

    def _reclaim_unjournalled(self, link: Link, req_id: int, msg: messages.Reattach, now: float) -> None:
        """The journal was lost: a live process of the broker's user that says it held ``msg.cores`` gets them back
        while the recovery window lasts (the first to claim a core wins; new acquires wait for the window to end)."""
        if link.lease_id or not re.fullmatch(r"[0-9a-f]{16}", msg.lease_id) or len(msg.token) < 32:
            raise LeaseLostError(f"lease {msg.lease_id} cannot be re-attached: not a lease of this runtime")
        request = self._request_of(messages.Acquire(cmd="", visible=list(msg.cores)))
        denied = self._try_grant(link, req_id, request, now, lease_id=msg.lease_id, token=msg.token)
        if denied is not None:
            raise LeaseLostError(f"lease {msg.lease_id} cannot be re-attached: "
                                 f"{self.conflict_message(request, denied)}")
        log.warning("journal lost: pid %d re-attached lease %s on %s on its word", link.pid, msg.lease_id,
                    format_cores(msg.cores))

    def conflict_message(self, request: CoreRequest, denied: Denied) -> str:
        free = self.alloc.free_cores()
        holders: dict[str, list[int]] = {}
        for core, lease_id in sorted(denied.busy.items()):
            holders.setdefault(lease_id, []).append(core)
        why = []
        for lease_id, cores in holders.items():
            lease = self.leases.get(lease_id)
            who = f"pid {lease.pid} {lease.cmd!r}" if lease else f"lease {lease_id}"
            if lease is not None and lease.state == LeaseState.ORPHANED:
                who += " (restored from the journal; waiting for it to re-attach)"
            why.append(f"{format_cores(cores)} held by {who}")
        if denied.failed:
            why.append(f"{format_cores(denied.failed)} failed")
        requested = format_cores(denied.requested) if denied.requested is not None else request.describe()
        detail = f" ({'; '.join(why)})" if why else ""
        return (f"NeuronCore(s) not available - Requested:{requested} Available:{format_cores(free)}{detail}. "
                "Ask for free cores (NEURON_RT_VISIBLE_CORES / NEURON_RT_NUM_CORES), stop the owner, or set "
                "NEURON_RT_ACQUIRE_TIMEOUT=<seconds> to wait for them")

    # -- ending leases ---------------------------------------------------------------------------------------------
    def _end_lease(self, lease: Lease, reason: EndReason, why: str, now: float, closed: bool = False) -> None:
        self.leases.pop(lease.lease_id, None)
        self.alloc.release(lease.lease_id)
        self.emit(JournalForget(lease.lease_id))
        link = self.links.get(lease.link) if lease.link is not None else None
        if link is not None:
            link.lease_id = ""
            if not closed and reason != EndReason.RELEASED:
                if lease.state == LeaseState.ACTIVE:
                    self.emit(Reply(("link", link.link), 0, messages.LeaseEnded(lease_id=lease.lease_id, reason=why)))
                else:
                    self.emit(Reply(("link", link.link), lease.req_id, NeuronCoreUnavailableError(
                        f"the grant of {format_cores(lease.cores)} was abandoned: {why}")))
        self.ended[lease.lease_id] = why
        while len(self.ended) > RECENTLY_ENDED_KEPT:
            self.ended.pop(next(iter(self.ended)))
        self.ended_counts.append(reason)
        for core in lease.cores:
            self._retire(self.slots[core], now)
        if reason == EndReason.RELEASED:
            log.info("pid %d released %s", lease.pid, format_cores(lease.cores))
        else:
            log.warning("lease %s of pid %d (%s) on %s ended: %s", lease.lease_id, lease.pid, lease.cmd[:60],
                        format_cores(lease.cores), why)
        self.emit(UnlinkSegments(lease.pid, lease.start_time))
        self._unwatch(lease.pid)
        self._serve_pending(now)

    def _retire(self, slot: Slot, now: float) -> None:
        """The core's owner left: the worker that served it goes, a fresh one comes; crashes are forgiven."""
        slot.crashes, slot.failed, slot.lease_id = [], False, ""
        if slot.state in (SlotState.DOWN, SlotState.RETIRING):
            slot.next_start = now
            return
        if slot.state in (SlotState.FRESH, SlotState.STARTING):  # never told of this owner
            return
        slot.state, slot.since = SlotState.RETIRING, now
        self.emit(StopWorker(slot.core, "its owner's lease ended", graceful=True))

    # -- waiting acquires ------------------------------------------------------------------------------------------
    def _serve_pending(self, now: float) -> None:
        if not self.pending or now < self.recovering_until:
            return
        still = []
        for p in self.pending:
            link = self.links.get(p.link)
            if link is None:
                continue
            denied = None if self.draining else self._try_grant(link, p.req_id, p.request, now)
            if denied is None and not self.draining:
                link.pending = False
                continue
            if self.draining or now >= p.deadline:
                link.pending = False
                err = BrokerDrainingError("the broker began draining (neuron-broker drain) while you waited for "
                                          "cores") if self.draining else NeuronCoreUnavailableError(
                    self.conflict_message(p.request, denied) + f" (waited {now - p.since:.1f}s)")
                self.emit(Reply(("link", p.link), p.req_id, err))
            else:
                still.append(p)
        self.pending = still

    # -- workers ---------------------------------------------------------------------------------------------------
    def _start_worker(self, slot: Slot, now: float) -> None:
        slot.state, slot.pid, slot.since, slot.heard = SlotState.STARTING, 0, now, now
        self.emit(StartWorker(slot.core))

    def on_WorkerStarted(self, ev: WorkerStarted, now: float) -> None:
        slot = self.slots[ev.core]
        if slot.state == SlotState.STARTING:
            slot.pid = ev.pid

    def on_WorkerStartFailed(self, ev: WorkerStartFailed, now: float) -> None:
        self._worker_gone(self.slots[ev.core], 0, f"could not start: {ev.error}", now)

    def on_WorkerMessage(self, ev: WorkerMessage, now: float) -> None:
        slot = self.slots.get(ev.core)
        if slot is None:
            return
        msg = ev.msg
        if isinstance(msg, messages.WorkerStats) and slot.state == SlotState.STARTING and msg.pid and (
                msg.pid == slot.pid):
            msg = messages.WorkerReady(core=slot.core, pid=msg.pid, endpoint="")  # its first word was lost
        if isinstance(msg, messages.WorkerReady):
            if slot.state != SlotState.STARTING or (slot.pid and msg.pid != slot.pid):
                return  # a late word from a worker already replaced
            slot.pid, slot.heard = msg.pid, now
            slot.state, slot.since, slot.lease_id = SlotState.FRESH, now, ""
            log.info("core %d: worker ready (pid %d)", slot.core, msg.pid)
            owner = self.alloc.owner_of(slot.core)
            lease = self.leases.get(owner or "")
            if lease is not None and lease.state in (LeaseState.ASSIGNING, LeaseState.ACTIVE):
                self._offer(slot, lease, now)
            return
        if slot.state in (SlotState.DOWN, SlotState.STARTING, SlotState.RETIRING):
            return
        slot.heard = now
        if isinstance(msg, messages.Assigned):
            if slot.state == SlotState.ASSIGNING and msg.lease_id == slot.lease_id:
                slot.state, slot.since = SlotState.SERVING, now
                lease = self.leases.get(slot.lease_id)
                if lease is not None:
                    if lease.state == LeaseState.ACTIVE:
                        self._notify(lease)  # a fresh worker after a crash: the owner loads its models again
                    self._maybe_granted(lease, now)

    def recent_crashes(self, slot: Slot, now: float) -> int:
        """The core's worker crashes within the restart window (those charged to the current lease)."""
        return sum(1 for t in slot.crashes if now - t < self.policy.window_s)

    def on_WorkerExited(self, ev: WorkerExited, now: float) -> None:
        slot = self.slots[ev.core]
        if slot.state == SlotState.DOWN or (slot.pid and ev.pid and ev.pid != slot.pid):
            return
        self._worker_gone(slot, ev.pid, ev.how, now)

    def _worker_gone(self, slot: Slot, pid: int, how: str, now: float) -> None:
        retired = slot.state == SlotState.RETIRING
        slot.state, slot.pid, slot.since = SlotState.DOWN, 0, now
        if retired:  # the next owner's fresh worker, at once
            slot.next_start = now
            if not self.stopping:
                self._start_worker(slot, now)
            return
        slot.last_exit = how
        slot.restarts += 1
        slot.crashes = [t for t in slot.crashes if now - t < self.policy.window_s] + [now]
        lease = self.leases.get(self.alloc.owner_of(slot.core) or "")
        if lease is not None and lease.state == LeaseState.ACTIVE:
            self._notify(lease)
        if lease is not None and len(slot.crashes) > self.policy.max_restarts:
            slot.failed = True
            if lease.state == LeaseState.ACTIVE:
                self._notify(lease)
            log.error("core %d: worker died %d times in %.0fs under lease %s of pid %d (last: %s); the core is "
                      "failed for this lease and gets a fresh worker when it ends", slot.core, len(slot.crashes),
                      self.policy.window_s, lease.lease_id, lease.pid, how)
            if lease.state == LeaseState.ASSIGNING:
                self._end_lease(lease, EndReason.WORKER_FAILED, f"the worker of core {slot.core} keeps dying ({how})", now)
            return
        delay = RESTART_BACKOFF_S[min(len(slot.crashes) - 1, len(RESTART_BACKOFF_S) - 1)]
        slot.next_start = now + delay
        log.warning("core %d: worker (pid %d) died (%s); restarting in %.2fs", slot.core, pid, how, delay)

    def on_Tick(self, ev: Tick, now: float) -> None:
        for slot in self.slots.values():
            if slot.state == SlotState.DOWN and not slot.failed and now >= slot.next_start and not self.stopping:
                self._start_worker(slot, now)
            elif slot.state == SlotState.STARTING and now - slot.since > self.policy.worker_start_timeout_s:
                self.emit(StopWorker(slot.core, f"it did not register within {self.policy.worker_start_timeout_s:.0f}s"))
                slot.since = now
            elif slot.ready and now - slot.heard > self.policy.worker_silence_s:
                log.error("core %d: worker (pid %d) has said nothing for %.1fs; replacing it", slot.core, slot.pid,
                          now - slot.heard)
                self.emit(StopWorker(slot.core, f"it said nothing for {now - slot.heard:.1f}s (hung)"))
                slot.heard = now  # one stop per silence; its exit follows
        for lease in list(self.leases.values()):
            if lease.state == LeaseState.ORPHANED and now >= lease.deadline:
                self._end_lease(lease, EndReason.BROKER_RESTART, f"its owner did not re-attach within {self.policy.restart_grace_s:.0f}s "
                                       "of the broker's restart", now)
            elif lease.state == LeaseState.ASSIGNING and now >= lease.deadline:
                slow = [c for c in lease.cores if self.slots[c].state != SlotState.SERVING]
                self._end_lease(lease, EndReason.BROKER_RESTART, f"the workers of {format_cores(slow)} did not become ready within "
                                       f"{self.policy.grant_timeout_s:.0f}s", now)
        if self.pending:
            self._serve_pending(now)

    # -- operator --------------------------------------------------------------------------------------------------
    def on_Control(self, ev: Control, now: float) -> None:
        msg = ev.msg
        try:
            if isinstance(msg, messages.ForceRelease):
                leases = [le for le in self.leases.values() if le.pid == msg.pid]
                cores = sorted(c for le in leases for c in le.cores)
                for le in leases:
                    self._end_lease(le, EndReason.OPERATOR, f"released by an operator (neuron-broker release --pid {msg.pid})", now)
                self.emit(Reply(ev.to, ev.req_id, messages.ForceReleased(
                    pid=msg.pid, cores=cores, leases=[le.lease_id for le in leases])))
            elif isinstance(msg, messages.Drain):
                self.draining = not msg.resume
                log.warning("%s", "draining: no new leases are granted" if self.draining else "resumed granting")
                self._serve_pending(now)
                self.emit(Reply(ev.to, ev.req_id, messages.Ok()))
            elif isinstance(msg, messages.Stop):
                log.info("stop requested")
                self.stopping = True
                self.emit(Reply(ev.to, ev.req_id, messages.Ok()))
            elif isinstance(msg, messages.Heartbeat):  # lease info: its workers now (no bearing on liveness)
                lease = self.leases.get(msg.lease_id)
                if lease is None:
                    why = self.ended.get(msg.lease_id, "it is unknown to this broker (was the broker restarted?)")
                    raise LeaseLostError(f"lease {msg.lease_id} is gone: {why}")
                self.emit(Reply(ev.to, ev.req_id, messages.HeartbeatAck(workers=self.workers_of(lease))))
            else:
                raise ProtocolError(f"the broker's socket does not serve {msg.op!r}")
        except NeuronRuntimeError as exc:
            self.emit(Reply(ev.to, ev.req_id, exc))

    def stop(self, now: float) -> list:
        """Effects of shutting down: every waiting acquire is told."""
        self.out = []
        self.stopping = True
        for p in self.pending:
            self.emit(Reply(("link", p.link), p.req_id, BrokerDrainingError("the broker stopped while you waited")))
        self.pending = []
        out, self.out = self.out, []
        return out

    def _notify(self, lease: Lease) -> None:
        """Push the lease's workers to its owner (a worker died, failed, or a fresh one serves it)."""
        if lease.link is not None and lease.link in self.links:
            self.emit(Reply(("link", lease.link), 0, messages.HeartbeatAck(workers=self.workers_of(lease))))

    # -- queries ---------------------------------------------------------------------------------------------------
    def workers_of(self, lease: Lease) -> list[messages.WorkerInfo]:
        """What a lease's owner needs to know of its cores' workers (a changed pid means: load your models again)."""
        out = []
        for c in lease.cores:
            slot = self.slots[c]
            serving = slot.state == SlotState.SERVING and slot.lease_id == lease.lease_id
            out.append(messages.WorkerInfo(core=c, endpoint=self.worker_address(c), pid=slot.pid if serving else 0,
                                           ready=serving, failed=slot.failed, last_exit=slot.last_exit))
        return out

    def core_state(self, core: int) -> str:
        if self.slots[core].failed:
            return "failed"
        return "owned" if self.alloc.owner_of(core) else "free"
