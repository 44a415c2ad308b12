"""Worked examples of tensor-parallel models (seed 003 ported to this runtime)."""
