"""Per-(model, record) signals, computed once per population and shared by every attack.

All signals are arrays ``[M, N]`` (``logits`` and ``probs`` are ``[M, N, C]``), computed in
float64 from the models' logits:

``logits``      raw outputs z.
``probs``       softmax(z).
``confidence``  logit-scaled confidence of the true label (Carlini et al. 2022, Sec. IV-B, eq. 4):
                phi = log p_y - log sum_{y' != y} p_{y'}, computed as
                ``log_softmax(z)[y] - logsumexp_{y' != y} log_softmax(z)[y']`` so it stays exact
                when p_y rounds to 1 (the reference code adds 1e-45 instead).
``loss``        cross-entropy -log p_y.
``correct``     1.0 where argmax z == y, else 0.0.

On a regression dataset (:attr:`mia_core.data.Records.task` ``== "regression"``; float targets y,
one model output) the signals are squared-error based:

``logits``      the prediction y_hat, ``[M, N, 1]``.
``loss``        squared error (y_hat - y)^2 (so the loss attack and Yeom's threshold adversary run
                unchanged).
``confidence``  -(y_hat - y)^2: the analogue of the logit-scaled confidence (higher = fits the
                record better), so LiRA/RMIA-style attacks that fit per-record distributions of
                it run too. It is not Gaussian across models (a scaled chi-square), which LiRA's
                Gaussian fit only approximates; attacks that want the signed residual can read
                ``logits`` and the targets.
``probs``, ``correct``  undefined: reading them raises :class:`SignalUnavailable` (a usage
                error naming the signal and the dataset's task).

Which access level reveals which signal (see :data:`mia_core.base.ACCESS_LEVELS`):
``correct`` needs ``label`` (or more), ``loss`` needs ``loss`` or ``probs``/``logits``,
``probs`` and ``confidence`` need ``probs`` or ``logits``, ``logits`` needs ``logits``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional

import numpy as np
import torch

from mia_core.data import DataError

SIGNAL_ACCESS: Dict[str, FrozenSet[str]] = {
    "logits": frozenset({"logits"}),
    "probs": frozenset({"probs", "logits"}),
    "confidence": frozenset({"probs", "logits"}),
    "loss": frozenset({"loss", "probs", "logits"}),
    "correct": frozenset({"label", "probs", "logits"}),
}


#: Signals that only exist for classifiers.
CLASSIFICATION_ONLY = ("probs", "correct")


class SignalUnavailable(DataError):
    """A plugin read a signal the dataset's task does not define (``probs`` or ``correct`` on
    regression). A usage error: the run stops with one line."""


@dataclass(frozen=True)
class Signals:
    """Signals of every model on every record (see module docstring).

    ``task`` is the dataset's task; on ``"regression"`` ``correct`` is ``None`` and ``probs``
    and ``get("correct")`` raise :class:`SignalUnavailable`."""

    logits: np.ndarray  # float32 [M, N, C]
    confidence: np.ndarray  # float64 [M, N]
    loss: np.ndarray  # float64 [M, N]
    correct: Optional[np.ndarray]  # float64 [M, N]; None on regression
    task: str = "classification"

    def _unavailable(self, name: str) -> SignalUnavailable:
        return SignalUnavailable(f"signal {name!r} is undefined on a regression dataset (real-valued targets); "
                                 f"available there: logits (the prediction), loss (squared error), "
                                 f"confidence (-squared error)")

    @functools.cached_property
    def probs(self) -> np.ndarray:
        if self.task == "regression":
            raise self._unavailable("probs")
        z = self.logits.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def get(self, name: str) -> np.ndarray:
        if name not in SIGNAL_ACCESS:
            raise KeyError(f"unknown signal {name!r}; available: {', '.join(SIGNAL_ACCESS)}")
        if self.task == "regression" and name in CLASSIFICATION_ONLY:
            raise self._unavailable(name)
        return getattr(self, name)

    def take(self, idx: np.ndarray) -> "Signals":
        """The signals of records ``idx`` only (int ``[K]``)."""
        return Signals(logits=self.logits[:, idx], confidence=self.confidence[:, idx], loss=self.loss[:, idx],
                       correct=None if self.correct is None else self.correct[:, idx], task=self.task)


def compute_signals(logits: torch.Tensor, labels: np.ndarray, *, task: str = "classification") -> Signals:
    """Derive all signals from logits ``[M, N, C]`` and labels ``[N]`` (float targets and
    ``C == 1`` when ``task == "regression"``)."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be [M, N, C], got shape {tuple(logits.shape)}")
    logits = logits.detach().cpu()  # signals are host arrays, whatever device the models ran on
    if task == "regression":
        return _regression_signals(logits, labels)
    z = logits.to(torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    m, n, c = z.shape
    if y.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(y.shape)}")
    logp = torch.log_softmax(z, dim=-1)
    yi = y.view(1, n, 1).expand(m, n, 1)
    logp_y = logp.gather(-1, yi).squeeze(-1)
    others = logp.scatter(-1, yi, float("-inf"))
    if c > 1:
        log_rest = torch.logsumexp(others, dim=-1)
    else:  # one class: the rest has probability 0
        log_rest = torch.full_like(logp_y, float("-inf"))
    confidence = logp_y - log_rest
    correct = (z.argmax(dim=-1) == y.view(1, n)).to(torch.float64)
    return Signals(
        logits=logits.to(torch.float32).numpy().copy(),
        confidence=confidence.numpy(),
        loss=(-logp_y).numpy(),
        correct=correct.numpy(),
    )


def _regression_signals(logits: torch.Tensor, targets: np.ndarray) -> Signals:
    """Squared-error signals from predictions ``[M, N, 1]`` and float targets ``[N]``."""
    m, n, c = logits.shape
    if c != 1:
        raise ValueError(f"a regression model has one output per record; got predictions of shape {(m, n, c)}")
    y = np.asarray(targets, dtype=np.float64)
    if y.shape != (n,):
        raise ValueError(f"targets must have shape [{n}], got {y.shape}")
    se = (logits[..., 0].to(torch.float64).numpy() - y[None, :]) ** 2
    return Signals(logits=logits.to(torch.float32).numpy().copy(), confidence=-se, loss=se, correct=None,
                   task="regression")


__all__ = ["CLASSIFICATION_ONLY", "SIGNAL_ACCESS", "SignalUnavailable", "Signals", "compute_signals"]
