"""The broker daemon: one per host. Owns the core table and the leases, supervises the workers, answers status.

One thread, two ROUTER sockets: ``broker.sock`` for clients (control plane) and ``workers.sock`` for the workers
(supervision). Messages are decoded once at the edge and dispatched through one table, ``self.handlers``. Nothing in
the loop blocks: a request that must wait (an opt-in queued acquire) is parked and answered later.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

import psutil

from neuron_client import config, protocol, shm, transport
from neuron_client.cores import CoreRequest, format_cores
from neuron_client.errors import (BrokerDrainingError, LeaseLostError, NeuronCoreUnavailableError,
                                  NeuronRuntimeError, ProtocolError, code_of)

from .allocator import CoreAllocator, Denied
from .journal import Journal
from .leases import Lease, LeaseTable
from .metrics import Counters, Snapshots
from .status import perf_doc
from .supervisor import RestartPolicy, Supervisor

log = logging.getLogger("neuron.broker")
LIVENESS_CHECK_S = 0.1
RECENTLY_RECLAIMED_KEPT = 256
RESTART_GRACE_S = 5.0  # after a restart, a restored lease's owner has this long to heartbeat again
REMOTE_OPS = ("ping", "status")  # what an authenticated TCP client may ask
MAX_CONTROL_MESSAGE_BYTES = 1 << 20  # control messages are small; larger ones get an error reply
HARD_CONTROL_MESSAGE_BYTES = 16 << 20  # frames larger than this are dropped by ZeroMQ before they are read


def process_alive(pid: int, create_time: float) -> bool:
    """True if ``pid`` is the same live process that started at ``create_time`` (guards against pid reuse)."""
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - create_time) > 0.05:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds a process has used, or None if it is not running (gone, zombie, or stopped by a signal)."""
    try:
        p = psutil.Process(pid)
        if p.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_ZOMBIE):
            return None
        t = p.cpu_times()
        return t.user + t.system
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@dataclass
class Pending:
    """An acquire parked until its cores free up (NEURON_RT_ACQUIRE_TIMEOUT)."""

    identity: bytes
    req_id: int
    msg: protocol.Acquire
    request: CoreRequest
    deadline: float
    since: float


class Broker:
    def __init__(self, directory: str, backend, lease_timeout_s: float = config.LEASE_TIMEOUT_S,
                 address: str | None = None, shm_threshold: int = config.SHM_THRESHOLD_BYTES,
                 restart_policy: RestartPolicy | None = None, max_message_bytes: int = config.MAX_MESSAGE_BYTES,
                 listen: str | None = None):
        self.directory = directory
        self.backend = backend
        self.listen = listen  # a tcp:// endpoint served with CURVE authentication, read-only
        self.address = address or config.broker_address(directory)
        self.alloc = CoreAllocator(backend.n_cores)
        self.leases = LeaseTable(timeout_s=lease_timeout_s)
        self.supervisor = Supervisor(directory, backend, shm_threshold, restart_policy or RestartPolicy(),
                                     max_message_bytes)
        self.journal = Journal(os.path.join(directory, "leases.db"))
        self.pending: list[Pending] = []
        self.worker_stats: dict[int, protocol.WorkerStats] = {}
        self.reclaimed: dict[str, str] = {}  # lease id -> why, for clear errors to late heartbeats
        self.stopping = False
        self.draining = False  # neuron-broker drain: grant no new leases
        self.counters = Counters()
        self.metrics: Snapshots | None = None  # set when metrics are served (run_foreground --metrics-port)
        self.metrics_url = ""
        self.started = time.monotonic()
        self.handlers = {
            "ping": self.on_ping,
            "acquire": self.on_acquire,
            "heartbeat": self.on_heartbeat,
            "release": self.on_release,
            "status": self.on_status,
            "stop": self.on_stop,
            "drain": self.on_drain,
            "force_release": self.on_force_release,
        }
        self.worker_handlers = {"worker_ready": self.on_worker_ready, "worker_stats": self.on_worker_stats}
        self.restore()

    def restore(self) -> None:
        """Take back the journal's leases whose owners still run; they get a grace period to heartbeat."""
        now = time.monotonic()
        for rec in self.journal.load():
            if not process_alive(rec["pid"], rec["create_time"]):
                self.journal.forget(rec["lease_id"])
                shm.unlink_for_pid(rec["pid"])
                continue
            picked = self.alloc.grant(CoreRequest(visible=tuple(rec["cores"])), rec["lease_id"])
            if isinstance(picked, Denied):  # overlapping rows cannot be written; be safe anyway
                self.journal.forget(rec["lease_id"])
                continue
            self.leases.add(Lease(lease_id=rec["lease_id"], token=rec["token"], pid=rec["pid"],
                                  create_time=rec["create_time"], cmd=rec["cmd"], cores=picked, granted_at=now,
                                  last_seen=now + RESTART_GRACE_S, granted_wall=rec["granted_wall"] or 0.0))
            log.warning("restored lease %s of live pid %d on %s from the journal", rec["lease_id"], rec["pid"],
                        format_cores(picked))

    # -- client handlers: return a reply message, or None when the reply comes later ----------------------
    def on_ping(self, ident, rid, msg):
        return protocol.Pong(pid=os.getpid(), cores=self.alloc.n_cores, backend=self.backend.name)

    def on_acquire(self, ident, rid, msg: protocol.Acquire):
        if self.stopping:
            raise BrokerDrainingError("the broker is stopping and grants no cores; start it again and retry")
        if self.draining:
            raise BrokerDrainingError("the broker is draining (neuron-broker drain) and grants no new cores; retry "
                                      "after an operator resumes it ('neuron-broker drain --cancel') or restarts it")
        if msg.visible is not None and not all(isinstance(c, int) for c in msg.visible):
            raise ProtocolError("acquire: 'visible' must be a list of core indices")
        request = CoreRequest(visible=tuple(msg.visible) if msg.visible is not None else None,
                              count=msg.count or None)
        self.alloc.validate(request)
        reply = self.try_grant(msg, request)
        if isinstance(reply, protocol.Granted):
            return reply
        if msg.wait_s > 0 and reply.could_succeed_later:
            now = time.monotonic()
            self.pending.append(Pending(ident, rid, msg, request, now + msg.wait_s, now))
            log.info("pid %d waits up to %.1fs for %s", msg.pid, msg.wait_s, request.describe())
            return None
        raise NeuronCoreUnavailableError(self.conflict_message(request, reply))

    def try_grant(self, msg: protocol.Acquire, request: CoreRequest):
        lease_id, token = LeaseTable.new_ids()
        picked = self.alloc.grant(request, lease_id)
        if isinstance(picked, Denied):
            return picked
        now = time.monotonic()
        lease = Lease(lease_id=lease_id, token=token, pid=msg.pid, create_time=msg.create_time, cmd=msg.cmd,
                      cores=picked, granted_at=now, last_seen=now, granted_wall=time.time())
        self.journal.record(lease)  # durable before anyone hears of it
        self.leases.add(lease)
        self.counters.granted += 1
        for core in picked:
            self.assign(core, lease)
        log.info("granted %s to pid %d (%s) as lease %s", format_cores(picked), msg.pid, msg.cmd[:60], lease_id)
        return protocol.Granted(lease_id=lease_id, token=token, cores=picked, workers=self.workers_of(lease),
                                heartbeat_s=config.HEARTBEAT_INTERVAL_S, lease_timeout_s=self.leases.timeout_s)

    def conflict_message(self, request: CoreRequest, denied: Denied) -> str:
        free = self.alloc.free_cores()
        holders: dict[str, list[int]] = {}
        for core, lease_id in sorted(denied.busy.items()):
            holders.setdefault(lease_id, []).append(core)
        why = []
        for lease_id, cores in holders.items():
            lease = self.leases.get(lease_id)
            who = f"pid {lease.pid} {lease.cmd!r}" if lease else f"lease {lease_id}"
            why.append(f"{format_cores(cores)} held by {who}")
        if denied.failed:
            why.append(f"{format_cores(denied.failed)} failed (worker keeps crashing)")
        requested = format_cores(denied.requested) if denied.requested is not None else request.describe()
        detail = f" ({'; '.join(why)})" if why else ""
        return (f"NeuronCore(s) not available - Requested:{requested} Available:{format_cores(free)}{detail}. "
                "Ask for free cores (NEURON_RT_VISIBLE_CORES / NEURON_RT_NUM_CORES), stop the owner, or set "
                "NEURON_RT_ACQUIRE_TIMEOUT=<seconds> to wait for them")

    def on_heartbeat(self, ident, rid, msg: protocol.Heartbeat):
        if not self.leases.touch(msg.lease_id, time.monotonic()):
            why = self.reclaimed.get(msg.lease_id, "it is unknown to this broker (was the broker restarted?)")
            raise LeaseLostError(f"lease {msg.lease_id} is gone: {why}")
        return protocol.HeartbeatAck(workers=self.workers_of(self.leases.get(msg.lease_id)))

    def workers_of(self, lease: Lease) -> list[dict]:
        """What a lease's owner needs to know of its cores' workers (a changed pid means: load your models again)."""
        out = []
        for c in lease.cores:
            slot = self.supervisor.slots[c]
            out.append({"core": c, "endpoint": config.worker_address(self.directory, c), "pid": slot.pid,
                        "ready": slot.ready, "failed": slot.failed, "last_exit": slot.last_exit})
        return out

    def on_release(self, ident, rid, msg: protocol.Release):
        lease = self.leases.get(msg.lease_id)
        if lease is not None:
            self.end_lease(lease, "released")
        return protocol.Ok()

    def on_status(self, ident, rid, msg):
        return protocol.StatusReply(doc=self.status_doc())

    def on_stop(self, ident, rid, msg):
        log.info("stop requested")
        self.stopping = True
        return protocol.Ok()

    def on_drain(self, ident, rid, msg: protocol.Drain):
        self.draining = not msg.resume
        log.warning("%s", "draining: no new leases are granted" if self.draining else "resumed granting leases")
        if self.draining:
            for p in self.pending:
                self.reply_error(p.identity, p.req_id, BrokerDrainingError(
                    "the broker began draining (neuron-broker drain) while you waited for cores"))
            self.pending = []
        return protocol.Ok()

    def on_force_release(self, ident, rid, msg: protocol.ForceRelease):
        leases = self.leases.of_pid(msg.pid)
        cores = sorted(c for lease in leases for c in lease.cores)
        for lease in leases:
            self.end_lease(lease, f"released by an operator (neuron-broker release --pid {msg.pid})")
        return protocol.ForceReleased(pid=msg.pid, cores=cores, leases=[lease.lease_id for lease in leases])

    # -- worker handlers -------------------------------------------------------------------------------------
    def on_worker_ready(self, msg: protocol.WorkerReady):
        slot = self.supervisor.slots.get(msg.core)
        if slot is None:
            return
        slot.ready = True
        log.info("core %d: worker ready (pid %d)", msg.core, msg.pid)
        owner = self.alloc.owner_of(msg.core)
        lease = self.leases.get(owner) if owner else None
        if lease is not None:
            self.assign(msg.core, lease)

    def on_worker_stats(self, msg: protocol.WorkerStats):
        if msg.core in self.supervisor.slots:
            self.worker_stats[msg.core] = msg

    # -- lease bookkeeping -----------------------------------------------------------------------------------
    def assign(self, core: int, lease: Lease | None) -> None:
        msg = protocol.Assign(lease_id=lease.lease_id if lease else "", token=lease.token if lease else "",
                              owner_pid=lease.pid if lease else 0)
        if self.supervisor.slots[core].ready:
            transport.send(self.workers_sock, protocol.encode(msg), identity=b"core-%d" % core)

    def end_lease(self, lease: Lease, why: str) -> None:
        self.leases.remove(lease.lease_id)
        self.journal.forget(lease.lease_id)
        freed = self.alloc.release(lease.lease_id)
        for core in freed:
            self.assign(core, None)
        self.reclaimed[lease.lease_id] = why
        self.counters.lease_ended(why)
        if len(self.reclaimed) > RECENTLY_RECLAIMED_KEPT:
            self.reclaimed.pop(next(iter(self.reclaimed)))
        if why != "released":
            removed = shm.unlink_for_pid(lease.pid) if not process_alive(lease.pid, lease.create_time) else 0
            log.warning("reclaimed %s from pid %d (%s): %s%s", format_cores(freed), lease.pid, lease.cmd[:60], why,
                        f"; removed {removed} shared-memory segments" if removed else "")
        else:
            log.info("pid %d released %s", lease.pid, format_cores(freed))
        self.serve_pending()

    def serve_pending(self) -> None:
        now = time.monotonic()
        still = []
        for p in self.pending:
            if not process_alive(p.msg.pid, p.msg.create_time):
                continue
            reply = self.try_grant(p.msg, p.request)
            if isinstance(reply, protocol.Granted):
                self.reply(p.identity, p.req_id, reply)
            elif now >= p.deadline:
                self.reply_error(p.identity, p.req_id, NeuronCoreUnavailableError(
                    self.conflict_message(p.request, reply) + f" (waited {now - p.since:.1f}s)"))
            else:
                still.append(p)
        self.pending = still

    def tick(self, now: float) -> None:
        for lease, why in self.leases.dead(now, process_alive, process_cpu_seconds):
            self.end_lease(lease, why)
        for slot in self.supervisor.reap(now):
            self.worker_stats.pop(slot.core, None)
            if slot.failed:
                self.alloc.mark_failed(slot.core)
        if not self.stopping:  # a group-wide SIGTERM kills the workers too: no restarts on the way out
            self.supervisor.restart_due(now)
        if self.pending:
            self.serve_pending()
        if self.metrics is not None:
            self.metrics.publish_if_wanted(self.status_doc)

    # -- status ----------------------------------------------------------------------------------------------
    def status_doc(self) -> dict:
        now = time.monotonic()
        cores = []
        for c in range(self.alloc.n_cores):
            slot = self.supervisor.slots[c]
            lease = self.leases.get(self.alloc.owner_of(c) or "")
            stats = self.worker_stats.get(c)
            state = "failed" if c in self.alloc.failed else ("owned" if lease else "free")
            cores.append({
                "core": c,
                "state": state,
                **self.backend.placement(c),
                "worker": {"pid": slot.pid, "ready": slot.ready, "rss": stats.rss if stats else 0,
                           "device_memory": stats.device_memory if stats else 0,
                           "device_util": stats.device_util if stats else None,
                           "busy": stats.busy if stats else False, "restarts": len(slot.crashes),
                           "last_exit": slot.last_exit},
                "owner": None if lease is None else {"pid": lease.pid, "cmd": lease.cmd, "lease_id": lease.lease_id,
                                                     "age_s": round(lease.age_s(now), 3)},
                "models": stats.models if stats else [],
                "requests": stats.requests if stats else 0,
                "errors": stats.errors if stats else 0,
                "perf": perf_doc(stats),
            })
        leases = [{"lease_id": lease.lease_id, "pid": lease.pid, "cmd": lease.cmd, "cores": lease.cores,
                   "age_s": round(lease.age_s(now), 3), "last_seen_s": round(now - lease.last_seen, 3)}
                  for lease in self.leases.leases.values()]
        pending = [{"pid": p.msg.pid, "cmd": p.msg.cmd, "requested": p.request.describe(),
                    "waited_s": round(now - p.since, 3)} for p in self.pending]
        return {"schema": 1,
                "broker": {"pid": os.getpid(), "backend": self.backend.name, "cores": self.alloc.n_cores,
                           "address": self.address, "uptime_s": round(now - self.started, 3),
                           "lease_timeout_s": self.leases.timeout_s, "draining": self.draining,
                           "metrics": self.metrics_url, **self.counters.doc()},
                "cores": cores, "leases": leases, "pending": pending}

    # -- socket loop -----------------------------------------------------------------------------------------
    def reply(self, ident: bytes, rid: int, msg) -> None:
        transport.send(self.clients_sock, protocol.encode(msg, rid), identity=ident)

    def reply_error(self, ident: bytes, rid: int, exc: BaseException) -> None:
        text = str(exc) if isinstance(exc, NeuronRuntimeError) else f"{type(exc).__name__}: {exc}"
        transport.send(self.clients_sock, protocol.encode_error(code_of(exc), text, rid), identity=ident)

    def on_remote_frames(self, parts) -> None:
        """A request over the authenticated TCP socket: read-only operations only."""
        if len(parts) < 2:
            return
        ident, frames = parts[0], parts[1:]
        rid = protocol.peek_req_id(frames)
        try:
            env = protocol.decode(frames)
            handler = self.handlers.get(env.op) if env.op in REMOTE_OPS else None
            if handler is None:
                raise ProtocolError(f"over TCP the broker answers {', '.join(REMOTE_OPS)} only; {env.op!r} needs the "
                                    "host's ipc socket (run the command on the host)")
            reply = handler(ident, env.req_id, env.msg)
            transport.send(self.remote_sock, protocol.encode(reply, env.req_id), identity=ident)
        except Exception as exc:
            text = str(exc) if isinstance(exc, NeuronRuntimeError) else f"{type(exc).__name__}: {exc}"
            transport.send(self.remote_sock, protocol.encode_error(code_of(exc), text, rid), identity=ident)

    def on_client_frames(self, parts) -> None:
        if len(parts) < 2:
            return
        ident, frames = parts[0], parts[1:]
        rid = 0
        try:
            size = sum(len(f) for f in frames)
            if size > MAX_CONTROL_MESSAGE_BYTES:
                raise ProtocolError(f"a control message of {size} bytes exceeds the broker's limit of "
                                    f"{MAX_CONTROL_MESSAGE_BYTES} bytes")
            env = protocol.decode(frames)
            rid = env.req_id
            handler = self.handlers.get(env.op)
            if handler is None:
                raise ProtocolError(f"the broker does not serve {env.op!r}; it serves {', '.join(self.handlers)}")
            reply = handler(ident, rid, env.msg)
            if reply is not None:
                self.reply(ident, rid, reply)
        except Exception as exc:
            if not isinstance(exc, NeuronRuntimeError):
                log.exception("error handling a client request")
            self.reply_error(ident, rid or protocol.peek_req_id(frames), exc)

    def on_worker_frames(self, parts) -> None:
        try:
            env = protocol.decode(parts[1:])
            handler = self.worker_handlers.get(env.op)
            if handler is None:
                raise ProtocolError(f"unexpected {env.op!r} from a worker")
            handler(env.msg)
        except ProtocolError as exc:
            log.warning("bad message on the workers socket: %s", exc)

    def serve(self) -> None:
        self.clients_sock = transport.router(self.address, HARD_CONTROL_MESSAGE_BYTES)
        self.workers_sock = transport.router(config.workers_address(self.directory), HARD_CONTROL_MESSAGE_BYTES)
        self.remote_sock, self.remote_auth = None, None
        poller = transport.poller(self.clients_sock, self.workers_sock)
        if self.listen:
            self.remote_sock, self.remote_auth = transport.curve_router(self.listen, self.directory,
                                                                        HARD_CONTROL_MESSAGE_BYTES)
            poller.register(self.remote_sock, transport.POLLIN)
            log.info("also listening on %s (CURVE; keys in %s)", self.listen, transport.curve_dir(self.directory))
        self.supervisor.start_all()
        log.info("broker pid %d serving %d %s cores at %s", os.getpid(), self.alloc.n_cores, self.backend.name,
                 self.address)
        last_check = 0.0
        try:
            while not self.stopping:
                events = dict(poller.poll(int(config.BROKER_TICK_S * 1000)))
                if self.clients_sock in events:
                    for _ in range(64):
                        try:
                            self.on_client_frames(transport.recv(self.clients_sock))
                        except transport.Again:
                            break
                if self.remote_sock is not None and self.remote_sock in events:
                    for _ in range(64):
                        try:
                            self.on_remote_frames(transport.recv(self.remote_sock))
                        except transport.Again:
                            break
                if self.workers_sock in events:
                    for _ in range(256):
                        try:
                            self.on_worker_frames(transport.recv(self.workers_sock))
                        except transport.Again:
                            break
                now = time.monotonic()
                if now - last_check >= LIVENESS_CHECK_S:
                    last_check = now
                    self.tick(now)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        log.info("shutting down: stopping %d workers", len(self.supervisor.slots))
        for p in self.pending:
            self.reply_error(p.identity, p.req_id, BrokerDrainingError("the broker stopped while you waited"))
        for core, slot in self.supervisor.slots.items():
            if slot.ready:
                transport.send(self.workers_sock, protocol.encode(protocol.Shutdown()), identity=b"core-%d" % core)
        self.supervisor.stop_all()
        self.journal.close()
        self.clients_sock.close(linger=0)
        self.workers_sock.close(linger=0)
        if self.remote_sock is not None:
            self.remote_sock.close(linger=0)
            self.remote_auth.stop()
        for path in (self.address, config.workers_address(self.directory)):
            if path.startswith("ipc://") and os.path.exists(path[6:]):
                os.unlink(path[6:])


def take_instance_lock(directory: str):
    """Hold ``broker.lock`` for the broker's lifetime: one broker per directory. None if another holds it."""
    fd = os.open(os.path.join(directory, "broker.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def run_foreground(directory: str, backend, lease_timeout_s: float, address: str | None,
                   restart_policy: RestartPolicy | None = None,
                   max_message_bytes: int = config.MAX_MESSAGE_BYTES, metrics_port: int | None = None,
                   metrics_host: str = "127.0.0.1", shm_threshold: int = config.SHM_THRESHOLD_BYTES,
                   listen: str | None = None) -> int:
    """Run a broker in this process until stopped (``neuron-broker start --foreground``)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s broker %(levelname)s %(message)s")
    try:
        config.ensure_private_dir(directory)
    except NeuronRuntimeError as exc:
        print(f"neuron-broker: {exc}", file=sys.stderr)
        return 2
    lock = take_instance_lock(directory)
    if lock is None:
        print(f"neuron-broker: a broker already runs in {directory}", file=sys.stderr)
        return 3
    metrics_server = None
    if metrics_port is not None:
        from . import metrics

        snapshots = metrics.Snapshots()
        try:
            metrics_server = metrics.serve(snapshots, metrics_port, metrics_host)
        except OSError as exc:
            print(f"neuron-broker: {exc}", file=sys.stderr)
            os.close(lock)
            return 2
    if listen and not listen.startswith("tcp://"):
        print(f"neuron-broker: --listen takes a tcp:// endpoint such as tcp://127.0.0.1:7700, not {listen!r}",
              file=sys.stderr)
        return 2
    broker = Broker(directory, backend, lease_timeout_s, address, shm_threshold=shm_threshold,
                    restart_policy=restart_policy, max_message_bytes=max_message_bytes, listen=listen)
    if metrics_server is not None:
        broker.metrics, broker.metrics_url = snapshots, metrics.url_of(metrics_server)

    def stop(signum, frame):
        broker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pid_path = config.pid_file(directory)
    with open(pid_path, "w") as f:
        f.write(str(os.getpid()))
    try:
        broker.serve()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if os.path.exists(pid_path):
            os.unlink(pid_path)
        os.close(lock)
    return 0
