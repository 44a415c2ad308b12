"""``await model.acall(*inputs)``: the blocking call of any model, from asyncio, without blocking the event loop.

The call runs in a thread of one bounded pool (:func:`call_pool`, shared by every model of the process); the
coroutine awaits its future. The pool is its own, apart from the runtime's (whose threads run DataParallel's chunks
and tensor-parallel ranks, which a call waits for: sharing it could starve them). Each pool thread has its own
channels to the workers, as every calling thread does.

Cancelling the awaiting task drops the call: one still queued never starts; one already running finishes in its
thread and its reply is thrown away, so the core is not left busy. Errors are the blocking call's, of the same types.
"""
from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

MAX_THREADS = 64  # calls in flight from asyncio at once, over all models; more wait (in the pool, not the loop)

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def call_pool() -> ThreadPoolExecutor:
    """The process's pool for asyncio calls (a forked child makes its own)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="neuron-acall")
            _pool_pid = os.getpid()
        return _pool


async def run_blocking(fn, *args):
    """``await`` of ``fn(*args)`` run in :func:`call_pool`; cancelling the awaiting task drops the result."""
    return await asyncio.wrap_future(call_pool().submit(fn, *args))


async def await_future(fut: Future, timeout_s: float | None = None):
    """``await`` of a ``concurrent.futures.Future`` (cancelling the task cancels the future), with a timeout."""
    wrapped = asyncio.wrap_future(fut)
    if timeout_s is None:
        return await wrapped
    try:
        return await asyncio.wait_for(wrapped, timeout_s)
    except asyncio.TimeoutError:
        from neuron_client.wire.errors import RequestTimeoutError

        raise RequestTimeoutError(f"no result within {timeout_s:.0f}s") from None


class AsyncCalls:
    """Mixin: ``acall`` for a model whose ``__call__`` blocks (NeuronModel, DataParallel, TensorParallelModel)."""

    async def acall(self, *inputs):
        """``await model.acall(*inputs)``: the same as ``model(*inputs)``, without blocking the event loop."""
        return await run_blocking(self.__call__, *inputs)
