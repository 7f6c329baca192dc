"""Python face of miafw's native kernels: the only public door to ``mia_core._C``.

Every op takes ``backend="auto" | "native" | "torch"``:

* ``"native"`` -- the C++ extension (``csrc/kernels/*.h`` through ``csrc/bindings.cpp``); torch
  CPU tensors are handed over as zero-copy numpy views, so in-place ops write straight into
  the tensors' storage.
* ``"torch"`` -- the pure-torch reference next to each op here; it is the fallback and the
  oracle the tests compare the native kernel against (bit for bit).
* ``"auto"`` -- native when the extension loaded and the inputs qualify, else the torch
  reference. If the extension failed to import, ``auto`` warns once per process, naming the
  import error.

Inputs are validated the same way on every backend, with errors that name the list index.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from mia_core import _native
from mia_core._native import BACKENDS, NativeKernelWarning

# Op families, each in its own module, all reached through this one.
from mia_core._mask import *  # noqa: E402,F401,F403
from mia_core._mask import __all__ as _mask_all
from mia_core._quant import *  # noqa: E402,F401,F403
from mia_core._quant import __all__ as _quant_all
from mia_core._kl import *  # noqa: E402,F401,F403
from mia_core._kl import __all__ as _kl_all
# (op families end)

__all__ = ["BACKENDS", "NativeKernelWarning", "backend_info", "native_available", *_mask_all,
           *_quant_all, *_kl_all]


def native_available() -> bool:
    """Whether the native extension ``mia_core._C`` imported in this process."""
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
    return {
        "native_available": _native._C is not None,
        "import_error": None if _native._IMPORT_ERROR is None else repr(_native._IMPORT_ERROR),
        "openmp": bool(_native._C.openmp_enabled()) if _native._C is not None else False,
        "max_threads": int(_native._C.max_threads()) if _native._C is not None else None,
        "torch_threads": torch.get_num_threads(),
        "build": dict(_native._C.build_info()) if _native._C is not None else None,
        "backends": BACKENDS,
    }


