"""A thread's channel to one core's worker: requests and calls, their tensors through shared memory when large.

ZeroMQ sockets are single-threaded, so each thread of the process has its own channel to each core
(:meth:`neuron_client.runtime.lease.Runtime.channel`); a call then needs no hand-off between threads.
"""
from __future__ import annotations

import logging
import os
import time
import typing
import warnings

from neuron_client.wire import codec, comm as transport, config, messages, shm, tensors
from neuron_client.wire.errors import NeuronRuntimeError, NotOwnerError, ProtocolError, WorkerUnavailableError
from neuron_client.wire.procs import pid_running

if typing.TYPE_CHECKING:
    from neuron_client.runtime.lease import Runtime

log = logging.getLogger("neuron_client")


class _ReplySegments:
    """The tensor source's view of shared memory on the client: only its own reply arena."""

    def __init__(self, arena: shm.Arena):
        self.arena = arena

    def view(self, name, offset, nbytes):
        if self.arena.segment is None or name != self.arena.name:
            raise ProtocolError(f"the worker answered in segment {name!r}, which this client did not offer")
        return self.arena.segment.view(offset, nbytes)


NOT_SENT = object()  # a call the lean format does not carry: it goes as the codec's frames
FAST_PATH_RETRY_S = 1.0  # after a fast path could not be set up, calls take the socket this long before a retry


class WorkerChannel:
    """One thread's connection to one core's worker: its ZeroMQ channel with shared-memory arenas, and its
    mailbox (the fast path, :mod:`neuron_client.wire.mailbox`) where the worker is on this host.

    Calls go through the mailbox when there is one and the call fits it; everything else (loads, unloads, calls too
    large for it, or every call with ``NEURON_FAST_PATH=0``) through the socket. Both give the same results and errors.
    """

    def __init__(self, runtime: "Runtime", core: int, endpoint: str):
        self.runtime = runtime
        self.core = core
        self.channel = transport.Channel(endpoint, max_bytes=runtime.max_message_bytes)
        self.request_arena = shm.Arena()
        self.reply_arena = shm.Arena()
        self._reply_segments = _ReplySegments(self.reply_arena)
        self._worker_pid = 0
        self.threshold = config.shm_threshold_bytes() if shm.available() else 1 << 62
        self.timeout_s = config.call_timeout_s()  # read once, as the threshold: a call parses nothing
        self.fast = config.fast_path_enabled() and self._fast_path_supported()
        self.spin_us = config.fast_path_spin_us()
        self.mailbox = None  # neuron_client.wire.mailbox.ClientMailbox, made at the first call
        from neuron_client.wire import mailbox  # torch: a channel carries tensors

        self._mb = mailbox
        self._lean = mailbox.SocketLean(self.threshold)  # flat calls on the socket path, below the shm threshold
        self._fast_retry_at = 0.0
        self._fast_warned = False
        self._fast_capacity = 0
        self._socket_models: set[int] = set()  # models whose replies are too large for a mailbox

    @staticmethod
    def _fast_path_supported() -> bool:
        return hasattr(os, "memfd_create") and hasattr(os, "eventfd")

    def _mailbox(self, capacity: int = 0):
        """This thread's mailbox to the core's current worker, set up at need; None where the fast path cannot
        serve (then calls take the socket, and a new try is made after FAST_PATH_RETRY_S)."""
        mailbox = self._mb
        box = self.mailbox
        pid = self.runtime.workers[self.core].pid
        if box is not None:
            if not box.closed and box.worker_pid == pid and capacity <= box.capacity and not box.grow_to:
                return box
            if box.grow_to:  # its last reply streamed: the next mailbox holds such a reply
                capacity = max(capacity, mailbox.capacity_for(box.grow_to, self.runtime.max_message_bytes) or 0)
            box.close()
            self.mailbox = None
        if not pid or (time.monotonic() < self._fast_retry_at and not capacity):
            return None
        self.channel.check_process()
        try:
            self.mailbox = mailbox.ClientMailbox(
                mailbox.fast_path_address(self.runtime.directory, self.core), pid, self.runtime.token,
                capacity=min(max(capacity, self._fast_capacity, mailbox.CAPACITY_BYTES),
                             mailbox.max_capacity(self.runtime.max_message_bytes)), spin_us=self.spin_us,
                core=self.core)
        except (OSError, NeuronRuntimeError) as exc:
            if isinstance(exc, shm.SharedMemoryError) and not self._fast_warned:  # the operator can act on this one
                self._fast_warned = True
                warnings.warn(f"neuroncore {self.core}: no fast path ({exc}); calls take the socket path until "
                              "memory is free", RuntimeWarning, stacklevel=6)
            log.debug("core %d: no fast path now (%s); calls take the socket", self.core, exc)
            self._fast_retry_at = time.monotonic() + FAST_PATH_RETRY_S
            return None
        self._fast_capacity = self.mailbox.capacity
        self._worker_pid = pid  # the worker this channel's calls now go to: the one _alive watches
        return self.mailbox

    def _fast_call(self, model_id: int, args: tuple, timeout_s: float):
        """The call through the mailbox; ``NotCarried`` (nothing sent) when it cannot take it."""
        mailbox = self._mb
        box = self._mailbox()
        if box is None:
            raise mailbox.NotCarried(0)
        for _ in range(2):
            try:
                return self._after_stream(box, model_id, box.call(model_id, args, self.runtime.token, timeout_s,
                                                                  self._alive))
            except mailbox.NotCarried as too_big:  # grow the mailbox to fit, within its limit
                capacity = mailbox.capacity_for(too_big.args[0], self.runtime.max_message_bytes)
                if capacity is None:
                    raise
                box = self._mailbox(capacity)
                if box is None:
                    raise
            except WorkerUnavailableError:
                raise self.runtime.worker_died(self.core, box.worker_pid) from None
        raise mailbox.NotCarried(0)

    def _after_stream(self, box, model_id: int, out):
        """``out``, a call's outputs; a model whose replies outgrow any mailbox takes the socket's arenas from now."""
        if box.grow_to and self._mb.capacity_for(box.grow_to, self.runtime.max_message_bytes) is None:
            self._socket_models.add(model_id)
            box.grow_to = 0
        return out

    def _alive(self) -> None:
        """While waiting for a reply: the lease still held, the worker still there."""
        self.runtime.check_lease()
        if self._worker_pid and not pid_running(self._worker_pid):
            raise self.runtime.worker_died(self.core, self._worker_pid)

    def _source(self, frames) -> tensors.TensorSource:
        return tensors.TensorSource(frames, shm=self._reply_segments, copy_shm=True)

    def _with_worker(self, send):
        """``send()`` to the core's current worker: a fresh one being started is waited for (bounded), and a request
        that reached a fresh worker before the broker gave it its owner is sent again, once."""
        self._worker_pid = self.runtime.workers[self.core].pid
        if not self._worker_pid:  # being replaced: wait (bounded) for the fresh one rather than send into nothing
            self._worker_pid = self.runtime.await_worker(self.core, not_pid=0).pid
        try:
            return send()
        except NotOwnerError:
            self.runtime.refresh_workers()  # raises LeaseLostError with the broker's reason if the lease ended
            # the lease lives: the request reached a fresh worker before the broker gave it its owner; once it has
            # one (or another), ask again, once
            w = self.runtime.await_worker(self.core, not_pid=0)
            if w.pid == self._worker_pid and self._worker_pid:
                raise
            self._worker_pid = w.pid
            return send()

    def request(self, msg, timeout_s: float, carried=()):
        need = shm.reserve_bytes(carried, self.threshold) if carried else 0
        sink = None
        if need:
            self.request_arena.reset(need)
            sink = tensors.TensorSink(shm=self.request_arena, shm_threshold=self.threshold)
        return self._with_worker(lambda: self.channel.request(msg, timeout_s, sink=sink, alive=self._alive,
                                                              source=self._source)).msg

    def _decode_lean(self, reply):
        """A reply to a lean call: the lean result, or the codec's message (a structured or large result, an
        error)."""
        mb = self._mb
        if not mb.is_lean(reply):
            return codec.decode(reply, self._source(reply))
        kind, rid, _, _, container, ts = self._lean.read(reply)
        if kind != mb.LEAN_RESULT:
            raise ProtocolError(f"a lean reply of kind {kind}")
        return codec.Envelope(req_id=rid, msg=messages.Result(outputs=mb.rebuild(container, ts)), op="result")

    def _lean_call(self, model_id: int, args: tuple, timeout_s: float):
        """A flat call on the socket in the lean format: its outputs, or :data:`NOT_SENT` where it is not one."""
        def send():
            rid = self.channel.next_id()
            frames = self._lean.call(rid, model_id, self.runtime.token, args)
            if frames is None:
                return None
            return self.channel.exchange(frames, rid, "call", timeout_s, self._decode_lean, self._alive,
                                         peek=self._mb.lean_req_id)

        env = self._with_worker(send)
        return NOT_SENT if env is None else env.msg.outputs

    def call(self, model_id: int, args: tuple, timeout_s: float):
        box = self.mailbox
        if (box is not None and not box.closed and not box.grow_to and model_id not in self._socket_models
                and box.worker_pid == self.runtime.workers[self.core].pid):  # the common case, in one test
            try:
                return self._after_stream(box, model_id, box.call(model_id, args, self.runtime.token, timeout_s,
                                                                  self._alive))
            except self._mb.NotCarried:
                pass  # too large for this mailbox: the general path grows it, or takes the socket
            except WorkerUnavailableError:
                raise self.runtime.worker_died(self.core, box.worker_pid) from None
        if self.fast and model_id not in self._socket_models:
            try:
                return self._fast_call(model_id, args, timeout_s)
            except self._mb.NotCarried:
                pass
        outputs = self._lean_call(model_id, args, timeout_s) if not self.reply_arena.size else NOT_SENT
        if outputs is NOT_SENT:  # structured, large, or answered large before: the codec's frames and shm arenas
            carried = list(tensors.walk_tensors(args))
            msg = messages.Call(token=self.runtime.token, model_id=model_id, args=args,
                                reply_shm=self.reply_arena.name, reply_shm_size=self.reply_arena.size)
            outputs = self.request(msg, timeout_s, carried).outputs
        big = shm.reserve_bytes(tensors.walk_tensors(outputs), self.threshold)
        if big > self.reply_arena.size:  # next time, large outputs come back through shared memory
            try:
                self.reply_arena.reset(big)
            except shm.SharedMemoryFullError as exc:  # they keep coming over the socket
                log.warning("%s", exc)
        return outputs

    def close(self) -> None:
        if self.mailbox is not None:
            self.mailbox.close()
        self.channel.close()
        self.request_arena.release()
        self.reply_arena.release()
