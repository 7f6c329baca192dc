"""L2 regularisation as a train-time defense (Farokhi & Kaafar 2020, Theorem 3)."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from mia_core.base import TrainingDefense


def l2_penalty(params: Dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """``lam * ||θ_m||²`` for every model: float ``[M]``.

    Args:
        params: stacked parameters ``{name: Tensor[M, ...]}``; ``θ_m`` is all of model ``m``'s
            entries (weights and biases).
        lam: ``λ >= 0``.

    Its gradient in ``θ_m`` is ``2 λ θ_m``.
    """
    sq = None
    for p in params.values():
        s = p.reshape(p.shape[0], -1).pow(2).sum(dim=1)
        sq = s if sq is None else sq + s
    if sq is None:
        raise ValueError("the model has no parameters to regularise")
    return lam * sq


class WeightDecay(TrainingDefense):
    """L2 regularisation λ‖θ‖² added to every model's training loss (Farokhi & Kaafar 2020, Theorem 3).

    Farokhi & Kaafar (2020) train ``θ* ∈ argmin_θ f(θ, D)`` with
    ``f(θ, D) = λ g(θ) + (1/|D|) Σ_{(x,y)∈D} ℓ(M(x; θ), y)`` and, in their experiments, the
    quadratic ``g(θ) = θᵀθ``. Their Theorem 3 states that, if the parameter set is compact, the
    loss is Lipschitz in ``θ``, ``g`` is strictly convex and the expected loss convex, then the
    membership information leakage ``I(θ*; z_i | x_i, y_i)`` tends to 0 as ``λ → ∞``: the
    minimiser approaches ``argmin g``, which does not depend on the data. The theorem is a limit
    for convex problems; for neural networks it is a heuristic that ``miafw`` measures (attack
    advantage and leakage estimates against the accuracy cost the engine reports).

    The penalty is the paper's, without a factor 1/2: each model's step minimises its batch's mean
    cross-entropy plus ``λ‖θ_m‖²`` over all its parameters (weights and biases), so ``2λθ_m`` is
    added to its gradient (:meth:`penalty`; the per-step objective is an unbiased estimate of
    ``f``). With the recipe's optimizer, ``TrainingRecipe(weight_decay=w)`` adds ``w θ`` to the
    gradient, so ``WeightDecay(lam=λ)`` computes the same update as ``weight_decay = 2λ`` for
    SGD and for Adam (torch's L2-coupled ``weight_decay``, not AdamW's decoupled decay). It differs
    in what surrounds it: as a defense it is part of the population's cache key and of the defense
    chain, it is reported (λ and the parameter norm it leaves) next to the attacks and the
    accuracy cost, and a sweep over ``lam`` traces its privacy-utility trade-off.
    Combined with gradient transforms (DP-SGD), its gradient is added after clipping, noise and
    the division by the batch denominator, as Opacus treats an optimizer's weight decay.

    Args:
        lam: ``λ``, a finite number >= 0 (0 trains as without the defense).
    """

    api_version = "1.0"
    stage = "train"
    reference = (
        "F. Farokhi, M. A. Kaafar. Modelling and Quantifying Membership Information Leakage in "
        "Machine Learning. arXiv:2001.10648, 2020 (Theorem 3: regularization)"
    )

    def __init__(self, lam: float = 1e-3):
        self.lam = lam

    def validate(self) -> None:
        lam = self.lam
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0 (the L2 penalty weight λ), got {lam!r}")

    def configure(self, ctx) -> None:
        self.validate()
        self.sq_norm_: Optional[torch.Tensor] = None

    def penalty(self, params: Dict[str, torch.Tensor], batch=None) -> torch.Tensor:
        """``λ‖θ_m‖²`` per model, float ``[M]`` (see :func:`l2_penalty`)."""
        sq = l2_penalty(params, 1.0)
        self.sq_norm_ = sq.detach()  # ‖θ_m‖² at the last step, for the report (no extra pass)
        return float(self.lam) * sq

    def report(self, result) -> Dict[str, Any]:
        out: Dict[str, Any] = {"lam": float(self.lam), "penalty": "lam * ||theta||^2 per model (all parameters)"}
        sq = getattr(self, "sq_norm_", None)
        if sq is not None:
            norms = sq.double().sqrt()
            out["param_norm_mean"] = float(norms.mean())
            out["param_norm_max"] = float(norms.max())
            out["penalty_mean"] = float((self.lam * sq.double()).mean())
        return out
