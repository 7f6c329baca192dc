"""The one module that imports the extension ``mia_core._C``, and what every op shares.

Op modules (``mia_core/_mask.py``, ``_kl.py``, ``_quant.py``) read :data:`_C` through this module
at call time (``_native._C``), so tests can simulate a missing extension by patching it here.
Users go through :mod:`mia_core.kernels`, the only public door.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

try:
    from mia_core import _C
    _IMPORT_ERROR: Optional[BaseException] = None
except (ImportError, OSError) as exc:  # not built, wrong ABI, missing libgomp, ...
    _C = None
    _IMPORT_ERROR = exc

BACKENDS = ("auto", "native", "torch")

#: Set once ``auto`` has warned that the extension is missing (one warning per process).
_warned_missing = False


class NativeKernelWarning(UserWarning):
    """``backend="auto"`` fell back to torch because ``mia_core._C`` could not be imported."""


def check_backend(backend) -> None:
    """Raise ValueError naming ``backend`` unless it is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(map(repr, BACKENDS))}")


def missing_message() -> str:
    """Why ``backend='native'`` cannot run at all (the extension did not import)."""
    return (
        "backend='native' requested but the extension mia_core._C failed to import "
        f"({_IMPORT_ERROR!r}); rebuild it (pip install -e . or python setup.py "
        "build_ext --inplace) or use backend='auto' / 'torch'"
    )


def numpy_view(t: torch.Tensor):
    """Zero-copy numpy view of a CPU tensor (raises for other devices and dtypes numpy lacks)."""
    return (t.detach() if t.requires_grad else t).numpy()


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


def warn_missing_once() -> None:
    global _warned_missing
    if _warned_missing:
        return
    _warned_missing = True
    warnings.warn(
        f"mia_core._C (native kernels) failed to import ({_IMPORT_ERROR!r}); backend='auto' "
        "falls back to the torch reference, which gives the same results more slowly. "
        "Rebuild with `pip install -e .`. (Shown once per process.)",
        NativeKernelWarning,
        stacklevel=3,
    )


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
