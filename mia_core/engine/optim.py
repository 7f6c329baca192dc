"""The optimizer step of the ensemble: torch's fused Adam/SGD kernels, called directly.

The stacked parameters of M models are a handful of tensors, updated elementwise, so one fused
kernel call (``torch._fused_adam_`` / ``torch._fused_sgd_``, the kernels behind
``torch.optim.Adam(fused=True)`` and ``torch.optim.SGD(fused=True)``) performs all M independent
updates. Calling them directly computes bit for bit what ``torch.optim`` computes
(``tests/engine/test_trainer.py`` checks it) while skipping ``torch.optim``'s per-step
bookkeeping and the one-off import of ``torch._dynamo`` that constructing a ``torch.optim``
optimizer triggers (about a second per process). Where the device has no fused kernel, or this
torch lacks one, :func:`make_optimizer` returns ``torch.optim``'s ``foreach`` implementation of
the same update.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch


class _FusedStep:
    """Shared state handling: a fixed list of tensors, each with its ``.grad`` set per step."""

    #: ``"fused"`` (direct kernel) or ``"foreach"`` (torch.optim fallback), for reports.
    kind = "fused"

    def __init__(self, params: Sequence[torch.Tensor], lr: float, weight_decay: float):
        self.params: List[torch.Tensor] = list(params)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)

    def _grads(self) -> List[torch.Tensor]:
        """The parameters' gradients, each in its parameter's memory layout: the fused kernels
        pair elements by position in memory, so a transposed gradient (as autograd returns for
        some views) is copied into the parameter's strides first."""
        grads = []
        for p in self.params:
            g = p.grad
            if g is None:
                raise RuntimeError("every stacked parameter needs a gradient before the optimizer step")
            if g.stride() != p.stride():
                g = torch.empty_like(p).copy_(g)
            grads.append(g)
        return grads


class FusedAdam(_FusedStep):
    """Adam with L2-coupled weight decay (``torch.optim.Adam``'s update), one fused call per step."""

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr, weight_decay)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        grads = self._grads()
        torch._foreach_add_(self.steps, 1)
        torch._fused_adam_(
            self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps,
            amsgrad=False, lr=self.lr, beta1=self.beta1, beta2=self.beta2,
            weight_decay=self.weight_decay, eps=self.eps, maximize=False, grad_scale=None, found_inf=None,
        )


class FusedSGD(_FusedStep):
    """SGD with momentum and L2 weight decay (``torch.optim.SGD``'s update), one fused call per step."""

    def __init__(self, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr, weight_decay)
        self.momentum = float(momentum)
        self.buffers: List[torch.Tensor] = []

    @torch.no_grad()
    def step(self) -> None:
        grads = self._grads()
        first = self.momentum != 0 and not self.buffers
        if first:
            self.buffers = [torch.empty_like(g) for g in grads]
        torch._fused_sgd_(
            self.params, grads, self.buffers if self.momentum != 0 else [],
            weight_decay=self.weight_decay, momentum=self.momentum, lr=self.lr, dampening=0.0,
            nesterov=False, maximize=False, is_first_step=first, grad_scale=None, found_inf=None,
        )


class _TorchOptim:
    """``torch.optim``'s foreach implementation behind the same ``step()``."""

    kind = "foreach"

    def __init__(self, opt: torch.optim.Optimizer):
        self._opt = opt

    def step(self) -> None:
        self._opt.step()


_FUSED: Dict[str, bool] = {}


def _fused_available(device: torch.device) -> bool:
    """Whether this torch has the fused Adam/SGD kernels for ``device`` (probed once on 1 element)."""
    key = str(device)
    if key not in _FUSED:
        _FUSED[key] = _probe_fused(device)
    return _FUSED[key]


def _probe_fused(device: torch.device) -> bool:
    try:
        p = torch.zeros(1, device=device)
        g = torch.zeros(1, device=device)
        torch._fused_adam_([p], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], [],
                           [torch.ones((), device=device)], amsgrad=False, lr=0.1, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=1e-8, maximize=False, grad_scale=None, found_inf=None)
        torch._fused_sgd_([p], [g], [torch.zeros_like(p)], weight_decay=0.0, momentum=0.9, lr=0.1,
                          dampening=0.0, nesterov=False, maximize=False, is_first_step=True,
                          grad_scale=None, found_inf=None)
        return True
    except (AttributeError, RuntimeError, TypeError):  # "not implemented" errors are RuntimeErrors too
        return False


def make_optimizer(params: Sequence[torch.Tensor], *, optimizer: str, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.0, fused: bool = True):
    """An object whose ``step()`` applies Adam or SGD to ``params`` from their ``.grad``.

    Args:
        params: the stacked parameter tensors (one device, floating point).
        optimizer: ``"adam"`` or ``"sgd"``.
        lr, weight_decay, momentum: as in ``torch.optim`` (Adam's betas and eps are torch's defaults).
        fused: use the fused kernels when the device has them (``False`` forces ``foreach``).
    """
    params = list(params)
    device = params[0].device
    if fused and _fused_available(device):
        if optimizer == "adam":
            return FusedAdam(params, lr=lr, weight_decay=weight_decay)
        return FusedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adam":
        return _TorchOptim(torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True))
    return _TorchOptim(torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True))


__all__ = ["FusedAdam", "FusedSGD", "make_optimizer"]
