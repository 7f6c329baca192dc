"""Multi-layer perceptron: the default model family."""

from __future__ import annotations

from typing import Literal

from torch import nn

from mia_core.base import ModelFamily

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(ModelFamily):
    """Fully connected network: ``depth`` hidden layers of ``width`` units, then a linear head.

    Args:
        width: units per hidden layer (>= 1).
        depth: number of hidden layers (>= 0; 0 gives multinomial logistic regression).
        activation: ``relu``, ``tanh`` or ``gelu``.
    """

    api_version = "1.0"

    def __init__(self, width: int = 256, depth: int = 1, activation: Literal["relu", "tanh", "gelu"] = "relu"):
        self.width = width
        self.depth = depth
        self.activation = activation

    def validate(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, got {self.depth}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {self.activation!r}")

    def build(self, n_features: int, n_classes: int) -> nn.Module:
        self.validate()
        layers = []
        d = n_features
        for _ in range(self.depth):
            layers += [nn.Linear(d, self.width), _ACTIVATIONS[self.activation]()]
            d = self.width
        layers.append(nn.Linear(d, n_classes))
        return nn.Sequential(*layers)
