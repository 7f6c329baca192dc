"""The one module that imports the extension ``mia_core._C``, and the buffer helpers every op shares.

The op modules (``_mask.py``, ``_kl.py``, ``_quant.py``) and the dispatcher (``_dispatch.py``) read
:data:`_C` and :func:`cuda_kernels` through this module at call time (``_native._C``), so tests
can simulate a missing extension, or a build without CUDA kernels, by patching them here.
Users go through :mod:`mia_core.kernels`, the only public door.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

try:
    from mia_core import _C
    _IMPORT_ERROR: Optional[BaseException] = None
except (ImportError, OSError) as exc:  # not built, wrong ABI, missing libgomp, ...
    _C = None
    _IMPORT_ERROR = exc


def numpy_view(t: torch.Tensor):
    """Zero-copy numpy view of a CPU tensor (raises for other devices and dtypes numpy lacks)."""
    return (t.detach() if t.requires_grad else t).numpy()


def lazy_bit_refusal(tensors, names) -> Optional[str]:
    """Why a native kernel cannot take one of ``tensors``: a lazily negated or conjugated view
    (``t.is_neg()`` / ``t.is_conj()``, e.g. ``torch._neg_view(x)``) has no numpy view and its
    ``data_ptr()`` holds the unnegated values; None if no tensor (None entries skipped) has
    such a bit. ``backend="auto"`` then runs the torch reference, which resolves them."""
    for t, name in zip(tensors, names):
        if t is not None and (t.is_neg() or t.is_conj()):
            return (f"{name} is a lazily negated or conjugated view (is_neg() / is_conj()); "
                    f"pass {name}.resolve_neg().resolve_conj()")
    return None


def memory_span(t: torch.Tensor):
    """[first, last + 1) byte addresses a tensor's elements occupy (strides included).
    Any device: ``data_ptr()`` is an address on CUDA too. Empty tensors occupy nothing."""
    lo = t.data_ptr()
    if not t.numel():
        return lo, lo
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return lo, lo + (last + 1) * t.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors intersect (see :func:`memory_span`)."""
    alo, ahi = memory_span(a)
    blo, bhi = memory_span(b)
    return alo < ahi and blo < bhi and alo < bhi and blo < ahi


def bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    """Tell autograd the tensors changed in place, as ``mul_`` would have."""
    if not tensors:
        return
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.3 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


# --------------------------------------------------------------------------------------
# CUDA twins (csrc/cuda/*.cu): present only in a MIAFW_CUDA=1 build
# --------------------------------------------------------------------------------------

#: Why ``backend="native"`` cannot take CUDA tensors in a CPU-only build.
CUDA_MISSING_MESSAGE = ("this miafw was built without CUDA kernels; rebuild with MIAFW_CUDA=1 "
                        "(and nvcc available), or use backend='auto' / 'torch', which run the "
                        "torch reference on the GPU")


def cuda_kernels():
    """The extension when it holds the CUDA twins (``build_info()["cuda"]``), else None."""
    C = _C
    if C is None or not hasattr(C, "cuda_apply_masks"):
        return None
    return C


def cuda_stream(device: torch.device) -> int:
    """``cudaStream_t`` (as an int) of torch's current stream on ``device``."""
    return int(torch.cuda.current_stream(device).cuda_stream)
