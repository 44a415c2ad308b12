"""Integrations with other systems: :mod:`.ray` (one broker per Ray node, actors owning Ray's neuron_cores)."""
