"""Section 1, dispatch: what a call through neuron_client costs compared with the transports under it.

Five parts, each interleaved in rounds (4 and 5 are in :mod:`benchmarks.loop`):

1. The round trip of a call of an identity TorchScript model (traced with ``neuron_client.trace``) on one core,
   with a 1 KiB, 1 MiB and 16 MiB float32 tensor, against the same bytes through bare pyzmq (DEALER to a ROUTER
   echo in a spawned process), through a raw Unix-domain socket (an echo process: the machine's floor), an
   in-process call of the same TorchScript model, and a Ray actor when ``ray`` is importable.
2. At the sizes that travel through shared memory by default, the same call with shared memory turned off in the
   client (a channel created while ``config.SHM_THRESHOLD_BYTES`` is huge: ``WorkerChannel`` reads the threshold when
   it is created, and a channel with no reply arena offers none, so the worker answers through the socket too),
   and a plain 1-copy memcpy of the payload as a unit.
3. The threshold sweep: 16 KiB..4 MiB with and without shared memory, against a second broker whose workers write
   every reply into the client's segment when the client offers one (workers' threshold 1 byte), so that the
   client alone decides, for both directions. The crossover is where shared memory starts to win for good.
4. Closed-loop throughput of one process per core calling a small MLP, against in-process processes.
5. A compute-bound MLP in a worker against a plain pinned process.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

from . import echo
from .harness import (CHILDREN, Plot, SectionResult, ThreadRunner, Variant, client_of, dots_p50_p99, fmt_bytes,
                      fmt_ratio, fmt_spread, fmt_us, interleave, md_table, patched_environ, ratio, round_ratio, verdict)

KIB, MIB = 1 << 10, 1 << 20
SIZES = [1 * KIB, 1 * MIB, 16 * MIB]
# size -> (rounds full, rounds quick, calls per batch full, calls per batch quick)
PLAN = {1 * KIB: (30, 5, 200, 40), 1 * MIB: (30, 5, 40, 10), 16 * MIB: (30, 5, 8, 3)}
# 16 KiB..4 MiB, and two smaller sizes in case shared memory already wins at 16 KiB.
SWEEP_FULL = [4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1 * MIB, 2 * MIB,
              4 * MIB]
SWEEP_QUICK = [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB]
SWEEP_ROUNDS = (20, 4)
WIN_MARGIN = 0.05  # in the sweep, a side "wins" at a size when it is at least 5% faster in at least 3 rounds of 4
SHM_OFF = 1 << 62  # a threshold no tensor reaches
# The brokers get one core per CPU of this machine (2 here), so that the worker of the core this process owns is pinned
# to one CPU and runs torch with one thread. With one core over both CPUs its worker runs torch with two threads, and
# on a loaded 2-CPU machine every copy of 32 KiB or more (torch parallelises those) waits for a descheduled thread:
# milliseconds per call, which would swamp what this section measures (see the report's notes).
BROKER_CORES = max(1, min(8, os.cpu_count() or 1))

TARGET_SMALL_RATIO = 1.0  # neuron_client p50 at most bare pyzmq's at 1 KiB (the fast path) ...
TARGET_SPIN_RATIO = 0.4  # ... and at most 0.4x of it with the spin on a free CPU
TARGET_SMALL_P99_RATIO = 1.3  # p99 within 1.3x of bare pyzmq's p99
TARGET_RAY_SPEEDUP = 15.0  # at least 15x faster than a Ray actor call of the same model
TARGET_CPU_RATIO = 1.0  # client + worker CPU per call at most bare pyzmq's client + echo CPU
CPU_CALLS = (2000, 400)  # calls per variant in the CPU-per-call measurement (full, quick)
TARGET_SHM_SPEEDUP = 5.0  # 16 MiB through shared memory at least 5x faster than through the socket

NEURON = "neuron_client"  # the default: the fast path (mailbox), spinning where a CPU is free
NEURON_BLOCK = "neuron_client, fast path, client blocks"  # NEURON_FAST_PATH_SPIN_US=0: no spin in the client
NEURON_SOCKET = "neuron_client, socket path"  # NEURON_FAST_PATH=0: ZeroMQ for every call
NEURON_NOSHM = "neuron_client, shm off"
PYZMQ = "bare pyzmq"
UNIX = "unix socket"
INPROC = "in-process TorchScript"
CODEC = "pyzmq + wire format"  # bare pyzmq carrying neuron_client's encoded Call (a breakdown, small payloads only)
RAY = "ray actor"
MEMCPY = "memcpy (1 copy)"


def _identity_class():
    import torch

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    return Identity


def _save_identity(directory: str, nbytes: int):
    """A saved identity model traced for a float32 tensor of ``nbytes``; (path, example input)."""
    import torch

    import neuron_client

    x = torch.rand(nbytes // 4, dtype=torch.float32)
    traced = neuron_client.trace(_identity_class()(), x)
    path = os.path.join(directory, f"identity-{nbytes}.pt")
    torch.jit.save(traced, path)
    return path, x


def _payload(x) -> bytes:
    from neuron_client.wire import tensors

    return bytes(memoryview(tensors.tensor_buffer(x)))


def _ray_echo():
    """(call(x) -> x through a Ray actor, shutdown) or (None, why not)."""
    if importlib.util.find_spec("ray") is None:
        return None, "ray not installed"
    try:
        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)

        @ray.remote
        class Echo:
            def echo(self, x):
                return x

        actor = Echo.remote()
        import torch

        ray.get(actor.echo.remote(torch.zeros(1)))
        return (lambda x: ray.get(actor.echo.remote(x)), ray.shutdown), None
    except Exception as exc:  # a broken ray must not cost the rest
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        return None, f"ray failed to start: {type(exc).__name__}: {exc}"


def _codec_roundtrip(zc, x):
    """Bare pyzmq carrying what neuron_client puts on the wire: a ``Call`` encoded with ``codec.encode`` goes to the
    echo, and what comes back is decoded with ``codec.decode`` (the tensor copied out, as a client does). Against
    it, neuron_client's extra time is the worker's side and the client's bookkeeping, not the wire format."""
    from neuron_client.wire import codec, messages

    msg = messages.Call(token="0" * 32, model_id=1, args=(x,), reply_shm=None, reply_shm_size=0)
    ids = iter(range(1, 1 << 62))

    def call():
        zc.sock.send_multipart(codec.encode(msg, next(ids)), copy=False)
        env = codec.decode(zc.sock.recv_multipart(copy=False))
        return env.msg.args

    if not __import__("torch").equal(call()[0], x):
        raise RuntimeError("the wire-format echo returned a different tensor")
    return call


def _channel_in_this_thread(rt, core: int, threshold: int, env: dict | None = None):
    """Create this thread's channel to ``core`` with shared-memory threshold ``threshold``
    (``NEURON_SHM_THRESHOLD_BYTES``, which a channel reads when it is created) and the fast-path settings ``env``
    (``NEURON_FAST_PATH``, ``NEURON_FAST_PATH_SPIN_US``, read then too); without ``env``, the socket path (the
    sections that measure shared memory measure the socket path's arenas)."""
    from neuron_client.wire import config

    env = env or {config.ENV_FAST_PATH: "0"}
    with patched_environ(**{config.ENV_SHM_THRESHOLD: threshold}, **env):
        ch = rt.channel(core)
    if ch.threshold != threshold:
        raise RuntimeError(f"the channel took shm threshold {ch.threshold}, not {threshold}: this thread already had "
                           "a channel to the core")
    return ch


def _path_of(rt, core: int) -> dict:
    """Which path this thread's calls to ``core`` took: its mailbox's calls and spin, or none."""
    ch = rt.channel(core)
    box = ch.mailbox
    return {"fast_path": ch.fast, "mailbox_calls": box.calls if box else 0,
            "mailbox_spin_us": round(box.spin_s * 1e6) if box else None,
            "mailbox_blocked": box.blocked if box else 0}


def _zmq_threads_cpu_s() -> float:
    """CPU seconds of this process's ZeroMQ I/O threads (``ZMQbg/...``): a bare pyzmq call's cost is partly theirs."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if not f.read().startswith("ZMQbg"):
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


def _cpu_per_call(call, n: int, server_pid: int) -> dict:
    """CPU seconds per call of ``call`` over ``n`` calls: the client's (the calling thread and the process's ZeroMQ
    I/O threads; not Ray's or the runtime's other threads, which idle) and the server's (the worker, or the echo
    process: all its threads)."""
    import time

    import psutil

    server = psutil.Process(server_pid)

    def server_cpu():
        t = server.cpu_times()
        return t.user + t.system

    c0, z0, s0, w0 = time.thread_time(), _zmq_threads_cpu_s(), server_cpu(), time.perf_counter()
    for _ in range(n):
        call()
    c1, z1, s1, w1 = time.thread_time(), _zmq_threads_cpu_s(), server_cpu(), time.perf_counter()
    client = (c1 - c0) + (z1 - z0)
    return {"client_us": client / n * 1e6, "server_us": (s1 - s0) / n * 1e6, "total_us": (client + s1 - s0) / n * 1e6,
            "wall_us": (w1 - w0) / n * 1e6, "calls": n}


def _arena_sizes(rt, core: int) -> dict:
    ch = rt.channel(core)
    return {"threshold": ch.threshold, "request_arena_bytes": ch.request_arena.size,
            "reply_arena_bytes": ch.reply_arena.size}


def run(ctx) -> SectionResult:
    res = SectionResult("dispatch", "1. Dispatch: the round trip of a call")
    with contextlib.ExitStack() as stack:  # this part's broker, runtime and echo processes go before the next
        _part_roundtrip(ctx, stack, res)
    with contextlib.ExitStack() as stack:
        _part_sweep(ctx, stack, res)
    from neuron_client.wire import config

    from . import loop

    with contextlib.ExitStack() as stack:
        loop.part_closed_loop(ctx, stack, res, {NEURON: {}, NEURON_BLOCK: {config.ENV_FAST_PATH_SPIN_US: "0"},
                                                NEURON_SOCKET: {config.ENV_FAST_PATH: "0"}}, NEURON)
    with contextlib.ExitStack() as stack:
        loop.part_worker_speed(ctx, stack, res, {})
    res.notes += [
        "Shared memory off: a `WorkerChannel` reads `NEURON_SHM_THRESHOLD_BYTES` when it is created (one channel per "
        "thread and core), so the suite creates one thread's channel with the threshold at 2^62; a channel that never "
        "puts a tensor in shared memory never grows a reply arena, so the worker answers through the socket too.",
        "The sweep's broker runs with `neuron-broker start --shm-threshold 1`, so that the client's channel decides "
        "for both directions.",
        f"Each broker gets {BROKER_CORES} cores, one per CPU, so that the worker of the measured core is pinned to one "
        "CPU and runs torch with one thread. With one core spread over both CPUs its worker runs torch with two "
        "threads, and on this loaded 2-CPU machine every copy of 32 KiB or more (which torch splits between its "
        "threads) waited for a descheduled thread: 10-25 ms per call from 64 KiB on, where one thread takes "
        "0.2-0.3 ms.",
        "The bench process runs torch with one intra-op thread (`--torch-threads`), for the same reason.",
        "The brokers run at their defaults: a lease lives as long as its owner's lease link, so a starved bench "
        "process keeps its cores.",
    ]
    return res


# ----------------------------------------------------------------------------------------------------------------
# Parts 1 and 2: round trips by size, shared memory on and off.


def _part_roundtrip(ctx, stack: contextlib.ExitStack, res: SectionResult) -> None:
    import torch

    import neuron_client
    from neuron_client.wire import config

    p = ctx.progress
    models_dir = ctx.tmp / "dispatch-models"
    models_dir.mkdir(exist_ok=True)

    broker = ctx.start_broker("dispatch", cores=BROKER_CORES)
    stack.callback(broker.stop)
    rt = stack.enter_context(client_of(broker, "0"))
    core = rt.cores[0]
    cpus = list(broker.status().cores[core].cpus)
    threshold = config.SHM_THRESHOLD_BYTES

    # Baselines: echo processes (spawned: fresh interpreters) pinned to the worker's CPUs, and their clients here.
    zmq_endpoint = f"ipc://{echo.socket_path(str(ctx.tmp), 'zmq-echo.sock')}"
    unix_path = echo.socket_path(str(ctx.tmp), "unix-echo.sock")
    p.note(f"starting the pyzmq and Unix-socket echo processes (multiprocessing spawn, pinned to CPUs {cpus} like "
           f"the worker of core {core})")
    zproc = CHILDREN.add_mp(echo.start(echo.zmq_echo, zmq_endpoint, cpus))
    uproc = CHILDREN.add_mp(echo.start(echo.unix_echo, unix_path, cpus))
    stack.callback(CHILDREN.stop_mp, zproc)
    stack.callback(CHILDREN.stop_mp, uproc)
    zc = echo.ZmqClient(zmq_endpoint)
    stack.callback(zc.close)
    uc = echo.UnixClient(unix_path, uproc)
    stack.callback(uc.close)

    ray_call, ray_note = None, None
    made, why = _ray_echo()
    if made is None:
        ray_note = why
        p.note(f"Ray: {why}")
    else:
        ray_call, ray_shutdown = made
        stack.callback(ray_shutdown)
    p.note(f"this process owns core {core} (shm threshold {fmt_bytes(threshold)}); tracing identity models")

    noshm = ThreadRunner("bench-noshm")
    stack.callback(noshm.close)
    noshm.run(_channel_in_this_thread, rt, core, SHM_OFF)
    # the fast path without the client's spin, and the socket path for every call, each in a thread of its own
    blocking, socket_path = ThreadRunner("bench-fast-blocking"), ThreadRunner("bench-socket-path")
    stack.callback(blocking.close)
    stack.callback(socket_path.close)
    blocking.run(_channel_in_this_thread, rt, core, threshold, {config.ENV_FAST_PATH_SPIN_US: "0"})
    socket_path.run(_channel_in_this_thread, rt, core, threshold)

    rows, per_size, checks = [], {}, {}
    for size in SIZES:
        path, x = _save_identity(str(models_dir), size)
        model = neuron_client.jit.load(path)
        from neuron_client.tracing.script import load_here  # the graph, run here
        local = load_here(path)
        payload = _payload(x)
        # Correctness once, outside the timing: every path really carries the tensor.
        if not torch.equal(model(x), x):
            raise RuntimeError(f"neuron_client returned a different tensor at {fmt_bytes(size)}")
        if bytes(zc.roundtrip(payload)) != payload or bytes(uc.roundtrip(payload)) != payload:
            raise RuntimeError(f"an echo server returned different bytes at {fmt_bytes(size)}")

        def inproc(local=local, x=x):
            with torch.inference_mode():
                return local(x)

        for runner in (blocking, socket_path):
            if not runner.run(lambda model=model, x=x: torch.equal(model(x), x)):
                raise RuntimeError(f"neuron_client returned a different tensor at {fmt_bytes(size)}")
        variants = [Variant(NEURON, lambda model=model, x=x: model(x)),
                    Variant(NEURON_BLOCK, lambda model=model, x=x: model(x), runner=blocking),
                    Variant(NEURON_SOCKET, lambda model=model, x=x: model(x), runner=socket_path),
                    Variant(PYZMQ, lambda payload=payload: zc.roundtrip(payload)),
                    Variant(UNIX, lambda payload=payload: uc.roundtrip(payload)),
                    Variant(INPROC, inproc)]
        if size < threshold:
            variants.append(Variant(CODEC, _codec_roundtrip(zc, x)))
        if ray_call is not None:
            variants.append(Variant(RAY, lambda x=x: ray_call(x)))
        big = size >= threshold
        if big:
            if not noshm.run(lambda model=model, x=x: torch.equal(model(x), x)):
                raise RuntimeError("neuron_client with shm off returned a different tensor")
            variants.append(Variant(NEURON_NOSHM, lambda model=model, x=x: model(x), runner=noshm))
            dst = torch.empty_like(x)
            variants.append(Variant(MEMCPY, lambda dst=dst, x=x: dst.copy_(x)))

        full_r, quick_r, full_b, quick_b = PLAN[size]
        rounds, batch = ctx.n_rounds(full_r, quick_r), (quick_b if ctx.quick else full_b)
        task = p.task(f"round trip {fmt_bytes(size)} ({len(variants)} variants)", rounds)
        m = interleave(variants, rounds, batch, warmup=max(2, batch // 2), task=task, rng=ctx.rng)
        if size == 1 * KIB:
            m_1kib = m
        base = m[PYZMQ].summary()
        nc = m[NEURON].summary()
        task.finish(f"neuron_client p50 {fmt_us(nc['p50_us'])}, {fmt_ratio(ratio(nc['p50_us'], base['p50_us']))} "
                    "of bare pyzmq")
        # Which path the calls took (the arenas a channel holds after its calls).
        checks[fmt_bytes(size)] = {"shm_on_channel": _arena_sizes(rt, core),
                                   "shm_off_channel": noshm.run(_arena_sizes, rt, core) if big else None,
                                   "paths": {NEURON: _path_of(rt, core),
                                             NEURON_BLOCK: blocking.run(_path_of, rt, core),
                                             NEURON_SOCKET: socket_path.run(_path_of, rt, core)}}
        entry = {"bytes": size, "rounds": rounds, "calls_per_batch": batch, "variants": {}}
        for name, meas in m.items():
            s = meas.summary()
            entry["variants"][name] = {
                **s, "round_p50_us": [v / 1e3 for v in meas.round_p50],
                "p50_ratio_to_pyzmq": ratio(s["p50_us"], base["p50_us"]),
                "p99_ratio_to_pyzmq": ratio(s["p99_us"], base["p99_us"]),
                "p50_ratio_to_unix": ratio(s["p50_us"], m[UNIX].summary()["p50_us"]),
                "round_ratio_to_pyzmq": round_ratio(meas, m[PYZMQ]),
            }
        n = entry["variants"][NEURON]
        entry["neuron_vs"] = {other: {"p50_ratio": ratio(n["p50_us"], entry["variants"][other]["p50_us"]),
                                      "p99_ratio": ratio(n["p99_us"], entry["variants"][other]["p99_us"]),
                                      "round_spread": round_ratio(m[NEURON], m[other])}
                              for other in m if other != NEURON}
        if big:
            off, on = entry["variants"][NEURON_NOSHM], entry["variants"][NEURON]
            entry["shm_speedup"] = {"p50": ratio(off["p50_us"], on["p50_us"]),
                                    "p99": ratio(off["p99_us"], on["p99_us"]),
                                    "round_spread": round_ratio(m[NEURON_NOSHM], m[NEURON]),
                                    "shm_in_memcpy_units": ratio(on["p50_us"], entry["variants"][MEMCPY]["p50_us"]),
                                    "socket_in_memcpy_units": ratio(off["p50_us"],
                                                                    entry["variants"][MEMCPY]["p50_us"])}
        per_size[fmt_bytes(size)] = entry
        for name, v in entry["variants"].items():
            rows.append([fmt_bytes(size), name, fmt_us(v["p50_us"]), fmt_us(v["p99_us"]),
                         fmt_ratio(v["p50_ratio_to_pyzmq"]), fmt_ratio(v["p99_ratio_to_pyzmq"]),
                         fmt_ratio(v["p50_ratio_to_unix"]), fmt_spread(v["round_ratio_to_pyzmq"]), v["n"]])
        if size == 1 * KIB:  # CPU per call, client and server together, in alternation
            n_cpu = CPU_CALLS[1] if ctx.quick else CPU_CALLS[0]
            worker_pid = rt.worker(core).pid
            cpu_variants = [(NEURON, None, lambda model=model, x=x: model(x), worker_pid),
                            (NEURON_BLOCK, blocking, lambda model=model, x=x: model(x), worker_pid),
                            (NEURON_SOCKET, socket_path, lambda model=model, x=x: model(x), worker_pid),
                            (PYZMQ, None, lambda payload=payload: zc.roundtrip(payload), zproc.pid)]
            cpu: dict = {name: [] for name, *_ in cpu_variants}
            for _ in range(3):
                for name, runner, fn, pid in cpu_variants:
                    got = runner.run(_cpu_per_call, fn, n_cpu, pid) if runner else _cpu_per_call(fn, n_cpu, pid)
                    cpu[name].append(got)
            res.figures["cpu_per_call_1kib"] = {
                name: {k: sorted(r[k] for r in runs)[1] for k in runs[0]} for name, runs in cpu.items()}
        model.unload()

    small = per_size[fmt_bytes(1 * KIB)]["neuron_vs"][PYZMQ]
    big16 = per_size[fmt_bytes(16 * MIB)]["shm_speedup"]
    kib_v = per_size[fmt_bytes(1 * KIB)]["variants"]
    blocked = {"p50_ratio": ratio(kib_v[NEURON_BLOCK]["p50_us"], kib_v[PYZMQ]["p50_us"]),
               "round_spread": round_ratio(m_1kib[NEURON_BLOCK], m_1kib[PYZMQ])}
    cpu = res.figures["cpu_per_call_1kib"]
    cpu_ratio = ratio(cpu[NEURON]["total_us"], cpu[PYZMQ]["total_us"])
    ray_speedup = (ratio(kib_v[RAY]["p50_us"], kib_v[NEURON]["p50_us"]) if RAY in kib_v else None)

    def at_most(value, goal):
        return None if value is None else value <= goal

    targets = {
        "small_p50_vs_pyzmq": {"what": "neuron_client p50 / bare pyzmq p50 at 1 KiB, the client not spinning",
                               "value": blocked["p50_ratio"], "goal": f"<= {TARGET_SMALL_RATIO}x",
                               "round_spread": blocked["round_spread"],
                               "met": at_most(blocked["p50_ratio"], TARGET_SMALL_RATIO)},
        "spin_p50_vs_pyzmq": {"what": "neuron_client p50 / bare pyzmq p50 at 1 KiB, default (spin where a CPU is "
                                      "free)", "value": small["p50_ratio"], "goal": f"<= {TARGET_SPIN_RATIO}x",
                              "round_spread": small["round_spread"],
                              "met": at_most(small["p50_ratio"], TARGET_SPIN_RATIO)},
        "small_p99_vs_pyzmq": {"what": "neuron_client p99 / bare pyzmq p99 at 1 KiB", "value": small["p99_ratio"],
                               "goal": f"<= {TARGET_SMALL_P99_RATIO}x", "round_spread": None,
                               "met": at_most(small["p99_ratio"], TARGET_SMALL_P99_RATIO)},
        "ray_speedup": {"what": "Ray actor p50 / neuron_client p50 at 1 KiB", "value": ray_speedup,
                        "goal": f">= {TARGET_RAY_SPEEDUP}x", "round_spread": None,
                        "met": None if ray_speedup is None else ray_speedup >= TARGET_RAY_SPEEDUP},
        "cpu_per_call": {"what": "client + worker CPU per 1 KiB call / bare pyzmq client + echo CPU",
                         "value": cpu_ratio, "goal": f"<= {TARGET_CPU_RATIO}x", "round_spread": None,
                         "met": at_most(cpu_ratio, TARGET_CPU_RATIO)},
        "shm_speedup_16mib": {"what": "16 MiB p50 with shm off / with shm on", "value": big16["p50"],
                              "goal": f">= {TARGET_SHM_SPEEDUP}x", "round_spread": big16["round_spread"],
                              "met": None if big16["p50"] is None else big16["p50"] >= TARGET_SHM_SPEEDUP},
    }
    res.figures.update(roundtrip=per_size, targets=targets, path_checks=checks, shm_threshold_bytes=threshold,
                       ray=ray_note or "measured",
                       setup={"broker_cores": broker.cores, "core": core, "worker_cpus": cpus,
                              "worker_torch_threads": len(cpus) or None, "echo_servers_cpus": cpus})

    L = res.lines
    L += ["Round trip of one call with a float32 tensor of the given size (identity model: the tensor goes to "
          "the worker and comes back). Baselines carry the same bytes: **bare pyzmq** is a DEALER to a ROUTER echo "
          "in another process, **unix socket** a length-prefixed echo over an AF_UNIX stream socket (the floor), "
          "**in-process** the same TorchScript model called in this process. Ratios are to bare pyzmq and to the "
          "Unix socket; round spread is that of the ratio to bare pyzmq.", "",
          f"Setup: a broker of {broker.cores} cores (one per CPU); this process owns core {core}, whose worker is "
          f"pinned to CPU(s) {cpus} with as many torch threads; the echo servers are pinned to the same CPU(s).", ""]
    if ray_note:
        L += [f"Ray: {ray_note}.", ""]
    L += ["### Targets", ""]
    L += md_table(["target", "measured", "round spread", "goal", "verdict"],
                  [[t["what"], fmt_ratio(t["value"]), fmt_spread(t["round_spread"]), t["goal"], verdict(t["met"], ctx.quick)]
                   for t in targets.values()])
    L += ["", "CPU per 1 KiB call (median of 3 alternating runs; the client is the calling thread plus this process's "
          "ZeroMQ I/O threads; the server is the core's worker, or the echo process, all threads; per-thread times "
          "tick at 10 ms, hence the round figures):", ""]
    L += md_table(["variant", "client CPU", "server CPU", "total", "wall", "total / pyzmq"],
                  [[name, fmt_us(c["client_us"]), fmt_us(c["server_us"]), fmt_us(c["total_us"]), fmt_us(c["wall_us"]),
                    fmt_ratio(ratio(c["total_us"], cpu[PYZMQ]["total_us"]))] for name, c in cpu.items()])
    paths = checks[fmt_bytes(1 * KIB)]["paths"]
    L += ["", "Paths taken at 1 KiB: " + "; ".join(
        f"{name}: {'mailbox' if p['mailbox_calls'] else 'socket'} ({p['mailbox_calls']} mailbox calls, client spin "
        f"{p['mailbox_spin_us']} µs, {p['mailbox_blocked']} calls waited in poll)" for name, p in paths.items())
        + ".", ""]
    kib = per_size[fmt_bytes(1 * KIB)]["variants"]
    if CODEC in kib:
        pz, cd, nc = kib[PYZMQ]["p50_us"], kib[CODEC]["p50_us"], kib[NEURON_SOCKET]["p50_us"]
        res.figures["breakdown_1kib_p50_us"] = {"bare_pyzmq": pz, "wire_format": cd - pz, "rest": nc - cd,
                                                "socket_path": nc, "fast_path": kib[NEURON]["p50_us"]}
        L += ["", f"Where the socket path's 1 KiB p50 goes: bare pyzmq {fmt_us(pz)}; adding neuron_client's wire "
              f"format (msgpack encode + decode of the `Call`, the tensor copied out) brings it to {fmt_us(cd)} "
              f"(+{fmt_us(cd - pz)}); the remaining {fmt_us(nc - cd)} of its {fmt_us(nc)} is the worker's side "
              f"(receive, decode, token check, model call of ~{fmt_us(kib[INPROC]['p50_us'])}, encode, send) and the "
              "client's bookkeeping (replica pick, shape check). The fast path, which skips both the wire format "
              f"and ZeroMQ, takes {fmt_us(kib[NEURON]['p50_us'])}."]
    L += ["", "### Round trip by payload", ""]
    L += md_table(["payload", "variant", "p50", "p99", "p50 / pyzmq", "p99 / pyzmq", "p50 / unix",
                   "round spread", "calls"], rows)
    L += ["", f"Shared memory (client threshold {fmt_bytes(threshold)}): at each size at or above it, "
          f"**{NEURON_NOSHM}** is the same call from a thread whose channel was created while "
          "`neuron_client.config.SHM_THRESHOLD_BYTES` was huge (no request arena, so no reply arena is offered "
          "and the worker answers through the socket as well); **memcpy** is one copy of the payload in this "
          "process, the unit of the table below.", ""]
    srows = []
    for label, e in per_size.items():
        if "shm_speedup" in e:
            s = e["shm_speedup"]
            srows.append([label, fmt_us(e["variants"][NEURON]["p50_us"]), fmt_us(e["variants"][NEURON_NOSHM]["p50_us"]),
                          fmt_ratio(s["p50"]), fmt_ratio(s["p99"]), fmt_spread(s["round_spread"]),
                          f"{s['shm_in_memcpy_units']:.1f}" if s["shm_in_memcpy_units"] else "-",
                          f"{s['socket_in_memcpy_units']:.1f}" if s["socket_in_memcpy_units"] else "-"])
    L += md_table(["payload", "p50 shm on", "p50 shm off", "speed-up p50 (off/on)", "speed-up p99",
                   "round spread", "shm on, in memcpys", "shm off, in memcpys"], srows)
    ok = all(c["shm_on_channel"]["reply_arena_bytes"] >= _bytes_of(k) for k, c in checks.items()
             if c["shm_off_channel"] is not None)
    off_clean = all(c["shm_off_channel"]["request_arena_bytes"] == 0 and c["shm_off_channel"]["reply_arena_bytes"] == 0
                    for c in checks.values() if c["shm_off_channel"] is not None)
    L += ["", f"Path check: the shm-on channel holds request/reply arenas of the payload's size "
          f"({'yes' if ok else 'NO'}); the shm-off channel holds none ({'yes' if off_clean else 'NO'}).", ""]

    def draw(plt, out_path, per_size=per_size):
        fig, axes = plt.subplots(1, len(per_size), figsize=(5 * len(per_size), 4.2))
        for ax, (label, e) in zip(axes, per_size.items()):
            names = list(e["variants"])
            p50 = [e["variants"][n]["p50_us"] for n in names]
            p99 = [e["variants"][n]["p99_us"] for n in names]
            colors = ["tab:red" if n.startswith("neuron") else "tab:gray" for n in names]
            ys = range(len(names))
            dots_p50_p99(ax, p50, p99, colors)
            ax.set_yticks(list(ys), names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_xlabel("round trip (µs, log)")
            ax.set_title(f"{label} float32")
            ax.grid(axis="x", which="both", alpha=0.3)
        fig.suptitle("Round trip of one call (dots p50, ticks p99)")
        fig.tight_layout()
        fig.savefig(out_path, dpi=110)

    res.plots.append(Plot("dispatch_roundtrip.png", "Round trip by payload and variant", draw))


def _bytes_of(label: str) -> int:
    n, unit = label.split()
    return int(n) * {"B": 1, "KiB": KIB, "MiB": MIB, "GiB": 1 << 30}[unit]


# ----------------------------------------------------------------------------------------------------------------
# Part 3: the shared-memory threshold.


def _sweep_batch(size: int, quick: bool) -> int:
    if quick:
        return max(3, min(12, (2 * MIB) // size))
    return max(6, min(40, (8 * MIB) // size))


def _part_sweep(ctx, stack: contextlib.ExitStack, res: SectionResult) -> None:
    import torch

    import neuron_client
    from neuron_client.wire import config

    p = ctx.progress
    sizes = SWEEP_QUICK if ctx.quick else SWEEP_FULL
    models_dir = ctx.tmp / "sweep-models"
    models_dir.mkdir(exist_ok=True)
    broker = ctx.start_broker("sweep", cores=BROKER_CORES, worker_shm_threshold=1)
    stack.callback(broker.stop)
    rt = stack.enter_context(client_of(broker, "0"))
    core = rt.cores[0]
    shm_on, shm_off = ThreadRunner("bench-shm"), ThreadRunner("bench-socket")
    stack.callback(shm_on.close)
    stack.callback(shm_off.close)
    shm_on.run(_channel_in_this_thread, rt, core, 1)
    shm_off.run(_channel_in_this_thread, rt, core, SHM_OFF)

    rounds = ctx.n_rounds(*SWEEP_ROUNDS)
    task = p.task(f"shm threshold sweep ({len(sizes)} sizes)", rounds * len(sizes))
    table, points = [], []
    for size in sizes:
        path, x = _save_identity(str(models_dir), size)
        model = neuron_client.jit.load(path)
        for runner in (shm_on, shm_off):
            if not runner.run(lambda: torch.equal(model(x), x)):
                raise RuntimeError(f"neuron_client returned a different tensor at {fmt_bytes(size)}")
        batch = _sweep_batch(size, ctx.quick)
        variants = [Variant("shm", lambda model=model, x=x: model(x), runner=shm_on),
                    Variant("socket", lambda model=model, x=x: model(x), runner=shm_off)]
        m = interleave(variants, rounds, batch, warmup=max(2, batch // 2), task=task, rng=ctx.rng)
        on_arenas, off_arenas = shm_on.run(_arena_sizes, rt, core), shm_off.run(_arena_sizes, rt, core)
        s_on, s_off = m["shm"].summary(), m["socket"].summary()
        r = ratio(s_off["p50_us"], s_on["p50_us"])
        rr = round_ratio(m["socket"], m["shm"])
        points.append({"bytes": size, "shm": s_on, "socket": s_off, "socket_over_shm_p50": r,
                       "socket_over_shm_p99": ratio(s_off["p99_us"], s_on["p99_us"]), "round_spread": rr,
                       "calls_per_batch": batch,
                       "shm_used": on_arenas["request_arena_bytes"] >= size and on_arenas["reply_arena_bytes"] >= size,
                       "socket_used": off_arenas["request_arena_bytes"] == 0 and off_arenas["reply_arena_bytes"] == 0})
        faster = ("shm" if (rr["p25"] or 0) > 1 + WIN_MARGIN else
                  "socket" if (rr["p75"] or 2) < 1 - WIN_MARGIN else "tie (within the noise)")
        table.append([fmt_bytes(size), fmt_us(s_on["p50_us"]), fmt_us(s_off["p50_us"]), fmt_ratio(r),
                      fmt_spread(rr), faster])
        model.unload()
    task.finish()
    cross = crossover(points)
    current = config.SHM_THRESHOLD_BYTES
    res.figures["shm_sweep"] = {"rounds": rounds, "worker_shm_threshold_bytes": 1, "points": points,
                                "crossover": cross, "current_threshold_bytes": current}
    L = res.lines
    L += ["### Shared-memory threshold", "",
          "The same call with shared memory for every tensor (**shm**: both directions, since this broker's workers "
          "answer through the client's segment whenever one is offered) and for none (**socket**). "
          "Ratio > 1: shared memory is faster; \"faster\" names the side that is at least 5% faster in at least 3 "
          "rounds of 4 (else: a tie). Steady state: "
          "the arenas exist already (a channel's first large call creates them, untimed here).", ""]
    L += md_table(["payload", "p50 shm", "p50 socket", "socket / shm (p50)", "round spread", "faster"], table)
    L += ["", f"**Crossover: {cross['text']}** (now: `SHM_THRESHOLD_BYTES` = {current} = {fmt_bytes(current)})", ""]
    if not all(pt["shm_used"] and pt["socket_used"] for pt in points):
        L += ["_Path check failed at some size: a channel did not hold the arenas expected (see results.json)._", ""]

    def draw(plt, out_path, points=points, cross=cross, current=current):
        xs = [pt["bytes"] for pt in points]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for key, color in (("shm", "tab:red"), ("socket", "tab:blue")):
            a1.plot(xs, [pt[key]["p50_us"] for pt in points], "o-", color=color, label=f"{key} p50")
            a1.plot(xs, [pt[key]["p99_us"] for pt in points], ":", color=color, alpha=0.6, label=f"{key} p99")
        a1.set_xscale("log", base=2)
        a1.set_yscale("log")
        a1.set_xlabel("payload (bytes)")
        a1.set_ylabel("round trip (µs)")
        a1.legend(fontsize=8)
        a1.grid(which="both", alpha=0.3)
        a2.plot(xs, [pt["socket_over_shm_p50"] for pt in points], "o-", color="black")
        a2.axhline(1.0, color="gray", linestyle="--")
        if cross.get("first_winning_bytes"):
            a2.axvline(cross["first_winning_bytes"], color="tab:green", linestyle=":", label="shm wins from here")
        a2.axvline(current, color="tab:red", linestyle="-.", alpha=0.6, label="SHM_THRESHOLD_BYTES now")
        a2.legend(fontsize=8)
        a2.set_xscale("log", base=2)
        a2.set_xlabel("payload (bytes)")
        a2.set_ylabel("socket p50 / shm p50")
        a2.grid(which="both", alpha=0.3)
        fig.suptitle("Shared memory vs socket by payload size")
        fig.tight_layout()
        fig.savefig(out_path, dpi=110)

    res.plots.append(Plot("shm_threshold.png", "Shared memory vs socket by payload size", draw))


def crossover(points: list[dict]) -> dict:
    """The first size from which shared memory wins for good: at least 5% faster in at least 3 rounds of 4 (the 25th
    percentile of the round-by-round ratio above 1.05) at that size and every larger one."""
    import math

    pts = [pt for pt in points if pt["socket_over_shm_p50"]]
    if not pts:
        return {"text": "not measured", "first_winning_bytes": None, "interpolated_bytes": None}

    def wins(pt):
        return (pt["round_spread"]["p25"] or 0) > 1.0 + WIN_MARGIN

    first = next((i for i in range(len(pts)) if all(wins(pt) for pt in pts[i:])), None)
    rule = (f"at least {WIN_MARGIN:.0%} faster in at least 3 of 4 rounds, at that size and every larger one")
    if first is None:
        return {"text": f"shared memory does not win for good ({rule}) up to {fmt_bytes(pts[-1]['bytes'])}",
                "rule": rule, "first_winning_bytes": None, "interpolated_bytes": None}
    s1, r1 = pts[first]["bytes"], pts[first]["socket_over_shm_p50"]
    if first == 0:
        return {"text": f"shared memory already wins at {fmt_bytes(s1)} ({fmt_ratio(r1)}), the smallest size measured "
                        f"({rule}): the crossover lies at or below it",
                "rule": rule, "first_winning_bytes": s1, "interpolated_bytes": None, "suggested_threshold_bytes": s1}
    s0, r0 = pts[first - 1]["bytes"], pts[first - 1]["socket_over_shm_p50"]
    at = None
    if r0 < 1.0 < r1:  # where the p50 ratio crosses 1, log-linear between the two sizes
        t = -math.log(r0) / (math.log(r1) - math.log(r0))
        at = 2 ** (math.log2(s0) + t * (math.log2(s1) - math.log2(s0)))
    below = ("slower" if (pts[first - 1]["round_spread"]["p75"] or 2) < 1.0 - WIN_MARGIN
             else "no faster within the noise")
    near = f"; the p50 ratio crosses 1 near {fmt_bytes(int(at))}" if at else ""
    return {"text": f"shared memory wins from {fmt_bytes(s1)} on ({fmt_ratio(r1)}; {rule}); at {fmt_bytes(s0)} it is "
                    f"{below} ({fmt_ratio(r0)}){near}. Measured setting: SHM_THRESHOLD_BYTES = {s1} ({fmt_bytes(s1)})",
            "rule": rule, "first_winning_bytes": s1, "interpolated_bytes": at, "suggested_threshold_bytes": s1}
