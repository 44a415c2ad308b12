"""Moved to :mod:`neuron_client.tools.launch` (``neuron-run``); this path keeps working for one release."""
import sys

from ._moved import alias

if __name__ == "__main__":  # python -m neuron_client.launch
    from .tools.launch import main

    sys.exit(main())
alias(__name__, "neuron_client.tools.launch")
