"""Moved to :mod:`neuron_client.wire.errors`; this path keeps working for one release."""
from ._moved import alias

alias(__name__, "neuron_client.wire.errors")
