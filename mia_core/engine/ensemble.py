"""The forward pass of M stacked models, and their per-sample gradients.

Two interchangeable paths compute the logits of ``M`` models on their own batches
(``x``: float ``[M, B, D]`` -> ``[M, B, C]``) from stacked parameters ``{name: Tensor[M, ...]}``:

* :class:`StackedSequential` — the fast path for an ``nn.Sequential`` of ``nn.Linear`` layers and
  parameter-free elementwise activations (and a bare ``nn.Linear``): one ``torch.baddbmm`` per
  layer. It computes exactly what ``functional_call`` computes, ``x @ W.T + b`` per model; only
  the kernels (batched GEMM instead of ``vmap``'s batching rules) and hence the float rounding
  differ. Activations are kept feature-major, ``h [M, F, B]`` with ``h' = W h + b``, so that
  the weight gradient ``g hᵀ`` comes out ``[M, out, in]``, contiguous in the parameter's own
  layout (a row-major ``h Wᵀ`` yields a transposed gradient that must be copied every step).
  For the common activations it also runs the backward pass itself
  (:meth:`StackedSequential.loss_and_grads`): the very ATen kernels autograd would call (so the
  gradients are bitwise autograd's), written into a workspace reused from step to step. Fresh
  multi-megabyte buffers every step cost page faults that were ~20% of a step here.
* :class:`VmapForward` — any other module: ``torch.func.vmap`` over ``functional_call``.

:func:`ensemble_forward` picks the fast path when the module qualifies.
:func:`per_sample_gradients` is the generic ``torch.func`` path (``grad`` inside a double
``vmap``: over models, then over samples) that train-time defenses such as DP-SGD ask for.
"""

from __future__ import annotations

import abc
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

Params = Dict[str, torch.Tensor]

#: Parameter-free modules that act elementwise, so they apply unchanged to ``[M, B, H]``.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Identity,
)


_A = torch.ops.aten


def _same_kernels_as_autograd():
    """Per activation type: ``(forward into out=, backward in place on g)``, the kernels autograd
    uses for that activation (``ReluBackward0`` is ``threshold_backward(g, result, 0)``, and so
    on). ``fwd(op, h, out)`` may return ``h`` itself (ReLU in place); ``bwd(op, g, inp, res)``."""
    return {
        nn.ReLU: (lambda op, h, out: torch.clamp_min(h, 0, out=out),
                  lambda op, g, inp, res: _A.threshold_backward.grad_input(g, res, 0, grad_input=g)),
        nn.Tanh: (lambda op, h, out: torch.tanh(h, out=out),
                  lambda op, g, inp, res: _A.tanh_backward.grad_input(g, res, grad_input=g)),
        nn.Sigmoid: (lambda op, h, out: torch.sigmoid(h, out=out),
                     lambda op, g, inp, res: _A.sigmoid_backward.grad_input(g, res, grad_input=g)),
        nn.GELU: (lambda op, h, out: _A.gelu.out(h, approximate=op.approximate, out=out),
                  lambda op, g, inp, res: _A.gelu_backward.grad_input(g, inp, approximate=op.approximate, grad_input=g)),
        nn.SiLU: (lambda op, h, out: _A.silu.out(h, out=out),
                  lambda op, g, inp, res: _A.silu_backward.grad_input(g, inp, grad_input=g)),
        nn.LeakyReLU: (lambda op, h, out: _A.leaky_relu.out(h, op.negative_slope, out=out),
                       lambda op, g, inp, res: _A.leaky_relu_backward.grad_input(g, inp, op.negative_slope, False, grad_input=g)),
        nn.Identity: (lambda op, h, out: h, lambda op, g, inp, res: g),
    }


MANUAL_BACKWARD = _same_kernels_as_autograd()


class Workspace:
    """Buffers reused from one training step to the next, one per key, grown on demand."""

    def __init__(self):
        self._flat: Dict[object, torch.Tensor] = {}

    def get(self, key, shape, like: torch.Tensor) -> torch.Tensor:
        """A contiguous ``shape`` view of the buffer ``key`` (contents undefined)."""
        numel = 1
        for n in shape:
            numel *= int(n)
        buf = self._flat.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
            self._flat[key] = buf
        return buf[:numel].view(shape)


class EnsembleForward(abc.ABC):
    """Logits of ``M`` stacked models on their own batches."""

    #: ``"stacked"`` or ``"vmap"``, reported in the training result.
    name: str = ""

    @abc.abstractmethod
    def __call__(self, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        """``x`` float ``[M, B, D]`` -> logits ``[M, B, C]``."""


class VmapForward(EnsembleForward):
    """Any module: ``vmap`` over ``functional_call`` of the (meta-device) ``base``."""

    name = "vmap"

    def __init__(self, base: nn.Module):
        self._fn = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)))

    def __call__(self, params, buffers, x):
        return self._fn(params, buffers, x)


class StackedSequential(EnsembleForward):
    """``nn.Sequential`` of ``nn.Linear`` and elementwise activations, as batched GEMMs.

    On feature-major activations ``h [M, in, B]`` (the input batch ``x [M, B, D]`` enters as the
    transposed view), layer ``Linear(weight [M, out, in], bias [M, out])`` is
    ``baddbmm(bias[:, :, None], weight, h)``; activations are called as they are (they are
    elementwise). Use :meth:`for_module` to build one.
    """

    name = "stacked"

    def __init__(self, ops: List[Tuple[str, object]]):
        self._ops = ops
        #: whether :meth:`loss_and_grads` can run (every activation has its backward kernel here)
        self.manual = all(kind == "linear" or type(op) in MANUAL_BACKWARD for kind, op in ops)

    @classmethod
    def for_module(cls, module: nn.Module) -> Optional["StackedSequential"]:
        """The fast path for ``module``, or ``None`` when it does not qualify (then use
        :class:`VmapForward`). Only exact ``nn.Linear`` / ``nn.Sequential`` types qualify, so a
        subclass with its own ``forward`` never takes this path."""
        if type(module) is nn.Linear:
            return cls([("linear", ("weight", "bias" if module.bias is not None else None))])
        if type(module) is not nn.Sequential or len(module) == 0:
            return None
        if any(True for _ in module.buffers()):
            return None
        ops: List[Tuple[str, object]] = []
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                ops.append(("linear", (f"{name}.weight", f"{name}.bias" if child.bias is not None else None)))
            elif isinstance(child, ELEMENTWISE) and not any(True for _ in child.parameters()):
                ops.append(("act", child))
            else:
                return None
        if not any(kind == "linear" for kind, _ in ops):
            return None
        return cls(ops)

    def features_last(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[M, C, B]`` (class axis second, as ``F.cross_entropy`` takes it) of
        ``x [M, B, D]``: the layout the layers compute in, without a final transpose."""
        h = x.transpose(1, 2)
        fresh = False  # h is a linear layer's output that nothing has saved for backward yet
        for kind, op in self._ops:
            if kind == "linear":
                w_name, b_name = op
                w = params[w_name]
                h = torch.bmm(w, h) if b_name is None else torch.baddbmm(params[b_name].unsqueeze(2), w, h)
                fresh = True
            elif fresh and type(op) is nn.ReLU:
                h = h.relu_()  # in place on the GEMM's output: one pass and one buffer fewer
                fresh = False  # relu saved it for its backward
            else:
                h = op(h)  # activations may save their output (tanh, sigmoid): never overwritten
                fresh = False
        return h

    def __call__(self, params, buffers, x):
        return self.features_last(params, x).transpose(1, 2)

    @torch.no_grad()
    def loss_and_grads(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, weight, ws: Workspace
    ) -> Tuple[torch.Tensor, Params]:
        """Per-sample cross-entropy and the gradients of ``Σ_{m,b} weight[m, b] · loss[m, b]``,
        without autograd (requires :attr:`manual`).

        Args:
            params: stacked parameters.
            x: float ``[M, B, D]``; y: int64 ``[M, B]``.
            weight: a float (every sample) or float ``[M, B]`` (0 on padding rows, whose
                gradient is then exactly zero).
            ws: the workspace; the returned gradients live in it and are overwritten by the next
                call (the trainer hands them to the optimizer as ``.grad`` at once).

        Returns:
            ``(loss, grads)``: ``loss`` float ``[M, B]`` (unweighted), ``grads[name]`` shaped like
            ``params[name]``.
        """
        saved, logp, loss, g = self._forward_and_head(params, x, y, weight, ws)
        grads: Params = {}
        first_linear = self._first_linear
        for i in range(len(self._ops) - 1, first_linear - 1, -1):
            kind, op = self._ops[i]
            inp, out = saved[i]
            if kind == "linear":
                w_name, b_name = op
                w = params[w_name]
                grads[w_name] = torch.bmm(g, inp.transpose(1, 2), out=ws.get(("grad", w_name), w.shape, w))
                if b_name is not None:
                    grads[b_name] = torch.sum(g, 2, out=ws.get(("grad", b_name), params[b_name].shape, w))
                if i > first_linear:
                    g = torch.bmm(w.transpose(1, 2), g, out=ws.get(("g", i), inp.shape, w))
            else:
                g = MANUAL_BACKWARD[type(op)][1](op, g, inp, out)
        return loss, grads

    @property
    def _first_linear(self) -> int:
        return next(i for i, (kind, _) in enumerate(self._ops) if kind == "linear")

    def _forward_and_head(self, params: Params, x: torch.Tensor, y: torch.Tensor, weight, ws: Workspace):
        """The forward pass, saving every op's ``(input, output)``, and the gradient of
        ``Σ weight · loss`` with respect to the logits: ``(saved, logp, loss, g)``."""
        n_models, width = y.shape
        h = x.transpose(1, 2)  # [M, D, B], a view
        saved: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of every op
        fresh = False
        for i, (kind, op) in enumerate(self._ops):
            if kind == "linear":
                w_name, b_name = op
                w = params[w_name]
                out = ws.get(("z", i), (n_models, w.shape[1], width), w)
                if b_name is None:
                    torch.bmm(w, h, out=out)
                else:
                    torch.baddbmm(params[b_name].unsqueeze(2), w, h, out=out)
                fresh = True
            else:
                fwd, _ = MANUAL_BACKWARD[type(op)]
                if fresh and type(op) is nn.ReLU:  # the linear output is needed by no backward
                    out = h.relu_()
                else:
                    out = fwd(op, h, ws.get(("a", i), h.shape, h))
                fresh = False
            saved.append((h, out))
            h = out
        logp = torch.log_softmax(h, 1)  # [M, C, B]
        loss = F.nll_loss(logp, y, reduction="none")
        # nll_loss's backward: -weight at each sample's label; then log_softmax's backward.
        g = torch.zeros_like(logp)
        if isinstance(weight, torch.Tensor):
            g.scatter_(1, y.unsqueeze(1), weight.neg().unsqueeze(1).to(g.dtype))
        else:
            g.scatter_(1, y.unsqueeze(1), -float(weight))
        g = _A._log_softmax_backward_data(g, logp, 1, logp.dtype)
        return saved, logp, loss, g

    @torch.no_grad()
    def rescaled_grads(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, factors, ws: Workspace
    ) -> Tuple[torch.Tensor, Params, torch.Tensor]:
        """Per-sample gradient norms, and the sum of the per-sample gradients rescaled by
        ``factors(norms)``, without materialising any per-sample gradient (requires :attr:`manual`).

        Sample ``b``'s gradient of a linear layer is ``δ_b a_bᵀ`` (its output gradient times its
        input), so its squared norm is ``‖δ_b‖²‖a_b‖²`` (plus ``‖δ_b‖²`` for the bias); the
        squared norms of every layer add up to the sample's flat norm. The rescaled sum
        ``Σ_b c_b δ_b a_bᵀ`` is one batched GEMM per layer (Li, Tramèr, Liang, Hashimoto, "Large
        language models can be strong differentially private learners", ICLR 2022, sec. 4, for
        sequences; here each sample is one vector, so the norm is exact, not a bound).

        Args:
            weight: float ``[M, B]``: each sample's gradient is that of ``weight · loss``
                (0 on padding rows).
            factors: ``norms [M, B] -> float [M, B]``, the per-sample factors ``c``.

        Returns:
            ``(loss, grads, norms)``: ``loss`` float ``[M, B]`` (unweighted), ``grads[name]``
            shaped like ``params[name]`` (in the workspace), ``norms`` float ``[M, B]`` before
            rescaling.
        """
        saved, _, loss, g = self._forward_and_head(params, x, y, weight, ws)
        first_linear = self._first_linear
        layers = []  # (op, input, output gradient) of every linear layer, last first
        sq = torch.zeros(y.shape, dtype=g.dtype, device=g.device)
        for i in range(len(self._ops) - 1, first_linear - 1, -1):
            kind, op = self._ops[i]
            inp, out = saved[i]
            if kind == "linear":
                g_sq = g.square().sum(1)  # [M, B]
                sq.add_(g_sq * inp.square().sum(1))
                if op[1] is not None:
                    sq.add_(g_sq)
                layers.append((op, inp, g))
                if i > first_linear:
                    g = torch.bmm(params[op[0]].transpose(1, 2), g)  # a fresh tensor: g is kept
            else:
                g = MANUAL_BACKWARD[type(op)][1](op, g, inp, out)
        norms = sq.sqrt()
        c = factors(norms).to(g.dtype).unsqueeze(1)  # [M, 1, B]
        grads: Params = {}
        for (w_name, b_name), inp, g in layers:
            w = params[w_name]
            gc = g * c
            grads[w_name] = torch.bmm(gc, inp.transpose(1, 2), out=ws.get(("grad", w_name), w.shape, w))
            if b_name is not None:
                grads[b_name] = torch.sum(gc, 2, out=ws.get(("grad", b_name), params[b_name].shape, w))
        # in the parameters' order, as torch.func's per-sample route gives them: a defense that draws
        # noise parameter by parameter (dp-sgd) then draws the same noise on either route
        return loss, {k: grads[k] for k in params}, norms


def ensemble_forward(base: nn.Module, *, allow_stacked: bool = True) -> EnsembleForward:
    """The fastest exact forward path for ``base`` (see the module docstring)."""
    if allow_stacked:
        fast = StackedSequential.for_module(base)
        if fast is not None:
            return fast
    return VmapForward(base)


def per_sample_gradients(
    base: nn.Module, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
) -> Tuple[Params, torch.Tensor]:
    """Gradients of every sample's weighted cross-entropy, for every model.

    Args:
        base: the meta-device module (``functional_call``).
        params, buffers: stacked ``{name: Tensor[M, ...]}``.
        x: float ``[M, B, D]``; y: int64 ``[M, B]``.
        weight: float ``[M, B]``; sample ``b`` of model ``m`` contributes ``weight[m, b] * loss``
            (0 for the padding rows of a ragged batch, whose gradient is then exactly zero).

    Returns:
        ``(grads, losses)``: ``grads[name]`` float ``[M, B, ...]`` (the gradient of
        ``weight[m, b] * loss[m, b]``), ``losses`` float ``[M, B]`` weighted per-sample losses.
    """

    def one(p, b, x1, y1, w1):
        out = functional_call(base, (p, b), (x1.unsqueeze(0),))
        return w1 * F.cross_entropy(out, y1.unsqueeze(0))

    per_model = vmap(grad_and_value(one), in_dims=(None, None, 0, 0, 0))
    return vmap(per_model, in_dims=(0, 0, 0, 0, 0))(params, buffers, x, y, weight)


__all__ = [
    "ELEMENTWISE",
    "MANUAL_BACKWARD",
    "Workspace",
    "EnsembleForward",
    "StackedSequential",
    "VmapForward",
    "ensemble_forward",
    "per_sample_gradients",
]
