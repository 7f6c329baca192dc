"""Post-training quantization of every model's parameters through miafw's fake-quantize kernels.

The maths are pure keyword-only functions over stacked tensors ``w: Tensor[M, ...]`` (model
axis first, as ``DefenseContext.params``); :class:`Quantize` is the thin plugin around them.
Every function quantizes each model on its own (never a scale shared across models), so
quantizing model ``m`` alone gives the ``m``-th slice of the stacked result.

Groups. ``axis=None`` quantizes per model per tensor (one scale per model); ``axis=a`` (an axis
``>= 1`` of the stacked tensor, ``1`` for the output channel of a PyTorch ``[out, in, ...]``
weight) quantizes per model per slice along ``a``. Either way the groups are the rows of
``w.movedim(a, 1).reshape(M * C, -1)`` (``w.reshape(M, -1)`` per tensor), handed to the
kernels with ``axis=0``.

Kernels (:mod:`mia_core.kernels`; formulas in ``mia_core/kernels/_quant.py``):
``fake_quantize`` / ``masked_fake_quantize`` (uniform, min-max derived scale and zero point),
``fake_quantize_sign`` (1 bit) and ``fake_quantize_ternary`` (1.58 bit).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import torch

from mia_core import kernels
from mia_core.base import Defense

#: Storage assumed for a value left in floating point and for a scale (float32), in bits.
FLOAT_BITS = 32
#: Storage of an affine zero point (an int32, as torch's quantized tensors hold it), in bits.
ZERO_POINT_BITS = 32
#: Bits per value of the ternary code ({-1, 0, +1}: log2 3, "1.58 bits").
TERNARY_BITS = math.log2(3)

_SCHEMES = ("symmetric", "affine")
_GRANULARITIES = ("per-tensor", "per-channel")
_METHODS = ("uniform", "sign", "ternary")
_ROUNDINGS = ("nearest", "stochastic")
_M63 = 2 ** 63


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def _check_w(w, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} has dtype {w.dtype}; allowed: torch.float32 or torch.float64")
    if w.dim() < 1:
        raise ValueError(f"{name} is 0-dimensional; expected a stacked tensor [M, ...] (model axis first)")


def _norm_axis(w: torch.Tensor, axis) -> Optional[int]:
    """``None`` or the channel axis of the stacked tensor, in ``1..w.dim()-1``."""
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int or None, got {type(axis).__name__}")
    nd = w.dim()
    a = int(axis) + nd if axis < 0 else int(axis)
    if nd < 3:
        raise ValueError(
            f"per-channel quantization (axis={axis}) of a tensor of shape {tuple(w.shape)} (1-D per "
            "model, e.g. a bias) would make every entry its own channel; quantize it per tensor (axis=None)")
    if not 1 <= a < nd:
        raise ValueError(f"axis={axis} is out of range for a stacked tensor of shape {tuple(w.shape)}; "
                         f"allowed: 1..{nd - 1} (axis 0 is the model axis) or None")
    return a


def _groups(t: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """The quantization groups of stacked ``t`` as the rows of a contiguous 2-D tensor."""
    m = t.shape[0]
    if axis is None:
        return t.reshape(m, -1).contiguous()
    return t.movedim(axis, 1).reshape(m * t.shape[axis], -1).contiguous()


def _ungroup(g: torch.Tensor, like: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None:
        return g.reshape(like.shape)
    return g.reshape(like.movedim(axis, 1).shape).movedim(1, axis).contiguous()


def _check_mask(mask, w: torch.Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a bool tensor (True = kept) or None")
    if mask.shape != w.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but w has shape {tuple(w.shape)}; they must be equal")


def model_seeds(seed, n_models: int) -> List[int]:
    """Per-model seeds of stochastic rounding: ``seed`` an int (model ``m`` gets ``seed + m``)
    or a sequence of ``n_models`` ints (model ``m`` gets ``seed[m]``)."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return [int(seed) + m for m in range(n_models)]
    if seed is None:
        raise ValueError("rounding='stochastic' requires a seed (an int or one int per model)")
    seeds = [int(s) for s in seed]
    if len(seeds) != n_models:
        raise ValueError(f"seed has {len(seeds)} entries but w has {n_models} models; pass one per model or an int")
    return seeds


def quantize_tensor(
    *,
    w: torch.Tensor,
    bits: int,
    scheme: str = "symmetric",
    axis: Optional[int] = None,
    rounding: str = "nearest",
    seed: Union[int, Sequence[int], None] = None,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Uniform ``bits``-bit fake quantization of every model of a stacked tensor.

    Per group (module doc) with min-max derived parameters (``mn = min(min w, 0)``,
    ``mx = max(max w, 0)``; the kernels' formula)::

        symmetric: s = max(-mn, mx) / ((2^b - 1) / 2),  z = 0,  q in [-2^(b-1), 2^(b-1) - 1]
        affine:    s = (mx - mn) / (2^b - 1),  z = clamp(-round(mn / s), 0, 2^b - 1),  q in [0, 2^b - 1]
        w_hat = (clamp(round(w / s) + z, q_min, q_max) - z) * s

    ``round`` is half-to-even (``nearest``) or ``floor(y) + [u < y - floor y]`` with ``u`` from
    a counter-based hash of (the model's seed, the element's index within its model)
    (``stochastic``). So at most ``2^b`` levels per group; ``|w_hat - w| <= s / 2`` for nearest
    rounding (no value is clipped: the range covers min-max); 0 maps to exactly 0 in both
    schemes (0 is in every range and the zero point is an integer code).

    Idempotence holds for fixed parameters (re-quantizing ``w_hat`` with the same ``s, z``
    returns it bit for bit), not for derived ones: the symmetric range ``(2^b - 1) / 2`` puts
    the extreme at a half step, which rounds half to even to ``-2^(b-1)`` (or clamps to
    ``2^(b-1) - 1``), so ``w_hat``'s min-max, hence its derived scale, differs from ``w``'s
    (``[-1, 0.3]`` at 2 bits: ``[-4/3, 0]``, then ``[-16/9, 0]``); affine moves its ends by
    the rounding of the zero point likewise. This is torch's observer convention, kept
    as the kernels implement it; the defense quantizes once.

    Args:
        w (Tensor[M, ...]): float32 / float64, model axis first.
        bits (int): 1..16 (symmetric needs >= 2; 1 bit symmetric is :func:`binarize`).
        scheme (str): ``"symmetric"`` or ``"affine"``.
        axis (int, optional): ``None`` per model per tensor; an axis ``>= 1`` (``1``: output
            channel) per model per channel. A tensor that is 1-D per model (``[M, n]``, a bias)
            cannot be quantized per channel (every entry would be its own channel): ValueError.
        rounding (str): ``"nearest"`` or ``"stochastic"``.
        seed (int or sequence of M ints): stochastic rounding only (:func:`model_seeds`).
        mask (Tensor[M, ...] bool, optional): kept entries; dropped ones come out as ``+0.0``
            and do not enter the min-max (``masked_fake_quantize``: how pruned zeros stay zero).
        backend (str): the kernels' ``"auto" | "native" | "torch"``.

    Returns:
        Tensor[M, ...] of ``w``'s dtype (a new tensor; ``w`` is not modified).
    """
    _check_w(w)
    _check_mask(mask, w)
    axis = _norm_axis(w, axis)
    kernels.quant_range(bits, scheme)  # ValueError naming bits / scheme
    if rounding not in _ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; allowed: 'nearest', 'stochastic'")
    if w.numel() == 0:
        return w.clone()
    g = _groups(w, axis)
    gm = None if mask is None else _groups(mask, axis)
    kw = dict(bits=bits, scheme=scheme, axis=0, backend=backend)

    def fq(x, mk, **extra):
        return (kernels.fake_quantize(x, **kw, **extra) if mk is None
                else kernels.masked_fake_quantize(x, mk, **kw, **extra))

    if rounding == "nearest":
        out = fq(g, gm)
    else:
        m = w.shape[0]
        seeds = model_seeds(seed, m)
        rows = g.shape[0] // m
        out = torch.empty_like(g)
        for i in range(m):  # one call per model: the hash counts elements within the model
            sl = slice(i * rows, (i + 1) * rows)
            fq(g[sl], None if gm is None else gm[sl], rounding="stochastic", seed=seeds[i] % 2 ** 64,
               out=out[sl])
    return _ungroup(out, w, axis)


def _masked_mean_abs(g: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean ``|g|`` over the kept entries of every row (float64 sums), 0 for an empty row: [G]."""
    a = g.abs().to(torch.float64) * keep
    cnt = keep.sum(dim=1).to(torch.float64)
    return torch.where(cnt > 0, a.sum(dim=1) / cnt.clamp(min=1), torch.zeros_like(cnt)).to(g.dtype)


def binarize(*, w: torch.Tensor, axis: Optional[int] = None, mask: Optional[torch.Tensor] = None,
             backend: str = "auto") -> torch.Tensor:
    """1-bit sign quantization: ``w_hat = s * sign(w)`` with ``s = mean |w|`` per group.

    ``s = ||w||_1 / n`` is the scale minimising ``||w - s * sign(w)||_2`` (Rastegari et al.
    2016, XNOR-Net, eq. 2-4). ``sign(0) = +1`` (kernel convention). With ``mask``, dropped entries
    come out ``+0.0`` and ``s`` is the mean over the kept entries only (the optimal scale on
    that support), so a pruned tensor keeps its zeros (three values, the zeros being the
    prune mask's).

    Args:
        w (Tensor[M, ...]), axis, mask, backend: as :func:`quantize_tensor`.

    Returns:
        Tensor[M, ...]: per group, values in ``{-s, +s}`` (``{-s, 0, +s}`` with a mask).
    """
    _check_w(w)
    _check_mask(mask, w)
    axis = _norm_axis(w, axis)
    if w.numel() == 0:
        return w.clone()
    g = _groups(w, axis)
    if mask is None:
        out = kernels.fake_quantize_sign(g, axis=0, backend=backend)
    else:
        gm = _groups(mask, axis)
        s = _masked_mean_abs(g, gm)
        scale = torch.where(s > 0, s, torch.ones_like(s))  # the kernel takes scales > 0 only
        out = kernels.fake_quantize_sign(g, axis=0, scale=scale, backend=backend)
        out = torch.where(gm & (s > 0).unsqueeze(1), out, torch.zeros((), dtype=g.dtype, device=g.device))
    return _ungroup(out, w, axis)


def ternarize(*, w: torch.Tensor, sparsity: float, axis: Optional[int] = None,
              mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Ternary ("1.58-bit") quantization to ``{-s, 0, +s}`` per group.

    Per group of ``n`` entries, the ``k = round(sparsity * n)`` entries of smallest ``|w|`` (the
    ``sparsity``-quantile of ``|w|`` as threshold; ties by position) become 0, the others
    ``s * sign(w)`` with ``s`` = mean ``|w|`` of the kept ones -- the scale that minimises the
    squared error for that support (Li, Zhang, Liu 2016, Ternary Weight Networks, eq. 5-6; TWN
    sets the threshold at ``0.7 E|w|``, here it is the quantile, so the zero fraction is a
    parameter). With ``mask``, dropped entries are set to 0 before ranking, so they are among
    the ``k`` smallest; a group with more dropped entries than ``k`` keeps exactly its
    non-dropped entries, its ``s`` recomputed over them (torch, after the kernel), and the
    dropped entries come out ``+0.0`` whatever their value.

    Args:
        w (Tensor[M, ...]), axis, mask, backend: as :func:`quantize_tensor` (no NaN).
        sparsity (float): target zero fraction in ``[0, 1)``.

    Returns:
        Tensor[M, ...]: per group exactly ``k`` zeros (``max(k, dropped)`` with a mask) when no
        kept entry is exactly 0 (a kept 0 comes out ``+s``, the kernel's ``sign(0) = +1``).
    """
    _check_w(w)
    _check_mask(mask, w)
    axis = _norm_axis(w, axis)
    if w.numel() == 0:
        return w.clone()
    g = _groups(w, axis)
    gm = None if mask is None else _groups(mask, axis)
    if gm is not None:
        g = g.masked_fill(~gm, 0)  # dropped entries rank first (|w| = 0)
    out = kernels.fake_quantize_ternary(g, sparsity=sparsity, axis=0, backend=backend)
    if gm is not None:
        nz = out != 0
        support = nz & gm
        changed = (support != nz).any(dim=1)
        if bool(changed.any()):
            s = _masked_mean_abs(g, support).unsqueeze(1)
            fixed = torch.where(support, torch.where(g < 0, -s, s), torch.zeros((), dtype=g.dtype, device=g.device))
            out = torch.where(changed.unsqueeze(1), fixed, out)
    return _ungroup(out, w, axis)


def count_levels(*, w: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """Distinct values per group (``-0.0`` and ``+0.0`` count as one; 0 for an empty group).

    Returns:
        int64 Tensor[M] (``axis=None``) or Tensor[M, C] (per channel along ``axis``).
    """
    _check_w(w)
    axis = _norm_axis(w, axis)
    m = w.shape[0]
    shape = (m,) if axis is None else (m, w.shape[axis])
    if w.numel() == 0:
        return torch.zeros(shape, dtype=torch.int64)
    g = _groups(w, axis).sort(dim=1).values
    n = 1 + (g[:, 1:] != g[:, :-1]).sum(dim=1)
    return n.reshape(shape).cpu()


@dataclass(frozen=True)
class StoredTensor:
    """How one tensor of one model is stored after quantization.

    Attributes:
        numel: values in the tensor (one model's).
        bits: bits per value (``FLOAT_BITS`` for a tensor kept in float32; ``TERNARY_BITS``
            for ternary).
        groups: scales stored (1 per tensor, or one per channel); 0 when kept in float.
        zero_point: whether each group also stores an affine zero point.
    """

    numel: int
    bits: float
    groups: int = 0
    zero_point: bool = False


def model_bytes(*, tensors: Sequence[StoredTensor]) -> float:
    """Bytes of one model: ``sum(numel * bits / 8 + groups * (32 + [zero_point] * 32) / 8)``.

    Values are counted at their code width without padding to whole bytes (ternary at
    ``log2 3`` bits: ideal packing; 5 trits per byte would give 1.6 bits); a scale is a
    float32, a zero point an int32. Sparse storage of zeros is not assumed (a pruned tensor
    costs as much as a dense one).
    """
    total = 0.0
    for t in tensors:
        total += t.numel * t.bits / 8
        total += t.groups * (FLOAT_BITS + (ZERO_POINT_BITS if t.zero_point else 0)) / 8
    return total


def effective_bits(*, tensors: Sequence[StoredTensor]) -> float:
    """Payload bits per value over ``tensors`` (scales and zero points excluded)."""
    n = sum(t.numel for t in tensors)
    return sum(t.numel * t.bits for t in tensors) / n if n else 0.0


# --------------------------------------------------------------------------------------------
# The plugin
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    name: str
    method: str  # "uniform" | "sign" | "ternary" | "float" (kept)
    bits: float
    axis: Optional[int]
    role: str  # "weight" | "bias" | "last-layer"


def _is_bits(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= 16


class Quantize(Defense):
    """Post-training quantization of every model's weights: uniform 1-16 bits, sign or ternary.

    Every model of the population is quantized on its own (its own scales: "per-tensor" is per
    model per tensor) and dequantized in place (fake quantization: the weights take the values
    a ``bits``-bit model would compute with). Quantization as a membership-inference defense:
    Aubinais et al. (2025) derive, from an asymptotic analysis, an indicator of a post-training
    quantizer's membership-inference security (MIS) and rank quantizers by it; Zhang et al.
    (2025, "Bits for Privacy") measure with LiRA that 4-bit PTQ keeps utility and leakage
    close to full precision while 2-bit and 1.58-bit (ternary) reduce leakage at an accuracy
    cost, and that keeping the last layer at higher precision controls that trade-off
    (``keep_last_layer``). Their PTQ
    algorithms (AdaRound, BRECQ, OBC) optimise the rounding on calibration data; here the
    rounding is plain min-max round-to-nearest (or stochastic), the baseline those improve on.

    Methods:
        ``uniform``: ``bits``-bit min-max quantization (:func:`quantize_tensor`), symmetric
        (zero point 0) or affine. ``sign``: 1 bit, ``s * sign(w)`` with ``s = mean |w|``
        (:func:`binarize`; XNOR-Net's scale). ``ternary``: ``{-s, 0, +s}`` with a fraction
        ``ternary_sparsity`` of each group's smallest ``|w|`` set to 0 (:func:`ternarize`).

    What is quantized: the weight tensors (at least 2-D per model); biases and other 1-D
    parameters too with ``include_bias`` -- always per tensor, since a per-channel scale on a
    1-D tensor would give every entry its own scale (``granularity=per-channel`` applies to
    weights, along the output channel, axis 0 of PyTorch's ``[out, in, ...]`` layout). The last
    layer is the module of the last weight tensor in parameter order (a Sequential's head);
    with ``keep_last_layer`` its parameters (those that would be quantized) are quantized
    uniformly at ``last_layer_bits`` instead (``none``: left in float32).

    Pruning composes: a tensor that already holds exact zeros (``--defense prune:... --defense
    quantize:...``) is quantized with its zero mask (``masked_fake_quantize``; for sign and
    ternary the mask is re-applied and the scale taken over the kept entries), so pruned
    weights stay exactly 0. Uniform quantization would keep them anyway, in both schemes: 0 is
    in every min-max range and the affine zero point is an integer code, so 0 -> code z -> 0.
    Sign quantization would not (``sign(0) = +s``), nor ternary where the prune sparsity
    exceeds ``ternary_sparsity``; the mask is what keeps them.

    Args:
        bits: bit width of ``method=uniform``, 1..16 (symmetric needs >= 2); ignored by sign
            (1 bit) and ternary (log2 3 bits).
        scheme: ``symmetric`` (zero point 0) or ``affine`` (min-max with a zero point).
        granularity: ``per-tensor`` (one scale per model per tensor) or ``per-channel`` (per
            model per output channel of each weight tensor; biases stay per tensor).
        method: ``uniform``, ``sign`` or ``ternary``.
        ternary_sparsity: fraction of each group's entries set to 0 by ``ternary``, in [0, 1).
        rounding: ``nearest`` (half to even) or ``stochastic`` (seeded from ``ctx.rng``, one
            seed per model; ``uniform`` only).
        keep_last_layer: quantize the last layer at ``last_layer_bits`` instead.
        last_layer_bits: 1..16 (not below the method's bits), or ``none`` to keep it in float32.
        include_bias: also quantize biases and other 1-D parameters (per tensor).
    """

    api_version = "1.0"
    stage = "post"
    reference = (
        "E. Aubinais, P. Formont, P. Piantanida, E. Gassiat. Membership Inference Risks in "
        "Quantized Models: A Theoretical and Empirical Study. arXiv:2502.06567, 2025; "
        "C. Zhang, T. Qu, Z. Li, T. Zhang, J. Pang, S. Mauw. Bits for Privacy: Evaluating "
        "Post-Training Quantization via Membership Inference. arXiv:2512.15335, 2025"
    )

    def __init__(
        self,
        bits: int = 8,
        scheme: Literal["symmetric", "affine"] = "symmetric",
        granularity: Literal["per-tensor", "per-channel"] = "per-tensor",
        method: Literal["uniform", "sign", "ternary"] = "uniform",
        ternary_sparsity: float = 0.5,
        rounding: Literal["nearest", "stochastic"] = "nearest",
        keep_last_layer: bool = False,
        last_layer_bits: Optional[int] = 8,
        include_bias: bool = False,
    ):
        self.bits = bits
        self.scheme = scheme
        self.granularity = granularity
        self.method = method
        self.ternary_sparsity = ternary_sparsity
        self.rounding = rounding
        self.keep_last_layer = keep_last_layer
        self.last_layer_bits = last_layer_bits
        self.include_bias = include_bias

    # ---------------------------------------------------------------- validation
    def _method_bits(self) -> float:
        return {"uniform": self.bits, "sign": 1, "ternary": TERNARY_BITS}[self.method]

    def validate(self) -> None:
        lo = 2 if self.scheme == "symmetric" else 1
        if self.scheme not in _SCHEMES:
            raise ValueError(f"scheme must be 'symmetric' or 'affine', got {self.scheme!r}")
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be 'per-tensor' or 'per-channel', got {self.granularity!r}")
        if self.method not in _METHODS:
            raise ValueError(f"method must be 'uniform', 'sign' or 'ternary', got {self.method!r}")
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if not _is_bits(self.bits, 1):
            raise ValueError(f"bits must be an integer in 1..16, got {self.bits!r}")
        if self.method == "uniform" and self.bits < lo:
            raise ValueError("bits=1 with scheme='symmetric' has no level but 0 and -s; use method=sign "
                             "(1 bit: +-mean|w|) or scheme=affine")
        ts = self.ternary_sparsity
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts < 1:
            raise ValueError(f"ternary_sparsity must be a number in [0, 1), got {ts!r}")
        if self.rounding == "stochastic" and self.method != "uniform":
            raise ValueError(f"rounding='stochastic' applies to method=uniform only (method={self.method!r} "
                             "has no rounding step)")
        for flag in ("keep_last_layer", "include_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        llb = self.last_layer_bits
        if llb is not None and not _is_bits(llb, lo):
            raise ValueError(f"last_layer_bits must be an integer in {lo}..16 (scheme={self.scheme!r}) or none "
                             f"(float32), got {llb!r}")
        if self.keep_last_layer and llb is not None and llb < self._method_bits():
            raise ValueError(f"last_layer_bits={llb} is below the {self.method} method's "
                             f"{self._method_bits():.3g} bits; keep_last_layer keeps the last layer at higher "
                             "precision")

    # ---------------------------------------------------------------- planning
    def plan(self, params: Dict[str, torch.Tensor]) -> List[_Item]:
        """What happens to each parameter, checked against the model's shapes.

        Raises:
            ValueError: one line naming the tensor that cannot be quantized and why (no
                quantizable tensor, a dtype other than float32/float64, non-finite values,
                ternary groups that ``ternary_sparsity`` would zero entirely, nothing left to
                quantize with ``keep_last_layer`` and ``last_layer_bits=none``).
        """
        weights = [n for n, p in params.items() if p.dim() > 2]
        chosen = [n for n, p in params.items() if p.dim() > 2 or self.include_bias]
        if not chosen:
            raise ValueError("the model has no weight tensors (at least 2-D per model) to quantize; "
                             f"its parameters are {', '.join(params) or 'none'} (set include_bias=true to "
                             "quantize 1-D ones)")
        last = weights[-1].rpartition(".")[0] if weights else None
        items = []
        for n in chosen:
            p = params[n]
            if p.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"parameter {n!r} has dtype {p.dtype}; quantize needs float32 or float64")
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"parameter {n!r} holds NaN or inf, so its min-max scale is undefined")
            axis = 1 if self.granularity == "per-channel" and p.dim() > 2 else None
            role = "weight" if p.dim() > 2 else "bias"
            if self.keep_last_layer and last is not None and n.rpartition(".")[0] == last:
                if self.last_layer_bits is None:
                    items.append(_Item(n, "float", FLOAT_BITS, None, "last-layer"))
                else:
                    items.append(_Item(n, "uniform", self.last_layer_bits, axis, "last-layer"))
                continue
            if self.method == "ternary":
                per = p[0].numel() if axis is None else p[0].numel() // max(p.shape[1], 1)
                if per and round(self.ternary_sparsity * per) == per:
                    where = "each tensor" if axis is None else "each output channel"
                    raise ValueError(
                        f"ternary_sparsity={self.ternary_sparsity} would set all {per} entries of {where} of "
                        f"{n!r} to 0; lower it or exclude the tensor")
            items.append(_Item(n, self.method, self._method_bits(), axis, role))
        if all(it.method == "float" for it in items):
            raise ValueError(f"keep_last_layer=true with last_layer_bits=none leaves nothing to quantize: "
                             f"{', '.join(repr(it.name) for it in items)} belong to the last layer "
                             f"{last!r}, the only one selected")
        return items

    def check_model(self, module) -> None:
        """:meth:`plan` on the model's parameter shapes (one model, zeros), before training."""
        self.validate()
        self.plan({n: torch.zeros((1,) + tuple(p.shape), dtype=p.dtype if p.dtype.is_floating_point else torch.float32)
                   for n, p in module.named_parameters()})

    # ---------------------------------------------------------------- apply
    def apply(self, ctx) -> Dict[str, Any]:
        self.validate()
        params = ctx.params
        items = self.plan(params)
        m = next(iter(params.values())).shape[0]
        stochastic = self.rounding == "stochastic"
        seeds = None
        if stochastic:  # model m's seeds from its own stream: one per quantized tensor
            seeds = [[int(s) for s in ctx.rng(mi).integers(0, _M63, size=len(items))] for mi in range(m)]
        backends, masked, stored, errors = set(), [], [], []
        zeros_before = zeros_after = covered = 0
        levels: Dict[str, int] = {}
        group_levels = 0
        with torch.no_grad():
            for i, it in enumerate(items):
                w = params[it.name]
                numel = w[0].numel() if m else 0
                groups = 1 if it.axis is None else w.shape[it.axis]
                if it.method == "float":
                    stored.append(StoredTensor(numel, FLOAT_BITS))
                    continue
                nz = w != 0
                mask = None if bool(nz.all()) else nz
                if mask is not None:
                    masked.append(it.name)
                if it.method == "uniform":
                    q = quantize_tensor(w=w, bits=int(it.bits), scheme=self.scheme, axis=it.axis,
                                        rounding=self.rounding,
                                        seed=[seeds[mi][i] for mi in range(m)] if stochastic else None,
                                        mask=mask)
                elif it.method == "sign":
                    q = binarize(w=w, axis=it.axis, mask=mask)
                else:
                    q = ternarize(w=w, sparsity=float(self.ternary_sparsity), axis=it.axis, mask=mask)
                backends.add(kernels.last_backend())
                flat_w, flat_q = w.reshape(m, -1).double(), q.reshape(m, -1).double()
                errors.append(((flat_q - flat_w).pow(2).sum(1), flat_w.pow(2).sum(1)))
                zeros_before += int((~nz).sum())
                zeros_after += int((q == 0).sum())
                covered += w.numel()
                if q.numel():
                    levels[it.name] = int(count_levels(w=q).max())
                    group_levels = max(group_levels, int(count_levels(w=q, axis=it.axis).max()))
                w.copy_(q)
                affine = it.method == "uniform" and self.scheme == "affine"
                stored.append(StoredTensor(numel, float(it.bits), groups, affine))
        ctx.changed()
        return self._report(params, items, stored, backends, masked, levels, group_levels, errors,
                            zeros_before, zeros_after, covered, m)

    def _report(self, params, items, stored, backends, masked, levels, group_levels, errors,
                zeros_before, zeros_after, covered, m) -> Dict[str, Any]:
        names = {it.name for it in items}
        per_model = sum(p[0].numel() for p in params.values()) if m else 0
        untouched = [StoredTensor(p[0].numel() if m else 0, FLOAT_BITS) for n, p in params.items() if n not in names]
        before = model_bytes(tensors=[StoredTensor(p[0].numel() if m else 0, FLOAT_BITS) for p in params.values()])
        after = model_bytes(tensors=stored + untouched)
        overhead = after - model_bytes(tensors=[StoredTensor(t.numel, t.bits) for t in stored + untouched])
        all_zero = sum(int((p == 0).sum()) for p in params.values())
        rel = 0.0
        if errors and m:
            num = sum(e[0] for e in errors)
            den = sum(e[1] for e in errors)
            rel = float((num.sqrt() / den.sqrt().clamp(min=1e-300)).mean())
        last = [it.name for it in items if it.role == "last-layer"]
        return {
            "method": self.method,
            "bits": int(self.bits) if self.method == "uniform" else None,
            "bits_per_value": round(float(self._method_bits()), 4),
            "scheme": self.scheme,
            "granularity": self.granularity,
            "rounding": self.rounding,
            "ternary_sparsity": float(self.ternary_sparsity) if self.method == "ternary" else None,
            "quantized_tensors": [it.name for it in items if it.method != "float"],
            "last_layer_tensors": last,
            "last_layer_bits": (self.last_layer_bits if last else None),
            "zero_masked_tensors": masked,
            "effective_bits": round(effective_bits(tensors=stored), 4),
            "effective_bits_all": round(effective_bits(tensors=stored + untouched), 4),
            "bytes_before": round(before, 2),
            "bytes_after": round(after, 2),
            "overhead_bytes": round(overhead, 2),
            "compression_ratio": round(before / after, 3) if after else None,
            "max_levels_per_tensor": max(levels.values()) if levels else 0,
            "max_levels_per_group": group_levels,
            "levels_per_tensor": levels,
            "sparsity_before": round(zeros_before / covered, 6) if covered else 0.0,
            "sparsity_after": round(zeros_after / covered, 6) if covered else 0.0,
            "overall_sparsity_after": round(all_zero / (per_model * m), 6) if per_model and m else 0.0,
            "relative_error": round(rel, 6),
            "parameters_per_model": int(per_model),
            "kernel_backend": "+".join(sorted(backends)) if backends else None,
        }
