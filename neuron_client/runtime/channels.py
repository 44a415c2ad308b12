"""A thread's channel to one core's worker: requests and calls, their tensors through shared memory when large.

ZeroMQ sockets are single-threaded, so each thread of the process has its own channel to each core
(:meth:`neuron_client.runtime.lease.Runtime.channel`); a call then needs no hand-off between threads.
"""
from __future__ import annotations

import logging
import typing

from neuron_client.wire import comm as transport, config, messages, shm, tensors
from neuron_client.wire.errors import NotOwnerError, ProtocolError
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


class WorkerChannel:
    """One thread's connection to one core's worker, with its shared-memory arenas."""

    def __init__(self, runtime: "Runtime", core: int, endpoint: str):
        self.runtime = runtime
        self.core = core
        self.channel = transport.Channel(endpoint, max_bytes=runtime.max_message_bytes)
        self.request_arena = shm.Arena()
        self.reply_arena = shm.Arena()
        self._reply_segments = _ReplySegments(self.reply_arena)
        self._worker_pid = 0
        self.threshold = config.shm_threshold_bytes() if shm.available() else 1 << 62

    def _alive(self) -> None:
        """While waiting for a reply: the lease still held, the worker still there."""
        self.runtime.check_lease()
        if self._worker_pid and not pid_running(self._worker_pid):
            raise self.runtime.worker_died(self.core, self._worker_pid)

    def _source(self, frames) -> tensors.TensorSource:
        return tensors.TensorSource(frames, shm=self._reply_segments, copy_shm=True)

    def request(self, msg, timeout_s: float, carried=()):
        self._worker_pid = self.runtime.workers[self.core].pid
        if not self._worker_pid:  # being replaced: wait (bounded) for the fresh one rather than send into nothing
            self._worker_pid = self.runtime.await_worker(self.core, not_pid=0).pid
        need = shm.reserve_bytes(carried, self.threshold) if carried else 0
        sink = None
        if need:
            self.request_arena.reset(need)
            sink = tensors.TensorSink(shm=self.request_arena, shm_threshold=self.threshold)
        try:
            return self.channel.request(msg, timeout_s, sink=sink, alive=self._alive, source=self._source).msg
        except NotOwnerError:
            self.runtime.refresh_workers()  # raises LeaseLostError with the broker's reason if the lease ended
            # the lease lives: the request reached a fresh worker before the broker gave it its owner; once it has
            # one (or another), ask again, once
            w = self.runtime.await_worker(self.core, not_pid=0)
            if w.pid == self._worker_pid and self._worker_pid:
                raise
            self._worker_pid = w.pid
            return self.channel.request(msg, timeout_s, sink=sink, alive=self._alive, source=self._source).msg

    def call(self, model_id: int, args: tuple, timeout_s: float):
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
        self.channel.close()
        self.request_arena.release()
        self.reply_arena.release()
