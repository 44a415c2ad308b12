"""What ``neuron-run`` launches in the operator-tool tests: ``python -m tests.procs.ranks NAME ARGS...``.

These are not driven by commands: the launcher under test starts, watches, restarts and signals them, and prefixes
the plain lines they print (``[rank N] ...``), which the tests read. They import nothing heavy unless they must own
cores.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

HOLD_S = 120


def rank() -> int:
    return int(os.environ["RANK"])


def wait_until(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def env(marker: str = "") -> None:
    """Print this rank's environment; with ``marker``, own the cores it names and wait for the marker file."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES",
             "MASTER_PORT")
    print("env " + json.dumps({k: os.environ.get(k) for k in names}), flush=True)
    if marker:
        import neuron_client

        rt = neuron_client.get_runtime()
        print("owned " + json.dumps(rt.cores), flush=True)
        print(f"to stderr from rank {rank()}", file=sys.stderr, flush=True)
        wait_until(lambda: os.path.exists(marker))


def fail(failing: str, code: str, pid_dir: str) -> None:
    """Rank ``failing`` exits with ``code`` once every rank has started; the others run until stopped."""
    with open(os.path.join(pid_dir, f"rank{rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    print(f"started pid {os.getpid()}", flush=True)
    if rank() == int(failing):
        world = int(os.environ["WORLD_SIZE"])
        wait_until(lambda: len(os.listdir(pid_dir)) >= world)
        print("failing now", flush=True)
        print(f"rank {rank()} gives up: exit {code}", file=sys.stderr, flush=True)
        sys.exit(int(code))
    time.sleep(HOLD_S)


def flaky(marker_dir: str) -> None:
    """Fail (exit 3) the first time this rank runs, succeed the second: a marker file remembers."""
    marker = os.path.join(marker_dir, f"rank{rank()}.failed-once")
    restarts = os.environ.get("NEURON_RUN_RESTARTS")
    assert os.environ.get("TORCHELASTIC_RESTART_COUNT") == restarts  # torchrun's name for it
    if not os.path.exists(marker):
        print(f"rank {rank()} fails on purpose", file=sys.stderr, flush=True)
        open(marker, "w").close()
        print(f"first attempt fails (restarts={restarts})", flush=True)
        sys.exit(3)
    print(f"second attempt succeeds (restarts={restarts})", flush=True)


def signals(pid_dir: str) -> None:
    """Report the signal that stops this rank, then exit with 128 + its number."""

    def on(signum, frame):
        print(f"got {signal.Signals(signum).name}", flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on)
    signal.signal(signal.SIGTERM, on)
    with open(os.path.join(pid_dir, f"rank{rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    print("waiting for a signal", flush=True)
    time.sleep(HOLD_S)


if __name__ == "__main__":
    {"env": env, "fail": fail, "flaky": flaky, "signals": signals}[sys.argv[1]](*sys.argv[2:])
