"""``neuron-broker``: start, stop and inspect the per-host core broker (setup.cfg: ``neuron-broker = broker.cli:main``).

The commands are the modules of :mod:`broker.commands` (start, status, ls, release, drain, stop), each its own
``--help``; :func:`main` and :func:`parser` are the registry's. The broker's directory comes from ``--dir``, else
``NEURON_BROKER_DIR``, else a private per-user directory.
"""
from __future__ import annotations

import sys

from broker.commands import main, parser

__all__ = ["main", "parser"]

if __name__ == "__main__":
    sys.exit(main())
