"""Offline stand-ins for ``torchvision.models``, for the seed pages' examples: ``from neuron_client.examples import
models`` in place of ``from torchvision import models`` leaves the rest of a page's code as it is.

``resnet50(pretrained=True)`` would download ImageNet weights; here it is a small CNN that takes the same
``[N, 3, 224, 224]`` images and returns ``[N, 1000]`` logits (random weights, a fixed seed), cheap enough to run on
one CPU per core."""
from __future__ import annotations

import torch


class SmallResNet(torch.nn.Module):
    """conv, relu, global average pool, linear: a few milliseconds per 224x224 image on one CPU."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def resnet50(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """The stand-in for ``torchvision.models.resnet50``; ``pretrained`` is accepted and changes nothing."""
    torch.manual_seed(0)
    return SmallResNet(**kwargs)
