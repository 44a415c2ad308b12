"""Operator tools as real processes: neuron-ls, neuron-top (live through a pseudo-terminal, and --once), neuron-run,
neuron-broker release/drain, and the Prometheus metrics endpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from tests.helpers import ROOT, App, BrokerProc

RANKS = [sys.executable, "-m", "tests.procs.ranks"]  # what neuron-run launches here
BIN = os.path.dirname(sys.executable)
CLI_TIMEOUT_S = 90


def command(name: str, module: str) -> list[str]:
    """The installed console script, or its module when the scripts are not installed."""
    path = os.path.join(BIN, name)
    return [path] if os.path.exists(path) else [sys.executable, "-m", module]


NEURON_LS = command("neuron-ls", "broker.ls")
NEURON_TOP = command("neuron-top", "broker.top")
NEURON_RUN = command("neuron-run", "neuron_client.launch")
NEURON_BROKER = command("neuron-broker", "broker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_env(broker: BrokerProc, env=None) -> dict:
    """The broker's environment with this checkout first on the path: the console scripts (and what neuron-run
    launches) import the code under test, wherever the scripts were installed from."""
    return dict(broker.env, PYTHONPATH=ROOT + os.pathsep + broker.env.get("PYTHONPATH", ""), **(env or {}))


def run(broker: BrokerProc, cmd: list[str], timeout_s: float = CLI_TIMEOUT_S, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=tool_env(broker, env), capture_output=True, text=True, timeout=timeout_s,
                          cwd=ROOT, check=False)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie not yet reaped by its (dead) parent counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Ops:
    """The module's broker (4 cores, metrics on a free port) and one client serving a model on nc0-nc1."""

    def __init__(self, tmp, models_dir):
        self.port = free_port()
        self.broker = BrokerProc(str(tmp / "ops"), 4, extra=("--metrics-port", str(self.port)))
        self.models_dir = models_dir
        self.app: App | None = None

    def serving(self) -> App:
        """The serving client (``python -m tests.procs.ops``), started (again) if it is not running."""
        if self.app is None or not self.app.alive():
            if self.app is not None:
                self.app.close()
            self.app = App(self.broker, "ops")
            assert self.app.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "0-1"})["cores"] == [0, 1]
            self.app.served = self.app.ok("serve", path=os.path.join(self.models_dir, "affine.pt"))
            self.broker.wait_for(lambda d: d.cores[0].models and d.cores[1].models, 10,
                                 "the served model on nc0 and nc1")
        return self.app

    def others_gone(self) -> None:
        keep = {self.app.pid} if self.app and self.app.alive() else set()
        self.broker.wait_for(lambda d: {lease.pid for lease in d.leases} <= keep, 10, "test clients gone")

    def close(self) -> None:
        if self.app is not None:
            self.app.close()
        self.broker.stop()


@pytest.fixture(scope="module")
def ops_module(tmp_path_factory, models_dir):
    ops = Ops(tmp_path_factory.mktemp("operator"), models_dir)
    yield ops
    ops.close()


@pytest.fixture
def ops(ops_module):
    ops_module.others_gone()
    yield ops_module
    ops_module.others_gone()


@pytest.fixture
def client(ops, kept):
    """The module's other client process (``python -m tests.procs.owner``) on the module's broker, holding nothing."""
    with kept.lend(ops.broker, "owner") as app:
        yield app


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(scrape_text(port))}


def sample(families: dict, family: str, name: str | None = None, **labels) -> float:
    for s in families[family].samples:
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name or family} {labels} in {families[family].samples[:8]}")


# -- neuron-ls -----------------------------------------------------------------------------------------------------


def test_ls_table_and_json(ops, capsys):
    app = ops.serving()
    pid = app.served["pid"]
    out = run(ops.broker, NEURON_LS)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("nc")}
    assert sorted(rows) == ["nc0", "nc1", "nc2", "nc3"]
    for nc in ("nc0", "nc1"):
        assert "owned" in rows[nc] and str(pid) in rows[nc] and "-m tests.procs.ops" in rows[nc]
        assert "affine.pt x2 loaded" in rows[nc]  # one model, replicated on the owner's two cores
        assert "MiB" in rows[nc]  # the worker's memory
    assert "free" in rows["nc2"] and str(pid) not in rows["nc2"]
    assert "cpu cpus" in rows["nc0"]

    js = run(ops.broker, NEURON_LS + ["--json"])
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert doc["schema"] == 2 and doc["broker"]["cores"] == 4 and doc["broker"]["draining"] is False
    nc0, nc2 = doc["cores"][0], doc["cores"][2]
    assert set(nc0) >= {"index", "device", "cpus", "state", "owner", "models", "worker"}
    assert nc0["index"] == 0 and nc0["state"] == "owned" and nc0["device"] == "cpu"
    assert nc0["owner"]["pid"] == pid and nc0["owner"]["lease_age_s"] >= 0 and "tests.procs.ops" in nc0["owner"]["cmd"]
    assert nc0["models"][0] | {"requests": 0, "bytes": 0} == {"name": "affine.pt", "replicas": 2, "state": "loaded",
                                                              "copies": 1, "requests": 0, "bytes": 0}
    assert nc0["worker"]["memory_bytes"] > 0 and nc0["worker"]["pid"] > 0
    assert nc2["state"] == "free" and nc2["owner"] is None and nc2["models"] == []
    assert doc["processes"] == [{"pid": pid, "cmd": nc0["owner"]["cmd"], "cores": [0, 1],
                                 "lease_age_s": doc["processes"][0]["lease_age_s"]}]

    from broker import cli  # `neuron-broker ls` is the same command

    assert cli.main(["--dir", ops.broker.directory, "ls"]) == 0
    assert "affine.pt x2 loaded" in capsys.readouterr().out
    assert cli.main(["ls", "-j", "--dir", ops.broker.directory]) == 0  # AWS neuron-ls's flag; --dir after
    assert json.loads(capsys.readouterr().out)["cores"][0]["owner"]["pid"] == pid

    # a terminal of 80 columns: every line fits, each owner keeps the part of its command that tells it apart
    for cmd in (NEURON_LS, NEURON_BROKER + ["status"]):
        narrow = run(ops.broker, cmd, env={"COLUMNS": "80"})
        assert narrow.returncode == 0 and max(map(len, narrow.stdout.splitlines())) <= 80, narrow.stdout
        row = next(line for line in narrow.stdout.splitlines() if line.startswith("nc0"))
        assert f"{pid}" in row and "tests.procs.ops" in row and "affine" in row, narrow.stdout
        wide = run(ops.broker, cmd + ["-w"], env={"COLUMNS": "80"})
        assert "-m tests.procs.ops" in wide.stdout and "cpu cpus 0" in wide.stdout, wide.stdout

    # the reader of a pipe goes away first (`neuron-ls --json | head -c0`): no traceback
    proc = subprocess.Popen(NEURON_LS + ["--json-output"], env=tool_env(ops.broker), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(CLI_TIMEOUT_S) == 141 and "Traceback" not in err, err


def test_processes_are_named_and_the_broker_runs_in_its_directory(ops):
    ops.serving()
    doc = ops.broker.status()

    def cmdline(pid: int) -> str:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()

    for c in doc.cores:
        assert cmdline(c.worker.pid).startswith(f"neuron-worker nc{c.index}"), cmdline(c.worker.pid)
    assert cmdline(doc.broker.pid).startswith(f"neuron-broker --dir {ops.broker.directory}")
    assert os.readlink(f"/proc/{doc.broker.pid}/cwd") == ops.broker.directory


def test_second_start_says_what_runs_and_a_failed_start_shows_its_log(ops, tmp_path, capsys, monkeypatch):
    from broker import cli

    d = ops.broker.directory
    assert cli.main(["start", "--dir", d, "--cores", "2"]) == 1
    err = capsys.readouterr().err
    assert f"already running in {d} (pid {ops.broker.status().broker.pid} with 4 cpu cores); you asked for 2 cores" \
        in err and "neuron-broker stop" in err
    assert cli.main(["start", "--dir", d, "--cores", "4"]) == 0  # what runs is what was asked for
    assert "already running" in capsys.readouterr().out

    monkeypatch.setenv("PYTHONPATH", ROOT)  # the daemon imports this checkout
    bad = str(tmp_path / "bad")
    assert cli.main(["start", "--dir", bad, "--cores", "1", "--listen", "udp://nowhere"]) == 1
    err = capsys.readouterr().err
    assert "exited with code 2 while starting; the last lines of" in err and "broker.log" in err
    assert "--listen takes a tcp:// endpoint" in err  # the log's own line, printed


def test_json_documents_of_a_real_broker_follow_their_schemas(ops, owners):
    """`neuron-broker status --json` and `neuron-ls --json` as printed, with an owner, models, counters and a
    waiting acquire in them, validate against broker/schemas; both carry the schema version and a timestamp."""
    import jsonschema

    from broker import schemas

    pid = ops.serving().served["pid"]
    ops.broker.wait_for(lambda d: d.cores[0].requests > 0, 10, "calls counted on nc0")
    waiting = owners(ops.broker)  # a process of this test only: killed below, its acquire still waiting
    try:
        waiting.send("acquire", env={"NEURON_RT_VISIBLE_CORES": "0", "NEURON_RT_ACQUIRE_TIMEOUT": "30"})
        ops.broker.wait_for(lambda d: d.pending, 30, "a waiting acquire")
        status = run(ops.broker, NEURON_BROKER + ["status", "--json"])
        listing = run(ops.broker, NEURON_LS + ["--json"])
    finally:
        waiting.close()
    assert status.returncode == 0 and listing.returncode == 0, status.stderr + listing.stderr
    doc, ls_doc = json.loads(status.stdout), json.loads(listing.stdout)
    jsonschema.validate(doc, schemas.load("status"))
    jsonschema.validate(ls_doc, schemas.load("ls"))
    assert doc["schema"] == ls_doc["schema"] == 2
    assert doc["timestamp"].endswith("Z") and ls_doc["timestamp"].endswith("Z")
    assert doc["pending"] and doc["cores"][0]["owner"]["pid"] == pid and doc["cores"][0]["models"]
    # one set of names: the owner and worker parts are the same in both documents
    for key in ("owner", "worker"):
        a, b = doc["cores"][0][key], ls_doc["cores"][0][key]
        assert set(a) == set(b) and a["pid"] == b["pid"]
    assert doc["cores"][0]["index"] == ls_doc["cores"][0]["index"] == 0
    assert {"lease_age_s", "memory_bytes"} <= set(doc["cores"][0]["owner"]) | set(doc["cores"][0]["worker"])


def test_ls_without_broker_says_how_to_start(tmp_path):
    env = dict(os.environ, NEURON_BROKER_DIR=str(tmp_path / "none"))
    out = subprocess.run(NEURON_LS, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=ROOT)
    assert out.returncode == 1 and "neuron-broker start" in out.stderr


# -- neuron-top ----------------------------------------------------------------------------------------------------


def test_top_fits_80_columns_keeping_owners_and_models():
    """A frame at 80 columns drops the bar, the USS column and the history, never owners or models, and keeps the
    part of a command that tells owners apart; at 160 everything is there."""
    from rich.console import Console

    from broker import top
    from tests.helpers import sample_status_doc

    cmd = "/opt/venv/bin/python -u /srv/app/serve_embeddings.py --port 8080 --model-dir /models/minilm --batch 32"
    before, after = sample_status_doc(cmd), sample_status_doc(cmd)
    after.cores[0].perf.busy_s, after.cores[0].requests = 0.5, 40
    view = top.View()
    view.record({0: top.CoreRate(0.25, 1.0)})
    frames = {}
    for width in (80, 160):
        con = Console(width=width, no_color=True, highlight=False)
        with con.capture() as cap:
            con.print(top.frame(top.Sample(before, 0.0), top.Sample(after, 1.0), width, view=view,
                                memory={7: (30 << 20, 20 << 20)}))
        frames[width] = cap.get()
        assert max(len(line) for line in frames[width].splitlines()) <= width, frames[width]
    core80 = next(line for line in frames[80].splitlines() if line.startswith("nc0"))
    assert "4242 serve_embeddings.py" in core80 and "m.pt" in core80 and "50%" in core80 and "30.0MiB" in core80
    assert "[|" not in frames[80] and "USS" not in frames[80]
    core160 = next(line for line in frames[160].splitlines() if line.startswith("nc0"))
    assert "[|||||     ]" in core160 and "20.0MiB" in core160 and "--batch 32" in core160
    assert "HISTORY" in frames[160] and "▃" in core160


def test_an_owner_is_shown_by_what_tells_it_apart():
    from broker.status import distinguishing

    assert distinguishing("/usr/bin/python3 -u -W ignore -X dev /srv/app/serve.py --port 1") == "serve.py --port 1"
    assert distinguishing("/opt/venv/bin/python -m app.serve --port 1") == "app.serve --port 1"
    assert distinguishing("/usr/local/bin/gunicorn app:wsgi") == "gunicorn app:wsgi"
    assert distinguishing("python") == "python"


def test_top_keys():
    from broker import top

    view = top.View(pids=[10, 20])
    assert top.key_presses("s\x1b[Bk?") == ["s", "down", "k", "?"]
    top.handle(view, "s", "/nonexistent")
    assert view.sort == "util"
    top.handle(view, "down", "/nonexistent")
    top.handle(view, "down", "/nonexistent")
    assert view.selected == 1  # not past the last process
    top.handle(view, "r", "/nonexistent")
    assert view.confirm == 20
    top.handle(view, "n", "/nonexistent")  # anything but y cancels
    assert view.confirm == 0 and view.message == "pid 20 keeps its cores"
    top.handle(view, "h", "/nonexistent")
    assert view.help and top.handle(view, "x", "/nonexistent") and not view.help
    assert top.handle(view, "q", "/nonexistent") is False


def test_top_once_prints_cores_and_processes(ops):
    pid = ops.serving().served["pid"]
    out = run(ops.broker, NEURON_TOP + ["--once", "--interval", "0.5"])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "\x1b[" not in text  # no escape codes for scripts
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith("nc")}
    assert sorted(rows) == ["nc0", "nc1", "nc2", "nc3"]
    assert str(pid) in rows["nc0"] and "%" in rows["nc0"] and "affine.pt" in rows["nc0"]
    assert "ms" in rows["nc0"]  # p50/p99 of the calls the app keeps making
    assert "free" in rows["nc3"]
    proc_rows = [line for line in text.splitlines() if line.strip().startswith(str(pid))]
    assert proc_rows and "nc0-nc1" in proc_rows[0]  # the per-process group
    for header in ("UTIL", "HISTORY", "REQ/S", "P50", "P99", "QUEUE", "PSS", "USS"):
        assert header in text


def test_top_live_in_a_terminal_help_sort_release_and_quit(ops, client):
    """The live view through a pseudo-terminal: help screen, sorting, selecting a process and releasing its cores
    (after a y), q; then Ctrl-C in a second one."""
    import pexpect

    pid = ops.serving().served["pid"]
    assert client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "3"})["cores"] == [3]
    env = tool_env(ops.broker, {"TERM": "xterm-256color"})
    env.pop("COLUMNS", None)
    child = pexpect.spawn(NEURON_TOP[0], NEURON_TOP[1:] + ["--interval", "0.3"], env=env, cwd=ROOT,
                          dimensions=(40, 180), timeout=60, encoding="utf-8", codec_errors="replace")
    try:
        child.expect("nc3")  # the core table is on the screen ...
        child.expect(str(pid))  # ... with the owner's pid (as a row and as a process group)
        child.expect("req/s")
        child.send("h")
        child.expect("neuron-top keys")
        child.send("x")  # any key closes the help
        child.expect("HISTORY")
        child.send("s")
        child.expect("sort: util")
        child.send("sss")  # back round to sorting by core: the serving app (nc0-nc1), then the client (nc3)
        child.expect("sort: core")
        child.send("j")
        child.send("r")
        child.expect(f"release pid {client.pid}")
        child.expect(r"\[y/N\]")
        child.send("y")
        child.expect(f"released nc3 of pid {client.pid}")
        ops.broker.wait_for(lambda d: d.cores[3].owner is None and d.cores[0].owner is not None, 10,
                            "nc3 released, nc0 still owned")
        child.send("q")
        child.expect(pexpect.EOF, timeout=20)
        child.close()
        assert child.exitstatus == 0, child.before
    finally:
        if child.isalive():
            child.close(force=True)
    child = pexpect.spawn(NEURON_TOP[0], NEURON_TOP[1:] + ["--interval", "0.3"], env=env, cwd=ROOT,
                          dimensions=(40, 180), timeout=60, encoding="utf-8", codec_errors="replace")
    try:  # Ctrl-C quits as quietly as q
        child.expect("nc3")
        child.sendintr()
        child.expect(pexpect.EOF, timeout=20)
        child.close()
        assert "Traceback" not in child.before and child.exitstatus in (0, 130), child.before
    finally:
        if child.isalive():
            child.close(force=True)


# -- neuron-broker release / drain ---------------------------------------------------------------------------------


def test_release_pid_takes_cores_back(ops, client):
    assert client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "3"})["cores"] == [3]
    m = client.ok("load", path=os.path.join(ops.models_dir, "affine.pt"))["model"]
    client.ok("call", model=m, shape=[2, 4])
    out = run(ops.broker, NEURON_BROKER + ["release", "--pid", str(client.pid)])
    assert out.returncode == 0, out.stderr
    assert f"released nc3 of pid {client.pid}" in out.stdout
    doc = ops.broker.wait_for(lambda d: d.cores[3].owner is None, 5, "nc3 free")
    assert doc.cores[3].state == "free"
    client.ok("lost", wait_s=10)  # wait for the lease thread to hear of it (within ~0.2 s)
    result = client.do("call", model=m, shape=[2, 4])
    assert result.get("error") == "LeaseLostError", result
    assert "operator" in result["message"] and "release --pid" in result["message"]
    again = run(ops.broker, NEURON_BROKER + ["release", "--pid", str(client.pid)])
    assert again.returncode == 1 and "holds no cores" in again.stderr
    families = scrape(ops.port)
    assert sample(families, "neuron_leases_ended", reason="operator") >= 1
    assert sample(families, "neuron_leases_reclaimed") >= 1


def test_drain_refuses_new_leases_and_waits_for_owners(ops, client):
    ops.serving()
    drain = subprocess.Popen(NEURON_BROKER + ["drain", "--timeout", "60"], env=tool_env(ops.broker), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ops.broker.wait_for(lambda d: d.broker.draining, 30, "draining")
        refused = client.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "3"})
        assert refused.get("error") == "BrokerDrainingError" and "draining" in refused["message"], refused
        status = run(ops.broker, NEURON_BROKER + ["status"])
        assert "DRAINING" in status.stdout
        refused = launch(ops, "--nproc", "1", "--first-core", "3", "--", "true")  # checked before any rank starts
        assert refused.returncode == 2 and "is draining" in refused.stderr and "drain --cancel" in refused.stderr
        assert drain.poll() is None  # still waiting for the serving app
        ops.app.kill()
        out, err = drain.communicate(timeout=60)
        assert drain.returncode == 0, err
        assert "waiting" in out and str(ops.app.pid) in out and "drained" in out
        assert "keeps refusing new leases until 'neuron-broker drain --cancel'" in out
    finally:
        if drain.poll() is None:
            drain.kill()
            drain.communicate()
        run(ops.broker, NEURON_BROKER + ["drain", "--cancel"])
    assert not ops.broker.status().broker.draining


# -- metrics -------------------------------------------------------------------------------------------------------


def test_metrics_endpoint(ops):
    pid = ops.serving().served["pid"]
    ops.broker.wait_for(lambda d: d.cores[0].requests > 0 and d.cores[0].perf.window > 0, 10,
                        "calls counted on nc0")
    families = scrape(ops.port)
    assert sample(families, "neuron_broker_cores", backend="cpu") == 4
    assert sample(families, "neuron_core_owned", core="0") == 1 and sample(families, "neuron_core_owned", core="2") == 0
    assert sample(families, "neuron_core_state", core="2", state="free") == 1
    owner = [s for s in families["neuron_core_owner_info"].samples if s.labels["core"] == "1"]
    assert owner and owner[0].labels["pid"] == str(pid)
    assert sample(families, "neuron_core_requests", "neuron_core_requests_total", core="0") > 0
    assert sample(families, "neuron_core_busy_seconds", "neuron_core_busy_seconds_total", core="0") > 0
    count = sample(families, "neuron_core_request_duration_seconds", "neuron_core_request_duration_seconds_count",
                   core="0")
    inf = sample(families, "neuron_core_request_duration_seconds", "neuron_core_request_duration_seconds_bucket",
                 core="0", le="+Inf")
    assert count > 0 and inf == count
    assert sample(families, "neuron_core_latency_seconds", core="0", quantile="0.99") > 0
    assert sample(families, "neuron_worker_memory_bytes", core="0") > 0
    assert sample(families, "neuron_model_loads", "neuron_model_loads_total", core="0") >= 1
    assert sample(families, "neuron_model_load_seconds", "neuron_model_load_seconds_total", core="0") > 0
    assert sample(families, "neuron_leases_granted") >= 1
    assert {s.labels["reason"] for s in families["neuron_leases_ended"].samples} == {
        "released", "owner_exited", "owner_stopped", "worker_failed", "broker_restart", "operator"}
    assert sample(families, "neuron_process_cores", pid=str(pid)) == 2
    assert "process_resident_memory_bytes" in {s.name for f in families.values() for s in f.samples}
    assert ops.broker.status().broker.metrics == f"http://127.0.0.1:{ops.port}/metrics"
    assert families["neuron_core_latency_seconds"].type == "summary"
    assert sample(families, "neuron_model_requests", "neuron_model_requests_total", model="affine.pt", core="0") > 0
    assert sample(families, "neuron_worker_restarts", "neuron_worker_restarts_total", core="0") == 0
    assert sample(families, "neuron_build_info", "neuron_build_info") == 1
    promtool = shutil.which("promtool")
    if promtool:  # the real endpoint's text, with the broker's process_* metrics
        checked = subprocess.run([promtool, "check", "metrics"], input=scrape_text(ops.port), capture_output=True,
                                 text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


# -- neuron-run ----------------------------------------------------------------------------------------------------


def launch(ops, *args, timeout_s: float = CLI_TIMEOUT_S, env=None) -> subprocess.CompletedProcess:
    return run(ops.broker, NEURON_RUN + list(args), timeout_s, env)


def test_run_gives_each_rank_its_own_cores(ops, tmp_path):
    ops.serving()  # nc0-nc1 are taken: the ranks start at nc2
    marker = tmp_path / "go"
    proc = subprocess.Popen(NEURON_RUN + ["--nproc", "2", "--first-core", "2", "--", *RANKS, "env", str(marker)],
                            env=tool_env(ops.broker), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        progress = []
        for line in proc.stderr:  # the launcher's progress, as a person sees it
            progress.append(line)
            if "processes ready" in line:
                break
        marker.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(progress) + err
    assert proc.returncode == 0, err
    assert "[neuron-run] starting 2 processes on cores 2-3" in err
    assert "all 2 processes ready: they hold nc2-nc3" in err
    assert "[rank 0] to stderr from rank 0" in err and "[rank 1] to stderr from rank 1" in err
    lines = out.splitlines()
    assert all(line.startswith(("[rank 0] ", "[rank 1] ")) for line in lines), lines
    envs = {int(e["RANK"]): e for e in (json.loads(line.split(" env ", 1)[1]) for line in lines if " env " in line)}
    owned = {int(line[6]): json.loads(line.split(" owned ", 1)[1]) for line in lines if " owned " in line}
    assert owned == {0: [2], 1: [3]}  # disjoint, K=1 consecutive cores per rank
    assert envs[0]["NEURON_RT_VISIBLE_CORES"] == "2" and envs[1]["NEURON_RT_VISIBLE_CORES"] == "3"
    assert all(e["WORLD_SIZE"] == "2" and e["LOCAL_RANK"] == e["RANK"] for e in envs.values())
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]


def test_run_failure_stops_the_others_and_propagates_the_code(ops, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    out = launch(ops, "--nproc", "3", "--first-core", "2", "--cores-per-proc", "0", "--", "true")
    assert out.returncode == 2  # a bad request is refused before anything starts
    # these ranks own no cores; the acquire timeout lets the launch go ahead while the serving app holds two
    out = launch(ops, "--nproc", "3", "--num-cores", "1", "--stop-timeout", "5", "--",
                 *RANKS, "fail", "1", "7", str(pids), env={"NEURON_RT_ACQUIRE_TIMEOUT": "5"})
    assert out.returncode == 7, out.stderr
    assert "[rank 1] failing now" in out.stdout
    assert "rank 1" in out.stderr and "failed with exit code 7" in out.stderr and "stopping the other 2" in out.stderr
    summary = out.stderr.split("failure summary: ", 1)[1]  # each failed rank, its code, its stderr's last lines
    assert summary.startswith("1 of 3 rank(s) failed; rank 1 failed for good")
    assert "rank 1 (attempt 1): exit code 7 (exit code 7)" in summary and "| rank 1 gives up: exit 7" in summary
    for rank in (0, 2):
        pid = int((pids / f"rank{rank}.pid").read_text())
        assert not alive(pid), f"rank {rank} (pid {pid}) still runs"


def test_run_restarts_a_failed_process(ops, tmp_path):
    logs = tmp_path / "logs"
    out = launch(ops, "--nproc-per-node", "2", "--first-core", "2", "--max-restarts", "1", "--log-dir", str(logs),
                 "--tee", "--", *RANKS, "flaky", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):  # --log-dir: per-rank files, appended across the restart; --tee: on the terminal too
        stdout = (logs / f"rank{rank}" / "stdout.log").read_text()
        stderr = (logs / f"rank{rank}" / "stderr.log").read_text()
        assert "attempt 1 ---" in stdout and "attempt 2 ---" in stdout
        assert "first attempt fails (restarts=0)" in stdout and "second attempt succeeds (restarts=1)" in stdout
        assert f"rank {rank} fails on purpose" in stderr and "[rank" not in stdout
    for rank in (0, 1):
        assert f"[rank {rank}] first attempt fails (restarts=0)" in out.stdout
        assert f"[rank {rank}] second attempt succeeds (restarts=1)" in out.stdout
        assert f"rank {rank} (pid" in out.stderr
    assert out.stderr.count("restarting it (restart 1 of 1)") == 2
    assert "all 2 processes finished successfully" in out.stderr
    # without restarts left, the same failure ends the launch with the child's code; --log-dir alone: files only
    (tmp_path / "fresh").mkdir()
    out = launch(ops, "--nproc", "1", "--first-core", "2", "--log-dir", str(tmp_path / "quiet"), "--", *RANKS,
                 "flaky", str(tmp_path / "fresh"))
    assert out.returncode == 3, out.stderr
    assert "[rank 0]" not in out.stdout + out.stderr.split("failure summary")[0]
    assert f"its output: {tmp_path / 'quiet' / 'rank0'}/" in out.stderr and "| rank 0 fails on purpose" in out.stderr


def test_run_forwards_signals(ops, tmp_path):
    proc = subprocess.Popen(NEURON_RUN + ["--nproc", "2", "--first-core", "2", "--", *RANKS, "signals", str(tmp_path)],
                            env=tool_env(ops.broker), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        seen = 0
        for line in proc.stdout:
            seen += "waiting for a signal" in line
            if seen == 2:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "[rank 0] got SIGINT" in out and "[rank 1] got SIGINT" in out
    assert "forwarded" in err


def test_run_too_many_cores_fails_before_starting(ops, tmp_path):
    out = launch(ops, "--nproc", "3", "--cores-per-proc", "2", "--", *RANKS, "flaky", str(tmp_path))
    assert out.returncode == 2
    assert "needs cores nc0-nc5" in out.stderr and "has 4 cpu cores" in out.stderr
    assert "--cores" in out.stderr  # says what to do
    assert os.listdir(tmp_path) == []  # no process ran
    out = launch(ops, "--nproc", "5", "--num-cores", "1", "--", "true")
    assert out.returncode == 2 and "needs 5 cores" in out.stderr
    busy = launch(ops, "--nproc", "2", "--", "true")  # nc0-nc1 are held by the serving app (when it runs)
    if ops.app is not None and ops.app.alive():
        assert busy.returncode == 2 and f"held by pid {ops.app.pid}" in busy.stderr
