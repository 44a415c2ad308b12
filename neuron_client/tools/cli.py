"""What every command line of the project shares (neuron-broker, neuron-ls, neuron-top, neuron-run): help that shows
defaults, ``--version``, and an exit without a traceback on Ctrl-C or a closed pipe (``neuron-ls --json | head``).

Imports nothing heavy: ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class Formatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (plain text, its line breaks kept); each option's default at the end of its help,
    unless the help already says it or there is none to say (a flag, no value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, (argparse._StoreTrueAction, argparse._VersionAction, argparse._HelpAction))):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def plain(text: str) -> str:
    """A docstring as plain text for a terminal: no reST markup (``code``, ``::``), its indentation removed."""
    import textwrap

    first, _, rest = text.strip("\n").partition("\n")
    text = (first.strip() + "\n" + textwrap.dedent(rest)).strip()
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r":(\w+):`~?([^`]+)`", r"\2", text)
    text = re.sub(r"::$", ":", text, flags=re.M)
    return text


def version() -> str:
    from neuron_client import __version__

    return __version__


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {version()}",
                        help="print the version and exit")


def guarded(main, argv=None) -> int:
    """``main(argv)``, ending quietly on Ctrl-C (exit 130) and on a reader that closed the pipe (exit 141)."""
    try:
        code = main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except KeyboardInterrupt:
        try:
            sys.stderr.write("\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        try:  # nothing more can be written; keep the interpreter's final flush from failing again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
