"""Ridge regression, every model of the population solved in closed form in one batched call."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from mia_core.base import ModelFamily


def ridge_solve(*, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, lam: float,
                penalize_bias: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of ``y`` on ``x`` for every model on its own training half, in one call.

    Model ``m`` minimises ``(1/n_m) sum_{j in S_m} (y_j - w^T x_j - b)^2 + lam ||w||^2`` over its
    training half ``S_m = {j : keep[m, j]}`` of size ``n_m`` (Farokhi & Kaafar 2020's ridge
    objective, the bias added); the normal equations with the augmented features
    ``a_j = [x_j, 1]`` are

        (A_m^T A_m + lam * n_m * P) [w; b] = A_m^T y_m,   P = diag(1, ..., 1, p_b),

    with ``p_b = 0`` (the bias is **not** penalised, as in scikit-learn's ``Ridge``, which this
    equals with ``alpha = lam * n_m`` and ``fit_intercept=True``) or ``p_b = 1`` with
    ``penalize_bias``. The Gram matrices are built for all models at once as
    ``A^T diag(keep[m]) A`` and the ``M`` systems ``[M, D+1, D+1]`` are solved by one batched
    ``torch.linalg.solve`` in float64.

    Args:
        x: float ``[N, D]`` features; y: float ``[N]`` targets; keep: bool ``[M, N]`` membership.
        lam: the ridge weight, ``>= 0`` (``0``: ordinary least squares, which needs every model's
            ``A_m`` to have full column rank).
        penalize_bias: penalise the bias like the weights.

    Returns:
        ``(w, b)``: float64 ``[M, D]`` weights and ``[M]`` biases.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    k = torch.as_tensor(keep).to(torch.float64)
    n, d = x.shape
    if y.shape != (n,) or k.ndim != 2 or k.shape[1] != n:
        raise ValueError(f"expected x [N, D], y [N], keep [M, N]; got {tuple(x.shape)}, {tuple(y.shape)}, "
                         f"{tuple(k.shape)}")
    a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)  # [N, D+1]
    gram = torch.einsum("mn,ni,nj->mij", k, a, a)  # [M, D+1, D+1]
    rhs = torch.einsum("mn,ni,n->mi", k, a, y)  # [M, D+1]
    penalty = torch.ones(d + 1, dtype=torch.float64)
    penalty[d] = 1.0 if penalize_bias else 0.0
    n_m = k.sum(dim=1)  # [M]
    system = gram + (lam * n_m)[:, None, None] * torch.diag(penalty)[None]
    beta = torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1)  # [M, D+1]
    return beta[:, :d], beta[:, d]


class LinReg(ModelFamily):
    """Ridge regression (regression datasets), the whole population solved in closed form.

    Each model ``m`` solves ``(X_m^T X_m + lam n_m I) w = X_m^T y_m`` on its own training half
    (the bias unpenalised unless ``penalize_bias``), all models in one batched
    ``torch.linalg.solve`` (:func:`ridge_solve`); no SGD runs, so ``--epochs``/``--lr`` are unused
    and train-time defenses are refused (post-training ones such as ``noise`` apply). The
    signals are squared-error based (:mod:`mia_core.engine.signals`).

    Farokhi & Kaafar's fitness ``lam theta^T theta + (1/n) sum (y - M(x; theta))^2`` penalises every
    parameter; with ``penalize_bias=true`` the bias is part of ``theta`` and penalised too (their
    objective exactly); the default leaves it free (scikit-learn's ``Ridge``).

    Args:
        lam: ridge weight ``lambda >= 0`` on the mean squared error's scale (sklearn's
            ``alpha = lam * n_m``).
        penalize_bias: also penalise the bias.
    """

    api_version = "1.0"
    reference = ("F. Farokhi and M. A. Kaafar, \"Modelling and Quantifying Membership Information Leakage in "
                 "Machine Learning\", arXiv:2001.10648, 2020 (fitness lam g(theta) + mean loss with g(theta) = theta^T theta; "
                 "their linear-regression experiments)")

    def __init__(self, lam: float = 0.01, penalize_bias: bool = False):
        self.lam = lam
        self.penalize_bias = penalize_bias

    def validate(self) -> None:
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0 and self.lam < float("inf")):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")

    def build(self, n_features: int, n_classes: int) -> nn.Module:
        self.validate()
        if n_classes != 1:
            raise ValueError(f"linreg is a regression model (one output); the dataset has {n_classes} classes: "
                             f"use a regression dataset (diabetes, synthetic:kind=regression)")
        return nn.Linear(n_features, 1)

    def fit_closed_form(self, *, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every model's parameters ``{"weight": [M, 1, D], "bias": [M, 1]}`` (float64) from
        :func:`ridge_solve`; the engine calls this instead of SGD training."""
        self.validate()
        w, b = ridge_solve(x=x, y=y, keep=keep, lam=float(self.lam), penalize_bias=bool(self.penalize_bias))
        return {"weight": w.unsqueeze(1), "bias": b.unsqueeze(1)}
