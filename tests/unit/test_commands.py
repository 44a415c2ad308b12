"""The operator commands' registry (broker/commands): every command's --help is its module's docstring, as plain
text, and neuron-broker --help loads neither zmq, msgpack, rich nor torch."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from broker import commands

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("zmq", "msgpack", "rich", "torch", "psutil", "prometheus_client")
MARKUP = re.compile(r"``|:(class|mod|func|meth|data):`|::$", re.M)

# What each command's help must say: the message it sends and the reply it reads.
MESSAGES = {"start": ("ping", "pong"), "status": ("status", "status_reply"), "ls": ("status", "status_reply"),
            "release": ("force_release", "force_released"), "drain": ("drain", "ok"), "stop": ("stop", "ok")}


def python(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))


def test_every_command_of_the_old_cli_is_registered():
    assert set(commands.COMMANDS) == {"start", "status", "ls", "release", "drain", "stop"} == set(MESSAGES)
    for name in commands.COMMANDS:
        module = commands.load(name)
        assert module.__doc__ and callable(module.add_arguments) and callable(module.run)
    with pytest.raises(KeyError, match="no command 'nope'"):
        commands.load("nope")


def test_top_level_help_lists_every_command_in_plain_text():
    out = python("-m", "broker", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: neuron-broker")
    for name in commands.COMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", out.stdout, re.M), (name, out.stdout)
        assert commands.summary(commands.load(name)) in " ".join(out.stdout.split())
    assert not MARKUP.search(out.stdout), out.stdout


@pytest.mark.parametrize("name", commands.COMMANDS)
def test_each_command_help_is_its_docstring_in_plain_text(name):
    out = python("-m", "broker", name, "--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"usage: neuron-broker {name}")
    assert not MARKUP.search(text), text
    assert commands.description(commands.load(name)).split("\n", 1)[0] in text
    sent, reply = MESSAGES[name]
    assert re.search(rf"\b{sent}\b", text) and re.search(rf"\b{reply}\b", text), text
    assert "Examples:" in text and "Exit codes:" in text
    assert f"neuron-broker {name}" in text.split("Examples:", 1)[1] or name == "ls"


@pytest.mark.parametrize("argv", [["-m", "broker", "--help"], ["-m", "broker", "drain", "--help"],
                                  ["-m", "broker.ls", "--help"], ["-m", "broker.top", "--help"]])
def test_help_imports_nothing_heavy(argv):
    out = python("-X", "importtime", *argv)
    assert out.returncode == 0, out.stderr
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert heavy == [], heavy


def test_neuron_ls_and_top_help_are_plain_text():
    for module in ("broker.ls", "broker.top"):
        out = python("-m", module, "--help")
        assert out.returncode == 0, out.stderr
        assert not MARKUP.search(out.stdout), out.stdout
    assert "usage: neuron-ls" in python("-m", "broker.ls", "--help").stdout


def test_plain_strips_restructured_text():
    assert commands.plain("""Use ``neuron-ls``::

        neuron-ls --json

    see :class:`~a.B` and :func:`c`.""") == "Use neuron-ls:\n\n    neuron-ls --json\n\nsee a.B and c."


def test_no_command_is_an_error_that_names_the_commands():
    out = python("-m", "broker")
    assert out.returncode == 2 and "{start,status,ls,release,drain,stop}" in out.stderr
