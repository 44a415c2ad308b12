"""Autoregressive generation: :mod:`.generate` (the loop) over :mod:`.decoder` (a decoder's per-step state)."""
