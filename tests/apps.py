"""Client programs that tests run as real processes: ``python tests/apps.py SCENARIO ARGS...``.

Each prints JSON lines that the test reads; a scenario that holds cores prints ``{"ready": ...}`` and then waits to
be killed (at most HOLD_S seconds).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List

import torch

from neuron_client.examples.lstm_ensemble import LSTMEnsemble
from neuron_client.examples.matmul_chain import MatmulChain

HOLD_S = 120


class Affine(torch.nn.Module):
    def forward(self, x):
        return x * 2 + 1


class Nested(torch.nn.Module):
    def forward(self, x: torch.Tensor, d: Dict[str, torch.Tensor], items: List[torch.Tensor]):
        return x + d["a"], {"double": d["a"] * 2}, [items[0] * 3, items[1].to(torch.int64) - 1], x > 0


class Gather(torch.nn.Module):
    """Raises inside the worker for an out-of-range index: a model error that depends on the input."""

    def forward(self, x, idx):
        return x.index_select(0, idx)


def model_zoo():
    return {
        "affine": (Affine(), torch.rand(2, 4)),
        "nested": (Nested(), (torch.rand(3), {"a": torch.rand(3)}, [torch.rand(2, 2), torch.ones(5, dtype=torch.int32)])),
        "gather": (Gather(), (torch.rand(4, 3), torch.tensor([0, 1]))),
        "big": (Affine(), torch.rand(1024, 1024)),
    }


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def hold() -> None:
    time.sleep(HOLD_S)


def scenario_load2(models: str) -> None:
    """Seed 001: two plain loads land on nc0 and nc1 of the process."""
    import neuron_client

    rt = neuron_client.get_runtime()
    m0 = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    m1 = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    x = torch.rand(2, 4)
    y = m0(x)
    emit(pid=os.getpid(), owned=rt.cores, m0=m0.cores, m1=m1.cores, ok=bool(torch.allclose(y, x * 2 + 1)),
         last_core=m0.last_core)


def scenario_hold(models: str = "", load: str = "0") -> None:
    """Own cores (and optionally load a model on them), say so, and wait to be killed."""
    import neuron_client

    rt = neuron_client.get_runtime()
    m = neuron_client.jit.load(os.path.join(models, "affine.pt")) if load == "1" else None
    emit(ready=True, pid=os.getpid(), owned=rt.cores, model_cores=m.cores if m else [])
    hold()


def scenario_acquire_error() -> None:
    """Try to own cores; report the error class and message instead of a traceback."""
    import neuron_client

    try:
        rt = neuron_client.get_runtime()
        emit(ok=True, owned=rt.cores)
    except Exception as exc:
        emit(ok=False, error=type(exc).__name__, message=str(exc),
             is_value_error=isinstance(exc, ValueError),
             is_unavailable=isinstance(exc, neuron_client.NeuronCoreUnavailableError))


def scenario_roundtrip(models: str) -> None:
    """Nested inputs and outputs, a large tensor through shared memory, and a model raising inside the worker."""
    import neuron_client
    from neuron_client.wire import shm

    nested = neuron_client.jit.load(os.path.join(models, "nested.pt"))
    x, a = torch.rand(3), torch.rand(3)
    items = [torch.rand(2, 2), torch.arange(5, dtype=torch.int32)]
    out = nested(x, {"a": a}, items)
    total, doubled, pair, flag = out
    ok_nested = (isinstance(out, tuple) and torch.allclose(total, x + a)
                 and isinstance(doubled, dict) and torch.allclose(doubled["double"], a * 2)
                 and isinstance(pair, list) and torch.allclose(pair[0], items[0] * 3)
                 and pair[1].dtype == torch.int64 and torch.equal(pair[1], items[1].long() - 1)
                 and flag.dtype == torch.bool)

    big = neuron_client.jit.load(os.path.join(models, "big.pt"))
    xb = torch.rand(1024, 1024)
    first = big(xb)
    second = big(xb)  # the reply arena exists now: the output comes back through shared memory too
    segments = shm.segments_of(os.getpid())
    ok_big = bool(torch.allclose(first, xb * 2 + 1) and torch.allclose(second, xb * 2 + 1))

    gather = neuron_client.jit.load(os.path.join(models, "gather.pt"))
    xs = torch.rand(4, 3)
    try:
        gather(xs, torch.tensor([0, 9]))
        raised = None
    except neuron_client.ModelExecutionError as exc:
        raised = str(exc)
    after = gather(xs, torch.tensor([3, 1]))
    emit(ok_nested=bool(ok_nested), ok_big=ok_big, segments=len(segments), raised=raised,
         core=gather.cores[0], after_ok=bool(torch.equal(after, xs[[3, 1]])))



# -- placement inside a process (issue 3) ---------------------------------------------------------------------


def Slow(steps: int = 150) -> torch.nn.Module:
    """CPU-bound: ``steps`` chained 256-wide matmuls, long enough that concurrent calls visibly overlap."""
    return MatmulChain(steps, 256)


def save(module, example, path, lazy=False, asynchronous=False) -> str:
    import neuron_client

    traced = neuron_client.trace(module, example)
    if lazy:
        neuron_client.lazy_load(traced)
    if asynchronous:
        neuron_client.async_load(traced)
    torch.jit.save(traced, path)
    return path


def broker_status() -> dict:
    from neuron_client.wire import config
    from neuron_client.wire.broker_client import BrokerClient

    with BrokerClient(config.broker_address()) as broker:
        return broker.status()


def models_on(cores) -> int:
    time.sleep(0.3)  # workers report within ~0.1 s of a change
    doc = broker_status()
    return sum(len(doc.cores[c].models) for c in cores)


def scenario_seed001_manual(models: str) -> None:
    """Seed 001 'manual core selection' with NEURON_RT_NUM_CORES=4: m0 on nc3, m1's replicas on nc0 and nc1."""
    import neuron_client
    from neuron_client.experimental import neuron_cores_context

    path = os.path.join(models, "affine.pt")
    with neuron_cores_context(start_nc=3):
        m0 = neuron_client.jit.load(path)
    with neuron_cores_context(start_nc=0, nc_count=2):
        m1 = neuron_client.jit.load(path)
    example = torch.rand(2, 4)
    m0_runs, m1_runs = [], []
    for _ in range(3):
        m1(example)
        m1_runs.append(m1.last_core)
    for _ in range(2):
        m0(example)
        m0_runs.append(m0.last_core)
    rt = neuron_client.get_runtime()
    emit(owned=rt.cores, m0=m0.cores, m1=m1.cores, m0_runs=m0_runs, m1_runs=m1_runs)


def scenario_multicore(models: str) -> None:
    """Seed 001 'automatic multicore': one model replicated on every owned core, calls round-robin."""
    import neuron_client
    from neuron_client.experimental import multicore_context

    with multicore_context():
        m0 = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    runs = []
    for _ in range(3):
        m0(torch.rand(2, 4))
        runs.append(m0.last_core)
    emit(cores=m0.cores, runs=runs)


def scenario_thread_contexts(models: str) -> None:
    """Two threads, each inside its own context at the same time, place their own loads."""
    import threading

    import neuron_client
    from neuron_client.experimental import neuron_cores_context

    neuron_client.get_runtime()
    barrier = threading.Barrier(2)
    placed = {}

    def load(name, start, count):
        with neuron_cores_context(start_nc=start, nc_count=count):
            barrier.wait()  # both contexts are open now
            placed[name] = neuron_client.jit.load(os.path.join(models, "affine.pt")).cores
            barrier.wait()

    threads = [threading.Thread(target=load, args=("a", 1, 2)), threading.Thread(target=load, args=("b", 5, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    outside = neuron_client.jit.load(os.path.join(models, "affine.pt")).cores  # least-used core, no context
    emit(a=placed.get("a"), b=placed.get("b"), outside=outside)


def scenario_set_cores(models: str) -> None:
    """set_neuron_cores / set_multicore re-place a loaded model; bad arguments get the reference's errors."""
    import neuron_client
    from neuron_client.experimental import neuron_cores_context, set_multicore, set_neuron_cores

    m = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    first = m.cores
    set_neuron_cores(m, start_nc=2, nc_count=2)
    second = m.cores
    loaded_after_move = models_on(neuron_client.get_runtime().cores)
    set_multicore(m)
    third = m.cores
    x = torch.rand(2, 4)
    ok = bool(torch.allclose(m(x), x * 2 + 1))
    errors = {}
    for label, call in {
        "zero": lambda: set_neuron_cores(m, 0, 0),
        "below": lambda: set_neuron_cores(m, 0, -2),
        "too_many": lambda: set_neuron_cores(m, 0, 5),
        "start_past": lambda: set_neuron_cores(m, 4, 1),
        "start_plus_count": lambda: set_neuron_cores(m, 3, 2),
        "context_zero": lambda: neuron_cores_context(0, 0),
    }.items():
        try:
            call()
            errors[label] = None
        except ValueError as exc:
            errors[label] = str(exc)
    emit(first=first, second=second, third=third, ok=ok, errors=errors, loaded_after_move=loaded_after_move,
         still=m.cores)


def scenario_concurrency(models: str) -> None:
    """Threads on a replicated model run on different cores at once; a busy replica does not hold others up."""
    import threading

    import neuron_client
    from neuron_client.experimental import neuron_cores_context

    path = save(Slow(), torch.rand(64, 256), os.path.join(models, f"slow-{os.getpid()}.pt"))
    with neuron_cores_context(start_nc=0, nc_count=2):
        m = neuron_client.jit.load(path)
    x = torch.rand(64, 256)  # about 0.1 s a call: long against thread start-up jitter
    m(x), m(x)  # warm both replicas
    spans = {}
    together = threading.Barrier(2)

    def call(name, barrier=None):
        if barrier is not None:
            barrier.wait()
        t0 = time.monotonic()
        m(x)
        spans[name] = (t0, time.monotonic(), m.last_core)

    a = threading.Thread(target=call, args=("a",))
    a.start()
    while not any(r.in_flight for r in m.replicas):
        time.sleep(0.001)
    busy_core = next(r.core for r in m.replicas if r.in_flight)
    followers = []
    for _ in range(1):  # a call while 'a' is running goes to the idle replica, not round-robin onto a busy one
        m(x)
        followers.append(m.last_core)
    a.join()
    b = threading.Thread(target=call, args=("b", together))
    c = threading.Thread(target=call, args=("c", together))
    b.start(), c.start(), b.join(), c.join()
    (b0, b1, bcore), (c0, c1, ccore) = spans["b"], spans["c"]
    overlap = min(b1, c1) - max(b0, c0)
    emit(busy_core=busy_core, a_core=spans["a"][2], followers=followers, b_core=bcore, c_core=ccore,
         overlap_s=overlap, b_s=b1 - b0, c_s=c1 - c0)


def scenario_futures(models: str) -> None:
    """model.submit returns futures; one thread keeps every replica busy."""
    from concurrent.futures import Future

    import neuron_client
    from neuron_client.experimental import multicore_context

    with multicore_context():
        m = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    xs = [torch.rand(2, 4) for _ in range(8)]
    futures = [m.submit(x) for x in xs]
    results = [f.result(60) for f in futures]
    emit(is_future=isinstance(futures[0], Future), ok=all(torch.allclose(r, x * 2 + 1) for r, x in zip(results, xs)),
         cores=m.cores)


class Wide(torch.nn.Module):
    """Heavy to load (about 16 MB of weights), light to run."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2048, 2048)

    def forward(self, x):
        return self.fc(x)


def scenario_lazy_async(models: str) -> None:
    """lazy_load: nothing on a core until the first call. async_load: load returns at once, first call waits."""
    import neuron_client

    rt = neuron_client.get_runtime()
    x = torch.rand(1, 2048)
    wide = Wide()
    lazy_path = save(wide, x, os.path.join(models, f"lazy-{os.getpid()}.pt"), lazy=True)
    async_path = save(wide, x, os.path.join(models, f"async-{os.getpid()}.pt"), asynchronous=True)
    both_path = save(wide, x, os.path.join(models, f"both-{os.getpid()}.pt"), lazy=True, asynchronous=True)
    expected = wide(x)

    lazy = neuron_client.jit.load(lazy_path)
    lazy_state, lazy_loaded = lazy.state, models_on(rt.cores)
    lazy_ok = bool(torch.allclose(lazy(x), expected, atol=1e-5))
    lazy_cores = lazy.cores
    lazy.unload()

    t0 = time.monotonic()
    asyncs = [neuron_client.jit.load(async_path) for _ in range(4)]
    returned_s = time.monotonic() - t0
    states = [m.state for m in asyncs]
    async_ok = all(torch.allclose(m(x), expected, atol=1e-5) for m in asyncs)
    async_cores = [m.cores[0] for m in asyncs]
    for m in asyncs:
        m.unload()

    both = neuron_client.jit.load(both_path)
    both_state = both.state
    both_ok = bool(torch.allclose(both(x), expected, atol=1e-5))
    emit(lazy_state=lazy_state, lazy_loaded=lazy_loaded, lazy_ok=lazy_ok, lazy_cores=lazy_cores,
         async_states=states, async_returned_s=returned_s, async_ok=async_ok, async_cores=async_cores,
         both_state=both_state, both_ok=both_ok)


def scenario_async_failure(models: str) -> None:
    """A background load that fails surfaces as a clear error at the first call."""
    import zipfile

    import neuron_client

    from neuron_client.tracing import trace as tracing

    graph = tracing.trace_graph(Affine(), torch.rand(2, 4))  # a plain traced file: its program is what breaks
    neuron_client.async_load(graph)
    good = os.path.join(models, f"good-{os.getpid()}.pt")
    torch.jit.save(graph, good)
    broken = os.path.join(models, f"broken-{os.getpid()}.pt")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if "/code/" not in item.filename:  # keep the metadata, drop the program
                dst.writestr(item, src.read(item.filename))
    m = neuron_client.jit.load(broken)
    state = m.state
    try:
        m(torch.rand(2, 4))
        error = None
    except neuron_client.ModelLoadError as exc:
        error = str(exc)
    emit(state=state, error=error)


def scenario_static_shapes(models: str) -> None:
    import neuron_client

    m = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    try:
        m(torch.rand(3, 4))
        error = None
    except neuron_client.InputShapeError as exc:
        error = str(exc)
    try:
        m(torch.rand(2, 4, dtype=torch.float64))
        dtype_error = None
    except ValueError as exc:
        dtype_error = str(exc)
    emit(error=error, dtype_error=dtype_error)


def lstm_ensemble(n_models: int, fork: bool, T: int = 12, B: int = 8, C: int = 64):
    """Seed 004's ensemble of bidirectional LSTMs, scaled down to this machine, scripted; and an input."""
    torch.manual_seed(0)
    return torch.jit.script(LSTMEnsemble(n_models, C, fork).eval()), torch.rand(T, B, C)


def scenario_fork_lstm(models: str) -> None:
    """The forked ensemble runs in a worker and gives the same result as the sequential one."""
    import neuron_client

    plain, x = lstm_ensemble(2, fork=False)
    forked, _ = lstm_ensemble(2, fork=True)
    forked.load_state_dict(plain.state_dict())
    path = os.path.join(models, f"lstm-fork-{os.getpid()}.pt")
    torch.jit.save(forked, path)
    m = neuron_client.jit.load(path)
    with torch.no_grad():
        expected = plain(x)
    out = m(x)
    graph_forks = "fork" in torch.jit.load(path).code
    emit(ok=bool(torch.allclose(out, expected, atol=1e-5)), graph_forks=graph_forks)


# -- reliability (issue 8) -----------------------------------------------------------------------------------------


def scenario_crash_recovery(models: str) -> None:
    """A worker killed under a call: the call fails at once naming core and cause; the next call just works."""
    import warnings

    import neuron_client

    path = save(Slow(steps=400), torch.rand(256, 256), os.path.join(models, f"slower-{os.getpid()}.pt"))
    m = neuron_client.jit.load(path)
    x = torch.rand(256, 256)
    expected = m(x)
    rt = neuron_client.get_runtime()
    core = m.cores[0]
    emit(ready=True, worker_pid=rt.worker(core).pid, core=core)
    t0 = time.monotonic()
    try:
        for _ in range(50):  # the test kills the worker during one of these
            m(x)
        error = None
    except neuron_client.WorkerUnavailableError as exc:
        error = str(exc)
    failed_after_s = time.monotonic() - t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = m(x)
    emit(error=error, failed_after_s=failed_after_s, ok=bool(torch.allclose(again, expected)),
         warnings=[str(w.message) for w in caught], new_worker_pid=rt.worker(core).pid)


def scenario_survive_restart(models: str, flag: str) -> None:
    """Hold cores and models across a broker restart (kill -9, start again): calls work again afterwards."""
    import warnings

    import neuron_client
    from neuron_client.experimental import multicore_context

    with multicore_context():
        m = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    x = torch.rand(2, 4)
    m(x)
    rt = neuron_client.get_runtime()
    emit(ready=True, owned=rt.cores, worker_pids=[rt.worker(c).pid for c in rt.cores])
    deadline = time.monotonic() + HOLD_S
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [bool(torch.allclose(m(x), x * 2 + 1)) for _ in range(4)]
    emit(ok=all(results), warnings=[str(w.message) for w in caught], lost=rt.lost, owned=rt.cores,
         worker_pids=[rt.worker(c).pid for c in rt.cores])
    hold()


def scenario_bad_models(models: str) -> None:
    """Missing, truncated, non-TorchScript and hostile model files: clear errors, nothing executed."""
    import io
    import pickle
    import zipfile

    import neuron_client

    good = open(os.path.join(models, "affine.pt"), "rb").read()
    marker = os.path.join(models, f"pwned-{os.getpid()}")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = io.BytesIO()
    with zipfile.ZipFile(hostile, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps(Evil(), protocol=2))
        z.writestr("archive/version", "3\n")
    cases = {
        "missing": os.path.join(models, "no-such-model.pt"),
        "truncated": good[: len(good) // 2],
        "not_torchscript": os.urandom(4096),
        "hostile": hostile.getvalue(),
    }
    errors = {}
    for name, content in cases.items():
        path = content if isinstance(content, str) else os.path.join(models, f"{name}-{os.getpid()}.pt")
        if not isinstance(content, str):
            with open(path, "wb") as f:
                f.write(content)
        try:
            neuron_client.jit.load(path)
            errors[name] = None
        except neuron_client.ModelLoadError as exc:
            errors[name] = str(exc)
    m = neuron_client.jit.load(os.path.join(models, "affine.pt"))  # the worker still serves
    x = torch.rand(2, 4)
    emit(errors=errors, executed=os.path.exists(marker), still_ok=bool(torch.allclose(m(x), x * 2 + 1)))


# -- the cuda backend (issue 10) ----------------------------------------------------------------------------------


class Hog(torch.nn.Module):
    """Allocates ``n`` floats on the model's device: more than a core's share of the GPU runs out of memory."""

    def forward(self, x, n):
        return x + torch.zeros(int(n.item()), device=x.device).sum()


def scenario_cuda_model(models: str) -> None:
    import neuron_client
    from neuron_client.experimental import multicore_context

    with multicore_context():
        m = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    x = torch.rand(2, 4)
    outs = [m(x) for _ in range(2)]
    ok = all(torch.allclose(o, x * 2 + 1) for o in outs)
    m.output_device = "cuda:0"
    moved = m(x)
    hog_path = os.path.join(models, f"hog-{os.getpid()}.pt")
    torch.jit.save(torch.jit.script(Hog()), hog_path)
    hog = neuron_client.jit.load(hog_path)
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        hog(torch.zeros(1), torch.tensor(int(total * 0.75 / 4)))  # 75 % of the GPU: over this core's half
        oom = ""
    except neuron_client.ModelExecutionError as exc:
        oom = str(exc)
    after = hog(torch.zeros(1), torch.tensor(1000))
    emit(ok=bool(ok), outputs_on=outs[0].device.type, moved_on=str(moved.device), cores=m.cores, oom_error=oom,
         after_oom_ok=bool(after.item() == 0))

if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    globals()[f"scenario_{name}"](*args)
