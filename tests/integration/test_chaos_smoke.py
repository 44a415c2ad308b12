"""The chaos script's quick run (scripts/chaos.py --quick, cut to 10 s of chaos and 5,000 fuzz cases to keep the suite
short; `bash scripts/chaos` is the full run): clients, faults, broker restarts and fuzzing at the broker's default
settings; no invariant violation, no leak, and the fuzzer really ran."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

CHAOS = os.path.join(ROOT, "scripts", "chaos.py")
RUN_TIMEOUT_S = 180


def _kill_run(proc: subprocess.Popen, out: str) -> None:
    """Stop a run that is still going and everything it started: SIGTERM (the script cleans up after itself), then
    SIGKILL its process group and those of the brokers it started (each broker has its own; <work>/pgids lists
    them). A run that ended by itself has already cleaned up."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        pass
    pgids = [proc.pid]
    for line in out.splitlines():
        if "(work dir " in line:
            work = line.rsplit("(work dir ", 1)[1].rstrip(")\n ")
            try:
                with open(os.path.join(work, "pgids")) as f:
                    pgids += [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                pass
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.timeout(240)
def test_chaos_quick_run_has_no_violation_and_no_leak(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for var in ("NEURON_BROKER_DIR", "NEURON_BROKER_ADDRESS", "NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES"):
        env.pop(var, None)
    log_path = tmp_path / "chaos.out"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-W", "ignore", CHAOS, "--quick", "--seconds", "10",
                                 "--fuzz-cases", "5000"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ok = False
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        out = log_path.read_text(errors="replace")
        assert proc.poll() is not None, f"chaos --quick still running after {RUN_TIMEOUT_S}s:\n{out[-6000:]}"
        results = [line for line in out.splitlines() if line.startswith("[chaos] result ")]
        assert results, f"no result line:\n{out[-6000:]}"
        result = json.loads(results[-1][len("[chaos] result "):])
        assert result["violations"] == 0, out[-6000:]
        assert result["leaks"] == 0, out[-6000:]
        assert result["fuzz_cases"] > 0, out[-6000:]
        assert result["acquires"] > 0 and result["broker_restarts"] >= 1, out[-6000:]
        assert proc.returncode == 0, out[-6000:]
        ok = True
    finally:
        if not ok:
            _kill_run(proc, log_path.read_text(errors="replace"))
