"""Seed 004's ensemble of bidirectional LSTMs (PyTorch's "Dynamic Parallelism in TorchScript" tutorial), with and
without ``torch.jit.fork``/``wait``; script it with ``torch.jit.script``.

With ``fork=True`` the forward direction of each member runs as a fork task beside the backward one, and every member
runs as its own task: the inter-op parallelism that a core's worker provides (``--inter-op-threads``).
"""
from __future__ import annotations

from typing import List

import torch


class BiLSTM(torch.nn.Module):
    """Seed 004's bidirectional LSTM; with ``fork`` the forward direction runs as a torch.jit.fork task."""

    def __init__(self, channels: int, fork: bool):
        super().__init__()
        self.fork = fork
        self.cell_f = torch.nn.LSTM(input_size=channels, hidden_size=channels)
        self.cell_b = torch.nn.LSTM(input_size=channels, hidden_size=channels)

    def forward(self, x):
        if self.fork:
            future_f = torch.jit.fork(self.cell_f, x)
            output_b, _ = self.cell_b(torch.flip(x, dims=[0]))
            output_f, _ = torch.jit.wait(future_f)
        else:
            output_f, _ = self.cell_f(x)
            output_b, _ = self.cell_b(torch.flip(x, dims=[0]))
        return torch.cat((output_f, torch.flip(output_b, dims=[0])), dim=2)


class LSTMEnsemble(torch.nn.Module):
    """Seed 004's ensemble; with ``fork`` every member runs as its own task."""

    def __init__(self, n_models: int, channels: int, fork: bool):
        super().__init__()
        self.fork = fork
        self.models = torch.nn.ModuleList([BiLSTM(channels, fork) for _ in range(n_models)])

    def forward(self, x):
        results: List[torch.Tensor] = []
        if self.fork:
            futures: List[torch.jit.Future[torch.Tensor]] = []
            for m in self.models:
                futures.append(torch.jit.fork(m, x))
            for f in futures:
                results.append(torch.jit.wait(f))
        else:
            for m in self.models:
                results.append(m(x))
        return torch.stack(results).sum(dim=0)
