"""Tensor-parallel client programs that tests run as real processes: ``python tests/tp_apps.py SCENARIO ARGS...``.

``trace WORK``: seed 003 on all-MiniLM-L6-v2 (a real BERT). Saves the unsharded checkpoint, traces TP=2 with inline
weights, TP=2 with separated weights and TP=4 with separated weights (the unsharded checkpoint loaded into the sharded
model by ``parallel_layers.load(sharded=False)``), runs each on real sentences against the unsharded CPU model, saves
each into ``WORK/<name>``, and writes the inputs, the CPU outputs and the TP outputs to ``WORK/reference.pt``.

``load WORK``: a fresh process that never imports transformers: loads the saved directories with
``parallel_model_load``, compares with ``reference.pt``, runs two TP models on different cores at the same time, and
then streams calls until the test kills one rank's worker; reports the error and the next call.

Each prints one JSON line per check: ``{"check": name, ...}``.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import neuron_client  # noqa: E402
from neuron_client.distributed import parallel_layers, trace  # noqa: E402

MODELS = {"inline2": (2, True), "sep2": (2, False), "sep4": (4, False)}


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def max_diff(got, want) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want))


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def checked(name):
    """Run a check; a crash becomes a line saying so (the other checks still run)."""
    def wrap(fn):
        def run(*args):
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported to the test
                emit(check=name, crashed=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc()[-3000:])
        return run
    return wrap


def scenario_trace(work: str) -> None:
    from neuron_client.distributed.examples import minilm

    tok = minilm.tokenizer()
    inputs = [minilm.encode(tok, s) for s in minilm.SENTENCES]
    inputs.append(minilm.encode(tok, minilm.SENTENCES[1], minilm.SENTENCES[2]))  # a sentence pair, as the seed's
    checkpoint = minilm.save_checkpoint(os.path.join(work, "minilm.pt"))
    cpu = minilm.cpu_model()
    with torch.no_grad():
        want = [tuple(cpu(*x)) for x in inputs]
    del cpu
    ref = {"inputs": inputs, "cpu": want, "tp": {}}

    @checked("sharded_checkpoint")
    def sharded_checkpoint():
        """parallel_layers.save per rank, then load(sharded=True) gives the same shard as load(sharded=False)."""
        shards = os.path.join(work, "shards")
        same = []
        for rank in range(2):
            with parallel_layers.parallel_state.rank_context(rank, 2):
                model, _ = minilm.get_model(checkpoint)
                parallel_layers.save({"model": model.state_dict()}, shards)
                again = minilm.parallelize(minilm.cpu_model())
                parallel_layers.load(shards, again, sharded=True)
                a, b = model.state_dict(), again.state_dict()
                q = "encoder.layer.0.attention.self.query.weight"
                same.append(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                            and list(a[q].shape) == [192, 384])
        emit(check="sharded_checkpoint", same=same)

    sharded_checkpoint()
    for name, (tp, inline) in MODELS.items():
        @checked(name)
        def one():
            t0 = time.monotonic()
            model = trace.parallel_model_trace(minilm.get_model_fn(checkpoint), inputs[0], tp_degree=tp,
                                               inline_weights_to_neff=inline)
            trace_s = time.monotonic() - t0
            outs = [tuple(model(*x)) for x in inputs]
            ref["tp"][name] = outs
            path = os.path.join(work, name)
            trace.parallel_model_save(model, path)
            emit(check=name, tp=tp, inline=inline, cores=model.cores, group=model.group, trace_s=trace_s,
                 diff=max(max_diff(o, w) for o, w in zip(outs, want)),
                 files=sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs),
                 bytes=dir_bytes(path), graph_bytes=os.path.getsize(os.path.join(path, "tp_0.pt")),
                 shapes=[list(o.shape) for o in outs[0]])
            model.unload()

        one()
    @checked("state")
    def state():
        """io_aliases from get_model: each rank's state stays on its core, updated in place, never sent."""
        from neuron_client.tracing.io_aliases import TrafficMeter

        class Stateful(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.col = parallel_layers.layers.ColumnParallelLinear(64, 64, bias=False, gather_output=False)
                self.row = parallel_layers.layers.RowParallelLinear(64, 64, bias=False, input_is_parallel=True)
                self.register_buffer("calls", torch.zeros(1))
                self.register_buffer("memory", torch.zeros(16384))  # 64 KiB of state per rank

            def forward(self, x):
                return self.row(self.col(x)) + self.calls, self.calls + 1, self.memory + 1

        def get_model():
            torch.manual_seed(0)
            m = Stateful()
            return m, {m.calls: 1, m.memory: 2}

        model = trace.parallel_model_trace(get_model, torch.ones(2, 64), tp_degree=2)
        x = torch.ones(2, 64)
        with TrafficMeter() as meter:
            outs = [model(x) for _ in range(3)]
        outs = [o[0] if isinstance(o, (tuple, list)) else o for o in outs]
        emit(check="state", steps=[float((o - outs[0]).mean()) for o in outs], calls=meter.calls,
             received_per_call=meter.received / max(1, meter.calls), sent_per_call=meter.sent / max(1, meter.calls))
        model.unload()

    state()
    torch.save(ref, os.path.join(work, "reference.pt"))
    emit(check="done")


def scenario_load(work: str) -> None:
    from neuron_client.experimental import neuron_cores_context

    ref = torch.load(os.path.join(work, "reference.pt"), weights_only=True)
    inputs, want = ref["inputs"], ref["cpu"]
    assert "transformers" not in sys.modules
    rt = neuron_client.get_runtime()
    models = {}
    for name in MODELS:
        @checked(f"load_{name}")
        def one():
            model = trace.parallel_model_load(os.path.join(work, name))
            models[name] = model
            outs = [tuple(model(*x)) for x in inputs]
            emit(check=f"load_{name}", cores=model.cores, load_s=model.load_s, inline=model.inline_weights,
                 diff=max(max_diff(o, w) for o, w in zip(outs, want)),
                 same_as_traced=max(max_diff(o, w) for o, w in zip(outs, ref["tp"][name])))

        one()

    @checked("concurrent")
    def concurrent():
        """The two TP=2 models sit on different cores; threads call both at once, many times."""
        a, b = models["inline2"], models["sep2"]
        diffs, errors = [], []

        def hammer(model):
            try:
                for i in range(6):
                    x = inputs[i % len(inputs)]
                    diffs.append(max_diff(tuple(model(*x)), want[i % len(inputs)]))
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=hammer, args=(m,)) for m in (a, b, a, models["sep4"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        emit(check="concurrent", cores=[a.cores, b.cores, models["sep4"].cores], diff=max(diffs or [1.0]),
             calls=len(diffs), errors=errors)

    concurrent()

    @checked("context")
    def context():
        with neuron_cores_context(start_nc=1):
            m = trace.parallel_model_load(os.path.join(work, "sep2"))
        out = m(*inputs[0])
        emit(check="context", cores=m.cores, owned=rt.cores, diff=max_diff(out, want[0]))
        m.unload()

    context()
    for name in ("inline2", "sep4"):
        models.pop(name).unload()

    @checked("kill")
    def kill():
        model = models["sep2"]
        victim = model.cores[1]
        emit(check="kill_ready", core=victim, worker_pid=rt.worker(victim).pid, cores=model.cores)
        error, t_fail, t0 = None, None, time.monotonic()
        calls = 0
        while time.monotonic() - t0 < 60:
            t_call = time.monotonic()
            try:
                model(*inputs[calls % len(inputs)])
                calls += 1
            except Exception as exc:  # noqa: BLE001
                error, t_fail = f"{type(exc).__name__}: {exc}", time.monotonic() - t_call
                break
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t1 = time.monotonic()
            out = model(*inputs[0])
            recover_s = time.monotonic() - t1
        emit(check="kill", error=error, failed_after_s=t_fail, calls_before=calls, diff=max_diff(out, want[0]),
             recover_s=recover_s, cores=model.cores, new_worker_pid=rt.worker(victim).pid,
             warnings=[str(w.message) for w in caught])

    kill()

    @checked("kill_between")
    def kill_between():
        """A rank's worker dies between calls; the very next call (made the moment it is gone) re-forms the group."""
        from neuron_client.wire.procs import pid_running

        model = models["sep2"]
        model(*inputs[0])
        victim = model.cores[0]
        pid = rt.worker(victim).pid
        os.kill(pid, signal.SIGKILL)
        while pid_running(pid):
            time.sleep(0.001)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = model(*inputs[0])
                error, diff = None, max_diff(out, want[0])
            except Exception as exc:  # noqa: BLE001
                error, diff = f"{type(exc).__name__}: {exc}", 1.0
        emit(check="kill_between", error=error, diff=diff, warnings=[str(w.message) for w in caught])

    kill_between()
    emit(check="done")


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    globals()[f"scenario_{name}"](*args)
