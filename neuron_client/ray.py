"""Moved to :mod:`neuron_client.integrations.ray`; this path keeps working for one release."""
from ._moved import alias

alias(__name__, "neuron_client.integrations.ray")
