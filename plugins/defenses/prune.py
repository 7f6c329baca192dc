"""Magnitude pruning after training, with optional mask-preserving fine-tuning."""

from __future__ import annotations

import math
from typing import Dict, List, Literal, Optional

import torch

from mia_core import kernels
from mia_core.base import Defense


def magnitude_masks(weights: List[torch.Tensor], sparsity: float, *, scope: str) -> List[torch.Tensor]:
    """Keep-masks that zero the smallest-magnitude weights of every model.

    A thin wrapper over :func:`mia_core.kernels.magnitude_masks` with ``stacked=True`` (native
    O(n) selection, bit-identical to the stable-argsort reference
    :func:`mia_core.kernels.magnitude_masks_reference`).

    Args:
        weights: stacked tensors ``[M, ...]``, one per prunable parameter.
        sparsity: fraction in ``[0, 1)`` of the weights to remove, per model.
        scope: ``"global"`` ranks all of a model's prunable weights together (one threshold per
            model); ``"layer"`` prunes each tensor of each model to ``sparsity`` on its own.

    Returns:
        bool masks with the shapes of ``weights`` (True = kept). Exactly
        ``round(sparsity * count)`` weights are removed per model (per tensor for ``layer``);
        magnitude ties are broken by position (lower position removed first) and NaN counts as
        the largest magnitude, so the result is deterministic.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return kernels.magnitude_masks(
        weights, sparsity, scope="global" if scope == "global" else "tensor", stacked=True
    )


class Prune(Defense):
    """Magnitude pruning of every model after training (Han, Pool, Tran, Dally, NeurIPS 2015),
    the defense Wang et al. evaluate against membership inference (IJCAI 2021, "Against
    Membership Inference Attack: Pruning is All You Need", eq. 6: g(x) uses P_i ⊙ W_i, a binary
    mask P_i per layer).

    The smallest-magnitude weights of each model are set to zero so that a fraction
    ``sparsity`` of its prunable weights is removed; with ``finetune_epochs > 0`` every model
    then continues training on its own training half while the mask is re-applied after each
    step, so pruned weights stay zero. Wang et al. additionally search the per-layer
    cardinalities n_i against an adversary (their Algorithm 1); here the sparsity is given, and
    ``miafw`` measures the leakage at that point.

    Args:
        sparsity: fraction of prunable weights removed, in [0, 1).
        scope: ``global`` (one magnitude threshold per model across all layers) or ``layer``
            (each layer pruned to ``sparsity``).
        finetune_epochs: epochs of mask-preserving fine-tuning (0 = none; the default 10 retrains
            as Han et al. do, so the pruned model keeps its accuracy).
        finetune_lr: learning rate for fine-tuning (default: the recipe's).
        include_bias: also prune biases and other 1-D parameters (default: weight matrices only).
    """

    api_version = "1.0"
    stage = "post"
    reference = (
        "Y. Wang et al. Against Membership Inference Attack: Pruning is All You Need. IJCAI 2021; "
        "S. Han, J. Pool, J. Tran, W. Dally. Learning both Weights and Connections for Efficient "
        "Neural Networks. NeurIPS 2015"
    )

    def __init__(
        self,
        sparsity: float = 0.8,
        scope: Literal["global", "layer"] = "global",
        finetune_epochs: int = 10,
        finetune_lr: Optional[float] = None,
        include_bias: bool = False,
    ):
        self.sparsity = sparsity
        self.scope = scope
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.include_bias = include_bias

    def validate(self) -> None:
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {self.scope!r}")
        if not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be an integer >= 0, got {self.finetune_epochs!r}")
        if self.finetune_lr is not None and not (self.finetune_lr > 0 and math.isfinite(self.finetune_lr)):
            raise ValueError(f"finetune_lr must be a positive number, got {self.finetune_lr!r}")

    def prunable(self, params: Dict[str, torch.Tensor]) -> List[str]:
        """Names of the parameters this defense prunes (``[M, ...]`` stacked: ndim > 2 means a
        weight matrix or kernel per model)."""
        return [n for n, p in params.items() if self.include_bias or p.ndim > 2]

    def apply(self, ctx) -> Dict[str, object]:
        self.validate()
        names = self.prunable(ctx.params)
        if not names:
            raise ValueError("the model has no prunable parameters (set include_bias=true to prune 1-D ones)")
        tensors = [ctx.params[n] for n in names]
        masks = magnitude_masks(tensors, self.sparsity, scope=self.scope)
        # Validated once and re-applied after every fine-tuning step with one cheap call: the
        # optimizer updates the stacked parameters in place, so the plan stays valid (a plan whose
        # tensors were reallocated raises StaleMaskPlanError rather than mask stale memory).
        plan = kernels.MaskPlan(tensors, masks)
        with torch.no_grad():
            backend = plan.apply()
        if self.finetune_epochs:
            ctx.finetune(self.finetune_epochs, lr=self.finetune_lr, post_step=lambda params: plan.apply())
        ctx.changed()
        return self._report(ctx.params, names, masks, backend)

    def _report(self, params, names, masks, backend) -> Dict[str, object]:
        m = params[names[0]].shape[0]
        zeros = torch.zeros(m, dtype=torch.float64)
        total = 0
        for n in names:
            zeros += (params[n].reshape(m, -1) == 0).sum(dim=1).to("cpu", torch.float64)  # any device
            total += params[n][0].numel()
        achieved = zeros / total
        all_params = sum(p[0].numel() for p in params.values())
        all_zero = sum((p.reshape(m, -1) == 0).sum(dim=1).to("cpu", torch.float64) for p in params.values())
        return {
            "target_sparsity": float(self.sparsity),
            "achieved_sparsity": float(achieved.mean()),
            "achieved_sparsity_min": float(achieved.min()),
            "achieved_sparsity_max": float(achieved.max()),
            "overall_sparsity": float((all_zero / all_params).mean()),
            "pruned_tensors": names,
            "prunable_parameters_per_model": int(total),
            "parameters_per_model": int(all_params),
            "scope": self.scope,
            "finetune_epochs": int(self.finetune_epochs),
            "kernel_backend": backend,
        }
