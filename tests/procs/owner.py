"""The commands of every test process that owns cores (``python -m tests.procs.owner``; the other command sets of
this package import them): a lease, models loaded on it, calls.

* ``acquire`` (``env``: NEURON_RT_* and the like, over the environment the process started with): releases what the
  process held, then takes cores as a fresh process would (``neuron_client.get_runtime()``) -> ``cores``;
* ``release``; ``secrets`` (lease id, token, cores, workers); ``lost`` (``wait_s``: how long to wait for the lease
  thread to hear of the loss) -> ``lost``; ``worker`` (``core``) -> the broker's view of that core's worker;
* ``load`` (``path``; ``context``: arguments of ``neuron_cores_context``, or ``multicore``) -> ``model`` (a handle),
  ``cores``, ``replicas`` (process-relative), ``model_ids`` (the workers' ids of its replicas), ``state``;
  ``describe`` (``model``) -> the same, now; ``unload`` (``model``);
* ``call`` (``model``; ``args`` as :func:`tests.procs.harness.value` reads them, or ``shape`` and ``fill``; ``times``)
  -> ``sum`` (of a tensor output), ``shape``, ``dtype``, ``device``, ``last_core``, ``runs`` (the core of each
  call), ``kinds`` (the output's structure); with ``ref`` (a reference registered with :func:`reference`) or
  ``same_as`` (the handle of an earlier output, kept by ``keep``), ``same``: every output equals the reference's on
  the same inputs, or that earlier output (within ``atol``);
* ``stream`` (``model``, ``args``, ``times``): calls until one fails -> ``calls`` made, ``error`` (None or the
  failure as an error reply), ``seconds`` until then, ``failed_call_s`` (how long the failing call took).

``reset`` drops the models and releases the cores, and restores the environment.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import unittest.mock

import torch  # noqa: F401 - imported before the first command, as a real client would have it

import neuron_client
from neuron_client.experimental import multicore_context, neuron_cores_context
from tests.procs import harness

_BASE_ENV = dict(os.environ)
REFERENCES: dict = {}


def reference(name: str, fn) -> None:
    """Register ``fn(*args)``, the output a model named ``name`` must give, for ``call(ref=name)``."""
    REFERENCES[name] = fn


def runtime():
    return neuron_client.get_runtime()


@harness.command
def acquire(env: dict | None = None) -> dict:
    neuron_client.shutdown()
    os.environ.clear()
    os.environ.update(_BASE_ENV)
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    return {"cores": runtime().cores}


@harness.command
def release() -> dict:
    neuron_client.shutdown()
    return {"released": True}


@harness.on_reset
def _release_and_restore() -> None:
    neuron_client.shutdown()
    os.environ.clear()
    os.environ.update(_BASE_ENV)


@harness.command
def secrets() -> dict:
    rt = runtime()
    return {"lease_id": rt.lease_id, "token": rt.token, "cores": rt.cores,
            "workers": {str(k): dataclasses.asdict(v) for k, v in rt.workers.items()}}


@harness.command
def lost(wait_s: float = 0.0) -> dict:
    from neuron_client.runtime import lease

    rt = lease._runtime  # get_runtime() would raise once the lease is lost
    deadline = time.monotonic() + wait_s
    while rt is not None and rt.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"lost": rt.lost if rt is not None else None}


@harness.command
def limit_file_size(nbytes: int) -> dict:
    """No file (a memfd, a /dev/shm segment) of this process may grow past ``nbytes``: creating one larger fails
    with EFBIG, as on a full /dev/shm (SIGXFSZ ignored, so the process is told, not killed)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return {}


@harness.command
def fast_hello(core: int, token: str = "", version: int | None = None) -> dict:
    """Ask ``core``'s worker for a mailbox with ``token`` (default: this lease's; not it, say), speaking mailbox
    protocol ``version`` (default: this library's): its refusal, or ok."""
    from neuron_client.wire import mailbox

    rt = runtime()
    saved = mailbox.VERSION
    try:
        if version is not None:
            mailbox.VERSION = version
        box = mailbox.ClientMailbox(mailbox.fast_path_address(rt.directory, core), rt.worker(core).pid,
                                    token or rt.token, core=core)
    except Exception as exc:  # noqa: BLE001 - the test asserts on it
        return harness.error_doc(exc)
    finally:
        mailbox.VERSION = saved
    box.close()
    return {"ok": True}


@harness.command
def worker(core: int) -> dict:
    return dataclasses.asdict(runtime().worker(core))


def context_of(context):
    if context == "multicore":
        return multicore_context()
    if context:
        return neuron_cores_context(**context)
    import contextlib

    return contextlib.nullcontext()


def describe_model(m) -> dict:
    return {"cores": m.cores, "replicas": [r.nc for r in m.replicas], "model_ids": [r.model_id for r in m.replicas],
            "state": m.state}


@harness.command
def load(path: str, context=None) -> dict:
    with context_of(context):
        m = neuron_client.jit.load(path)
    return {"model": harness.keep(m), **describe_model(m)}


@harness.command
def describe(model: int) -> dict:
    return describe_model(harness.get(model))


@harness.command
def unload(model: int) -> dict:
    harness.get(model).unload()
    harness.drop(model)
    return {}


def arguments(args=None, shape=None, fill=1.0) -> tuple:
    if args is not None:
        return tuple(harness.value(args))
    return (torch.full(shape, float(fill)),)


def describe_output(y) -> dict:
    doc = {"kinds": harness.kinds(y)}
    if isinstance(y, torch.Tensor):
        doc.update(sum=float(y.sum()), shape=list(y.shape), dtype=str(y.dtype).replace("torch.", ""),
                   device=str(y.device))
    return doc


def paths() -> dict:
    """This thread's path to each core it has called: the mailbox's calls and capacity (0: none, the socket)."""
    from neuron_client.runtime.lease import get_runtime

    chans = getattr(get_runtime()._local, "channels", {})
    return {str(core): {"mailbox_calls": ch.mailbox.calls if ch.mailbox else 0,
                        "mailbox_capacity": ch.mailbox.capacity if ch.mailbox else 0} for core, ch in chans.items()}


@harness.command
def call(model: int, args=None, shape=None, fill=1.0, times: int = 1, ref: str | None = None, same_as=None,
         keep: bool = False, atol: float = 1e-6) -> dict:
    m = harness.get(model)
    x = arguments(args, shape, fill)
    runs, outs = [], []
    for _ in range(times):
        outs.append(m(*x))
        runs.append(getattr(m, "last_core", None))
    doc = dict(describe_output(outs[-1]), runs=runs, last_core=runs[-1], paths=paths())
    if ref is not None or same_as is not None:
        want = REFERENCES[ref](*x) if ref is not None else harness.get(same_as)
        doc["same"] = all(harness.close(y, want, atol) for y in outs)
    if keep:
        doc["output"] = harness.keep(outs[-1])
    return doc


@harness.command
def call_in_thread(model: int, env: dict, args=None, shape=None, fill=1.0, times: int = 1, ref: str | None = None,
                   atol: float = 1e-6) -> dict:
    """``call`` from a fresh thread whose channels are made under ``env`` (e.g. ``NEURON_FAST_PATH=0``: the socket
    path); its error, if it raised, as the doc."""
    box: dict = {}

    def run():
        with unittest.mock.patch.dict(os.environ, {k: str(v) for k, v in env.items()}):
            try:
                box["doc"] = call(model, args, shape, fill, times, ref, atol=atol)
            except Exception as exc:  # noqa: BLE001 - the test asserts on it
                box["doc"] = harness.error_doc(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    return box["doc"]


@harness.command
def stream(model: int, args=None, shape=None, fill=1.0, times: int = 50) -> dict:
    m = harness.get(model)
    x = arguments(args, shape, fill)
    t0 = time.monotonic()
    calls, error, failed_call_s = 0, None, None
    while calls < times:
        t_call = time.monotonic()
        try:
            m(*x)
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            error, failed_call_s = harness.error_doc(exc), time.monotonic() - t_call
            break
        calls += 1
    return {"calls": calls, "error": error, "seconds": time.monotonic() - t0, "failed_call_s": failed_call_s}


if __name__ == "__main__":
    harness.serve()
