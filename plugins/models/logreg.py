"""Multinomial logistic regression."""

from __future__ import annotations

from torch import nn

from mia_core.base import ModelFamily


class LogReg(ModelFamily):
    """A single linear layer trained with cross-entropy (softmax regression).

    It has little capacity to memorise, so it is a useful low-leakage baseline; add L2
    regularisation through the recipe's ``--weight-decay``.
    """

    api_version = "1.0"

    def __init__(self):
        pass

    def build(self, n_features: int, n_classes: int) -> nn.Module:
        return nn.Linear(n_features, n_classes)
