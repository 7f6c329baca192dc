"""Python face of miafw's native kernels: the only public door to ``mia_core._C``.

Every op takes ``backend="auto" | "native" | "torch"``, resolved once per call by the one
dispatcher (``_dispatch.py``):

* ``"native"`` -- the C++ extension (``csrc/kernels/*.h`` through ``csrc/bindings.cpp``); torch
  CPU tensors are handed over as zero-copy numpy views, so in-place ops write straight into
  the tensors' storage. CUDA tensors go to the CUDA twins in a ``MIAFW_CUDA=1`` build.
  Side effect: ``Tensor.numpy()`` marks the storage NOT resizable, permanently, so every CPU
  tensor (input, mask, scale or ``out``) that a native op ran on afterwards raises
  ``RuntimeError: Trying to resize storage that is not resizable`` on a growing
  ``t.resize_(...)`` (shrinking, ``copy_`` and other in-place ops still work; ``t.data =
  t.new_empty(...)`` or a fresh tensor are the ways to grow). ``backend="torch"`` leaves the
  storage resizable.
* ``"torch"`` -- the pure-torch reference next to each op here; it is the fallback and the
  oracle the tests compare the native kernel against (bit for bit).
* ``"auto"`` -- native when the extension loaded and the inputs qualify, else the torch
  reference. If the extension failed to import, ``auto`` warns once per process, naming the
  import error.

:func:`last_backend` tells which backend ran the calling thread's most recent op. Inputs are
validated the same way on every backend, with errors that name the argument or list index.

Layout: ``_native.py`` imports the extension, ``_dispatch.py`` chooses the backend, one module
per op family (``_mask.py``, ``_quant.py``, ``_kl.py``), and ``bench/`` holds the benchmarks
behind ``miafw bench``. The op modules (and torch) are imported on first use of a name here,
so ``import mia_core.kernels.bench`` (the CLI's list of benchmarks) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict

# Public name -> the module under mia_core.kernels that defines it (each module's __all__;
# tests/kernels/test_layout.py checks that the two agree).
_WHERE: Dict[str, str] = {
    **dict.fromkeys(("BACKENDS", "NativeKernelWarning", "last_backend"), "_dispatch"),
    **dict.fromkeys(("MaskPlan", "StaleMaskPlanError", "apply_masks", "apply_masks_reference",
                     "magnitude_masks", "magnitude_masks_reference"), "_mask"),
    **dict.fromkeys(("FakeQuantizeSTE", "fake_quantize", "fake_quantize_reference",
                     "fake_quantize_sign", "fake_quantize_sign_reference", "fake_quantize_ste",
                     "fake_quantize_ternary", "fake_quantize_ternary_reference",
                     "masked_fake_quantize", "masked_fake_quantize_reference", "quant_range",
                     "quantization_params"), "_quant"),
    **dict.fromkeys(("KL_DIRECTIONS", "gaussian_kl", "gaussian_kl_full",
                     "gaussian_kl_full_reference", "gaussian_kl_reference"), "_kl"),
}

__all__ = ["backend_info", "native_available", *_WHERE]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def native_available() -> bool:
    """Whether the native extension ``mia_core._C`` imported in this process."""
    from mia_core.kernels import _native

    return _native._C is not None


def backend_info() -> Dict[str, Any]:
    """Describe the kernel backends available in this process.

    Returns:
        dict: ``native_available`` (bool), ``import_error`` (``repr`` of the import error or
        None), ``openmp`` (bool, False without the extension), ``max_threads`` (OpenMP threads
        the extension would use by default, None without it), ``torch_threads``
        (``torch.get_num_threads()``, which the native kernels use), ``build`` (the
        extension's ``build_info()`` dict: compiler, OpenMP version, ``cuda``,
        ``mask_parallel_threshold``; None without it) and ``backends`` (the accepted
        ``backend`` values).
    """
    import torch

    from mia_core.kernels import _dispatch, _native

    C = _native._C
    return {
        "native_available": C is not None,
        "import_error": None if _native._IMPORT_ERROR is None else repr(_native._IMPORT_ERROR),
        "openmp": bool(C.openmp_enabled()) if C is not None else False,
        "max_threads": int(C.max_threads()) if C is not None else None,
        "torch_threads": torch.get_num_threads(),
        "build": dict(C.build_info()) if C is not None else None,
        "backends": _dispatch.BACKENDS,
    }
