"""Moved to :mod:`neuron_client.tracing.io_aliases`; this path keeps working for one release."""
from ._moved import alias

alias(__name__, "neuron_client.tracing.io_aliases")
