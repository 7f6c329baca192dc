"""Fake quantization (quantize, then dequantize): the quantize defense's and the MIS indicator's
kernels; public through :mod:`mia_core.kernels`.

Conventions shared by every op here:

* **Integer ranges.** ``scheme="affine"``: codes in ``[0, 2**bits - 1]`` with a zero point;
  ``scheme="symmetric"``: codes in ``[-2**(bits-1), 2**(bits-1) - 1]`` with zero point 0
  (bits >= 2; 1 bit is :func:`fake_quantize_sign`). ``bits`` is an integer in 1..16.
* **Formula** (nearest rounding), per element, in ``x``'s dtype::

      inv_scale = 1 / scale                      (rounded to x.dtype, as torch's 1.0f / scale)
      q   = clamp(round_half_even(x * inv_scale) + zero_point, quant_min, quant_max)
      out = (q - zero_point) * scale             code = int32(q)

  For float32 this is bit-identical to ``torch.fake_quantize_per_tensor_affine`` and
  ``torch.fake_quantize_per_channel_affine`` on every non-NaN input, except that torch's
  per-channel op sends ``+inf`` and every finite ``x * inv_scale >= 2**63`` to ``quant_min``
  (an out-of-range int64 cast); here they clamp to ``quant_max``, as torch's per-tensor op
  does. float64 runs entirely in float64 (torch rounds
  its scale to float32, so float64 results are not torch's).
* **NaN propagates**: a NaN element gives a NaN output and the code ``quant_min`` (torch would
  output the ``quant_min`` level). ``+-inf`` clamp to the ends of the range.
* **Derived parameters** (``scale=None``): per tensor / channel, ``mn = min(min(x), 0)``,
  ``mx = max(max(x), 0)`` (zero always in the range, as torch's observers), then in float64::

      affine:     scale = max((mx - mn) / (quant_max - quant_min), 2**-23)
                  zero_point = clamp(quant_min - round_half_even(mn / scale_t), quant_min, quant_max)
      symmetric:  scale = max(max(-mn, mx) / ((quant_max - quant_min) / 2), 2**-23);  zero_point = 0

  where ``scale_t`` is the scale rounded to ``x.dtype`` (the value used). 2**-23 is the documented
  floor (float32 epsilon, as torch's observers) that keeps a constant channel from a zero scale.
  NaN or inf in the data make the derived parameters undefined: ValueError (pass ``scale=``).
* **Stochastic rounding** (``rounding="stochastic"``, integer ``seed`` required):
  ``round(y) = floor(y) + (u < y - floor(y))`` with ``u`` uniform in [0, 1) from a counter-based
  hash (splitmix64) of ``(seed mod 2**64, flat element index)``: reproducible for a seed and
  independent of the thread count. ``u`` has 24 (float32) / 53 (float64) random bits.
* **out=**: a preallocated contiguous tensor of ``x``'s dtype, shape and device; it may be ``x``
  itself (in place), any other overlap with ``x`` is an error. Returned as the result.
* **backend**: ``"auto"`` runs the native kernel when the extension imported and ``x`` (and
  ``mask``) are contiguous CPU tensors, else the torch reference (warning once per process if
  the extension failed to import); ``"native"`` raises RuntimeError instead of falling back;
  ``"torch"`` always runs the reference. ``last_backend()`` tells which one ran last in the
  calling thread.
  CUDA ``x``: a ``MIAFW_CUDA=1`` build has a CUDA twin for :func:`fake_quantize` and
  :func:`masked_fake_quantize` on a contiguous ``x`` (and ``mask``): per tensor or per channel,
  nearest or stochastic rounding, on the current stream, bit-identical to the CPU kernel (it
  runs the CPU kernel's per-element code, ``csrc/kernels/quant_elem.h``). Derived min-max
  parameters are computed by torch on the GPU first (the reference's code, same bits).
  Strided inputs, sign and ternary run the reference (torch ops on the GPU) under ``"auto"``,
  and ``"native"`` raises RuntimeError saying why (in a CPU-only build: "this miafw was built
  without CUDA kernels; rebuild with MIAFW_CUDA=1").
* Results carry no autograd history; use :func:`fake_quantize_ste` for training.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import numpy as np
import torch

from mia_core.kernels import _dispatch, _native
from mia_core.kernels._dispatch import Refusal
from mia_core.kernels._native import bump_versions as _bump_versions

__all__ = [
    "FakeQuantizeSTE",
    "fake_quantize",
    "fake_quantize_reference",
    "fake_quantize_sign",
    "fake_quantize_sign_reference",
    "fake_quantize_ste",
    "fake_quantize_ternary",
    "fake_quantize_ternary_reference",
    "masked_fake_quantize",
    "masked_fake_quantize_reference",
    "quant_range",
    "quantization_params",
]

_DTYPES = (torch.float32, torch.float64)
_SCHEMES = ("affine", "symmetric")
_ROUNDINGS = ("nearest", "stochastic")
SCALE_FLOOR = 2.0 ** -23
_PRECLAMP = float(2 ** 22)
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15

Tensor = torch.Tensor
Number = Union[int, float]


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def quant_range(bits: int, scheme: str = "affine") -> Tuple[int, int]:
    """``(quant_min, quant_max)`` of ``bits``-bit codes for ``scheme`` (see the module doc).

    Raises:
        ValueError: ``bits`` not an integer in 1..16; unknown ``scheme``; symmetric with 1 bit.
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is out of range; allowed: an integer in 1..16")
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; allowed: 'affine', 'symmetric'")
    bits = int(bits)
    if scheme == "affine":
        return 0, (1 << bits) - 1
    if bits < 2:
        raise ValueError("scheme='symmetric' needs bits >= 2 (got bits=1); use fake_quantize_sign "
                         "for 1-bit {-s, +s} quantization")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; allowed: torch.float32 or torch.float64")


def _norm_axis(x: Tensor, axis) -> Optional[int]:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int or None, got {type(axis).__name__}")
    nd = x.dim()
    if not -nd <= axis < nd:
        rng = f"{-nd}..{nd - 1} or None" if nd else "None (x is 0-dimensional)"
        raise ValueError(f"axis={axis} is out of range for x with {nd} dimensions; allowed: {rng}")
    return int(axis) % nd


def _channels(x: Tensor, axis: Optional[int]) -> int:
    return 1 if axis is None else x.shape[axis]


def _bshape(x: Tensor, axis: Optional[int]):
    """Shape that broadcasts a [C] parameter along ``axis``."""
    if axis is None:
        return ()
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return tuple(shape)


def _check_out(out, x: Tensor) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != x.dtype:
        raise TypeError(f"out has dtype {out.dtype} but x has dtype {x.dtype}; they must be equal")
    if out.shape != x.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but x has shape {tuple(x.shape)}; "
                         "they must be equal")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device} but x is on {x.device}")
    if not out.is_contiguous():
        raise ValueError(f"out is not contiguous (strides {out.stride()}); pass a contiguous tensor")
    same = out.numel() and out.data_ptr() == x.data_ptr() and x.is_contiguous()
    if not same and _native.overlaps(out, x):
        raise ValueError("out partially overlaps x; pass x itself (in place) or a separate tensor")


def _check_rounding(rounding, seed) -> Tuple[bool, int]:
    if rounding not in _ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; allowed: 'nearest', 'stochastic'")
    if rounding == "nearest":
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        return False, 0
    if seed is None or isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"rounding='stochastic' requires an integer seed (got seed={seed!r})")
    return True, int(seed) & _M64


def _param_tensor(value, name: str, x: Tensor, axis: Optional[int], dtype) -> Tensor:
    """A given scale / zero_point as a [C] tensor of ``dtype`` on x's device."""
    C = _channels(x, axis)
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} has dtype {t.dtype}; pass a real number or tensor")
        if t.numel() == 1 and t.dim() <= 1:
            t = t.reshape(())
        elif axis is None:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; per tensor (axis=None) it must be "
                             "a number or a one-element tensor")
        elif tuple(t.shape) != (C,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({C},) for axis={axis} "
                             "(one value per channel) or a single number")
        t = t.to(device=x.device)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        t = torch.tensor(value, dtype=torch.float64, device=x.device)
    else:
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    return t.to(dtype).expand(C).contiguous() if t.dim() == 0 else t.to(dtype).contiguous()


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _given_numbers_fast(x, axis, scale, zero_point, qmin, qmax, scheme):
    """(scale [C], zero_point [C]) for a VALID plain-number scale / int zero_point without any
    tensor arithmetic (the common per-tensor call), else None (then _given_params validates and
    raises with its messages). Same values: the scale rounded once to x.dtype."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return None
    if zero_point is not None and (isinstance(zero_point, bool) or not isinstance(zero_point, int)):
        return None
    try:
        with np.errstate(all="ignore"):
            st = _NP_DTYPES[x.dtype](scale)
            inv = st.dtype.type(1) / st
    except (OverflowError, ValueError, TypeError):
        return None
    if not (math.isfinite(st) and st > 0 and math.isfinite(inv)):
        return None
    if zero_point is None:
        if scheme == "affine":
            return None
        zero_point = 0
    if not qmin <= zero_point <= qmax or (scheme == "symmetric" and zero_point != 0):
        return None
    C = _channels(x, axis)
    return (torch.full((C,), float(st), dtype=x.dtype, device=x.device),
            torch.full((C,), float(zero_point), dtype=x.dtype, device=x.device))


def _given_params(x, axis, scale, zero_point, qmin, qmax, scheme, bits):
    """Validated (scale [C] in x.dtype, zero_point [C] in x.dtype) or None to derive."""
    fast = _given_numbers_fast(x, axis, scale, zero_point, qmin, qmax, scheme)
    if fast is not None:
        return fast
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without scale; pass both or neither")
        return None
    s = _param_tensor(scale, "scale", x, axis, x.dtype)
    inv = torch.reciprocal(s)
    bad = ~(torch.isfinite(s) & (s > 0) & torch.isfinite(inv))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        where = f"scale[{i}]" if isinstance(scale, torch.Tensor) and scale.numel() > 1 else "scale"
        raise ValueError(f"{where}={s[i].item()!r} (as {x.dtype}) is invalid; every scale must be "
                         "finite and > 0 with a finite reciprocal")
    if zero_point is None:
        if scheme == "affine":
            raise ValueError("scheme='affine' with a given scale needs zero_point too "
                             "(or pass neither to derive both from min-max)")
        z = torch.zeros_like(s)
    else:
        z64 = _param_tensor(zero_point, "zero_point", x, axis, torch.float64)
        zr = z64.round()
        bad = (z64 != zr) | (z64 < qmin) | (z64 > qmax) | torch.isnan(z64)
        if bool(bad.any()):
            v = z64[bad][0].item()
            raise ValueError(f"zero_point={v!r} is invalid; it must be an integer in "
                             f"[{qmin}, {qmax}] (bits={bits}, scheme={scheme!r})")
        if scheme == "symmetric" and bool((z64 != 0).any()):
            raise ValueError(f"zero_point={z64[z64 != 0][0].item():g} with scheme='symmetric'; "
                             "the symmetric zero point is 0 (use scheme='affine')")
        z = z64.to(x.dtype)
    return s, z


def _formula_params(mn: Tensor, mx: Tensor, qmin: int, qmax: int, scheme: str, dtype):
    """The documented min-max formula in float64 (mirrors quant_params in fake_quant.h)."""
    mn = torch.clamp(mn.to(torch.float64), max=0.0)
    mx = torch.clamp(mx.to(torch.float64), min=0.0)
    rng = float(qmax - qmin)
    if scheme == "symmetric":
        s = torch.maximum(-mn, mx) / (rng / 2.0)
        s = torch.clamp(s, min=SCALE_FLOOR)
        z = torch.zeros_like(s)
    else:
        s = torch.clamp((mx - mn) / rng, min=SCALE_FLOOR)
        st = s.to(dtype).to(torch.float64)
        z = torch.clamp(qmin - torch.round(mn / st), qmin, qmax)
    return s.to(dtype), z.to(dtype)


def _derive_reference(v: Tensor, axis: Optional[int], qmin, qmax, scheme):
    C = _channels(v, axis)
    if v.numel() == 0:
        z = torch.zeros(C, dtype=v.dtype, device=v.device)
        return _formula_params(z, z, qmin, qmax, scheme, v.dtype)
    if axis is None:
        mn, mx = torch.aminmax(v)
        mn, mx = mn.reshape(1), mx.reshape(1)
    else:
        flat = v.movedim(axis, 0).reshape(C, -1)
        mn, mx = torch.aminmax(flat, dim=1)
    if not bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
        raise ValueError("x contains NaN or inf, so min-max scale / zero_point are undefined; "
                         "pass scale= (and zero_point=) explicitly")
    return _formula_params(mn, mx, qmin, qmax, scheme, v.dtype)


def _lsr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _s64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def _splitmix64_py(z: int) -> int:
    z = (z + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _uniform_reference(shape, seed: int, dtype, device) -> Tensor:
    """u(seed, flat index) exactly as csrc/kernels/fake_quant.h (wrapping int64 arithmetic)."""
    key = _splitmix64_py(seed)
    n = math.prod(shape)
    z = torch.arange(n, dtype=torch.int64, device=device) * _s64(_GOLDEN) + _s64(key)
    z = z + _s64(_GOLDEN)
    z = (z ^ _lsr(z, 30)) * _s64(0xBF58476D1CE4E5B9)
    z = (z ^ _lsr(z, 27)) * _s64(0x94D049BB133111EB)
    h = z ^ _lsr(z, 31)
    if dtype == torch.float32:
        u = _lsr(h, 40).to(torch.float32) * (2.0 ** -24)
    else:
        u = _lsr(h, 11).to(torch.float64) * (2.0 ** -53)
    return u.reshape(shape)


def _quantize_reference(v: Tensor, s: Tensor, z: Tensor, axis, qmin, qmax, stochastic, seed,
                        want_codes: bool):
    bs = _bshape(v, axis)
    sb, zb = s.reshape(bs), z.reshape(bs)
    inv = torch.reciprocal(sb)
    y = v * inv
    if stochastic:
        y = torch.clamp(y, -_PRECLAMP, _PRECLAMP)
        f = torch.floor(y)
        u = _uniform_reference(tuple(v.shape), seed, v.dtype, v.device)
        n = torch.where(u < (y - f), f + 1, f)
    else:
        n = torch.round(y)  # half to even
    q = torch.clamp(n + zb, qmin, qmax)  # NaN propagates
    out = (q - zb) * sb
    codes = None
    if want_codes:
        codes = torch.where(torch.isnan(q), torch.full_like(q, qmin), q).to(torch.int32)
    return out, codes


def _apply_mask_reference(x: Tensor, mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return x.masked_fill(~mask, 0)
    return x * mask


def _check_mask(mask, x: Tensor) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype != x.dtype:
        raise TypeError(f"mask has dtype {mask.dtype}; allowed: torch.bool or {x.dtype} (x's dtype)")
    if mask.shape != x.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but x has shape {tuple(x.shape)}; "
                         "they must be equal (no broadcasting)")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")


# --------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------


_CPU_HINT = "use backend='auto' (falls back to torch) or pass a contiguous CPU tensor"
_CUDA_HINT = "use backend='auto' (falls back to the torch reference on the GPU)"


def _lazy_refusal(x: Tensor, mask: Optional[Tensor], out: Optional[Tensor],
                  hint: str) -> Optional[Refusal]:
    reason = _native.lazy_bit_refusal((x, mask, out), ("x", "mask", "out"))
    return None if reason is None else Refusal(reason, hint)


def _cpu_refusal(x: Tensor, mask: Optional[Tensor] = None,
                 out: Optional[Tensor] = None) -> Optional[Refusal]:
    """Why the CPU kernel cannot take these (validated) inputs, or None."""
    lazy = _lazy_refusal(x, mask, out, _CPU_HINT)
    if lazy is not None:
        return lazy
    if not x.is_cpu:
        return Refusal(f"x is on {x.device}; the native kernel is CPU-only", _CPU_HINT)
    if not x.is_contiguous():
        return Refusal(f"x is not contiguous (strides {x.stride()})", _CPU_HINT)
    if mask is not None and not mask.is_contiguous():
        return Refusal(f"mask is not contiguous (strides {mask.stride()}); pass mask.contiguous()",
                       _CPU_HINT)
    return None


def _cuda_refusal(x: Tensor, mask: Optional[Tensor] = None,
                  out: Optional[Tensor] = None) -> Optional[Refusal]:
    """Why the CUDA twin cannot take a CUDA ``x`` (and ``mask``), or None. The twin covers
    contiguous inputs, masked or not, given or derived parameters (min-max derived by torch
    first), nearest or stochastic rounding."""
    if _native.cuda_kernels() is None:
        return _dispatch.NO_CUDA_KERNELS
    lazy = _lazy_refusal(x, mask, out, _CUDA_HINT)
    if lazy is not None:
        return lazy
    if not x.is_contiguous():
        return Refusal(f"x is not contiguous (strides {x.stride()})", _CUDA_HINT)
    if mask is not None and not mask.is_contiguous():
        return Refusal(f"mask is not contiguous (strides {mask.stride()}); pass mask.contiguous()",
                       _CUDA_HINT)
    return None


def _choose(backend: str, x: Tensor, mask: Optional[Tensor] = None, *, cuda_twin: bool,
            out: Optional[Tensor] = None) -> str:
    """The dispatcher's choice for ``x``: ``"native"`` (the CPU kernel, or the CUDA twin for a
    CUDA ``x`` when the op has one: ``cuda_twin``) or ``"torch"``."""
    if cuda_twin and x.is_cuda:
        return _dispatch.choose(backend, lambda b: _cuda_refusal(x, mask, out))
    return _dispatch.choose(backend, lambda b: _cpu_refusal(x, mask, out))


def _fq_cuda_launch(kernels, stream: int, x: Tensor, mask, given, axis, qmin: int, qmax: int,
                    scheme: str, stochastic: bool, seed: int, out, return_codes: bool):
    """One call of the CUDA twin ``kernels.cuda_fake_quantize`` on ``stream``, on tensors that
    :func:`_cuda_refusal` accepted (contiguous ``x`` and ``mask``, given (scale, zero_point)).

    ``given=None`` derives the min-max parameters first with the reference's torch code
    (:func:`_derive_reference` on the masked values: ``aminmax`` runs on the GPU), which gives
    the CPU kernel's parameters bit for bit, then quantizes with the twin.

    Device-agnostic on purpose: the tests pass the host emulation (``mia_core._cuda_emu``)
    with CPU tensors, so this argument marshalling runs without a GPU too.
    """
    if given is None:
        with torch.no_grad():
            v = x if mask is None else _apply_mask_reference(x, mask)
            given = _derive_reference(v, axis, qmin, qmax, scheme)
    s, z = given
    C = _channels(x, axis)
    if axis is None:
        outer, inner = 1, x.numel()
    else:
        outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    # resolve_neg: a given parameter may be a lazily negated view (data_ptr() is unnegated).
    s = s.to(device=x.device, dtype=x.dtype).resolve_neg().contiguous()
    z = z.to(device=x.device, dtype=x.dtype).resolve_neg().contiguous()
    res = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    codes = torch.empty(x.shape, dtype=torch.int32, device=x.device) if return_codes else None
    mask_kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "float")
    kernels.cuda_fake_quantize(
        x.data_ptr(), res.data_ptr(), 0 if codes is None else codes.data_ptr(),
        outer, C, inner, s.data_ptr(), z.data_ptr(), quant_min=qmin, quant_max=qmax,
        dtype=str(x.dtype).replace("torch.", ""),
        mask=0 if mask is None else mask.data_ptr(), mask_kind=mask_kind,
        stochastic=stochastic, seed=seed, stream=stream)
    if out is not None:
        _bump_versions([out])
    return res, codes


def _fq_cuda(x: Tensor, mask, given, axis, qmin: int, qmax: int, scheme: str, stochastic: bool,
             seed: int, out, return_codes: bool):
    """The CUDA twin on torch's current stream of ``x``'s device."""
    with torch.cuda.device(x.device):
        return _fq_cuda_launch(_native.cuda_kernels(), _native.cuda_stream(x.device), x, mask,
                               given, axis, qmin, qmax, scheme, stochastic, seed, out,
                               return_codes)


def _np(t: Tensor):
    """Zero-copy numpy view; a lazily negated input (a given scale, say) is resolved first
    (a copy). ``x``, ``mask`` and ``out`` with such a bit never get here (refused)."""
    t = t.detach() if t.requires_grad else t
    return (t.resolve_neg() if t.is_neg() else t).numpy()


# --------------------------------------------------------------------------------------
# fake_quantize / masked_fake_quantize
# --------------------------------------------------------------------------------------


def _fq(x, mask, *, bits, scheme, axis, scale, zero_point, rounding, seed, out, return_codes,
        backend, reference_only=False):
    _check_x(x)
    if mask is not None:
        _check_mask(mask, x)
    qmin, qmax = quant_range(bits, scheme)
    axis = _norm_axis(x, axis)
    stochastic, seed = _check_rounding(rounding, seed)
    given = _given_params(x, axis, scale, zero_point, qmin, qmax, scheme, bits)
    _check_out(out, x)
    if mask is not None and out is not None and _native.overlaps(out, mask):
        raise ValueError("mask overlaps the memory of out (or codes); pass a separate buffer")
    if not isinstance(return_codes, bool):
        raise TypeError(f"return_codes must be a bool, got {type(return_codes).__name__}")
    ran = "torch" if reference_only else _choose(backend, x, mask, cuda_twin=True, out=out)
    if ran == "native" and x.is_cuda:
        res, codes = _fq_cuda(x, mask, given, axis, qmin, qmax, scheme, stochastic, seed, out,
                              return_codes)
    elif ran == "torch":
        with torch.no_grad():
            v = x if mask is None else _apply_mask_reference(x, mask)
            s, z = given if given is not None else _derive_reference(v, axis, qmin, qmax, scheme)
            res, codes = _quantize_reference(v, s, z, axis, qmin, qmax, stochastic, seed,
                                             return_codes)
            if out is not None:
                out.copy_(res)
                _bump_versions([out])
                res = out
    else:
        C = _channels(x, axis)
        if given is not None:
            s, z = given
        else:
            s = torch.empty(C, dtype=x.dtype)
            z = torch.empty(C, dtype=x.dtype)
        res = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
        codes = torch.empty(x.shape, dtype=torch.int32) if return_codes else None
        ok = _native._C.fake_quantize(
            _np(x), _np(res), axis=axis, quant_min=qmin, quant_max=qmax,
            scheme=_SCHEMES.index(scheme), scale=_np(s), zero_point=_np(z),
            derive=given is None, stochastic=stochastic, seed=seed,
            codes=None if codes is None else codes.numpy(),
            mask=None if mask is None else _np(mask), num_threads=torch.get_num_threads())
        if not ok:
            raise ValueError("x contains NaN or inf, so min-max scale / zero_point are undefined; "
                             "pass scale= (and zero_point=) explicitly")
        if out is not None:
            _bump_versions([out])
    return (res, codes) if return_codes else res


def fake_quantize(
    x: Tensor,
    *,
    bits: int = 8,
    scheme: str = "affine",
    axis: Optional[int] = None,
    scale=None,
    zero_point=None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    out: Optional[Tensor] = None,
    return_codes: bool = False,
    backend: str = "auto",
):
    """Fake-quantize ``x`` per tensor or per channel (quantize to ``bits``-bit codes, dequantize).

    Args:
        x (Tensor[...]): float32 or float64, any shape (0-d and empty included).
        bits (int): 1..16.
        scheme (str): ``"affine"`` (codes ``[0, 2**bits - 1]``, zero point) or ``"symmetric"``
            (codes ``[-2**(bits-1), 2**(bits-1) - 1]``, zero point 0; bits >= 2).
        axis (int, optional): channel axis for per-channel quantization (negative allowed);
            ``None`` quantizes per tensor.
        scale (float or Tensor[] or Tensor[C], optional): given scale(s), rounded to ``x.dtype``;
            finite and > 0. ``None`` derives scale and zero point from min-max (module doc).
        zero_point (int or Tensor[] or Tensor[C], optional): integer(s) in
            ``[quant_min, quant_max]``; required with a given affine scale; 0 (or omitted) for
            symmetric.
        rounding (str): ``"nearest"`` (ties to even, as torch) or ``"stochastic"``.
        seed (int, optional): required for stochastic rounding (taken modulo 2**64).
        out (Tensor[...], optional): preallocated contiguous output like ``x``; may be ``x``.
        return_codes (bool): also return the integer codes as an int32 tensor.
        backend (str): ``"auto"``, ``"native"`` or ``"torch"`` (module doc).

    Returns:
        Tensor[...] (x.dtype) ``out = (q - zero_point) * scale``, or ``(out, codes)`` with
        ``codes`` Tensor[...] int32 when ``return_codes``.

    Edge cases: empty ``x`` returns an empty result (derived scale = 2**-23); NaN propagates
    (code ``quant_min``); +-inf clamp to the range ends; NaN/inf with derived parameters raise
    ValueError. float32 with a given scale / zero point is bit-identical to
    ``torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)`` and
    ``torch.fake_quantize_per_channel_affine`` on non-NaN input, with one exception: where
    ``x * inv_scale >= 2**63`` (finite, or +inf) torch's per-channel op gives the
    ``quant_min`` level (its int64 cast overflows) and this op ``quant_max`` (the clamp, as
    torch's per-tensor op); ``<= -2**63`` gives ``quant_min`` in both.

    Raises:
        TypeError: ``x`` not a float32/float64 tensor; wrong argument types; ``out`` dtype.
        ValueError: ``bits``, ``scheme``, ``axis``, ``rounding``, ``scale``, ``zero_point``,
            ``out`` shape / overlap; stochastic without ``seed``; non-finite data with derived
            parameters.
        RuntimeError: ``backend="native"`` when the extension is missing or ``x`` is not a
            contiguous CPU tensor.
    """
    return _fq(x, None, bits=bits, scheme=scheme, axis=axis, scale=scale, zero_point=zero_point,
               rounding=rounding, seed=seed, out=out, return_codes=return_codes, backend=backend)


def fake_quantize_reference(x: Tensor, **kwargs):
    """Pure-torch :func:`fake_quantize` (same arguments except ``backend``): fallback and oracle."""
    if "backend" in kwargs:
        raise TypeError("fake_quantize_reference() takes no backend argument")
    kw = dict(bits=8, scheme="affine", axis=None, scale=None, zero_point=None, rounding="nearest",
              seed=None, out=None, return_codes=False)
    _merge(kw, kwargs, "fake_quantize_reference")
    return _fq(x, None, backend="torch", reference_only=True, **kw)


def masked_fake_quantize(
    x: Tensor,
    mask: Tensor,
    *,
    bits: int = 8,
    scheme: str = "affine",
    axis: Optional[int] = None,
    scale=None,
    zero_point=None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    out: Optional[Tensor] = None,
    return_codes: bool = False,
    backend: str = "auto",
):
    """Fused mask + fake-quantize in one pass: ``fake_quantize(apply_mask(x, mask))``.

    The value quantized is ``mask ? x : +0.0`` for a bool mask (``x.masked_fill(~mask, 0)``)
    or ``x * mask`` for a mask of ``x``'s dtype (``x.mul(mask)``), exactly as
    :func:`apply_masks`; ``x`` itself is not modified (unless ``out is x``). Derived parameters
    come from the min-max of the masked values; since 0 is always in the range, that equals the
    min-max over the kept entries only. Dropped entries come out as ``+0.0`` (0 is always a
    quantization level). The result is bit-identical to masking, then :func:`fake_quantize`,
    with derived or given parameters.

    Args:
        x (Tensor[...]): float32 / float64.
        mask (Tensor[...]): ``x``'s shape and device, dtype bool or ``x.dtype``.
        bits, scheme, axis, scale, zero_point, rounding, seed, out, return_codes, backend:
            as :func:`fake_quantize` (``out`` may be ``x``, must not overlap ``mask``).

    Returns:
        Tensor[...] or ``(Tensor[...], Tensor[...] int32)`` as :func:`fake_quantize`.

    Raises:
        as :func:`fake_quantize`, plus TypeError / ValueError for ``mask`` dtype / shape / device
        (and RuntimeError for a non-contiguous mask with ``backend="native"``).
    """
    return _fq(x, mask, bits=bits, scheme=scheme, axis=axis, scale=scale, zero_point=zero_point,
               rounding=rounding, seed=seed, out=out, return_codes=return_codes, backend=backend)


def masked_fake_quantize_reference(x: Tensor, mask: Tensor, **kwargs):
    """Pure-torch :func:`masked_fake_quantize`: mask (as apply_masks), then fake-quantize."""
    if "backend" in kwargs:
        raise TypeError("masked_fake_quantize_reference() takes no backend argument")
    kw = dict(bits=8, scheme="affine", axis=None, scale=None, zero_point=None, rounding="nearest",
              seed=None, out=None, return_codes=False)
    _merge(kw, kwargs, "masked_fake_quantize_reference")
    return _fq(x, mask, backend="torch", reference_only=True, **kw)


def _merge(kw, kwargs, fn):
    for k, v in kwargs.items():
        if k not in kw:
            raise TypeError(f"{fn}() got an unexpected keyword argument {k!r}")
        kw[k] = v


def quantization_params(x: Tensor, *, bits: int = 8, scheme: str = "affine",
                        axis: Optional[int] = None, mask: Optional[Tensor] = None):
    """The derived ``(scale, zero_point)`` :func:`fake_quantize` uses when none are given.

    Returns:
        (Tensor[C] of x.dtype, Tensor[C] int32) with C = 1 per tensor or ``x.shape[axis]``,
        from the documented min-max formula (module doc) over ``x`` (masked by ``mask``).
    """
    _check_x(x)
    if mask is not None:
        _check_mask(mask, x)
    qmin, qmax = quant_range(bits, scheme)
    axis = _norm_axis(x, axis)
    with torch.no_grad():
        v = x if mask is None else _apply_mask_reference(x, mask)
        s, z = _derive_reference(v, axis, qmin, qmax, scheme)
    return s, z.to(torch.int32)


# --------------------------------------------------------------------------------------
# Sign and ternary
# --------------------------------------------------------------------------------------


def _mean_abs_reference(x: Tensor, axis: Optional[int], keep: Optional[Tensor] = None) -> Tensor:
    """Per-channel mean |x| (of kept entries) accumulated in float64, rounded to x.dtype."""
    C = _channels(x, axis)
    flat = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(C, -1)
    a = flat.abs().to(torch.float64)
    if keep is not None:
        a = a * keep
        cnt = keep.sum(dim=1).to(torch.float64)
    else:
        cnt = torch.full((C,), float(flat.shape[1]), dtype=torch.float64, device=x.device)
    s = a.sum(dim=1) / cnt
    s = torch.where(cnt > 0, s, torch.zeros_like(s))
    return s.to(x.dtype)


def _sign_apply(x: Tensor, s: Tensor, axis) -> Tensor:
    sb = s.reshape(_bshape(x, axis))
    return torch.where(x < 0, -sb, sb).expand(x.shape)


def _sign(x, axis, scale, out, backend, reference_only=False):
    _check_x(x)
    axis = _norm_axis(x, axis)
    given = None
    if scale is not None:
        given = _param_tensor(scale, "scale", x, axis, x.dtype)
        bad = ~(torch.isfinite(given) & (given > 0))
        if bool(bad.any()):
            raise ValueError(f"scale={given[bad][0].item()!r} is invalid; it must be finite and > 0")
    _check_out(out, x)
    ran = "torch" if reference_only else _choose(backend, x, cuda_twin=False, out=out)
    if ran == "torch":
        with torch.no_grad():
            s = given if given is not None else _mean_abs_reference(x, axis)
            res = _sign_apply(x, s, axis).clone(memory_format=torch.contiguous_format)
            if out is not None:
                out.copy_(res)
                _bump_versions([out])
                res = out
        return res
    C = _channels(x, axis)
    s = given if given is not None else torch.empty(C, dtype=x.dtype)
    res = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    _native._C.fake_quantize_sign(_np(x), _np(res), axis=axis, scale=_np(s),
                                  derive=given is None, num_threads=torch.get_num_threads())
    if out is not None:
        _bump_versions([out])
    return res


def fake_quantize_sign(x: Tensor, *, axis: Optional[int] = None, scale=None,
                       out: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """1-bit fake quantization: ``out = -s if x < 0 else +s`` per tensor / channel.

    Args:
        x (Tensor[...]): float32 / float64.
        axis (int, optional): channel axis; ``None`` for one scale per tensor.
        scale (float or Tensor[C], optional): given ``s`` (finite, > 0); default
            ``s = mean |x|`` over the tensor / channel, accumulated in float64 and rounded to
            ``x.dtype`` (an empty channel gets ``s = 0``).
        out, backend: as :func:`fake_quantize`.

    Returns:
        Tensor[...] with values in ``{-s, +s}``. ``sign(0) = sign(-0.0) = +s``. NaN input makes
        the derived ``s`` of its channel NaN (NaN propagates to the whole channel); with a given
        scale a NaN entry maps to ``+s``. The native ``s`` sums in a fixed order (8 interleaved
        float64 lanes) independent of the thread count; float32 ``s`` matched the reference
        bit for bit in our measurements, but float64 ``s`` differs from it by a relative
        amount that grows with the channel size n (summation order): measured up to ~2 eps
        at n = 1e3, ~8 eps at 1e5, ~36 eps at 1e6 (eps = 2.2e-16), not only the last bit.
    """
    return _sign(x, axis, scale, out, backend)


def fake_quantize_sign_reference(x: Tensor, *, axis: Optional[int] = None, scale=None,
                                 out: Optional[Tensor] = None) -> Tensor:
    """Pure-torch :func:`fake_quantize_sign`."""
    return _sign(x, axis, scale, out, "torch", reference_only=True)


_TERNARY_NAN = "x contains NaN; ternary quantization ranks |x| and NaN has no rank"


def _ternary_k(sparsity, count: int) -> int:
    return int(round(sparsity * count))


def _ternary(x, sparsity, axis, out, backend, reference_only=False):
    _check_x(x)
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) \
            or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r} is out of range; allowed: 0 <= sparsity < 1")
    axis = _norm_axis(x, axis)
    _check_out(out, x)
    C = _channels(x, axis)
    per = x.numel() // C if C else 0
    k = _ternary_k(float(sparsity), per)
    ran = "torch" if reference_only else _choose(backend, x, cuda_twin=False, out=out)
    # NaN is refused once per call: here on the torch path, by the extension (which must scan
    # anyway: NaN would break its selection) on the native one.
    if ran == "torch":
        if bool(torch.isnan(x).any()):
            raise ValueError(_TERNARY_NAN)
        with torch.no_grad():
            flat = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(C, -1)
            zero = torch.zeros(flat.shape, dtype=torch.bool, device=x.device)
            if k > 0:
                order = torch.sort(flat.abs(), dim=1, stable=True).indices
                zero.scatter_(1, order[:, :k], True)
            s = _mean_abs_reference(x, axis, keep=~zero if k > 0 else None)
            sb = s.reshape(C, 1)
            res_flat = torch.where(zero, torch.zeros((), dtype=x.dtype, device=x.device),
                                   torch.where(flat < 0, -sb, sb))
            if axis is None:
                res = res_flat.reshape(x.shape)
            else:
                moved = list(x.movedim(axis, 0).shape)
                res = res_flat.reshape(moved).movedim(0, axis).contiguous()
            if out is not None:
                out.copy_(res)
                _bump_versions([out])
                res = out
        return res
    s = torch.empty(C, dtype=x.dtype)
    zc = torch.full((C,), k, dtype=torch.int64)
    tmp = torch.empty_like(x, memory_format=torch.contiguous_format)
    ok = _native._C.fake_quantize_ternary(_np(x), tmp.numpy(), axis=axis, zero_count=zc.numpy(),
                                          scale=s.numpy(), num_threads=torch.get_num_threads())
    if not ok:  # nothing was written
        raise ValueError(_TERNARY_NAN)
    if out is not None:
        out.copy_(tmp)
        _bump_versions([out])
        return out
    return tmp


def fake_quantize_ternary(x: Tensor, *, sparsity: float = 0.5, axis: Optional[int] = None,
                          out: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Ternary fake quantization to ``{-s, 0, +s}`` per tensor / channel.

    Per tensor / channel of ``n`` entries, exactly ``k = round(sparsity * n)`` entries (Python
    ``round``: half to even) with the smallest ``|x|`` become ``+0.0``; ties in ``|x|`` go by
    position (lower flat index zeroed first). The others become ``-s if x < 0 else +s`` with
    ``s`` = mean ``|x|`` of the kept entries (float64 accumulation, rounded to ``x.dtype``;
    0 when nothing is kept). So the output has exactly ``k`` zeros per channel whenever ``s > 0``.

    Args:
        x (Tensor[...]): float32 / float64 without NaN (ValueError); inf ranks largest.
        sparsity (float): in ``[0, 1)``.
        axis, out, backend: as :func:`fake_quantize` (``out`` may be ``x``).

    Returns:
        Tensor[...] of ``x.dtype``. The native ``s`` may differ from the torch reference by
        the float64 summation order: invisible in float32 as a rule, in float64 a relative
        ~eps * sqrt(n) for a channel of n elements (measured ~26 eps at n = 1e6), as
        :func:`fake_quantize_sign`; the zero pattern and signs are identical.
    """
    return _ternary(x, sparsity, axis, out, backend)


def fake_quantize_ternary_reference(x: Tensor, *, sparsity: float = 0.5,
                                    axis: Optional[int] = None,
                                    out: Optional[Tensor] = None) -> Tensor:
    """Pure-torch :func:`fake_quantize_ternary` (stable sort of |x|)."""
    return _ternary(x, sparsity, axis, out, "torch", reference_only=True)


# --------------------------------------------------------------------------------------
# Straight-through estimator
# --------------------------------------------------------------------------------------


class FakeQuantizeSTE(torch.autograd.Function):
    """:func:`fake_quantize` with the straight-through estimator as its gradient.

    Forward: ``fake_quantize(x, **kw)``. Backward: ``grad_x = grad_out * inside`` where
    ``inside = quant_min <= round_half_even(x / scale) + zero_point <= quant_max`` (nearest
    rounding, whatever ``rounding`` the forward used), i.e. the gradient passes unchanged inside
    the clamp range and is zero outside it and at NaN -- exactly the gradient of
    ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``. No gradient flows to
    ``scale`` / ``zero_point``. Use as ``FakeQuantizeSTE.apply(x, kw)`` or
    :func:`fake_quantize_ste`.
    """

    @staticmethod
    def forward(ctx, x, kw):  # noqa: D102
        kw = dict(kw)
        for bad in ("out", "return_codes"):
            if bad in kw:
                raise ValueError(f"fake_quantize_ste does not take {bad}=")
        bits = kw.get("bits", 8)
        scheme = kw.get("scheme", "affine")
        qmin, qmax = quant_range(bits, scheme)
        _check_x(x)
        axis = _norm_axis(x, kw.get("axis"))
        with torch.no_grad():
            if kw.get("scale") is None:
                if kw.get("zero_point") is not None:
                    raise ValueError("zero_point was given without scale; pass both or neither")
                s, z = _derive_reference(x, axis, qmin, qmax, scheme)
            else:
                given = _given_params(x, axis, kw["scale"], kw.get("zero_point"), qmin, qmax,
                                      scheme, bits)
                s, z = given
            kw["scale"], kw["zero_point"] = s, z
            if axis is None:
                kw["scale"], kw["zero_point"] = s.reshape(()), z.reshape(())
            y = fake_quantize(x.detach(), **kw)
            bs = _bshape(x, axis)
            r = torch.round(x.detach() * torch.reciprocal(s.reshape(bs))) + z.reshape(bs)
            inside = (r >= qmin) & (r <= qmax)
        ctx.save_for_backward(inside)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None


def fake_quantize_ste(x: Tensor, **kw) -> Tensor:
    """``FakeQuantizeSTE.apply(x, kw)``: differentiable :func:`fake_quantize` (keyword arguments
    as :func:`fake_quantize`, without ``out`` / ``return_codes``)."""
    return FakeQuantizeSTE.apply(x, kw)
