"""A CPU-bound model of a chosen cost: ``steps`` chained ``tanh(x @ w)`` of width ``width``. Tests and benchmarks use it
where a call must take long enough to overlap with others or to measure throughput."""
from __future__ import annotations

import torch


class MatmulChain(torch.nn.Module):
    def __init__(self, steps: int = 40, width: int = 192):
        super().__init__()
        self.steps = steps
        self.w = torch.nn.Parameter(torch.randn(width, width) / width ** 0.5)

    def forward(self, x):
        for _ in range(self.steps):
            x = torch.tanh(x @ self.w)
        return x
