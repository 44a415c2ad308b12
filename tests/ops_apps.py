"""Programs the operator-tool tests run as real processes: ``python tests/ops_apps.py SCENARIO ARGS...``.

Client scenarios print JSON lines (like tests/apps.py). The ``rank_*`` scenarios are what ``neuron-run`` launches:
they print plain lines (the launcher prefixes them) and import nothing heavy unless they must own cores.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

HOLD_S = 120


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def wait_for_file(path: str, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.05)
    return False


# -- clients -----------------------------------------------------------------------------------------------------


def scenario_serve(models: str) -> None:
    """Own the cores the environment names, replicate a model on all of them, and call it in a loop until killed."""
    import torch

    import neuron_client
    from neuron_client.experimental import multicore_context

    rt = neuron_client.get_runtime()
    with multicore_context():
        m = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    x = torch.rand(2, 4)
    m(x)
    emit(ready=True, pid=os.getpid(), owned=rt.cores, model_cores=m.cores)
    deadline = time.monotonic() + HOLD_S
    while time.monotonic() < deadline:
        m(x)
        time.sleep(0.01)


def scenario_victim(models: str, marker: str) -> None:
    """Own cores with a model; when ``marker`` appears (after an operator released us), call again and report."""
    import torch

    import neuron_client

    rt = neuron_client.get_runtime()
    m = neuron_client.jit.load(os.path.join(models, "affine.pt"))
    m(torch.rand(2, 4))
    emit(ready=True, pid=os.getpid(), owned=rt.cores)
    wait_for_file(marker)
    deadline = time.monotonic() + 10
    while rt.lost is None and time.monotonic() < deadline:  # the heartbeat hears of it within ~0.2 s
        time.sleep(0.05)
    try:
        m(torch.rand(2, 4))
        emit(error=None, message="")
    except Exception as exc:
        emit(error=type(exc).__name__, message=str(exc))


# -- processes neuron-run launches ----------------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ["RANK"])


def scenario_rank_env(marker: str = "") -> None:
    """Print this rank's environment; with ``marker``, own the cores it names and wait for the marker file."""
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                           "NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES", "MASTER_PORT")}
    print("env " + json.dumps(env), flush=True)
    if marker:
        import neuron_client

        rt = neuron_client.get_runtime()
        print("owned " + json.dumps(rt.cores), flush=True)
        print(f"to stderr from rank {_rank()}", file=sys.stderr, flush=True)
        wait_for_file(marker)


def scenario_rank_fail(failing: str, code: str, pid_dir: str) -> None:
    """Rank ``failing`` exits with ``code`` once every rank has started; the others run until stopped."""
    with open(os.path.join(pid_dir, f"rank{_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    print(f"started pid {os.getpid()}", flush=True)
    if _rank() == int(failing):
        world = int(os.environ["WORLD_SIZE"])
        wait_for_file_count(pid_dir, world)
        print("failing now", flush=True)
        sys.exit(int(code))
    time.sleep(HOLD_S)


def wait_for_file_count(directory: str, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(directory)) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def scenario_rank_flaky(marker_dir: str) -> None:
    """Fail (exit 3) the first time this rank runs, succeed the second: a marker file remembers."""
    marker = os.path.join(marker_dir, f"rank{_rank()}.failed-once")
    restarts = os.environ.get("NEURON_RUN_RESTARTS")
    if not os.path.exists(marker):
        open(marker, "w").close()
        print(f"first attempt fails (restarts={restarts})", flush=True)
        sys.exit(3)
    print(f"second attempt succeeds (restarts={restarts})", flush=True)


def scenario_rank_signals(pid_dir: str) -> None:
    """Report the signal that stops this rank, then exit with 128 + its number."""

    def on(signum, frame):
        print(f"got {signal.Signals(signum).name}", flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on)
    signal.signal(signal.SIGTERM, on)
    with open(os.path.join(pid_dir, f"rank{_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    print("waiting for a signal", flush=True)
    time.sleep(HOLD_S)


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    globals()[f"scenario_{name}"](*args)
