"""The operator commands' registry (broker/commands): every command's --help is its module's docstring, as plain
text, and neuron-broker --help loads neither zmq, msgpack, rich nor torch."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

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


# -- what every command line shares (neuron_client.tools.cli) ----------------------------------------------------

TOOLS = {"neuron-broker": "broker", "neuron-ls": "broker.ls", "neuron-top": "broker.top",
         "neuron-run": "neuron_client.tools.launch"}


@pytest.mark.parametrize("prog", sorted(TOOLS))
def test_every_tool_has_version_and_plain_help_with_defaults(prog, capsys):
    import importlib

    import neuron_client

    main = importlib.import_module(TOOLS[prog] if prog != "neuron-broker" else "broker.cli").main
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"{prog} {neuron_client.__version__}\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {prog}") and not MARKUP.search(text), text
    assert "-V, --version" in text
    if prog == "neuron-top":
        assert "(default: 1.0)" in " ".join(text.split())  # --interval
    if prog == "neuron-run":
        assert "(default: 10.0)" in " ".join(text.split())  # --stop-timeout


def test_defaults_are_shown_in_command_help(capsys):
    from broker import cli

    with pytest.raises(SystemExit):
        cli.main(["start", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--max-restarts MAX_RESTARTS a core whose", "(default: 5)", "(default: 60.0)", "(default: info)",
                  "(default: 127.0.0.1)", "(default: cpu)"):
        assert shown in text, shown
    assert "(default: False)" not in text and "(default: None)" not in text


@pytest.mark.parametrize("argv", [["status", "--dir", "{d}"], ["--dir", "{d}", "status"], ["ls", "--dir", "{d}"],
                                  ["drain", "--dir", "{d}", "--cancel"], ["release", "--pid", "1", "--dir", "{d}"]])
def test_dir_is_accepted_before_and_after_the_command(argv, tmp_path, capsys):
    from broker import cli

    d = str(tmp_path / "nobroker")
    assert cli.main([a.format(d=d) for a in argv]) == 1
    assert f"no broker answers at ipc://{d}/broker.sock" in capsys.readouterr().err


def test_a_closed_pipe_and_ctrl_c_end_quietly():
    from neuron_client.tools import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.guarded(interrupted) == cli.EXIT_INTERRUPTED
    # a real closed pipe: the reader is gone before the tool writes
    code = ("import sys; from neuron_client.tools import cli; "
            "sys.exit(cli.guarded(lambda argv: print('x' * 100000) or 0))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == cli.EXIT_BROKEN_PIPE and err == "", err


@pytest.mark.parametrize("tool", ["neuron_broker", "neuron_ls", "neuron_run"])
def test_ctrl_c_at_any_moment_of_a_tools_start_prints_no_traceback(tool, tmp_path):
    """As a console script starts its tool (setup.cfg's entry points, broker.entry): a Ctrl-C while it imports, or
    while it runs, ends it with 130 (or it finished first), never with a traceback. The child holds SIGINT back
    until the entry point runs, so that a signal sent before then tests the entry point, not the child's first line
    (a console script's own two lines before it are the one moment left)."""
    args = {"neuron_broker": ["status", "--dir", str(tmp_path)], "neuron_ls": ["--dir", str(tmp_path)],
            "neuron_run": ["--help"]}[tool]
    code = (f"import signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT]); "
            f"sys.argv = ['{tool}', *{args!r}]; sys.stderr.write('go\\n'); sys.stderr.flush(); "
            f"from broker.entry import {tool}; sys.exit({tool}())")
    for delay in (0.0, 0.01, 0.03, 0.1, 0.3):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr.readline() == b"go\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read().decode()
        code_ = proc.wait(60)
        assert "Traceback" not in err, (delay, err)
        assert code_ in (0, 1, 130), (delay, code_, err)


def test_the_systemd_unit_runs_the_broker_in_the_foreground():
    import configparser
    import shlex

    from broker import cli

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    path = os.path.join(ROOT, "scripts", "systemd", "neuron-broker.service")
    unit.read(path)
    service = unit["Service"]
    start, stop = shlex.split(service["ExecStart"]), shlex.split(service["ExecStop"])
    assert os.path.basename(start[0]) == os.path.basename(stop[0]) == "neuron-broker"
    args = cli.parser().parse_args(start[1:])  # every flag in it is one the command takes
    assert args.command == "start" and args.foreground and args.cores == 8
    assert cli.parser().parse_args(stop[1:]).command == "stop"
    with open(path) as f:
        lines = f.read().splitlines()
    assert service["KillMode"] == "mixed" and "Environment=NEURON_BROKER_DIR=%t/neuron-broker" in lines
    assert unit["Install"]["WantedBy"] == "default.target"
