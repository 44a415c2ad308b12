"""Faults with real processes (issue 8): workers dying, the broker killed and restarted, bad input of every kind,
and who may use the broker's directory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from neuron_client.wire import codec, comm as transport, messages
from neuron_client.wire.broker_client import BrokerClient
from tests.helpers import ROOT, BrokerProc


def test_worker_killed_under_a_call_fails_fast_and_recovers(fresh_broker, apps, tmp_path):
    b = fresh_broker(2)
    app = apps(b)
    app.ok("acquire", env={"NEURON_RT_NUM_CORES": "1"})
    m = app.ok("load", path=app.ok("save", name="slower", directory=str(tmp_path))["path"])
    x = [{"rand": [256, 256], "seed": 0}]
    expected = app.ok("call", model=m["model"], args=x, keep=True, timeout_s=120)["output"]
    core = m["cores"][0]
    worker_pid = app.ok("worker", core=core)["pid"]
    app.send("stream", model=m["model"], args=x, times=50)  # long calls; the worker is killed under one of them
    time.sleep(0.5)  # inside the stream of long calls
    os.kill(worker_pid, signal.SIGKILL)
    out = app.read(120)
    error = out["error"]
    assert error is not None and error["error"] == "WorkerUnavailableError", out
    assert f"neuroncore {core}" in error["message"] and "SIGKILL" in error["message"]
    assert out["seconds"] < 10  # at once, not after the 600 s call timeout
    # the next call succeeds on a fresh worker, without the user doing anything
    again = app.ok("call", model=m["model"], args=x, same_as=expected, timeout_s=120)
    assert again["same"]
    assert app.ok("worker", core=core)["pid"] != worker_pid
    assert any("fresh worker" in w and "loaded on it again" in w for w in again.get("warnings", [])), again
    doc = b.status().cores[core]
    assert doc.worker.restarts == 1 and "SIGKILL" in doc.worker.last_exit


def test_broker_kill_9_and_restart_keeps_live_owners(tmp_path, apps, models_dir):
    directory = str(tmp_path / "b")
    first = BrokerProc(directory, 4)
    second = None
    try:
        holder, other = apps(first, wait=False), apps(first, wait=False)  # both talk to the broker in `directory`
        assert holder.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "0-1"})["cores"] == [0, 1]
        m = holder.ok("load", path=os.path.join(models_dir, "affine.pt"), context="multicore")["model"]
        holder.ok("call", model=m, shape=[2, 4])
        before = [w["pid"] for w in holder.ok("secrets")["workers"].values()]
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        second = BrokerProc(directory, 4)  # an operator starts it again
        doc = second.status()
        assert doc.cores[0].owner.pid == holder.pid  # restored from the journal
        out = other.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "1-2"})
        assert out.get("error") == "NeuronCoreUnavailableError" and f"held by pid {holder.pid}" in out["message"], out
        time.sleep(2.5)  # past the lease timeout: the owner's heartbeats reached the new broker
        after = holder.ok("call", model=m, args=[{"rand": [2, 4]}], ref="affine", times=4)
        assert after["same"]
        assert holder.ok("lost")["lost"] is None
        now = holder.ok("secrets")
        assert now["cores"] == [0, 1]
        assert {w["pid"] for w in now["workers"].values()}.isdisjoint(before)  # new workers, models loaded again
        assert any("loaded on it again" in w for w in after.get("warnings", [])), after
        assert second.owners()[0] == holder.pid
        holder.kill()
        second.wait_for(lambda d: d.cores[0].owner is None, 5, "cores freed after the owner died")
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_bad_model_files(client, models_dir, tmp_path):
    """Missing, truncated, non-TorchScript and hostile model files: clear errors, nothing executed."""
    import io
    import pickle
    import zipfile

    client.ok("acquire", env={"NEURON_RT_NUM_CORES": "1"})
    good = os.path.join(models_dir, "affine.pt")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = io.BytesIO()
    with zipfile.ZipFile(hostile, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps(Evil(), protocol=2))
        z.writestr("archive/version", "3\n")
    data = open(good, "rb").read()
    cases = {"truncated": data[: len(data) // 2], "not_torchscript": os.urandom(4096), "hostile": hostile.getvalue()}
    out = client.do("load", path=str(tmp_path / "no-such-model.pt"))
    assert out.get("error") == "ModelLoadError" and "does not exist" in out["message"], out
    for case, content in cases.items():
        (tmp_path / f"{case}.pt").write_bytes(content)
        out = client.do("load", path=str(tmp_path / f"{case}.pt"))
        assert out.get("error") == "ModelLoadError" and "could not load" in out["message"], (case, out)
    assert not marker.exists()  # the pickle payload did not run
    m = client.ok("load", path=good)["model"]  # the worker still serves
    assert client.ok("call", model=m, args=[{"rand": [2, 4]}], ref="affine")["same"]


# -- bad bytes on the sockets -------------------------------------------------------------------------------------

def _exchange(endpoint: str, frames, timeout_s: float = 5.0):
    sock = transport.dealer(endpoint)
    try:
        sock.send_multipart(frames)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return sock.recv_multipart()
    finally:
        sock.close(linger=0)


def _is_error_reply(reply) -> bool:
    env = codec.decode(reply)
    return isinstance(env.msg, messages.Error)


HEADER = {"v": messages.PROTOCOL_VERSION, "op": "status", "id": 7, "body": {}}
CASES = {
    "random bytes": [os.urandom(64)],
    "empty frame": [b""],
    "not a map": [msgpack.packb([1, 2, 3])],
    "wrong version": [msgpack.packb(dict(HEADER, v=99))],
    "unknown op": [msgpack.packb(dict(HEADER, op="format_disk"))],
    "missing field": [msgpack.packb(dict(HEADER, op="heartbeat"))],
    "wrong field type": [msgpack.packb(dict(HEADER, op="heartbeat", body={"lease_id": 5}))],
    "extra frame": [msgpack.packb(HEADER), b"extra"],
    "truncated header": [msgpack.packb(HEADER)[:-3]],
    "oversized": [msgpack.packb(dict(HEADER, body={"x": "y" * (2 << 20)}))],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broker_answers_bad_messages_with_errors(broker, case):
    reply = _exchange(broker.address, CASES[case])
    assert reply is not None and _is_error_reply(reply), case
    with broker.client() as client:
        assert client.ping(5) is not None


def _call_frames(tensor_ref, data: bytes, **body):
    header = {"v": messages.PROTOCOL_VERSION, "op": "call", "id": 3,
              "body": {"token": "x", "model_id": 1, "args": msgpack.ExtType(codec.EXT_TUPLE, msgpack.packb([
                  msgpack.ExtType(codec.EXT_TENSOR, msgpack.packb(tensor_ref))])), **body}}
    return [msgpack.packb(header), data]


WORKER_CASES = {
    "header and data disagree": _call_frames([1, "float32", [4]], b"\0" * 15),
    "bad dtype": _call_frames([1, "float128", [2]], b"\0" * 32),
    "negative shape": _call_frames([1, "float32", [-1]], b""),
    "missing frame": _call_frames([2, "float32", [1]], b"\0" * 4),
    "hostile shm name": [msgpack.packb({"v": 1, "op": "call", "id": 4, "body": {
        "token": "x", "model_id": 1, "args": msgpack.ExtType(codec.EXT_SHM_TENSOR,
                                                             msgpack.packb(["../../etc/passwd", 0, "uint8", [4]]))}})],
    "not the owner": _call_frames([1, "float32", [1]], b"\0" * 4),
}


@pytest.mark.parametrize("case", sorted(WORKER_CASES))
def test_worker_answers_bad_messages_with_errors(broker, case):
    endpoint = f"ipc://{broker.directory}/core-7.sock"
    reply = _exchange(endpoint, WORKER_CASES[case])
    assert reply is not None and _is_error_reply(reply), case
    env = codec.decode(reply)
    assert env.req_id in (3, 4)  # the error echoes the request id
    assert broker.status().cores[7].worker.ready


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.binary(max_size=256), min_size=1, max_size=4))
def test_fuzz_broker_and_worker_sockets(broker8, frames):
    for endpoint in (broker8.address, f"ipc://{broker8.directory}/core-6.sock"):
        reply = _exchange(endpoint, frames)
        assert reply is not None and _is_error_reply(reply)


def test_fuzzed_processes_are_still_alive(broker8):
    doc = broker8.status()
    assert all(c.worker.ready for c in doc.cores)
    assert all(c.worker.restarts == 0 for c in doc.cores)


def test_broker_refuses_a_directory_others_can_write(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    out = subprocess.run([sys.executable, "-m", "broker", "start", "--foreground", "--dir", str(d), "--cores", "1"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=dict(os.environ, NEURON_BROKER_DIR=str(d)))
    assert out.returncode != 0
    assert "writable by others" in out.stderr and "chmod 700" in out.stderr
    assert not os.path.exists(d / "broker.sock")


# -- who may talk to the broker -----------------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_only_when_asked_and_only_with_curve(fresh_broker, tmp_path, monkeypatch):
    import stat

    import zmq
    import zmq.auth

    plain = fresh_broker(1)
    assert not os.path.exists(os.path.join(plain.directory, "curve"))  # no TCP unless asked
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    b = fresh_broker(1, extra=["--listen", endpoint])
    keys = os.path.join(b.directory, "curve")
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(keys, "server.key_secret")).st_mode) == 0o600

    # an authorised operator (the client key pair the broker created) reads status over TCP
    env = dict(b.env, NEURON_BROKER_ADDRESS=endpoint, NEURON_BROKER_KEYS=keys)
    out = subprocess.run([sys.executable, "-m", "broker", "status", "--json"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert '"cores": 1' in out.stdout

    # anything else over TCP is refused with an error reply
    monkeypatch.setenv("NEURON_BROKER_KEYS", keys)
    with BrokerClient(endpoint) as client:
        with pytest.raises(Exception, match="over TCP the broker answers ping, status only"):
            client.request(messages.Acquire(pid=os.getpid(), create_time=0.0, cmd="x"), 5)
        with pytest.raises(Exception, match="over TCP the broker answers ping, status only"):
            client.drain()

    # a key pair the broker has not authorised gets no answer at all
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    zmq.auth.create_certificates(str(stranger), "client")
    with open(os.path.join(keys, "server.key"), "rb") as f:
        (stranger / "server.key").write_bytes(f.read())
    monkeypatch.setenv("NEURON_BROKER_KEYS", str(stranger))
    with BrokerClient(endpoint) as client:
        assert client.ping(2.0) is None

    # nor does a client without CURVE
    sock = transport.context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(codec.encode(messages.Ping(), 1))
        assert not sock.poll(2000)
    finally:
        sock.close()
    assert b.status().broker.cores == 1  # and the broker carries on
