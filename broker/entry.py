"""The console scripts' entry points (setup.cfg), neuron-run's too: each ends quietly on Ctrl-C at any moment, its
imports included (this module and its package import next to nothing, so the moment before its handler is set is
as short as can be).

A console script imports its command's module before calling it; a Ctrl-C then would print a traceback. Here the
first thing run sets SIGINT to exit at once with status 130 (as a shell reports it), the command's module is
imported, and Python's own handler is put back before the command runs (which ends quietly on Ctrl-C by itself:
:func:`neuron_client.tools.cli.guarded`).
"""
from __future__ import annotations

import _signal  # the C module: ``signal`` would import enum first, a millisecond before the handler is set
import os

EXIT_INTERRUPTED = 130


def _interrupted(signum, frame) -> None:
    os._exit(EXIT_INTERRUPTED)


def _run(module: str) -> int:
    _signal.signal(_signal.SIGINT, _interrupted)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [_signal.SIGINT])  # one that came while blocked arrives now
    import importlib

    main = importlib.import_module(module).main
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    return main()


def neuron_broker() -> int:
    return _run("broker.cli")


def neuron_ls() -> int:
    return _run("broker.ls")


def neuron_top() -> int:
    return _run("broker.top")


def neuron_run() -> int:
    return _run("neuron_client.tools.launch")
