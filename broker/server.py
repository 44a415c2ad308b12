"""The broker daemon: one per host. Owns the core table and the leases, supervises the workers, answers status.

Its decisions live in :class:`broker.state.BrokerState` (no I/O); this module is the loop that drives it. One thread
polls, at once: the lease listener and every owner's lease link (``lease.sock``: AF_UNIX streams whose peer pid and
uid come from the kernel), a pidfd per owner process (readable the moment it ends), the ZeroMQ ROUTER for operator
commands and status (``broker.sock``), the workers' socket (``workers.sock``) and each worker process's sentinel. Every
readiness becomes an event for the state; every effect it returns is carried out here, in order. Nothing in the loop
blocks: a journal write has a short busy timeout, a link that cannot take a reply is closed.
"""
from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import resource
import signal
import socket
import sys
import time

import psutil

from neuron_client.wire import codec, comm as transport, config, lease_link, messages, procs, shm, status
from neuron_client.wire.errors import NeuronRuntimeError, ProtocolError

from . import state as st
from .journal import Journal, JournalError
from .metrics import Counters, Snapshots
from .status import perf_status
from .supervisor import RestartPolicy, Supervisor, set_title

log = logging.getLogger("neuron.broker")
LIVENESS_CHECK_S = 0.1  # the tick: worker silence, grant and re-attach deadlines, waiting acquires
REMOTE_OPS = ("ping", "status")  # what an authenticated TCP client may ask
MAX_CONTROL_MESSAGE_BYTES = 1 << 20  # control messages are small; larger ones get an error reply
HARD_CONTROL_MESSAGE_BYTES = 16 << 20  # frames larger than this are dropped by ZeroMQ before they are read
CONTROL_OPS = ("force_release", "drain", "stop", "heartbeat")  # decisions: handed to the state
STOPPED_CHECK_S = 0.5  # the opt-in stopped-owner policy looks this often
RETIRE_GRACE_S = 2.0  # a retiring worker is SIGKILLed if it has not exited this long after being told (it exits
# as soon as its last stats have left: worker.main.FINAL_STATS_LINGER_S at most)
FINAL_STATS_WAIT_S = 1.0  # a retired worker's last stats may arrive just after its exit is seen
UNLINK_WATCH_S = 10.0  # a former owner's segments are removed if it exits within this long of its lease's end


def process_alive(pid: int, create_time: float) -> bool:
    """True if ``pid`` is the same live process that started at ``create_time`` (guards against pid reuse)."""
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - create_time) > 0.05:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, OverflowError):
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


def _identity(pid: int) -> tuple[float, str]:
    """(start time, command line) of a process, read from /proc; (0.0, "") if it is gone."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            start = p.create_time()
            try:
                cmd = procs.command_line(p)
            except psutil.Error:
                cmd = ""
        return start, cmd or p.name()
    except psutil.Error:
        return 0.0, ""


COUNTER_FIELDS = ("requests", "errors", "busy_s", "latency_sum_s", "loads", "load_s")


def add_counters(total: messages.WorkerStats | None, stats: messages.WorkerStats | None):
    """``stats`` with the counters of ``total`` (earlier workers of the same core) added: a core's counters run on
    across the fresh workers that each new owner gets, as counters must."""
    if total is None or stats is None:
        return stats if stats is not None else total
    merged = messages.WorkerStats(**{f: getattr(stats, f) for f in messages.WorkerStats.__dataclass_fields__})
    for f in COUNTER_FIELDS:
        setattr(merged, f, getattr(total, f) + getattr(stats, f))
    a, b = list(total.latency_buckets or []), list(stats.latency_buckets or [])
    n = max(len(a), len(b))
    merged.latency_buckets = [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]
    return merged


def retired_counters(total: messages.WorkerStats | None, last: messages.WorkerStats) -> messages.WorkerStats:
    """The running counters of a core after its worker ``last`` went; no gauges (models, queue, latency window)."""
    merged = add_counters(total, last)
    return messages.WorkerStats(core=last.core, models=[], requests=merged.requests, errors=merged.errors, rss=0,
                                busy=False, busy_s=merged.busy_s, latency_sum_s=merged.latency_sum_s,
                                latency_buckets=merged.latency_buckets, loads=merged.loads, load_s=merged.load_s)


class Broker:
    """Owns the sockets, pidfds, journal and worker processes of one broker; :attr:`state` owns its decisions.

    Only the loop thread changes either; metrics scrapes read status documents it publishes."""

    def __init__(self, directory: str, backend, lease_timeout_s: float = 0.0,
                 address: str | None = None, shm_threshold: int = config.SHM_THRESHOLD_BYTES,
                 restart_policy: RestartPolicy | None = None, max_message_bytes: int = config.MAX_MESSAGE_BYTES,
                 listen: str | None = None):
        self.directory = directory
        self.backend = backend
        self.listen = listen  # a tcp:// endpoint served with CURVE authentication, read-only
        self.address = address or config.broker_address(directory)
        restart_policy = restart_policy or RestartPolicy()
        self.policy = st.Policy(max_restarts=restart_policy.max_restarts, window_s=restart_policy.window_s,
                                stopped_owner_s=max(0.0, lease_timeout_s or 0.0),
                                max_message_bytes=max_message_bytes)
        self.state = st.BrokerState(backend.n_cores, self.policy,
                                    worker_address=lambda c: config.worker_address(directory, c))
        self.supervisor = Supervisor(directory, backend, shm_threshold, max_message_bytes)
        self.lease_path = lease_link.lease_socket_path(directory)
        journal_path = os.path.join(directory, "leases.db")
        unclean = os.path.exists(self.lease_path)  # the previous broker died without removing its socket
        self.journal = Journal(journal_path)
        self.recovering = self.journal.recovering or unclean
        self.stats_by_pid: dict[int, messages.WorkerStats] = {}  # the last stats of each worker (live or just gone)
        self.gone: dict[int, tuple[int, float]] = {}  # worker pid -> (core, when its stats are folded into retired)
        self.counters = Counters()
        self.metrics: Snapshots | None = None  # set when metrics are served (run_foreground --metrics-port)
        self.metrics_url = ""
        self.started = time.monotonic()
        self.links: dict[int, tuple[socket.socket, lease_link.FrameReader]] = {}
        self.pidfds: dict[int, tuple[int, float]] = {}  # pid -> (pidfd, start time)
        self.pid_of_fd: dict[int, int] = {}
        self.stopped_since: dict[int, float] = {}
        self.sentinels: dict[int, int] = {}  # worker sentinel fd -> core
        self.retired: dict[int, messages.WorkerStats] = {}  # per core: counters of its workers that have gone
        self.segments_of_exiting: dict[int, tuple[float, float]] = {}  # pid -> (start time, watch until)
        self.poller = None

    @property
    def stopping(self) -> bool:
        return self.state.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.state.stopping = value

    # -- events in, effects out ----------------------------------------------------------------------------------
    def dispatch(self, event) -> None:
        try:
            effects = self.state.handle(event, time.monotonic())
        except Exception:
            log.exception("internal error deciding %s", type(event).__name__)
            return
        self.execute(effects)

    def execute(self, effects) -> None:
        for eff in effects:
            try:
                self.apply(eff)
            except Exception:
                log.exception("internal error carrying out %s", type(eff).__name__)
        if self.state.ended_counts:
            for why in self.state.ended_counts:
                self.counters.lease_ended(why)
            self.state.ended_counts = []
        self.counters.granted = self.state.granted

    def apply(self, eff) -> None:
        kind = type(eff)
        if kind is st.Reply:
            self.send_reply(eff.to, eff.req_id, eff.msg)
        elif kind is st.ToWorker:
            self.workers.send(eff.msg, to=b"core-%d" % eff.core)
        elif kind is st.JournalRecord:
            try:
                self.journal.record(eff.lease)
                error = ""
            except JournalError as exc:
                error = str(exc)
                log.error("%s", error)
            self.dispatch(st.JournalWritten(eff.lease.lease_id, error))
        elif kind is st.JournalForget:
            self.journal.forget(eff.lease_id)
        elif kind is st.CloseLink:
            self.close_link(eff.link)
        elif kind is st.WatchPid:
            self.watch(eff.pid, eff.start_time)
        elif kind is st.UnwatchPid:
            self.unwatch(eff.pid)
        elif kind is st.StartWorker:
            try:
                pid, sentinel = self.supervisor.start(eff.core)
            except Exception as exc:
                log.exception("core %d: could not start a worker", eff.core)
                self.dispatch(st.WorkerStartFailed(eff.core, f"{type(exc).__name__}: {exc}"))
                return
            self.sentinels[sentinel] = eff.core
            self.poller.register(sentinel, transport.POLLIN)
            self.dispatch(st.WorkerStarted(eff.core, pid))
        elif kind is st.StopWorker:
            if eff.graceful:
                self.workers.send(messages.Shutdown(), to=b"core-%d" % eff.core)
            pid = self.supervisor.kill(eff.core, RETIRE_GRACE_S if eff.graceful else 0.0)
            if pid:
                log.info("core %d: stopping worker pid %d: %s", eff.core, pid, eff.why)
        elif kind is st.UnlinkSegments:
            self.segments_of_exiting[eff.pid] = (eff.start_time, time.monotonic() + UNLINK_WATCH_S)
            self.unlink_segments_of_exited()

    def send_reply(self, to, req_id: int, msg) -> None:
        kind, where = to
        if kind == "link":
            entry = self.links.get(where)
            if entry is None:
                return
            data = lease_link.pack(msg, req_id)
            try:
                sent = entry[0].send(data, socket.MSG_DONTWAIT)
                if sent != len(data):
                    raise BlockingIOError("partial send")
            except OSError as exc:  # the owner does not read its link: it is not served
                log.warning("lease link %d: cannot send (%s); closing it", where, exc)
                self.close_link(where)
                self.dispatch(st.LinkClosed(where))
            return
        (self.remote if kind == "tcp" else self.clients).send(msg, req_id, to=where)

    # -- lease links and owner processes ------------------------------------------------------------------------
    def on_listener(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the link is not served; the loop goes on
                log.error("cannot accept a lease link: %s", exc)
                return
            try:
                pid, uid, _ = lease_link.peer_cred(conn)
            except OSError:
                conn.close()
                continue
            if uid != os.getuid():
                log.warning("refused a lease link from pid %d of uid %d (this broker serves uid %d only)", pid, uid,
                            os.getuid())
                conn.close()
                continue
            start_time, cmd = _identity(pid)
            conn.setblocking(False)
            fd = conn.fileno()
            self.links[fd] = (conn, lease_link.FrameReader())
            self.poller.register(fd, transport.POLLIN)
            self.dispatch(st.LinkOpened(fd, pid, uid, start_time, cmd))

    def on_links(self, fds: list[int]) -> None:
        """Read every ready link; the links that ended are dispatched before any request, so that the cores of an
        owner that has gone are free for whoever asks in the same round."""
        ended, received = [], []
        for fd in fds:
            entry = self.links.get(fd)
            if entry is None:
                continue
            conn, reader = entry
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                ended.append(fd)
                continue
            try:
                received.append((fd, reader.feed(data)))
            except ProtocolError as exc:
                self.send_reply(("link", fd), 0, exc)
                ended.append(fd)
        for fd in ended:
            self.close_link(fd)
            self.dispatch(st.LinkClosed(fd))
        for fd, frames in received:
            if fd in self.links:
                self.on_frames(fd, frames)

    def on_frames(self, fd: int, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                env = codec.decode([frame])
            except ProtocolError as exc:
                self.send_reply(("link", fd), codec.peek_req_id([frame]), exc)
                continue
            self.dispatch(st.LinkMessage(fd, env.req_id, env.msg))

    def close_link(self, fd: int) -> None:
        entry = self.links.pop(fd, None)
        if entry is None:
            return
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
        entry[0].close()

    def watch(self, pid: int, start_time: float) -> None:
        if pid in self.pidfds:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = -1
        if fd < 0 or not process_alive(pid, start_time):  # gone already (or its pid reused)
            if fd >= 0:
                os.close(fd)
            self.dispatch(st.OwnerExited(pid, start_time))
            return
        self.pidfds[pid] = (fd, start_time)
        self.pid_of_fd[fd] = pid
        self.poller.register(fd, transport.POLLIN)

    def unwatch(self, pid: int) -> None:
        entry = self.pidfds.pop(pid, None)
        self.stopped_since.pop(pid, None)
        if entry is None:
            return
        fd = entry[0]
        self.pid_of_fd.pop(fd, None)
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
        os.close(fd)

    def on_pidfd(self, fd: int) -> None:
        pid = self.pid_of_fd.get(fd)
        if pid is not None:
            self.dispatch(st.OwnerExited(pid, self.pidfds[pid][1]))
            self.unwatch(pid)

    def unlink_segments_of_exited(self) -> None:
        """Remove the segments of former owners that have exited (a process whose link closed may be exiting)."""
        now = time.monotonic()
        for pid, (start_time, until) in list(self.segments_of_exiting.items()):
            if not process_alive(pid, start_time):
                del self.segments_of_exiting[pid]
                removed = shm.unlink_for_pid(pid)
                if removed:
                    log.info("removed %d shared-memory segments of pid %d, which exited", removed, pid)
            elif now > until:  # it lives on: its segments are its own
                del self.segments_of_exiting[pid]

    def check_stopped_owners(self, now: float) -> None:
        """The opt-in policy: report owners stopped by a signal (never a runnable process, however starved)."""
        for lease in list(self.state.leases.values()):
            try:
                stopped = psutil.Process(lease.pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
            except psutil.Error:
                stopped = False
            if not stopped:
                self.stopped_since.pop(lease.pid, None)
                continue
            since = self.stopped_since.setdefault(lease.pid, now)
            self.dispatch(st.OwnerStopped(lease.pid, since))

    # -- workers -----------------------------------------------------------------------------------------------
    def on_worker_frames(self, parts) -> None:
        try:
            ident = bytes(parts[0])
            if not ident.startswith(b"core-"):
                raise ProtocolError(f"unknown worker identity {ident[:40]!r}")
            core = int(ident[5:])
            env = codec.decode(parts[1:])
        except (ProtocolError, ValueError) as exc:
            log.warning("bad message on the workers socket: %s", exc)
            return
        msg = env.msg
        if isinstance(msg, messages.WorkerStats):
            if msg.core != core:
                return
            slot = self.state.slots.get(core)
            pid = msg.pid or (slot.pid if slot is not None else 0)
            if slot is not None and (pid == slot.pid or pid in self.gone):  # a gone worker's last word still counts
                self.stats_by_pid[pid] = msg
        self.dispatch(st.WorkerMessage(core, msg))

    def on_sentinel(self, fd: int) -> None:
        core = self.sentinels.pop(fd, None)
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
        if core is None:
            return
        for pid, how in self.supervisor.reap(core):
            self.gone[pid] = (core, time.monotonic() + FINAL_STATS_WAIT_S)
            self.dispatch(st.WorkerExited(core, pid, how))

    def fold_gone_workers(self) -> None:
        """A gone worker's counters join its core's running totals once its last stats had time to arrive."""
        now = time.monotonic()
        for pid, (core, when) in list(self.gone.items()):
            if now >= when:
                del self.gone[pid]
                last = self.stats_by_pid.pop(pid, None)
                if last is not None:
                    self.retired[core] = retired_counters(self.retired.get(core), last)

    # -- operator requests (ZeroMQ) --------------------------------------------------------------------------------
    def on_client_frames(self, parts, remote: bool = False) -> None:
        if len(parts) < 2:
            return
        ident, frames = bytes(parts[0]), parts[1:]
        to = ("tcp" if remote else "zmq", ident)
        rid = codec.peek_req_id(frames)
        try:
            size = sum(len(f) for f in frames)
            if size > MAX_CONTROL_MESSAGE_BYTES:
                raise ProtocolError(f"a control message of {size} bytes exceeds the broker's limit of "
                                    f"{MAX_CONTROL_MESSAGE_BYTES} bytes")
            env = codec.decode(frames)
            rid, op = env.req_id, env.op
            if remote and op not in REMOTE_OPS:
                raise ProtocolError(f"over TCP the broker answers {', '.join(REMOTE_OPS)} only; {op!r} needs the "
                                    "host's ipc socket (run the command on the host)")
            if op == "ping":
                self.send_reply(to, rid, messages.Pong(pid=os.getpid(), cores=self.state.alloc.n_cores,
                                                       backend=self.backend.name))
            elif op == "status":
                self.send_reply(to, rid, messages.StatusReply(doc=self.status_doc()))
            elif op in CONTROL_OPS:
                self.dispatch(st.Control(to, rid, env.msg))
            elif op in ("acquire", "release", "reattach"):
                raise ProtocolError(f"{op!r} is served on the lease link ({self.lease_path}), not on the broker's "
                                    "ZeroMQ socket: upgrade the client library")
            else:
                raise ProtocolError(f"the broker does not serve {op!r}; it serves ping, status, "
                                    f"{', '.join(CONTROL_OPS)} (and acquire, reattach, release on the lease link)")
        except Exception as exc:
            if not isinstance(exc, NeuronRuntimeError):
                log.exception("error handling a client request")
            self.send_reply(to, rid, exc)

    # -- status ----------------------------------------------------------------------------------------------
    def status_doc(self) -> status.StatusDoc:
        now = time.monotonic()
        s = self.state
        cores = []
        for c in range(s.alloc.n_cores):
            slot = s.slots[c]
            lease = s.leases.get(s.alloc.owner_of(c) or "")
            current = self.stats_by_pid.get(slot.pid) if slot.ready else None
            stats = self.retired.get(c)
            for pid, (core, _) in self.gone.items():
                if core == c:
                    stats = retired_counters(stats, self.stats_by_pid[pid]) if pid in self.stats_by_pid else stats
            stats = add_counters(stats, current)
            cores.append(status.CoreStatus(
                index=c,
                state=s.core_state(c),
                **self.backend.placement(c),
                worker=status.WorkerStatus(
                    pid=slot.pid, ready=slot.ready, state=slot.state.value,
                    memory_bytes=current.rss if current else 0,
                    device_memory_bytes=current.device_memory if current else 0,
                    device_util_percent=current.device_util if current else None,
                    busy=current.busy if current else False, restarts=slot.restarts, last_exit=slot.last_exit,
                    recent_crashes=s.recent_crashes(slot, now)),
                owner=None if lease is None else status.OwnerStatus(
                    pid=lease.pid, cmd=lease.cmd, lease_id=lease.lease_id, lease_age_s=round(lease.age_s(now), 3),
                    state=lease.state.value),
                models=list(current.models) if current else [],
                requests=stats.requests if stats else 0,
                errors=stats.errors if stats else 0,
                perf=perf_status(stats),
            ))
        leases = [status.LeaseStatus(lease_id=lease.lease_id, pid=lease.pid, cmd=lease.cmd, cores=list(lease.cores),
                                     lease_age_s=round(lease.age_s(now), 3), state=lease.state.value,
                                     batchers=list(lease.batchers))
                  for lease in s.leases.values()]
        pending = [status.PendingStatus(pid=s.links[p.link].pid if p.link in s.links else 0, cmd=p.cmd,
                                        requested=p.request.describe(), waited_s=round(now - p.since, 3))
                   for p in s.pending[:256]]
        counters = self.counters
        broker = status.BrokerStatus(
            pid=os.getpid(), backend=self.backend.name, cores=s.alloc.n_cores, address=self.address,
            uptime_s=round(now - self.started, 3), lease_timeout_s=self.policy.stopped_owner_s, draining=s.draining,
            recovering_s=round(max(0.0, s.recovering_until - now), 3), links=len(s.links),
            pending_total=len(s.pending), metrics=self.metrics_url, leases_granted=counters.granted,
            leases_ended=dict(counters.ended))
        return status.StatusDoc(timestamp=status.timestamp(), broker=broker, cores=cores, leases=leases,
                                pending=pending)

    # -- socket loop -----------------------------------------------------------------------------------------
    def bind_listener(self) -> socket.socket:
        try:
            os.unlink(self.lease_path)  # a stale socket of a broker that died (we hold the instance lock)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        old = os.umask(0o177)
        try:
            sock.bind(self.lease_path)
        finally:
            os.umask(old)
        sock.listen(1024)
        return sock

    def serve(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # every owner holds a link and a pidfd here
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.clients = transport.Comm(transport.router(self.address, HARD_CONTROL_MESSAGE_BYTES))
        self.workers = transport.Comm(transport.router(config.workers_address(self.directory),
                                                       HARD_CONTROL_MESSAGE_BYTES, handover=True))
        self.listener = self.bind_listener()
        self.remote, self.remote_auth = None, None
        self.poller = poller = transport.poller(self.clients.sock, self.workers.sock)
        poller.register(self.listener.fileno(), transport.POLLIN)
        if self.listen:
            remote_sock, self.remote_auth = transport.curve_router(self.listen, self.directory,
                                                                   HARD_CONTROL_MESSAGE_BYTES)
            self.remote = transport.Comm(remote_sock)
            poller.register(remote_sock, transport.POLLIN)
            log.info("also listening on %s (CURVE; keys in %s)", self.listen, transport.curve_dir(self.directory))
        restored = []
        for rec in self.journal.load():
            rec["alive"] = rec["uid"] == os.getuid() and process_alive(rec["pid"], rec["start_time"])
            restored.append(rec)
        self.execute(self.state.start_workers(time.monotonic()))
        if self.recovering:
            log.warning("the previous broker did not stop cleanly or its lease journal was lost: acquires wait %.0fs "
                        "so that running owners re-attach first", self.policy.restart_grace_s)
        self.execute(self.state.restore(time.monotonic(), restored, self.recovering))  # the grace runs from here
        log.info("broker pid %d serving %d %s cores at %s (lease links at %s)", os.getpid(), self.state.alloc.n_cores,
                 self.backend.name, self.address, self.lease_path)
        listener_fd = self.listener.fileno()
        last_check = last_stopped = 0.0
        try:
            while not self.stopping:
                events = poller.poll(int(config.BROKER_TICK_S * 1000))
                ready = {}
                for sock, _ in events:
                    ready[sock] = True
                # ends first: an owner that died is gone before anyone asks for its cores
                for fd in [s for s in ready if isinstance(s, int) and s in self.pid_of_fd]:
                    self.on_pidfd(fd)
                for fd in [s for s in ready if isinstance(s, int) and s in self.sentinels]:
                    self.on_sentinel(fd)
                self.on_links([s for s in ready if isinstance(s, int) and s in self.links])
                if self.workers.sock in ready:
                    self.drain(self.workers, self.on_worker_frames, 256)
                if listener_fd in ready:
                    self.on_listener()
                if self.clients.sock in ready:
                    self.drain(self.clients, self.on_client_frames, 64)
                if self.remote is not None and self.remote.sock in ready:
                    self.drain(self.remote, lambda parts: self.on_client_frames(parts, remote=True), 64)
                now = time.monotonic()
                if now - last_check >= LIVENESS_CHECK_S:
                    last_check = now
                    self.dispatch(st.Tick())
                    self.supervisor.kill_overdue()
                    if self.journal.unforgotten:
                        self.journal.retry()
                    if self.gone:
                        self.fold_gone_workers()
                    if self.segments_of_exiting:
                        self.unlink_segments_of_exited()
                    if self.policy.stopped_owner_s > 0 and now - last_stopped >= STOPPED_CHECK_S:
                        last_stopped = now
                        self.check_stopped_owners(now)
                    if self.metrics is not None:
                        self.metrics.publish_if_wanted(self.status_doc)
        finally:
            self.shutdown()

    @staticmethod
    def drain(comm, handler, limit: int) -> None:
        for _ in range(limit):
            try:
                handler(comm.recv())
            except transport.Again:
                break

    def shutdown(self) -> None:
        log.info("shutting down: stopping %d workers", len(self.state.slots))
        self.execute(self.state.stop(time.monotonic()))
        for core, slot in self.state.slots.items():
            if slot.ready:
                self.workers.send(messages.Shutdown(), to=b"core-%d" % core)
        self.supervisor.stop_all()
        self.journal.close()
        for fd in list(self.links):
            self.close_link(fd)
        for pid in list(self.pidfds):
            self.unwatch(pid)
        self.listener.close()
        self.clients.close()
        self.workers.close()
        if self.remote is not None:
            self.remote.close()
            self.remote_auth.stop()
        for path in (self.address, config.workers_address(self.directory), "ipc://" + self.lease_path):
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


LOG_FORMAT = "%(asctime)s broker %(levelname)s %(message)s"


class RotatingLog(logging.handlers.RotatingFileHandler):
    """The daemon's log, ``<dir>/broker.log``, rotated by size. The daemon's stdout and stderr are that file too
    (what it prints before logging is set up, a crash's traceback): at each rollover they are pointed at the new file.
    Workers already started keep writing to the file they inherited until they are replaced."""

    def doRollover(self):
        super().doRollover()
        if self.stream is not None:
            for fd in (1, 2):
                try:
                    os.dup2(self.stream.fileno(), fd)
                except OSError:
                    pass


def configure_logging(directory: str, level: str = "INFO", max_bytes: int = 10 << 20, backups: int = 3) -> None:
    """The broker's logging at ``level``: into a rotating ``broker.log`` when stderr is that file (the daemon, as
    ``neuron-broker start`` runs it), else to stderr (``--foreground`` in a terminal or under systemd)."""
    path = config.log_file(directory)
    handler: logging.Handler
    try:
        daemon = os.path.samestat(os.fstat(2), os.stat(path))
    except OSError:
        daemon = False
    if daemon:
        handler = RotatingLog(path, maxBytes=max_bytes, backupCount=backups)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def run_foreground(directory: str, backend, lease_timeout_s: float, address: str | None,
                   restart_policy: RestartPolicy | None = None,
                   max_message_bytes: int = config.MAX_MESSAGE_BYTES, metrics_port: int | None = None,
                   metrics_host: str = "127.0.0.1", shm_threshold: int = config.SHM_THRESHOLD_BYTES,
                   listen: str | None = None) -> int:
    """Run a broker in this process until stopped (``neuron-broker start --foreground``)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)  # unless configure_logging ran
    try:
        config.ensure_private_dir(directory)
    except NeuronRuntimeError as exc:
        print(f"neuron-broker: {exc}", file=sys.stderr)
        return 2
    os.chdir(directory)  # a safe working directory: private, and no mount point or user directory kept busy
    set_title(f"neuron-broker --dir {directory}")
    lock = take_instance_lock(directory)
    if lock is None:
        print(f"neuron-broker: a broker already runs in {directory}", file=sys.stderr)
        return config.EXIT_ALREADY_RUNNING
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
