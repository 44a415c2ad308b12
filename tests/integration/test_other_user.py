"""Attacks by another local user, with real processes: a broker directory planted where the victim will look for its
own (a directory, a pid file and a listening socket, or a symlink to the attacker's directory) is refused before the
victim reads or sends anything there (#11); a ``broker`` package planted in the victim's working directory never runs
when the client starts a broker (#12).

The planting tests create a second local user (``useradd``), so they need root (CI runs as root) and skip otherwise.
The shared directory is a fresh sticky, world-writable one (like /tmp), never the real /tmp/neuron-broker-$UID.
"""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from neuron_client.runtime import autostart
from neuron_client.wire import config
from neuron_client.wire.errors import NeuronRuntimeError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMAND_TIMEOUT_S = 30

CLIENT = """
import json
import neuron_client
try:
    rt = neuron_client.get_runtime()
    print(json.dumps({"ok": True, "cores": rt.cores}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
"""


def victim_env(directory: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NEURON_BROKER_ADDRESS", "NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES")}
    env.update(NEURON_BROKER_DIR=directory, NEURON_BROKER_AUTOSTART="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def run_client(directory: str, cwd: str = ROOT, **env) -> dict:
    """A victim's client process asking for cores (autostart on); its one JSON line."""
    done = subprocess.run([sys.executable, "-c", CLIENT], env=victim_env(directory, **env), cwd=cwd,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"client printed nothing (exit {done.returncode}); stderr:\n{done.stderr[-3000:]}"
    return json.loads(lines[-1])


# -- another local user --------------------------------------------------------------------------------------------


class Attacker:
    def __init__(self, name: str):
        self.name = name
        entry = pwd.getpwnam(name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid

    def run(self, script: str) -> None:
        """Run a shell script as this user (no supplementary groups, a plain environment)."""
        subprocess.run(["/bin/sh", "-c", script], user=self.uid, group=self.gid, extra_groups=[], cwd="/",
                       env={"PATH": "/usr/bin:/bin"}, check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S)


@pytest.fixture
def attacker():
    """A fresh second local user, deleted at teardown even if the test failed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second local user (useradd) that plants files for the victim")
    if not (shutil.which("useradd") and shutil.which("userdel")):
        pytest.skip("needs useradd and userdel to create a second local user")
    shell = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false") if os.path.exists(s)), "/bin/false")
    name = f"nrt-attacker-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-M", "-s", shell, name], check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S)
    try:
        yield Attacker(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=COMMAND_TIMEOUT_S)


@pytest.fixture
def shared():
    """A fresh directory every user can write, sticky like /tmp; removed at teardown."""
    d = tempfile.mkdtemp(prefix="nrt-shared-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class FakeBroker:
    """A listening unix socket where the victim's broker socket would be: it records whether anyone connected."""

    def __init__(self, path: str, owner: Attacker):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chown(path, owner.uid, owner.gid)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def was_contacted(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True

    def close(self) -> None:
        self.sock.close()


def assert_refused(message: str, directory: str, attacker: Attacker, why: str) -> None:
    assert f"refusing broker directory {directory}" in message, message
    assert why in message and f"uid {attacker.uid} ({attacker.name})" in message, message
    assert f"{config.ENV_BROKER_DIR}=" in message and f"remove {directory}" in message, message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("planted_mode", ["0777", "0700"])
def test_a_directory_planted_by_another_user_is_refused(attacker, shared, planted_mode):
    directory = os.path.join(shared, f"neuron-broker-{os.getuid()}")
    attacker.run(f"mkdir -m {planted_mode} {directory} && echo {os.getpid()} > {directory}/broker.pid")
    fake = FakeBroker(os.path.join(directory, "broker.sock"), attacker)
    try:
        with pytest.raises(NeuronRuntimeError) as info:
            config.ensure_private_dir(directory)
        assert_refused(str(info.value), directory, attacker, "not yours")
        reply = run_client(directory)
        assert not reply["ok"] and reply["error"] == "NeuronRuntimeError", reply
        assert_refused(reply["message"], directory, attacker, "not yours")
        time.sleep(0.2)  # a connect would already be queued on the listening socket
        assert not fake.was_contacted(), "the victim talked to the planted socket"
    finally:
        fake.close()
    assert sorted(os.listdir(directory)) == ["broker.pid", "broker.sock"]  # no log, no lock: nothing started there
    st = os.lstat(directory)
    assert st.st_uid == attacker.uid and f"{stat.S_IMODE(st.st_mode):04o}" == planted_mode  # and nothing changed


@pytest.mark.timeout(60)
def test_a_symlink_planted_by_another_user_is_refused(attacker, shared):
    directory = os.path.join(shared, f"neuron-broker-{os.getuid()}")
    theirs = os.path.join(shared, "attacker-owned")
    attacker.run(f"mkdir -m 0777 {theirs} && ln -s {theirs} {directory}")
    with pytest.raises(NeuronRuntimeError) as info:
        config.ensure_private_dir(directory)
    assert_refused(str(info.value), directory, attacker, "a symbolic link")
    reply = run_client(directory)
    assert not reply["ok"], reply
    assert_refused(reply["message"], directory, attacker, "a symbolic link")
    assert os.listdir(theirs) == [], "the victim created files in the attacker's directory"
    assert stat.S_IMODE(os.lstat(theirs).st_mode) == 0o777 and os.lstat(theirs).st_uid == attacker.uid


@pytest.mark.timeout(60)
def test_a_directory_inside_one_of_another_user_is_refused(attacker, shared):
    """The attacker owns the parent (as with ``broker_dir() + '-ray'``): they could swap what we create in it."""
    parent = os.path.join(shared, f"neuron-broker-{os.getuid()}-ray")
    attacker.run(f"mkdir -m 0777 {parent}")
    directory = os.path.join(parent, "node-1")
    with pytest.raises(NeuronRuntimeError) as info:
        config.ensure_private_dir(directory)
    message = str(info.value)
    assert f"its parent {parent} is not yours" in message and attacker.name in message, message


# -- a broker package planted in the working directory -------------------------------------------------------------


def plant_broker_package(cwd: str, marker: str) -> None:
    """``broker/__init__.py`` and ``broker/__main__.py`` that, if ever imported, create ``marker`` and exit."""
    os.makedirs(os.path.join(cwd, "broker"))
    code = f"open({marker!r}, 'w').write('pwned'); raise SystemExit(0)\n"
    for name in ("__init__.py", "__main__.py"):
        with open(os.path.join(cwd, "broker", name), "w") as f:
            f.write(code)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [sys.version_info[:2], (3, 10)], ids=["this-python", "before-3.11"])
def test_the_broker_command_ignores_a_planted_package(tmp_path, version):
    cwd, marker = str(tmp_path / "cwd"), str(tmp_path / "marker")
    plant_broker_package(cwd, marker)
    env = victim_env(str(tmp_path / "d"))
    plain = subprocess.run([sys.executable, "-m", "broker", "--help"], cwd=cwd, env=env, capture_output=True,
                           timeout=COMMAND_TIMEOUT_S)
    assert plain.returncode == 0 and os.path.exists(marker), "the planted package should shadow a plain -m broker"
    os.unlink(marker)
    env["PYTHONPATH"] = autostart.safe_pythonpath(env["PYTHONPATH"])
    done = subprocess.run([*autostart.broker_command(version), "--help"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0 and "neuron-broker" in done.stdout, done.stderr
    assert not os.path.exists(marker)


def test_safe_pythonpath():
    assert autostart.safe_pythonpath(f"/a{os.pathsep}{os.pathsep}rel{os.pathsep}") == \
        f"/a{os.pathsep}{os.path.abspath('rel')}"


def stop_broker(directory: str) -> None:
    pid = autostart.running_pid(directory)
    subprocess.run([sys.executable, "-m", "broker", "stop", "--dir", directory], cwd=ROOT, env=victim_env(directory),
                   capture_output=True, timeout=COMMAND_TIMEOUT_S)
    if pid:
        try:
            os.killpg(pid, signal.SIGKILL)  # the broker's session: its workers too
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.timeout(90)
def test_autostart_from_a_planted_working_directory_starts_the_real_broker(tmp_path):
    cwd, marker = str(tmp_path / "cwd"), str(tmp_path / "marker")
    plant_broker_package(cwd, marker)
    directory = str(tmp_path / "broker")
    try:
        reply = run_client(directory, cwd=cwd, NEURON_RT_NUM_CORES="1")
        assert reply["ok"] and len(reply["cores"]) == 1, reply
        assert not os.path.exists(marker), "the planted broker package ran"
        pid = autostart.running_pid(directory)
        assert pid, "no broker runs in the directory"
        assert os.readlink(f"/proc/{pid}/cwd") == directory  # not the caller's working directory
    finally:
        stop_broker(directory)


# -- the lease link checks the uid at both ends (SO_PEERCRED) ---------------------------------------------------------

# the attacker cannot run the test's interpreter (it may live under /root): a system one, standard library only
PLAIN_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)


def plain_python():
    if PLAIN_PYTHON is None:
        pytest.skip("needs a system python3 that another user can run")
    return PLAIN_PYTHON


@pytest.mark.timeout(60)
def test_client_sends_nothing_to_a_lease_socket_of_another_user(attacker, shared):
    """Even inside a directory of ours, a lease socket bound by another user gets nothing from the client."""
    import pathlib

    from neuron_client.wire import lease_link
    from neuron_client.wire.errors import BrokerUnavailableError

    d = pathlib.Path(shared) / "victim"
    d.mkdir(mode=0o700)
    got = pathlib.Path(shared) / "got"
    os.chmod(d, 0o777)  # only so that the attacker can bind there; 0700 again before the victim connects
    got.write_bytes(b"")
    os.chmod(got, 0o666)
    listener = subprocess.Popen(
        [plain_python(), "-c",
         "import socket, sys\n"
         "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(4); print('up', flush=True)\n"
         "c, _ = s.accept(); c.settimeout(3)\n"
         "data = b''\n"
         "try:\n"
         "    while True:\n"
         "        chunk = c.recv(4096)\n"
         "        if not chunk: break\n"
         "        data += chunk\n"
         "except OSError: pass\n"
         "open(sys.argv[2], 'ab').write(b'connected:' + data)\n",
         lease_link.lease_socket_path(str(d)), str(got)],
        user=attacker.uid, group=attacker.gid, extra_groups=[], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "up"
        os.chmod(d, 0o700)
        with pytest.raises(BrokerUnavailableError, match=f"runs as uid {attacker.uid}"):
            lease_link.LeaseLink(str(d), 5.0)
        listener.wait(10)
        assert got.read_bytes() == b"connected:"  # it saw a connection and not one byte
    finally:
        listener.kill()
        listener.wait(5)


@pytest.mark.timeout(120)
def test_broker_refuses_a_lease_link_from_another_user(attacker, shared):
    """A lease link from another uid is closed before it is read: no grant, nothing in status."""
    from tests.helpers import BrokerProc

    b = BrokerProc(os.path.join(shared, "b"), 1)
    try:
        os.chmod(b.directory, 0o711)  # let the attacker reach the socket (the broker checked the mode at start)
        sock_path = os.path.join(b.directory, "lease.sock")
        os.chmod(sock_path, 0o777)
        from neuron_client.wire import lease_link, messages

        frame = lease_link.pack(messages.Acquire(cmd="x"), 1).hex()
        script = ("import socket, sys\n"
                  "s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
                  "try:\n"
                  "    s.sendall(bytes.fromhex(sys.argv[2]))\n"
                  "    print(repr(s.recv(65536)))\n"
                  "except OSError as exc:\n"
                  "    print('closed', exc)\n")
        out = subprocess.run([plain_python(), "-c", script, sock_path, frame], user=attacker.uid, group=attacker.gid,
                             extra_groups=[], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() in ("b''",) or out.stdout.startswith("closed"), out
        doc = b.status()
        assert doc.cores[0].owner is None and doc.leases == []
        assert f"uid {attacker.uid}" in b.read_log()
    finally:
        b.stop()
