"""Unlearning by retraining, fine-tuning on the retain set, gradient ascent on the forget set,
NegGrad+, and relabelling the forget set."""

from __future__ import annotations

import abc
from typing import Any, Dict, Optional

import numpy as np

from mia_core.base import Unlearner


def _check_epochs_lr(epochs, lr) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number (or unset for the recipe's), got {lr!r}")


class _Training(Unlearner):
    """An unlearner that trains every model for ``epochs`` on its rows of one set (``keep_of``),
    descending the loss or ascending it (``ascent``), at ``lr`` (default: the recipe's)."""

    api_version = "1.0"
    ascent = False
    epochs: int
    lr: Optional[float]

    @abc.abstractmethod
    def keep_of(self, ctx):
        """The bool ``[M, N]`` set each model trains on (``ctx.retain`` or ``ctx.forget``)."""

    def validate(self) -> None:
        _check_epochs_lr(self.epochs, self.lr)

    def unlearn(self, ctx) -> Dict[str, Any]:
        self.validate()
        lr = self.lr if self.lr is not None else ctx.recipe.lr
        return {"steps": ctx.train(keep=self.keep_of(ctx), epochs=self.epochs, lr=lr, ascent=self.ascent), "lr": lr}


class Retrain(Unlearner):
    """Exact unlearning: every model trained from scratch on its retain set (its cost is the whole
    training). By default from random streams of its own (``stream=1``), so it is a retraining
    the evaluation's gold standard (``stream=0``: the original initialisation and batch order) did
    not see, and U-LiRA measures two independent retrainings: the sanity check that the
    evaluation calls exact unlearning indistinguishable.

    Args:
        stream: 0 reproduces the gold standard bitwise; any other value draws new streams.
    """

    api_version = "1.0"

    def __init__(self, stream: int = 1):
        self.stream = stream

    def validate(self) -> None:
        if isinstance(self.stream, bool) or not isinstance(self.stream, int) or self.stream < 0:
            raise ValueError(f"stream must be an integer >= 0, got {self.stream!r}")

    def unlearn(self, ctx) -> Dict[str, Any]:
        self.validate()
        return {"steps": ctx.retrain(stream=self.stream), "stream": self.stream}


class Finetune(_Training):
    """Continue training every model on its retain set only ("catastrophic forgetting" of the
    forget set; Golatkar et al. 2020's fine-tuning baseline).

    Args:
        epochs: passes over the retain set; lr: learning rate (default: the recipe's).
    """

    def __init__(self, epochs: int = 5, lr: Optional[float] = None):
        self.epochs = epochs
        self.lr = lr

    def keep_of(self, ctx):
        return ctx.retain


class GradientAscent(_Training):
    """Ascend the loss on the forget set (NegGrad, Thudi et al. 2022): every model's batches are
    drawn from its forget set and each step goes up the cross-entropy. It forgets fast and costs
    accuracy; ``epochs`` and ``lr`` set how far.

    Args:
        epochs: passes over the forget set; lr: learning rate (default: the recipe's).
    """

    ascent = True

    def __init__(self, epochs: int = 3, lr: Optional[float] = None):
        self.epochs = epochs
        self.lr = lr

    def keep_of(self, ctx):
        return ctx.forget


class NegGradPlus(Unlearner):
    """NegGrad+ (Kurmanji, Triantafillou, Hayes, Triantafillou, NeurIPS 2023, their baseline): descend
    the loss on the retain set while ascending it on the forget set, ``β·L_retain − (1−β)·L_forget``.

    Deviation: the paper takes one retain batch and one forget batch per step; here each epoch is one
    pass of ascent on the forget set at ``(1 - beta) * lr`` followed by one pass of descent on the
    retain set at ``beta * lr`` (the trainer draws each model's batches from one set at a time), so
    the two terms alternate by epoch rather than within a step.

    Args:
        epochs: rounds of (ascent on forget, descent on retain); beta: the retain term's weight in
            (0, 1); lr: learning rate (default: the recipe's).
    """

    api_version = "1.0"

    def __init__(self, epochs: int = 3, beta: float = 0.5, lr: Optional[float] = None):
        self.epochs = epochs
        self.beta = beta
        self.lr = lr

    def validate(self) -> None:
        _check_epochs_lr(self.epochs, self.lr)
        if not (isinstance(self.beta, (int, float)) and 0 < self.beta < 1):
            raise ValueError(f"beta must be a number in (0, 1), got {self.beta!r}")

    def unlearn(self, ctx) -> Dict[str, Any]:
        self.validate()
        lr = self.lr if self.lr is not None else ctx.recipe.lr
        steps = 0
        for _ in range(self.epochs):
            steps += ctx.train(keep=ctx.forget, epochs=1, lr=(1 - self.beta) * lr, ascent=True)
            steps += ctx.train(keep=ctx.retain, epochs=1, lr=self.beta * lr)
        return {"steps": steps, "lr": lr, "beta": self.beta}



class RandomLabels(Unlearner):
    """Relabel and fine-tune (Graves, Nagisetty, Ganesh, "Amnesiac Machine Learning", AAAI 2021;
    the "random label" baseline of the unlearning benchmarks): every model's forget records get a
    label drawn uniformly from the *other* classes (fixed per model and record for the whole run)
    and the model is fine-tuned on them, with its retain set under its true labels beside them
    (``retain=True``, the default, which keeps accuracy) or on the relabelled forget set alone
    (``retain=False``, Graves et al.'s few steps on the relabelled data).

    Args:
        epochs: passes over the set trained on; retain: mix in the retain set; lr: learning rate
            (default: the recipe's).
    """

    api_version = "1.0"

    def __init__(self, epochs: int = 2, retain: bool = True, lr: Optional[float] = None):
        self.epochs = epochs
        self.retain = retain
        self.lr = lr

    def validate(self) -> None:
        _check_epochs_lr(self.epochs, self.lr)
        if not isinstance(self.retain, bool):
            raise ValueError(f"retain must be true or false, got {self.retain!r}")

    def unlearn(self, ctx) -> Dict[str, Any]:
        self.validate()
        n_classes = ctx.records.n_classes
        if n_classes < 2:
            raise ValueError("random-labels needs at least two classes to draw a wrong label from")
        lr = self.lr if self.lr is not None else ctx.recipe.lr
        y = np.asarray(ctx.records.y, dtype=np.int64)
        # a shift in 1..C-1 makes every new label differ from the true one, uniformly over the rest
        shift = ctx.rng(1).integers(1, n_classes, size=ctx.forget.shape)
        labels = np.where(ctx.forget, (y[None] + shift) % n_classes, y[None])
        keep = ctx.forget | ctx.retain if self.retain else ctx.forget
        steps = ctx.train(keep=keep, epochs=self.epochs, lr=lr, labels=labels)
        return {"steps": steps, "lr": lr, "retain": self.retain}
