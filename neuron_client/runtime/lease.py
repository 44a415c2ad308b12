"""The process's connection to the runtime: its lease on cores, and channels to the workers.

One :class:`Runtime` per process, created on first use (:func:`get_runtime`). It asks the broker for the cores the
environment names (``NEURON_RT_VISIBLE_CORES`` / ``NEURON_RT_NUM_CORES`` / all), keeps the lease alive with a
heartbeat thread, and gives each thread its own channel to each core's worker (ZeroMQ sockets are single-threaded,
and a call then needs no hand-off between threads). Core indices inside the process are relative: ``nc0`` is the
first core the process owns.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import psutil

from neuron_client.runtime import autostart
from neuron_client.runtime.channels import WorkerChannel
from neuron_client.wire import config, cores, lease_link, messages
from neuron_client.wire.broker_client import BrokerClient
from neuron_client.wire.errors import BrokerUnavailableError, LeaseLostError, NeuronRuntimeError, WorkerUnavailableError
from neuron_client.wire.procs import command_line, current_pid, pid_running

log = logging.getLogger("neuron_client")

REPORT_INTERVAL_S = 1.0  # how often the lease thread sends the owner's batcher counters (messages.OwnerReport)
MAX_REPORTED = 64  # batched models per report (the broker keeps as many)


def acquire_timeout_s(env) -> float:
    return config.acquire_timeout_s(None if env is os.environ else env)


class Runtime:
    """This process's lease on its cores, and its way to their workers. One per process (:func:`get_runtime`).

    Owns: the lease (its token, its cores, the lease link kept open to the broker and the thread that reads the
    broker's pushes on it and re-attaches after a broker restart), the workers' endpoints as the broker last told them,
    one :class:`~neuron_client.runtime.channels.WorkerChannel` per thread and core, ``models_per_core`` (changed only
    by :class:`~neuron_client.models.placed.PlacedModel`), and the pool that runs background loads and calls. Created by
    :func:`get_runtime` (or tests); closed by :meth:`close`, :func:`shutdown` or the process's exit.
    """

    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.pid = os.getpid()
        config.validate_env()  # a bad variable fails here, naming itself, not at the first call
        request = cores.request_from_env(env)
        wait_s = acquire_timeout_s(env)
        self.directory = config.broker_dir()
        self.address = config.broker_address(self.directory)
        autostart.ensure_broker(self.directory)
        link = lease_link.LeaseLink(self.directory, config.BROKER_PING_TIMEOUT_S)
        try:
            granted = link.request(messages.Acquire(
                cmd=_command_line()[:4096], visible=list(request.visible) if request.visible is not None else None,
                count=request.count, wait_s=wait_s), config.ACQUIRE_TIMEOUT_S + wait_s)
        except BaseException:
            link.close()  # the broker ends whatever it had begun to grant on this link
            raise
        self._link = link  # held open for the lease's life: the broker ends the lease when it closes
        self.lease_id: str = granted.lease_id
        self.token: str = granted.token
        self.cores: list[int] = list(granted.cores)
        self.max_message_bytes: int = granted.max_message_bytes
        self.workers: dict[int, messages.WorkerInfo] = {w.core: w for w in granted.workers}  # pushed on change
        self._replaced: dict[int, set[int]] = {}  # core -> pids of its workers that a later one replaced
        self.lost: str | None = None
        self.closed = False
        self._local = threading.local()
        self._channels: list[WorkerChannel] = []
        self._lock = threading.Lock()
        self.models_per_core = [0] * len(self.cores)  # for least-used placement
        self._executor: ThreadPoolExecutor | None = None
        self._unloads: queue.Queue = queue.Queue()  # (core, model id) of collected models
        self._janitor: threading.Thread | None = None
        self._stop = threading.Event()
        self._detached = False  # the broker went away; the lease thread is re-attaching
        self._reporters: dict[int, object] = {}  # id -> fn() returning a status.BatcherStatus (batched models)
        self._reported: list | None = None  # what the last OwnerReport said
        self._report_due = 0.0
        self._reports_refused = False  # the broker answered a report with an error (it predates them)
        self._heartbeat = threading.Thread(target=self._lease_loop, name="neuron-lease", daemon=True)
        self._heartbeat.start()
        atexit.register(self.close)

    # -- cores -----------------------------------------------------------------------------------------------
    @property
    def num_cores(self) -> int:
        return len(self.cores)

    def global_core(self, nc: int) -> int:
        """The host-wide id of the process's ``nc``-th core."""
        if not 0 <= nc < len(self.cores):
            raise ValueError(f"nc{nc} is outside the {len(self.cores)} NeuronCores this process owns "
                             f"(nc0-nc{len(self.cores) - 1}, global {cores.format_cores(self.cores)})")
        return self.cores[nc]

    # -- lease -----------------------------------------------------------------------------------------------
    def check_lease(self) -> None:
        if self.pid != current_pid():
            raise NeuronRuntimeError("this neuron_client runtime belongs to the parent process; a forked child "
                                     "must not use it (start children with the 'spawn' method)")
        if self.lost:
            raise LeaseLostError(f"this process lost its NeuronCores {cores.format_cores(self.cores)}: {self.lost}")
        if self.closed:
            raise NeuronRuntimeError("the neuron_client runtime was closed")

    def _lease_loop(self) -> None:
        """Read what the broker pushes on the lease link (workers that changed, the lease's end); after the broker
        went away, re-attach to the one that replaces it."""
        link = self._link
        try:
            while not self._stop.is_set():
                try:
                    env = link.recv(0.5)
                except LeaseLostError as exc:
                    self.lost = str(exc)
                    return
                except BrokerUnavailableError:
                    if self._stop.is_set():
                        return
                    link = self._reattach()
                    if link is None:
                        return
                    continue
                except NeuronRuntimeError as exc:
                    if "owner_report" in str(exc):  # an older broker: it keeps no batcher statistics
                        self._reports_refused = True
                        continue
                    log.warning("the broker sent something this client cannot read: %s", exc)
                    continue
                if time.monotonic() >= self._report_due and not self._reports_refused:
                    self._report(link)
                if env is None:
                    continue
                if isinstance(env.msg, messages.HeartbeatAck):
                    self._update_workers(env.msg.workers)
                elif isinstance(env.msg, messages.LeaseEnded):
                    self.lost = f"lease {env.msg.lease_id} ended: {env.msg.reason}"
                    log.error("this process lost its NeuronCores %s: %s", cores.format_cores(self.cores),
                              env.msg.reason)
                    return
        except Exception:
            log.exception("the lease thread failed")

    # -- owner reports ----------------------------------------------------------------------------------------
    def add_reporter(self, key: int, fn) -> None:
        """Report ``fn()`` (a :class:`~neuron_client.wire.status.BatcherStatus`) to the broker every
        :data:`REPORT_INTERVAL_S` until :meth:`remove_reporter` (``neuron_client.batched`` does it)."""
        with self._lock:
            self._reporters[key] = fn
        self._report_due = 0.0

    def remove_reporter(self, key: int) -> None:
        with self._lock:
            self._reporters.pop(key, None)
        self._report_due = 0.0

    def _report(self, link) -> None:
        """Send the reporters' records on the lease link when they changed (from the lease thread, the link's only
        user after the grant). A failed send surfaces at the next read."""
        self._report_due = time.monotonic() + REPORT_INTERVAL_S
        with self._lock:
            fns = list(self._reporters.values())[:MAX_REPORTED]
        records = []
        for fn in fns:
            try:
                records.append(fn())
            except Exception:  # noqa: BLE001 - a reporter's bug must not end the lease thread
                log.exception("a batcher's report failed")
        if records == self._reported or (not records and self._reported is None):
            return
        try:
            link.send(messages.OwnerReport(batchers=records))
            self._reported = records
        except NeuronRuntimeError as exc:
            log.warning("could not send the batchers' report to the broker: %s", exc)

    def _reattach(self):
        """A link to the restarted broker holding this lease again, or None (lost, or closing)."""
        since = time.monotonic()
        log.warning("the broker closed the lease link; re-attaching lease %s when it is back", self.lease_id)
        self._detached = True
        while not self._stop.wait(config.LEASE_LINK_RETRY_S):
            try:
                link = lease_link.LeaseLink(self.directory, config.BROKER_PING_TIMEOUT_S)
            except BrokerUnavailableError:
                continue
            try:
                granted = link.request(messages.Reattach(lease_id=self.lease_id, token=self.token, cores=list(self.cores)),
                                       config.ACQUIRE_TIMEOUT_S)
            except LeaseLostError as exc:
                link.close()
                self.lost = str(exc)
                log.error("%s", exc)
                return None
            except NeuronRuntimeError as exc:
                link.close()
                log.warning("re-attaching lease %s failed (%s); retrying", self.lease_id, exc)
                continue
            with self._lock:
                self._link = link
            self._detached = False
            self._reported = None  # the restarted broker knows no report yet
            self._update_workers(granted.workers)
            log.warning("re-attached lease %s after %.1fs", self.lease_id, time.monotonic() - since)
            return link
        return None

    def _update_workers(self, workers: list[messages.WorkerInfo]) -> None:
        """Take the broker's word on the workers. Two threads may ask at once (the lease link's pushes, a heartbeat
        after a failed call), so a word can arrive after a newer one: a report naming a worker that a later one
        already replaced, and that is dead, is stale and changes nothing (calls would go to the dead worker)."""
        with self._lock:
            for w in workers:
                cur = self.workers.get(w.core)
                if cur is not None and w.pid != cur.pid:
                    replaced = self._replaced.setdefault(w.core, set())
                    if w.pid in replaced and not pid_running(w.pid):
                        continue
                    if cur.pid:
                        replaced.add(cur.pid)
                self.workers[w.core] = w

    def worker(self, core: int) -> messages.WorkerInfo:
        return self.workers[core]

    def refresh_workers(self) -> None:
        """Ask the broker now for the lease's workers (heartbeats do it every interval anyway)."""
        with BrokerClient(self.address) as broker:
            try:
                self._update_workers(broker.heartbeat(self.lease_id, config.BROKER_PING_TIMEOUT_S))
            except LeaseLostError as exc:
                self.lost = str(exc)
                raise

    def worker_died(self, core: int, pid: int) -> WorkerUnavailableError:
        """The error for a call in flight on a worker that died; this thread's channel to it is dropped."""
        chans = getattr(self._local, "channels", {})
        ch = chans.pop(core, None)
        if ch is not None:
            ch.close()
        cause = "it exited"
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # the broker reaps it within ~0.1 s and knows how it ended
            try:
                self.refresh_workers()
            except LeaseLostError as exc:  # the worker went because the lease ended: say so
                return exc
            except NeuronRuntimeError:
                break
            w = self.workers[core]
            if w.pid != pid or w.last_exit:
                cause = f"it ended with {w.last_exit}" if w.last_exit else cause
                break
            time.sleep(0.05)
        return WorkerUnavailableError(
            f"the worker of neuroncore {core} (pid {pid}) died while serving this request: {cause}; the broker "
            "starts a fresh one and your models are loaded on it again at the next call")

    def await_worker(self, core: int, not_pid: int,
                     timeout_s: float = config.WORKER_START_TIMEOUT_S) -> messages.WorkerInfo:
        """Wait until ``core`` has a live, ready worker other than ``not_pid`` (a restarted one)."""
        deadline = time.monotonic() + timeout_s
        while True:
            w = self.workers[core]
            if w.failed:
                raise WorkerUnavailableError(
                    f"neuroncore {core} failed for this process: its worker kept dying under this lease (last: "
                    f"{w.last_exit or 'unknown'}), which points at a model it ran. The broker restarts it no "
                    "more for this lease; the core returns to service with a fresh worker once this process releases "
                    "its cores")
            if w.pid and w.pid != not_pid and w.ready and pid_running(w.pid):
                return w
            if time.monotonic() > deadline:
                raise WorkerUnavailableError(
                    f"neuroncore {core} has had no working worker for {timeout_s:.0f}s; see the broker's log")
            time.sleep(0.05)
            self.refresh_workers()

    # -- background work -------------------------------------------------------------------------------------
    def submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` on the runtime's thread pool (each pool thread has its own worker channels)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=4 * len(self.cores) + 4,
                                                    thread_name_prefix="neuron-call")
        return self._executor.submit(fn, *args)

    def unload_later(self, replicas) -> None:
        """Unload a garbage-collected model's replicas from the janitor thread (never re-entering a caller's
        socket from inside a finaliser, and never delaying the heartbeat)."""
        for core, model_id in replicas:
            self._unloads.put((core, model_id))
        with self._lock:
            if self._janitor is None and not self.closed:
                self._janitor = threading.Thread(target=self._janitor_loop, name="neuron-janitor", daemon=True)
                self._janitor.start()

    def _janitor_loop(self) -> None:
        while not self._stop.is_set():
            try:
                core, model_id = self._unloads.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.channel(core).request(messages.Unload(token=self.token, model_id=model_id),
                                           config.BROKER_REQUEST_TIMEOUT_S)
            except NeuronRuntimeError:
                pass

    # -- workers ---------------------------------------------------------------------------------------------
    def channel(self, core: int) -> WorkerChannel:
        """This thread's channel to global ``core``'s worker."""
        self.check_lease()
        chans = getattr(self._local, "channels", None)
        if chans is None:
            chans = self._local.channels = {}
        ch = chans.get(core)
        if ch is None:
            ch = chans[core] = WorkerChannel(self, core, self.workers[core].endpoint)
            with self._lock:
                self._channels.append(ch)
        return ch

    def close(self) -> None:
        """Release the lease and close every socket; idempotent."""
        if self.closed or self.pid != os.getpid():
            return
        self.closed = True
        self._stop.set()
        with self._lock:
            link = self._link
        if link is not None:
            link.shutdown()  # the broker sees the link end (the release) at once; the lease thread wakes
        for thread in (self._heartbeat, self._janitor):  # they own sockets: let them finish first
            if thread is not None and thread is not threading.current_thread():
                thread.join(config.BROKER_PING_TIMEOUT_S + 1.0)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for ch in self._channels:
                ch.close()
            self._channels.clear()
        if self._detached and not self.lost:  # the broker is away: a restarted one must not bring the lease back
            lease_link.write_tombstone(self.directory, self.lease_id)
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.close()

def _command_line() -> str:
    try:
        return command_line(psutil.Process()) or sys.argv[0]
    except psutil.Error:
        return " ".join(sys.argv)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process's runtime, acquiring its cores on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime.closed:
            _runtime = Runtime()
        rt = _runtime
    rt.check_lease()
    return rt


def shutdown() -> None:
    """Release this process's cores now (they are also released at exit)."""
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            _runtime.close()
            _runtime = None
