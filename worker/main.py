"""A worker process: one per core, pinned to that core's compute, holding and running its owner's models.

Two threads, two sockets:

* the **data** thread (main) serves clients on the core's ROUTER socket: ``load``, ``unload``, ``call``; it owns the
  model store and the shared-memory mappings, so nothing else mutates them;
* the **control** thread talks to the broker: it announces the worker, receives ``assign`` (the core's owner changed)
  and ``shutdown``, sends stats, and exits the process if the broker is gone.

A worker serves one owner in its life: the broker assigns it (with a hash of the owner's token and the owner's kernel
pid and uid) before the owner hears of its grant, and stops it when the lease ends, so nothing of one owner (models,
memory, mappings, groups) is ever seen by the next. A request must carry the owner's token; any other is refused at
once. Shared-memory segments are mapped and written only if they belong to the owner (name and file owner).
"""
from __future__ import annotations

import bisect
import collections
import hashlib
import hmac
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from neuron_client.distributed import collectives  # registers neuron::all_reduce / all_gather for TP graphs
from neuron_client.wire import codec, comm as transport, config, mailbox as mb, messages, tensors
from neuron_client.wire.errors import ModelExecutionError, NeuronRuntimeError, NotOwnerError, ProtocolError
from neuron_client.wire.procs import pid_running
from neuron_client.wire.shm import SegmentCache, SegmentWriter

from . import devices
from .fastpath import FastPath, ServedMailbox
from .store import ModelStore, tune_allocator

log = logging.getLogger("neuron.worker")
DATA_POLL_MS = 200
SOCKET_LOOK_S = 0.0005  # while mailbox calls come back to back, the socket is looked at least this often
SPUN_TO_MAILBOX, SPUN_TO_SOCKET = "mailbox", "socket"  # what a spin found
LATENCY_WINDOW = 512  # p50/p99 in the stats are over at most this many recent calls ...
LATENCY_WINDOW_S = 60.0  # ... that ended within this many seconds
FINAL_STATS_LINGER_S = 1.0  # a retiring worker waits at most this long for its last stats to leave
DATA_STOP_WAIT_S = 0.5  # ... and this long for its data thread to finish the request in hand and close its socket
MAX_BACKLOG = 32  # requests taken off the socket ahead of the one running (the queue depth the stats report)


class CallTimes:
    """Cheap timing of calls for the stats: busy seconds, a latency histogram, and a ring of recent latencies.

    Written by the data thread only; the control thread reads totals and copies the ring (a list slice, atomic
    under the GIL) to compute percentiles when it sends stats.
    """

    def __init__(self):
        self.busy_s = 0.0
        self.sum_s = 0.0
        self.buckets = [0] * (len(messages.LATENCY_BUCKETS_S) + 1)
        self.ring: list = [None] * LATENCY_WINDOW  # (monotonic end time, seconds)
        self.n = 0

    def record(self, seconds: float, end: float) -> None:
        """A call of ``seconds`` that ended at ``end`` (``time.perf_counter()``, the clock the calls are timed by)."""
        self.sum_s += seconds
        self.buckets[bisect.bisect_left(messages.LATENCY_BUCKETS_S, seconds)] += 1
        self.ring[self.n % LATENCY_WINDOW] = (end, seconds)
        self.n += 1

    def percentiles(self, now: float) -> tuple[float, float, int]:
        """(p50, p99, calls) over the recent window; zeros when it holds no call."""
        cutoff = now - LATENCY_WINDOW_S
        recent = sorted(r[1] for r in self.ring[:] if r is not None and r[0] >= cutoff)
        if not recent:
            return 0.0, 0.0, 0
        n = len(recent)
        return recent[min(n - 1, int(0.5 * n))], recent[min(n - 1, int(0.99 * n))], n


class Flag:
    """A flag the data thread raises on every request and the control thread lowers when it sends stats: a plain
    attribute (the GIL orders it), no lock or wake-up per call as a ``threading.Event`` would cost."""

    __slots__ = ("up",)

    def __init__(self):
        self.up = False

    def set(self) -> None:
        self.up = True

    def clear(self) -> None:
        self.up = False

    def is_set(self) -> bool:
        return self.up


@dataclass
class WorkerConfig:
    core: int
    directory: str
    backend: str
    placement: dict
    broker_pid: int
    shm_threshold: int = config.SHM_THRESHOLD_BYTES
    max_message_bytes: int = config.MAX_MESSAGE_BYTES
    spin_us: int = 0  # the fast path's spin after a reply (0: block at once; cores share CPUs)


class Worker:
    """One core's worker process: runs its owner's models, and no one else's.

    Owns: its one owner (set once by the broker's ``Assign``: lease id, token hash, the owner's pid and uid; a worker
    never serves a second owner, the broker starts a fresh one), the :class:`~worker.store.ModelStore`, the owner's
    shared-memory segments it maps, and its counters (sent to the broker as ``WorkerStats``). The data thread serves
    requests; the control thread talks to the broker. Only the broker starts or stops it.
    """

    def __init__(self, cfg: WorkerConfig, device: str):
        self.cfg = cfg
        self.core = cfg.core
        self.store = ModelStore(cfg.core, device, rendezvous_dir=cfg.directory)
        self.device = None if device == "cpu" else device  # where inputs go before a call (None: they are there)
        self.segments = SegmentCache()
        self.lock = threading.Lock()
        self.owner_lease = ""  # set once, by the broker's assignment
        self.owner_hash = ""  # SHA-256 hex digest of the owner's token
        self.owner_pid = 0
        self.verified_token = None  # the token that matched the hash (so a call hashes nothing)
        self.requests = 0
        self.errors = 0
        self.busy = False
        self.times = CallTimes()
        self.queued = 0  # requests waiting in the backlog behind the one running
        self.loads = 0
        self.load_s = 0.0
        self.stats_dirty = Flag()
        self.stopping = threading.Event()
        self.data_closed = threading.Event()  # the data thread has closed its socket (set once, at its end)
        self.received = 0.0  # perf_counter when the request in hand came off its socket or mailbox
        self.lean = mb.SocketLean(cfg.shm_threshold)  # flat calls on the socket path
        self.spin_policy = mb.SpinPolicy(cfg.spin_us / 1e6)  # after a reply, watch the mailboxes a while?
        self.handlers = {"load": self.on_load, "unload": self.on_unload, "call": self.on_call}

    # -- ownership -------------------------------------------------------------------------------------------
    def assign(self, msg: messages.Assign) -> bool:
        """Take the one owner this worker serves in its life (the broker starts a fresh worker for the next)."""
        with self.lock:
            if self.owner_lease and self.owner_lease != msg.lease_id:
                log.error("core %d: asked to serve lease %s while serving %s; refused (a worker serves one owner)",
                          self.core, msg.lease_id, self.owner_lease)
                return False
            if not msg.lease_id or len(msg.token_hash) != 64:
                log.error("core %d: an assignment without a lease or token hash; refused", self.core)
                return False
            self.segments.set_owner(msg.owner_pid, msg.owner_uid if msg.owner_uid >= 0 else None)
            self.owner_lease, self.owner_hash, self.owner_pid = msg.lease_id, msg.token_hash, msg.owner_pid
        return True

    def authorize(self, token) -> None:
        """Return if ``token`` is the owner's; refuse at once otherwise (the owner is known before it is told)."""
        if token is not None and token == self.verified_token:
            return
        owner = self.owner_hash
        if (owner and isinstance(token, str) and token
                and hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), owner)):
            self.verified_token = token
            return
        raise NotOwnerError(
            f"core {self.core} is not held by this lease "
            f"({'it is free' if not owner else 'another lease owns it'}); acquire it through the broker "
            "(the lease may have ended)")

    # -- data plane ------------------------------------------------------------------------------------------
    def on_load(self, msg: messages.Load):
        data = msg.data
        if not hasattr(data, "dtype") or data.dim() != 1:
            raise ProtocolError("load: 'data' must be a 1-d uint8 tensor of the model file's bytes")
        blob = bytes(memoryview(tensors.tensor_buffer(data)))
        model_id, load_s = self.store.load(msg.name, blob, weights=msg.weights, group=msg.group)
        self.loads += 1
        self.load_s += load_s
        self.stats_dirty.set()
        return messages.Loaded(model_id=model_id, load_s=load_s), None

    def on_unload(self, msg: messages.Unload):
        self.store.unload(msg.model_id)
        self.stats_dirty.set()
        return messages.Ok(), None

    def run_model(self, model_id: int, args: tuple):
        """The outputs of model ``model_id`` on ``args`` (either path's call); a model's failure is a
        :class:`ModelExecutionError` naming it and the core. Counts the model's calls, failures, items, and its
        time waiting (since :attr:`received`) and running."""
        entry = self.store.get(model_id)
        if self.device is not None:  # inputs arrive on the host; the model lives on the core's device
            device = self.device
            args = tensors.map_tensors(args, lambda t: t.to(device, non_blocking=True))
        t0 = time.perf_counter()
        if self.received:
            entry.queue_s += t0 - self.received
        first = args[0] if args else None
        entry.inferences += len(first) if isinstance(first, torch.Tensor) and first.dim() else 1
        self.busy = True
        try:
            if entry.group is None:
                return entry.forward(*args)  # grad mode is off for this whole thread (see serve)
            with collectives.active(entry.group):
                return entry.forward(*args)
        except Exception as exc:
            entry.failures += 1
            first = str(exc).strip().splitlines()
            detail = first[-1] if first else ""
            raise ModelExecutionError(
                f"model {entry.name!r} raised on neuroncore {self.core}: {type(exc).__name__}: {detail}"
            ) from None
        finally:
            self.busy = False
            took = time.perf_counter() - t0
            self.times.busy_s += took
            entry.compute_s += took
            entry.requests += 1

    def on_call(self, msg: messages.Call):
        outputs = self.run_model(msg.model_id, msg.args if isinstance(msg.args, tuple) else (msg.args,))
        sink = None
        if msg.reply_shm:
            seg = self.segments.get(msg.reply_shm)
            sink = tensors.TensorSink(shm=SegmentWriter(seg), shm_threshold=self.cfg.shm_threshold)
        return messages.Result(outputs=outputs), sink

    def handle_box(self, box: ServedMailbox, kind: int, nbytes: int, received: float) -> bool:
        """Serve the request taken from mailbox ``box``; False if the mailbox broke (its client is gone)."""
        self.received = received
        try:
            if kind == mb.KIND_FRAMES:  # a structured call: the socket path's handling, over the mailbox
                box.reply(frames=self.handle(box.request_frames(nbytes), received))
                return True
            try:
                if kind != mb.KIND_LEAN:
                    raise ProtocolError(f"unknown mailbox request kind {kind}")
                model_id, container, args = box.reader.read(nbytes)
                if container != mb.CONTAINER_TUPLE:
                    raise ProtocolError("a mailbox call's arguments must be a tuple")
                outputs = self.run_model(model_id, args)
                self.requests += 1
                box.reply(outputs=outputs)
                self.times.record(box.replied_at - received, box.replied_at)
            except (ProtocolError, NeuronRuntimeError) as exc:
                self.errors += 1
                box.reply(frames=codec.encode_reply(exc))
            return True
        except OSError as exc:  # its connection broke (a streamed reply the client did not take)
            log.info("core %d: a fast-path client went away: %s", self.core, exc)
            return False
        except Exception as exc:  # a reply that cannot travel, or a bug: this call's error, as on the socket
            self.errors += 1
            log.exception("core %d: unexpected error", self.core)
            try:
                box.reply(frames=codec.encode_reply(NeuronRuntimeError(f"core {self.core}: "
                                                                       f"{type(exc).__name__}: {exc}")))
                return True
            except OSError:
                return False
        finally:
            self.stats_dirty.set()

    def handle_lean(self, frames, received: float) -> list:
        """The reply to a flat call in the lean format (the socket path's): a lean result where it is flat and
        small, else the codec's."""
        rid = mb.lean_req_id(frames)
        self.received = received
        try:
            kind, rid, token, model_id, container, args = self.lean.read(frames)
            if kind != mb.LEAN_CALL or container != mb.CONTAINER_TUPLE:
                raise ProtocolError(f"a worker serves lean calls of a tuple, not kind {kind} of container {container}")
            self.authorize(token)
            outputs = self.run_model(model_id, args)
            self.requests += 1
            out = self.lean.result(rid, outputs)  # None past its buffer, sized by the shm threshold
            return self.answered(out or codec.encode_reply(messages.Result(outputs=outputs), rid), received)
        except Exception as exc:
            return self.error_reply(exc, rid, frames)
        finally:
            self.stats_dirty.set()

    def answered(self, reply: list, received: float) -> list:
        """``reply``, its call's latency recorded (``received``: when it came off the socket; 0: not a call)."""
        if received:
            end = time.perf_counter()
            self.times.record(end - received, end)
        return reply

    def error_reply(self, exc: BaseException, rid: int, frames) -> list:
        """An exception as the request's error reply (counted; anything not ours logged and named)."""
        self.errors += 1
        if rid == 0:
            rid = codec.peek_req_id(frames)
        if not isinstance(exc, NeuronRuntimeError):
            log.exception("core %d: unexpected error", self.core)
            exc = NeuronRuntimeError(f"core {self.core}: {type(exc).__name__}: {exc}")
        return codec.encode_reply(exc, rid)

    def handle(self, frames, received: float = 0.0) -> list:
        """The reply to one request; ``received`` (perf_counter) is when it came off the socket."""
        if mb.is_lean(frames):
            return self.handle_lean(frames, received)
        self.received = received
        rid = 0
        try:
            size = sum(len(f) for f in frames)
            if self.cfg.max_message_bytes and size > self.cfg.max_message_bytes:
                raise ProtocolError(f"a message of {size} bytes exceeds core {self.core}'s limit of "
                                    f"{self.cfg.max_message_bytes} bytes; send large tensors through shared memory")
            env = codec.decode(frames, tensors.TensorSource(frames, shm=self.segments, copy_shm=False))
            rid = env.req_id
            handler = self.handlers.get(env.op)
            if handler is None:
                raise ProtocolError(f"a worker does not serve {env.op!r}; it serves {', '.join(self.handlers)}")
            self.authorize(env.msg.token)
            reply, sink = handler(env.msg)
            if env.op == "call":
                self.requests += 1
            # encoded here, not by Comm.send: a reply that cannot travel (an output dtype the wire does not carry)
            # must become this request's error, counted as one
            return self.answered(codec.encode_reply(reply, rid, sink), received if env.op == "call" else 0.0)
        except Exception as exc:
            return self.error_reply(exc, rid, frames)
        finally:
            self.stats_dirty.set()

    def serve(self) -> None:
        import torch

        torch.set_grad_enabled(False)  # inference only; cheaper than entering inference_mode on every call
        hard = 2 * self.cfg.max_message_bytes if self.cfg.max_message_bytes else 0
        comm = transport.Comm(transport.router(config.worker_address(self.cfg.directory, self.core), hard))
        fast = self.open_fast_path()
        poller = transport.poller(comm.sock)
        if fast is not None:
            poller.register(fast.listener.fileno(), transport.POLLIN)
        control = threading.Thread(target=self.control_loop, name=f"core{self.core}-control", daemon=True)
        control.start()
        # FIFO, like the socket: (mailbox, kind, bytes, received) or (None, identity, frames, received)
        backlog: collections.deque = collections.deque()
        socket_due = 0.0  # while the mailboxes keep this loop busy, the socket is looked at again from then on
        try:
            while not self.stopping.is_set():
                look = True
                if not backlog:
                    found = self.spin(fast, comm) if fast is not None else None
                    if found is None:
                        self.block(fast, poller)  # then look: the socket may be what woke it
                    elif found is SPUN_TO_MAILBOX and time.perf_counter() < socket_due:
                        look = False  # a look costs ZeroMQ's bookkeeping (~3 us); the spin looks every 32 turns
                # take what has arrived, so that the queue depth is known (no exception-driven draining: cheap)
                if look:
                    while len(backlog) < MAX_BACKLOG and comm.readable():
                        msg = comm.recv()
                        if len(msg) >= 2:
                            backlog.append((None, msg[0], msg[1:], time.perf_counter()))
                    socket_due = time.perf_counter() + SOCKET_LOOK_S
                if fast is not None:
                    for box in fast.boxes.values():
                        if box.pending():
                            now = time.perf_counter()
                            backlog.append((box, *box.take(now), now))
                if not backlog:
                    continue
                box, a, b, received = backlog.popleft()
                self.queued = len(backlog)
                if box is None:
                    comm.send_frames(self.handle(b, received), to=a)
                elif not box.closed and not self.handle_box(box, a, b, received):
                    self.drop_box(fast, poller, box)
        finally:
            self.store.clear()
            self.segments.clear()
            if fast is not None:
                fast.close()
            comm.close()
            self.data_closed.set()
        control.join(DATA_STOP_WAIT_S + FINAL_STATS_LINGER_S + 1.0)  # its exit_after_flush ends the process

    # -- the fast path ---------------------------------------------------------------------------------------
    def open_fast_path(self) -> FastPath | None:
        try:
            return FastPath(self.cfg.directory, self.core, self.cfg.spin_us, self.cfg.placement.get("cpus", []),
                            self.cfg.max_message_bytes)
        except OSError as exc:  # the socket path serves every call
            log.warning("core %d: no fast path (%s); calls take the socket", self.core, exc)
            return None

    def block(self, fast: FastPath | None, poller) -> None:
        """Wait (bounded) for a request, a connection or a doorbell. The mailboxes say first that this worker blocks,
        so that their next request rings (:func:`~neuron_client.wire.mailbox.ring_if_waiting`); a request stored
        before a client saw that is found by the look after the fence."""
        boxes = list(fast.boxes.values()) if fast is not None else []
        for box in boxes:
            box.waiting(True)
        try:
            if boxes:
                mb.fence()
                for box in boxes:
                    if box.pending():
                        return
            events = poller.poll(DATA_POLL_MS)
            if fast is not None and events:
                self.fast_events(fast, poller, events)
        finally:
            for box in boxes:
                box.waiting(False)

    def fast_events(self, fast: FastPath, poller, events) -> None:
        """Act on the fast path's part of a poll: a connecting client, a doorbell (drained: the sequence numbers
        say what waits), a closed connection."""
        for item, _ev in events:
            if not isinstance(item, int):
                continue  # the ZeroMQ socket
            if item == fast.listener.fileno():
                box = fast.accept(self.owner_pid, self.segments.owner_uid if self.segments.owner_uid is not None
                                  else os.getuid(), self.authorize)
                if box is not None:
                    poller.register(box.req_bell, transport.POLLIN)
                    poller.register(box.conn.fileno(), transport.POLLIN)
            elif item in fast.by_bell:
                try:
                    os.read(item, 8)
                except OSError:
                    pass
            elif item in fast.boxes:  # a client never writes after its hello: this is its end
                self.drop_box(fast, poller, fast.boxes[item])

    def drop_box(self, fast: FastPath, poller, box: ServedMailbox) -> None:
        for fd in (box.req_bell, box.conn.fileno()):
            try:
                poller.unregister(fd)
            except KeyError:
                pass
        fast.drop(box)

    def spin(self, fast: FastPath, comm):
        """After a reply, watch the mailboxes (and the socket) for a bounded time before blocking: what came
        (:data:`SPUN_TO_MAILBOX` or :data:`SPUN_TO_SOCKET`), or None. Only where this worker has its CPUs to itself,
        while a CPU of the host is free, and while such watches find the next request
        (:class:`~neuron_client.wire.mailbox.SpinPolicy`)."""
        window = self.cfg.spin_us / 1e6
        if not window or not fast.boxes:
            return None
        boxes = list(fast.boxes.values())
        stop = max(box.spin_until(window) for box in boxes)
        now = time.perf_counter()
        if now >= stop or not self.spin_policy.should(now):
            return None
        i = 0
        while time.perf_counter() < stop:
            for box in boxes:
                if box.pending():
                    self.spin_policy.record(True)
                    return SPUN_TO_MAILBOX
            i += 1
            if not i & 31 and comm.readable():
                return SPUN_TO_SOCKET
        self.spin_policy.record(False)
        return None

    # -- control plane ---------------------------------------------------------------------------------------
    def stats(self) -> messages.WorkerStats:
        try:
            rss = psutil.Process().memory_info().rss
        except psutil.Error:
            rss = 0
        times = self.times
        p50, p99, window = times.percentiles(time.perf_counter())
        return messages.WorkerStats(core=self.core, models=self.store.info(), requests=self.requests,
                                    errors=self.errors, rss=rss, busy=self.busy, busy_s=times.busy_s,
                                    latency_p50_s=p50, latency_p99_s=p99, latency_window=window,
                                    latency_sum_s=times.sum_s, latency_buckets=list(times.buckets),
                                    queue=self.queued, loads=self.loads, load_s=self.load_s, pid=os.getpid(),
                                    **devices.device_stats(self.store.device))

    def exit_after_flush(self, ctl) -> None:
        """Exit once the last stats have left: ``os._exit`` would drop what ZeroMQ's I/O thread still holds, so the
        context is terminated first (it returns when every queued message is sent or the linger runs out), which
        needs the data thread's socket closed too. A data thread busy past its wait (a long call) is not waited for:
        the stats then get the linger as a plain sleep, and the broker's SIGKILL ends whatever remains."""
        closed = self.data_closed.wait(DATA_STOP_WAIT_S)
        ctl.close(linger=int(FINAL_STATS_LINGER_S * 1000))
        if closed:
            transport.context().term()
        else:
            time.sleep(FINAL_STATS_LINGER_S)
        os._exit(0)  # whatever of the owner still runs, ends here

    def control_loop(self) -> None:
        ctl = transport.Comm(transport.dealer(config.workers_address(self.cfg.directory),
                                              identity=b"core-%d" % self.core))
        endpoint = config.worker_address(self.cfg.directory, self.core)
        ctl.send(messages.WorkerReady(core=self.core, pid=os.getpid(), endpoint=endpoint))
        last_stats = 0.0
        try:
            while not self.stopping.is_set():
                if ctl.poll(100):
                    frames = ctl.recv()
                    try:
                        env = codec.decode(frames)
                    except ProtocolError as exc:
                        log.warning("core %d: bad message from broker: %s", self.core, exc)
                        continue
                    if isinstance(env.msg, messages.Assign):
                        if self.assign(env.msg):
                            ctl.send(messages.Assigned(core=self.core, lease_id=env.msg.lease_id))
                    elif isinstance(env.msg, messages.Shutdown):  # its owner left (or the broker stops)
                        self.stopping.set()  # the data thread takes no further request
                        ctl.send(self.stats())  # the last word on its counters
                        self.exit_after_flush(ctl)
                now = time.monotonic()
                if self.stats_dirty.is_set() or now - last_stats > config.WORKER_STATS_INTERVAL_S:
                    if now - last_stats > 0.05:
                        self.stats_dirty.clear()
                        last_stats = now
                        ctl.send(self.stats())
                if not pid_running(self.cfg.broker_pid):
                    log.warning("core %d: broker (pid %d) is gone; exiting", self.core, self.cfg.broker_pid)
                    os._exit(0)
        finally:
            ctl.close()


def run(**settings) -> None:
    """Entry point of a worker process (:data:`broker.supervisor.WORKER_ENTRY`): ``settings`` are
    :class:`WorkerConfig`'s fields."""
    cfg = WorkerConfig(**settings)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s worker nc{cfg.core} %(levelname)s %(message)s")
    tune_allocator()
    device = devices.setup_worker(cfg.backend, cfg.placement)
    collectives.require_groups()  # a TP graph loaded without its group fails instead of computing a stand-in
    Worker(cfg, device).serve()
