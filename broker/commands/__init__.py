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
import sys

from neuron_client.tools.cli import plain

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


def summary(module) -> str:
    """The first line of a command's help."""
    return plain(module.__doc__).split("\n", 1)[0].rstrip(".")


def description(module) -> str:
    return plain(module.__doc__)


DIR_HELP = "broker directory (default: $NEURON_BROKER_DIR or a private one)"


def parser() -> argparse.ArgumentParser:
    from neuron_client.tools.cli import Formatter, add_version

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter)
    add_version(p)
    p.add_argument("--dir", default=None, help=DIR_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = load(name)
        s = sub.add_parser(name, help=summary(module), description=description(module), formatter_class=Formatter)
        module.add_arguments(s)
        s.add_argument("--dir", dest="sub_dir", metavar="DIR", default=None,
                       help=DIR_HELP + "; also accepted before the command")
        s.set_defaults(func=module.run)
    return p


def main(argv=None) -> int:
    from neuron_client.tools.cli import guarded

    return guarded(_main, argv)


def _main(argv=None) -> int:
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
