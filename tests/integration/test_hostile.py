"""The ownership promise under faults and hostile input (issue 14): a core belongs to exactly one live process, and
nothing of one owner reaches another. Real broker, workers and clients; each test names the finding it proves
impossible."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time

import pytest
import torch

from neuron_client.wire import lease_link, messages, shm
from neuron_client.wire.errors import NotOwnerError, ProtocolError
from tests.helpers import ROOT, BrokerProc, worker_request

pytestmark = pytest.mark.timeout(180)


def owner_of(broker, core):
    c = broker.status().cores[core]
    return c.owner.pid if c.owner else None


def endpoint(broker, core):
    return f"ipc://{broker.directory}/core-{core}.sock"


def test_kill_9_owner_then_immediate_acquire_is_never_refused(broker, owners):
    """#3: the moment an owner is reaped its cores are free: an acquire made right after is granted."""
    for _ in range(2):
        a = owners(broker)
        assert a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "2-3"})["cores"] == [2, 3]
        b = owners(broker)  # started (torch imported) before the kill, so it asks right after the reap
        os.kill(a.pid, signal.SIGKILL)
        a.proc.wait(10)  # reaped
        got = b.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "2-3"})
        assert got.get("cores") == [2, 3], got
        b.do("release")


def test_forked_child_does_not_keep_the_parents_lease(broker):
    """A child forked by the owner inherits the lease link; the lease still ends when the owner exits."""
    code = ("import os, time, neuron_client.runtime as r\n"
            "rt = r.get_runtime()\n"
            "if os.fork() == 0:\n"
            "    time.sleep(30); os._exit(0)\n"
            "print('{\"ok\": 1}', flush=True)\n"
            "time.sleep(30)\n")
    env = dict(broker.env, NEURON_RT_VISIBLE_CORES="4", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == '{"ok": 1}'
        assert owner_of(broker, 4) == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        broker.wait_for(lambda d: d.cores[4].owner is None, 10, "core 4 freed although a child lives")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def test_pid_comes_from_the_kernel_not_the_message(broker):
    """#8: an acquire claiming another pid and start time is recorded under the sender's real pid."""
    link = lease_link.LeaseLink(broker.directory, 5.0)
    try:
        granted = link.request(messages.Acquire(cmd="spoof", pid=1, create_time=0.0, visible=[5]), 30)
        assert granted.cores == [5]
        owner = broker.status().cores[5].owner
        assert owner.pid == os.getpid()
    finally:
        link.close()
    broker.wait_for(lambda d: d.cores[5].owner is None, 10, "core 5 freed when the link closed")


def test_free_core_serves_nobody_and_unknown_tokens_are_refused_at_once(broker, owners, models_dir):
    """#5 and #6: no lease, an empty token or a random one gets NotOwnerError at once; the owner is not stalled."""
    data = torch.frombuffer(bytearray(open(os.path.join(models_dir, "affine.pt"), "rb").read()), dtype=torch.uint8)
    for token in ("", "x", os.urandom(16).hex()):
        with pytest.raises(NotOwnerError, match="it is free"):
            worker_request(endpoint(broker, 6), messages.Load(token=token, name="m", data=data), 2.0)
    a = owners(broker)
    a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "6"})
    m = a.do("load", path=os.path.join(models_dir, "affine.pt"))["model"]
    for _ in range(10):  # each would have held the worker 2 s before
        with pytest.raises(NotOwnerError, match="another lease owns it"):
            worker_request(endpoint(broker, 6), messages.Call(token=os.urandom(16).hex(), model_id=1,
                                                              args=(torch.ones(2, 4),)), 1.0)
    assert a.do("call", model=m, shape=[2, 4])["sum"] == 24.0  # a refusal held for 2 s would time out above


def test_journal_holds_no_token(broker, owners):
    """#7: the journal keeps a hash of the token, never the token."""
    a = owners(broker)
    a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "7"})
    secrets = a.do("secrets")
    raw = b""
    for suffix in ("", "-wal"):
        path = os.path.join(broker.directory, "leases.db" + suffix)
        if os.path.exists(path):
            raw += open(path, "rb").read()
    assert secrets["token"].encode() not in raw
    assert hashlib.sha256(secrets["token"].encode()).hexdigest().encode() in raw
    assert secrets["lease_id"].encode() in raw


def test_stolen_token_is_useless_after_its_lease_and_on_other_cores(broker, owners, models_dir):
    """A token read from another process works only on its own lease's cores, and only while the lease lives."""
    a = owners(broker)
    a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "0"})
    stolen = a.do("secrets")["token"]
    b = owners(broker)
    b.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "1"})
    with pytest.raises(NotOwnerError):
        worker_request(endpoint(broker, 1), messages.Call(token=stolen, model_id=1, args=(torch.ones(1),)), 2.0)
    a.do("release")
    broker.wait_for(lambda d: d.cores[0].worker.state == "fresh", 10, "core 0 has a fresh worker")
    with pytest.raises(NotOwnerError, match="it is free"):
        worker_request(endpoint(broker, 0), messages.Call(token=stolen, model_id=1, args=(torch.ones(1),)), 2.0)


def test_worker_writes_only_into_its_owners_segments(broker, owners, models_dir):
    """#9: a call naming another process's segment as its reply segment is refused; that segment is untouched."""
    victim_seg = shm.Segment(shm.new_name(), 1 << 20, create=True)  # this test process plays the victim
    try:
        victim_seg.view(0, 16)[:] = b"V" * 16
        a = owners(broker)
        a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "1"})
        secrets = a.do("secrets")
        model_id = a.do("load", path=os.path.join(models_dir, "big.pt"))["model_ids"][0]  # the worker's id
        big = torch.ones(1024, 1024)
        with pytest.raises(ProtocolError, match="nrt-"):
            worker_request(endpoint(broker, 1), messages.Call(
                token=secrets["token"], model_id=model_id, args=(big,), reply_shm=victim_seg.name,
                reply_shm_size=1 << 20), 10.0)
        assert bytes(victim_seg.view(0, 16)) == b"V" * 16
    finally:
        victim_seg.close()
        victim_seg.unlink()


def test_next_owner_gets_a_fresh_worker(broker, owners, models_dir):
    """#10: nothing of the previous owner survives: another worker process, no models, no state."""
    a = owners(broker)
    a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "2"})
    first_pid = a.do("secrets")["workers"]["2"]["pid"]
    a.do("load", path=os.path.join(models_dir, "affine.pt"))
    a.do("release")
    b = owners(broker)
    b.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "2"})
    second = b.do("secrets")["workers"]["2"]
    assert second["pid"] != first_pid and second["ready"]
    assert not psutil_running(first_pid)
    assert broker.status().cores[2].models == []


def psutil_running(pid):
    from neuron_client.wire.procs import pid_running

    return pid_running(pid)


def test_operator_release_gives_the_owner_lease_lost_with_the_reason(broker, owners, models_dir):
    """#22: after `neuron-broker release --pid`, the owner's next call raises LeaseLostError naming the release."""
    a = owners(broker)
    a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "3"})
    m = a.do("load", path=os.path.join(models_dir, "affine.pt"))["model"]
    out = subprocess.run([sys.executable, "-m", "broker", "release", "--pid", str(a.pid)],
                         env=broker.env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = a.do("call", model=m, shape=[2, 4])
    assert got["error"] == "LeaseLostError" and "release --pid" in got["message"], got


def test_crashes_fail_the_core_for_their_lease_only(fresh_broker, owners, models_dir):
    """#16: a worker that keeps dying under one owner fails that owner's core, not the next owner's."""
    b = fresh_broker(2, extra=["--max-restarts", "1", "--restart-window", "60"])
    a = owners(b)
    a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "1"})
    for _ in range(2):
        pid = b.wait_for(lambda d: d.cores[1].worker.ready, 30, "worker ready").cores[1].worker.pid
        os.kill(pid, signal.SIGKILL)
        b.wait_for(lambda d, pid=pid: d.cores[1].worker.pid != pid, 30, "worker replaced or failed")
    b.wait_for(lambda d: d.cores[1].state == "failed", 30, "core 1 failed for this lease")
    a.do("release")
    doc = b.wait_for(lambda d: d.cores[1].state == "free" and d.cores[1].worker.ready, 30,
                     "core 1 back in service with a fresh worker")
    assert doc.cores[0].state == "free"
    c = owners(b)
    c.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "1"})
    m = c.do("load", path=os.path.join(models_dir, "affine.pt"))["model"]
    assert c.do("call", model=m, shape=[2, 4])["sum"] == 24.0


def test_hung_worker_is_replaced_and_its_caller_fails_within_seconds(fresh_broker, owners, models_dir):
    """#17: a worker that stops reporting (SIGSTOP) is replaced; the call waiting on it fails, then recovers."""
    b = fresh_broker(1)
    a = owners(b)
    a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "0"})
    m = a.do("load", path=os.path.join(models_dir, "affine.pt"))["model"]
    pid = a.do("secrets")["workers"]["0"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    got = a.do("call", model=m, shape=[2, 4], timeout_s=60)
    assert got.get("error") == "WorkerUnavailableError", got
    assert time.monotonic() - t0 < 30  # the worker-silence limit (10 s) and a margin; the call timeout is 600 s
    assert a.do("call", model=m, shape=[2, 4])["sum"] == 24.0  # reloaded on the fresh worker


def test_oversized_message_is_refused_before_sending(fresh_broker, owners, models_dir):
    """#18: a message above the workers' limit fails at once on the client, not after the call timeout."""
    b = fresh_broker(1, extra=["--max-message-mb", "1", "--shm-threshold", str(1 << 30)])
    a = owners(b, env={"NEURON_SHM_THRESHOLD_BYTES": str(1 << 40)})  # everything over the socket
    a.do("acquire")
    big = a.do("load", path=os.path.join(models_dir, "big.pt"))["model"]
    small = a.do("load", path=os.path.join(models_dir, "affine.pt"))["model"]
    got = a.do("call", model=big, shape=[1024, 1024])  # 4 MiB against a 1 MiB limit; not a 600 s wait
    assert got.get("error") == "MessageTooLargeError" and "limit" in got["message"], got
    assert a.do("call", model=small, shape=[2, 4])["sum"] == 24.0


def test_lease_link_refuses_garbage_and_huge_frames(broker):
    """Bad bytes on the lease link get an error and a closed link; the broker carries on."""
    path = lease_link.lease_socket_path(broker.directory)
    for payload in (struct.pack("!I", 1 << 30), struct.pack("!I", 5) + b"\xc1\xc1\xc1\xc1\xc1"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        s.sendall(payload)
        data = s.recv(65536)
        assert data, "no error reply"
        s.close()
    broker.wait_for(lambda d: d.broker.links == 0, 10, "the broker closed both garbage links")
    link = lease_link.LeaseLink(broker.directory, 5.0)
    try:
        assert link.request(messages.Acquire(cmd="after garbage", visible=[0]), 30).cores == [0]
    finally:
        link.close()


def test_locked_journal_refuses_the_grant_cleanly_and_leaks_nothing(broker, owners):
    """#14: a journal locked by someone else fails the acquire with the reason; the cores stay free."""
    db = sqlite3.connect(os.path.join(broker.directory, "leases.db"), isolation_level=None, timeout=1)
    db.execute("BEGIN EXCLUSIVE")
    try:
        a = owners(broker)
        got = a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "4"})
        assert got.get("error") == "NeuronRuntimeError" and "journal" in got["message"], got
        doc = broker.status()
        assert doc.cores[4].owner is None and not doc.leases
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "4"})["cores"] == [4]


def broker_with_keeper(tmp_path, owners):
    """A 2-core broker in its own directory and an owner of its core 0: (directory, broker, keeper)."""
    directory = str(tmp_path / "b")
    first = BrokerProc(directory, 2)
    try:
        keeper = owners(first)
        keeper.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "0"})
    except BaseException:
        first.stop()
        raise
    return directory, first, keeper


def test_broker_restart_does_not_revive_a_lease_released_while_it_was_down(tmp_path, owners):
    """#4: an owner that released while the broker was down leaves a tombstone: the restarted broker frees the
    cores at once; an owner that kept its lease re-attaches and keeps it."""
    directory, first, keeper = broker_with_keeper(tmp_path, owners)
    second = None
    try:
        leaver = owners(first)
        leaver.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "1"})
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        assert leaver.do("release")["released"]
        second = BrokerProc(directory, 2)
        taker = owners(second)
        got = taker.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "1"})
        assert got.get("cores") == [1], got
        second.wait_for(lambda d: d.cores[0].owner and d.cores[0].owner.pid == keeper.pid
                        and d.cores[0].owner.state == "active", 30, "the keeper re-attached")
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_corrupt_journal_is_set_aside_and_the_broker_starts(tmp_path):
    """#15: a journal that cannot be read does not stop the broker; it is kept aside for inspection."""
    directory = str(tmp_path / "b")
    os.makedirs(directory, mode=0o700)
    with open(os.path.join(directory, "leases.db"), "wb") as f:
        f.write(b"SQLite format 3\x00" + os.urandom(4000))
    b = BrokerProc(directory, 1)
    try:
        assert b.status().broker.recovering_s > 0
        assert any(name.startswith("leases.db.unreadable-") for name in os.listdir(directory))
        assert "set aside" in b.read_log()
    finally:
        b.stop()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs (needs root and mount(2)); unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs that can be filled")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_refuses_grants_cleanly_and_the_broker_carries_on(tiny_disk, owners):
    """#15: a full disk under the broker directory fails acquires with the reason; nothing leaks, nothing stops."""
    directory = os.path.join(tiny_disk, "b")
    b = BrokerProc(directory, 2)
    filler = os.path.join(tiny_disk, "filler")
    try:
        a = owners(b)
        assert a.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "0"})["cores"] == [0]
        with open(filler, "wb", buffering=0) as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
            try:
                while True:
                    f.write(b"\0" * 512)
                    f.flush()
            except OSError:
                pass
        c = owners(b)
        got = c.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "1"})
        assert got.get("error") == "NeuronRuntimeError" and "disk is full" in got["message"], got
        assert b.status().cores[1].owner is None
        assert b.proc.poll() is None and b.status().cores[0].owner.pid == a.pid
        os.unlink(filler)
        d = owners(b)
        assert d.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "1"})["cores"] == [1]
    finally:
        b.stop()


def test_deleted_journal_gives_no_live_owners_core_away(tmp_path, owners):
    """#15: with the journal gone, a restarted broker lets running owners claim their cores back before it grants
    anything; a process asking for such a core meanwhile waits, then is told who holds it."""
    directory, first, keeper = broker_with_keeper(tmp_path, owners)
    second = None
    try:
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(os.path.join(directory, "leases.db" + suffix)):
                os.unlink(os.path.join(directory, "leases.db" + suffix))
        second = BrokerProc(directory, 2)
        taker = owners(second)
        got = taker.do("acquire", env={"NEURON_RT_VISIBLE_CORES": "0"})
        assert got.get("error") == "NeuronCoreUnavailableError" and f"pid {keeper.pid}" in got["message"], got
        assert second.status().cores[0].owner.pid == keeper.pid
        assert "journal" in second.read_log()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_lease_links_per_process_are_bounded(broker):
    """#19: one process cannot pile up links (each would hold a waiting acquire): past the limit it is told why."""
    from broker.state import MAX_LINKS_PER_PID
    from neuron_client.wire import messages
    from neuron_client.wire.errors import NeuronCoreUnavailableError

    links = []
    try:
        for _ in range(MAX_LINKS_PER_PID):
            links.append(lease_link.LeaseLink(broker.directory, 5.0))
        broker.wait_for(lambda d: d.broker.links >= MAX_LINKS_PER_PID, 10, "the links counted")
        extra = lease_link.LeaseLink(broker.directory, 5.0)
        links.append(extra)
        with pytest.raises(NeuronCoreUnavailableError, match="per process"):
            extra.request(messages.Acquire(cmd="one too many", visible=[0]), 10)
        assert broker.status().broker.links == MAX_LINKS_PER_PID
    finally:
        for link in links:
            link.close()
    broker.wait_for(lambda d: d.broker.links == 0, 10, "links closed")
