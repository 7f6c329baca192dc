"""Post-training temperature scaling of the output layer."""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

from mia_core.base import Defense


def output_layer(params: Dict[str, torch.Tensor], n_classes: int) -> Tuple[str, List[str]]:
    """The output layer's name and the parameters to scale: ``(layer, [weight, bias?])``.

    The output layer is taken to be the one owning the *last* weight matrix in parameter order
    (stacked ``[M, out, in]``, i.e. a 2-D parameter per model); its bias is the 1-D parameter of
    the same module (``<layer>.bias``), if it has one. That is the head of any ``nn.Sequential``
    ending in ``nn.Linear`` and of any module that registers its head last.

    Raises:
        ValueError: no weight matrix, or the last one does not map to ``n_classes`` outputs (the
            model's head is not its last registered linear layer).
    """
    matrices = [name for name, p in params.items() if p.ndim == 3]
    if not matrices:
        raise ValueError("the model has no weight matrix (2-D parameter) to scale")
    weight = matrices[-1]
    w = params[weight]
    if w.shape[1] != n_classes:
        raise ValueError(
            f"the last weight matrix {weight!r} has {w.shape[1]} outputs but the dataset has "
            f"{n_classes} classes; temperature scaling needs the output layer to be registered last"
        )
    layer = weight.rsplit(".", 1)[0] if "." in weight else ""
    bias = f"{layer}.bias" if layer else "bias"
    names = [weight]
    if bias in params and tuple(params[bias].shape) == tuple(w.shape[:2]):
        names.append(bias)
    return layer, names


class Temperature(Defense):
    """Temperature scaling after training: the output layer's weight and bias are divided by T.

    For a model whose logits are ``z = W h + b`` (the last linear layer), dividing ``W`` and ``b``
    by ``T`` gives logits ``z / T``: the released softmax is ``softmax(z / T)``, the temperature
    of Hinton, Vinyals, Dean ("Distilling the Knowledge in a Neural Network", 2015) and of
    Guo et al.'s calibration ("On Calibration of Modern Neural Networks", ICML 2017). The
    predicted label, and hence accuracy, is unchanged for any ``T > 0``; ``T > 1`` softens the
    confidences, ``T < 1`` sharpens them. Every model of the population is scaled (the attacker
    knows the recipe). It is a confidence-masking defense: it changes the released confidences,
    not what the models learned.

    Args:
        T: the temperature, a finite number > 0 (1 leaves the model unchanged).
    """

    api_version = "1.0"
    stage = "post"
    reference = (
        "G. Hinton, O. Vinyals, J. Dean. Distilling the Knowledge in a Neural Network. NIPS Deep "
        "Learning Workshop 2015; C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger. On Calibration of "
        "Modern Neural Networks. ICML 2017"
    )

    def __init__(self, T: float = 2.0):
        self.T = T

    def validate(self) -> None:
        t = self.T
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"T must be a finite number > 0, got {t!r}")

    def apply(self, ctx) -> Dict[str, object]:
        self.validate()
        layer, names = output_layer(ctx.params, ctx.records.n_classes)
        with torch.no_grad():
            for name in names:
                ctx.params[name].div_(float(self.T))
        ctx.changed()
        return {"T": float(self.T), "layer": layer, "scaled_parameters": names}
