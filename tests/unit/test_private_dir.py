"""The broker directory is verified, never assumed (#11): config.ensure_private_dir refuses a symlink, a file, a
directory of another user or one open to others, naming the path, its owner and what to do; the client checks it
before it reads a pid file there or talks to a socket there."""
from __future__ import annotations

import os
import stat
import time

import pytest

from neuron_client.runtime import autostart
from neuron_client.wire import config
from neuron_client.wire.errors import NeuronRuntimeError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user (chown)")
NOBODY = 65534


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def refusal(path) -> str:
    with pytest.raises(NeuronRuntimeError) as info:
        config.ensure_private_dir(str(path))
    message = str(info.value)
    assert str(path) in message and config.ENV_BROKER_DIR in message
    return message


def test_creates_every_missing_component_private(tmp_path):
    path = tmp_path / "a" / "b" / "broker"
    assert config.ensure_private_dir(str(path)) == str(path)
    for p in (tmp_path / "a", tmp_path / "a" / "b", path):
        assert mode(p) == 0o700 and os.lstat(p).st_uid == os.getuid()
    assert config.ensure_private_dir(str(path)) == str(path)  # an existing private one is fine
    assert config.ensure_private_dir(str(path) + "/") == str(path) + "/"


def test_a_new_directory_gets_0700_whatever_the_umask(tmp_path):
    old = os.umask(0o277)
    try:
        config.ensure_private_dir(str(tmp_path / "d"))
    finally:
        os.umask(old)
    assert mode(tmp_path / "d") == 0o700


def test_an_existing_directory_open_to_others_is_refused_not_fixed(tmp_path):
    path = tmp_path / "open"
    path.mkdir()
    os.chmod(path, 0o755)
    message = refusal(path)
    assert "0755" in message and f"chmod 700 {path}" in message
    assert mode(path) == 0o755  # we did not make it: left alone


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "theirs"
    target.mkdir()
    os.chmod(target, 0o777)
    link = tmp_path / "broker"
    link.symlink_to(target)
    message = refusal(link)
    assert "symbolic link" in message and "another user may have planted it" in message
    assert f"remove {link}" in message and f"{config.ENV_BROKER_DIR}=" in message
    refusal(str(link) + "/")  # a trailing slash does not make us follow it
    assert mode(target) == 0o777 and os.listdir(target) == []


def test_a_dangling_symlink_is_refused_and_nothing_is_created(tmp_path):
    link = tmp_path / "broker"
    link.symlink_to(tmp_path / "not-yet")
    assert "symbolic link" in refusal(link)
    assert not (tmp_path / "not-yet").exists()


def test_a_file_is_refused(tmp_path):
    path = tmp_path / "broker"
    path.write_text("")
    assert "not a directory" in refusal(path)


def test_a_symlink_above_the_directory_is_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    config.ensure_private_dir(str(tmp_path / "alias" / "broker"))
    assert mode(tmp_path / "real" / "broker") == 0o700


def test_a_parent_everyone_can_write_without_the_sticky_bit_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    assert "writable by every user" in refusal(shared / "broker")
    os.chmod(shared, 0o1777)  # like /tmp: others cannot rename or remove what is ours
    config.ensure_private_dir(str(shared / "broker"))


@needs_root
def test_a_directory_of_another_user_is_refused(tmp_path):
    path = tmp_path / "broker"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)
    message = refusal(path)
    assert f"uid {NOBODY}" in message and "not yours" in message and f"uid {os.getuid()}" in message


@needs_root
def test_a_parent_of_another_user_is_refused(tmp_path):
    parent = tmp_path / "theirs"
    parent.mkdir()
    os.chown(parent, NOBODY, NOBODY)
    message = refusal(parent / "broker")
    assert f"its parent {parent} is not yours" in message and f"uid {NOBODY}" in message


def test_a_directory_we_may_not_open_is_refused_naming_its_owner(tmp_path, monkeypatch):
    """As a non-root victim sees another user's mode-0700 directory: opening it fails with EACCES."""
    path = tmp_path / "broker"
    path.mkdir(mode=0o700)
    owner, real_open = os.getuid(), os.open

    def open_denied(p, flags, *args):
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(p, flags, *args)

    monkeypatch.setattr(config.os, "open", open_denied)
    monkeypatch.setattr(config.os, "getuid", lambda: owner + 1)  # we are someone else
    message = refusal(path)
    assert "not yours" in message and f"belongs to uid {owner}" in message


def test_peer_uid_ok():
    assert config.peer_uid_ok(os.getuid())
    assert not config.peer_uid_ok(os.getuid() + 1)
    assert not config.peer_uid_ok(bool(os.getuid()))  # True/False are never uids


def planted(tmp_path):
    """A broker directory that is not private (ours here, mode 0777), with a pid file naming a live process."""
    path = tmp_path / "broker"
    path.mkdir()
    os.chmod(path, 0o777)
    (path / "broker.pid").write_text(str(os.getpid()))
    return str(path)


def test_the_client_checks_the_directory_before_it_trusts_anything_there(tmp_path, monkeypatch):
    directory = planted(tmp_path)
    talked = []
    monkeypatch.delenv(config.ENV_BROKER_ADDRESS, raising=False)
    monkeypatch.setattr(autostart, "_ping", lambda address, timeout: talked.append(address))
    monkeypatch.setattr(autostart.subprocess, "Popen", lambda *a, **k: talked.append(a))
    monkeypatch.setattr(autostart.subprocess, "run", lambda *a, **k: talked.append(a))
    for call in (lambda: autostart.ensure_broker(directory), lambda: autostart.ensure_broker(directory, detach=True),
                 lambda: autostart.spawn_broker(directory)):
        with pytest.raises(NeuronRuntimeError, match=f"refusing broker directory {directory}"):
            call()
    assert talked == [] and sorted(os.listdir(directory)) == ["broker.pid"]


@pytest.mark.timeout(60)
def test_operator_commands_refuse_a_squatted_directory_and_kill_nothing(tmp_path):
    """`neuron-broker stop` reads the pid file: in a directory others can write it must believe nothing there."""
    import subprocess
    import sys

    planted = tmp_path / "squatted"
    planted.mkdir()
    os.chmod(planted, 0o777)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (planted / "broker.pid").write_text(str(bystander.pid))
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, NEURON_BROKER_DIR=str(planted), PYTHONPATH=root)
        for argv in (["-m", "broker", "stop"], ["-m", "broker", "status"], ["-m", "broker.ls"]):
            out = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=30)
            assert out.returncode != 0 and str(planted) in out.stderr and "Traceback" not in out.stderr, out
        time.sleep(0.2)
        assert bystander.poll() is None  # nobody was signalled
    finally:
        bystander.kill()
        bystander.wait(5)
