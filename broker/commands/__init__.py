"""The operator commands of ``neuron-broker``: one module per command, in :data:`COMMANDS`, from which
:func:`parser` builds the command line.

A command module has

- a docstring that is its help, in plain text: its first line is the command's line in ``neuron-broker --help``, the
  rest its ``--help`` description: the message it sends, the reply it reads, examples, exit codes;
- ``add_arguments(parser)``, and ``run(args) -> int`` (the exit code; ``args.dir`` is the broker directory, already
  checked private).

A command module imports only what ``--help`` needs (argparse, os, sys, :mod:`neuron_client.wire.config`): zmq,
msgpack and rich are imported when a command runs, so that ``neuron-broker --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

COMMANDS = ("start", "status", "ls", "release", "drain", "stop")
PROG = "neuron-broker"
DESCRIPTION = "Start, stop and inspect the per-host core broker."
EPILOG = ("The broker's directory comes from --dir, else NEURON_BROKER_DIR, else a private per-user directory; "
          "every command exits 1 when that directory is not private to this user. 'neuron-broker COMMAND --help' "
          "says what a command sends and prints.")


def load(name: str):
    """The module of command ``name``."""
    if name not in COMMANDS:
        raise KeyError(f"no command {name!r}; commands: {', '.join(COMMANDS)}")
    return importlib.import_module(f"{__name__}.{name}")


def plain(text: str) -> str:
    """A docstring as plain text for a terminal: no reST markup (``code``, ``::``), its indentation removed."""
    import textwrap

    first, _, rest = text.strip("\n").partition("\n")
    text = (first.strip() + "\n" + textwrap.dedent(rest)).strip()
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r":(\w+):`~?([^`]+)`", r"\2", text)
    text = re.sub(r"::$", ":", text, flags=re.M)
    return text


def summary(module) -> str:
    """The first line of a command's help."""
    return plain(module.__doc__).split("\n", 1)[0].rstrip(".")


def description(module) -> str:
    return plain(module.__doc__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--dir", default=None, help="broker directory (default: $NEURON_BROKER_DIR or a private one)")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = load(name)
        s = sub.add_parser(name, help=summary(module), description=description(module),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(s)
        s.set_defaults(func=module.run)
    return p


def main(argv=None) -> int:
    from neuron_client.wire import config
    from neuron_client.wire.errors import NeuronRuntimeError

    args = parser().parse_args(argv)
    args.dir = os.path.abspath(getattr(args, "sub_dir", None) or args.dir or config.broker_dir())
    try:
        config.ensure_private_dir(args.dir)  # a squatted directory's pid file or socket is never believed
        return args.func(args)
    except NeuronRuntimeError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 1
