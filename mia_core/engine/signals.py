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

Which access level reveals which signal (see :data:`mia_core.base.ACCESS_LEVELS`):
``correct`` needs ``label`` (or more), ``loss`` needs ``loss`` or ``probs``/``logits``,
``probs`` and ``confidence`` need ``probs`` or ``logits``, ``logits`` needs ``logits``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, FrozenSet

import numpy as np
import torch

SIGNAL_ACCESS: Dict[str, FrozenSet[str]] = {
    "logits": frozenset({"logits"}),
    "probs": frozenset({"probs", "logits"}),
    "confidence": frozenset({"probs", "logits"}),
    "loss": frozenset({"loss", "probs", "logits"}),
    "correct": frozenset({"label", "probs", "logits"}),
}


@dataclass(frozen=True)
class Signals:
    """Signals of every model on every record (see module docstring)."""

    logits: np.ndarray  # float32 [M, N, C]
    confidence: np.ndarray  # float64 [M, N]
    loss: np.ndarray  # float64 [M, N]
    correct: np.ndarray  # float64 [M, N]

    @functools.cached_property
    def probs(self) -> np.ndarray:
        z = self.logits.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def get(self, name: str) -> np.ndarray:
        if name not in SIGNAL_ACCESS:
            raise KeyError(f"unknown signal {name!r}; available: {', '.join(SIGNAL_ACCESS)}")
        return getattr(self, name)


def compute_signals(logits: torch.Tensor, labels: np.ndarray) -> Signals:
    """Derive all signals from logits ``[M, N, C]`` and labels ``[N]``."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be [M, N, C], got shape {tuple(logits.shape)}")
    logits = logits.detach().cpu()  # signals are host arrays, whatever device the models ran on
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


__all__ = ["SIGNAL_ACCESS", "Signals", "compute_signals"]
