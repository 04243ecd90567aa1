"""The tutorial's network: three linear layers on the flattened 28x28 image.

The tutorial puts no activation between the layers, so ``Net()`` is a linear
classifier written as three matrices (784 -> 128 -> 64 -> 10 collapses to one
784 -> 10 map). It is kept that way on purpose: the example reproduces the
tutorial's numbers. ``Net(activation="relu")`` adds a ReLU after the first two
layers, the network the tutorial probably meant.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Activation = Literal["none", "relu"]
ACTIVATIONS: tuple[str, ...] = ("none", "relu")


class Net(nn.Module):
    """The tutorial's MLP, 784 -> 128 -> 64 -> 10.

    Args:
        activation: ``"none"`` (the tutorial: no activation, a linear model)
            or ``"relu"`` (a ReLU after the first and second layers).
    """

    def __init__(self, activation: Activation = "none") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
        self.activation = activation
        # Created in the tutorial's order, so a seed gives the tutorial's weights.
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)
        self.act: nn.Module = nn.ReLU() if activation == "relu" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 784)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)
