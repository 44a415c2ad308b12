"""The co-located fast path (neuron_client.wire.mailbox): calls go through a per-(thread, core) mailbox by default,
with the socket path's results and errors; only the core's owner, with its lease's token, gets one; a stopped or
dead peer never holds the other beyond the call timeout."""
from __future__ import annotations

import os
import select
import signal
import socket
import time

import msgpack
import pytest

from neuron_client.wire import config, mailbox

SOCKET = {"NEURON_FAST_PATH": "0"}


def test_calls_take_the_mailbox_with_the_socket_paths_results_and_errors(client, models_dir):
    client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "3"})
    nested = client.ok("load", path=os.path.join(models_dir, "nested.pt"))["model"]
    affine = client.ok("load", path=os.path.join(models_dir, "affine.pt"))["model"]
    gather = client.ok("load", path=os.path.join(models_dir, "gather.pt"))["model"]
    nested_args = [{"rand": [3]}, {"a": {"rand": [3]}}, [{"rand": [2, 2]}, {"arange": 5, "dtype": "int32"}]]
    for env in ({}, SOCKET):
        # a structured call (frames in the mailbox) and a flat one (the lean format), each as the model runs here
        a = client.ok("call_in_thread", model=nested, ref="nested", args=nested_args, env=env)
        b = client.ok("call_in_thread", model=affine, ref="affine", args=[{"rand": [2, 4]}], times=3, env=env)
        assert a["same"] and b["same"]
        assert a["kinds"] == {"tuple": ["tensor", {"dict": {"double": "tensor"}}, {"list": ["tensor", "tensor"]},
                                        "tensor"]}
        fast_calls = b["paths"]["3"]["mailbox_calls"]
        assert fast_calls == (0 if env else 3), b
    # the same errors, word for word, on both paths: a model that raises, and inputs of the wrong shape
    for args in ([{"rand": [4, 3]}, {"tensor": [0, 9]}], [{"rand": [4, 3]}, {"tensor": [0, 1, 2]}]):
        fast = client.do("call_in_thread", model=gather, args=args, env={})
        slow = client.do("call_in_thread", model=gather, args=args, env=SOCKET)
        assert fast["error"] == slow["error"] and fast["message"] == slow["message"], (fast, slow)
    assert fast["error"] == "InputShapeError"
    raised = client.do("call_in_thread", model=gather, args=[{"rand": [4, 3]}, {"tensor": [0, 9]}], env={})
    assert raised["error"] == "ModelExecutionError" and "neuroncore 3" in raised["message"]


def test_a_reply_larger_than_the_mailbox_streams_then_the_mailbox_grows(client, models_dir):
    client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "4"})
    expand = client.ok("load", path=client.ok("save", name="expand", directory=models_dir)["path"])["model"]
    # a 256-byte input whose 512 KiB output is larger than the first mailbox's reply area: the first reply follows
    # on the connection, and the next call's mailbox holds it
    out = client.ok("call", model=expand, ref="expand", args=[{"rand": [1, 64]}], times=3)
    assert out["same"]
    assert out["paths"]["4"]["mailbox_capacity"] > mailbox.CAPACITY_BYTES, out["paths"]


def _hello(address: str, token: str, seal: bool = True):
    """A client's hello to a worker's fast path, from this (test) process; the worker's answer, or None if it
    closed the connection without one."""
    fds = []
    if seal:
        fds.append(mailbox.create_memfd(mailbox.CAPACITY_BYTES))
    else:
        fd = os.memfd_create("x")
        os.posix_fallocate(fd, 0, mailbox.mapping_size(mailbox.CAPACITY_BYTES))
        fds.append(fd)
    fds += [os.eventfd(0), os.eventfd(0)]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(address)
        if not select.select([s], [], [], 0.5)[0]:  # a worker refuses a process not its owner before its hello
            try:
                socket.send_fds(s, [msgpack.packb({"v": mailbox.VERSION, "token": token,
                                                   "capacity": mailbox.CAPACITY_BYTES})], fds)
            except BrokenPipeError:  # refused meanwhile: its answer is there to read
                pass
        data = s.recv(4096)
        return msgpack.unpackb(data) if data else None
    finally:
        s.close()
        for fd in fds:
            os.close(fd)


def test_only_the_owner_with_its_token_gets_a_mailbox(broker, client, models_dir):
    client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "5"})
    affine = client.ok("load", path=os.path.join(models_dir, "affine.pt"))["model"]
    address = mailbox.fast_path_address(broker.directory, 5)
    # another process of the same user (this test), even with a well-formed, sealed mailbox: refused by its pid
    answer = _hello(address, "0" * 64)
    assert answer is not None and not answer["ok"] and "owner only" in answer["message"], answer
    # the owner itself, with a wrong token: refused as on the socket
    wrong = client.do("fast_hello", core=5, token="f" * 64)
    assert wrong["error"] == "NotOwnerError", wrong
    # the owner keeps its own fast path
    own = client.ok("call", model=affine, ref="affine", args=[{"rand": [2, 4]}])
    assert own["same"] and own["paths"]["5"]["mailbox_calls"] == 1, own


def test_a_client_of_another_mailbox_protocol_is_refused_and_keeps_the_socket_path(broker, client, models_dir):
    """Version 2 changed when a doorbell rings (only for a peer that said it blocks): a version-1 peer would wait
    for rings that never come, so a worker takes only its own version's hello, and says which it speaks."""
    client.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "6"})
    assert mailbox.VERSION == 2
    old = client.do("fast_hello", core=6, version=1)
    assert old["error"] == "ProtocolError" and "this worker speaks 2" in old["message"], old
    assert client.ok("fast_hello", core=6)["ok"]  # its own version is taken
    affine = client.ok("load", path=os.path.join(models_dir, "affine.pt"))["model"]
    assert client.ok("call", model=affine, ref="affine", args=[{"rand": [2, 4]}])["same"]


def test_no_memory_for_a_mailbox_is_a_warning_and_the_socket_path(fresh_broker, apps, models_dir):
    b = fresh_broker(1)
    app = apps(b)
    app.ok("acquire")
    m = app.ok("load", path=os.path.join(models_dir, "affine.pt"))["model"]
    app.ok("limit_file_size", nbytes=4096)  # no mailbox (256 KiB) can be reserved from now on
    out = app.ok("call_in_thread", model=m, ref="affine", args=[{"rand": [2, 4]}], times=3, env={})
    assert out["same"] and out["paths"]["0"]["mailbox_calls"] == 0, out
    assert any("no fast path" in w and "cannot reserve" in w for w in out.get("warnings", [])), out


def test_a_client_sends_its_mailbox_only_to_the_cores_worker(tmp_path):
    """A socket planted at the fast path's address (by a process that is not the core's worker) gets nothing."""
    address = str(tmp_path / "core-0.fast")
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    impostor.bind(address)
    impostor.listen(1)
    impostor.settimeout(5)
    try:
        with pytest.raises(Exception, match="not by the core's worker"):
            mailbox.ClientMailbox(address, worker_pid=1, token="0" * 64)  # the broker named pid 1 the worker
        conn, _ = impostor.accept()
        conn.settimeout(2)
        assert conn.recv(4096) == b""  # the client hung up without a byte (and so without a descriptor)
        conn.close()
    finally:
        impostor.close()


def test_a_mailbox_that_could_fault_its_worker_is_refused():
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    try:
        os.posix_fallocate(fd, 0, mailbox.mapping_size(mailbox.CAPACITY_BYTES))
        with pytest.raises(Exception, match="sealed against shrinking"):
            mailbox.check_memfd(fd, mailbox.CAPACITY_BYTES)
        with pytest.raises(Exception, match="must be"):
            mailbox.check_memfd(fd, 2 * mailbox.CAPACITY_BYTES)
    finally:
        os.close(fd)
    sealed = mailbox.create_memfd(mailbox.CAPACITY_BYTES)
    try:
        mailbox.check_memfd(sealed, mailbox.CAPACITY_BYTES)
        with pytest.raises(OSError):  # the seal holds: nobody can shrink it under a mapping
            os.ftruncate(sealed, 4096)
    finally:
        os.close(sealed)


def test_a_stopped_worker_holds_a_call_no_longer_than_its_timeout(fresh_broker, apps, models_dir):
    b = fresh_broker(2)
    app = apps(b, env={"NEURON_CALL_TIMEOUT": "2"})
    app.ok("acquire", env={"NEURON_RT_NUM_CORES": "1"})
    m = app.ok("load", path=os.path.join(models_dir, "affine.pt"))
    core = m["cores"][0]
    assert app.ok("call", model=m["model"], ref="affine", args=[{"rand": [2, 4]}])["paths"][str(core)]["mailbox_calls"]
    pid = app.ok("worker", core=core)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        out = app.do("call", model=m["model"], args=[{"rand": [2, 4]}])
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert out["error"] == "RequestTimeoutError" and f"core {core}" in out["message"], out
    assert took < 30, took  # the 2 s call timeout, not forever
    # the worker, running again, serves the next call through a fresh mailbox (the timed-out one is not reused)
    again = app.ok("call", model=m["model"], ref="affine", args=[{"rand": [2, 4]}])
    assert again["same"] and again["paths"][str(core)]["mailbox_calls"] == 1


def test_a_thread_whose_socket_last_served_a_dead_worker_calls_its_replacement(broker, client, tmp_path):
    """A thread that loaded on a worker, which died, then calls its replacement through a fresh mailbox (another thread
    did the reload) must check the replacement's liveness, not the dead one's: a call outlasting the liveness poll
    (0.25 s) failed, naming the dead worker (seen as a tensor-parallel call failing right after a rank's worker
    was replaced)."""
    app = client
    app.ok("acquire", env={"NEURON_RT_VISIBLE_CORES": "5"})
    m = app.ok("load", path=app.ok("save", name="slowest", directory=str(tmp_path))["path"])["model"]
    assert app.ok("call", model=m, shape=[1024, 1024])["paths"]["5"]["mailbox_calls"] == 1  # this thread's mailbox
    dead = app.ok("worker", core=5)["pid"]
    os.kill(dead, signal.SIGKILL)
    broker.wait_for(lambda d: d.cores[5].worker.pid not in (None, 0, dead) and d.cores[5].worker.ready, 30,
                    "a fresh worker")
    again = app.ok("call_in_thread", model=m, shape=[1024, 1024], env={})  # reloads the model on the fresh worker
    assert "error" not in again, again
    t0 = time.monotonic()
    out = app.do("call", model=m, shape=[1024, 1024])  # the first thread's mailbox to the fresh worker
    took = time.monotonic() - t0
    assert "error" not in out, out
    assert took > config.LIVENESS_POLL_S  # the call outlasted a liveness poll: it was checked while it ran
    assert out["paths"]["5"]["mailbox_calls"] == 1  # through a fresh mailbox
