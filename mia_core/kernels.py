"""Python face of miafw's native kernels: the only module that imports ``mia_core._C``.

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

import bisect
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

try:  # The one import of the extension in the package.
    from mia_core import _C
    _IMPORT_ERROR: Optional[BaseException] = None
except (ImportError, OSError) as exc:  # not built, wrong ABI, missing libgomp, ...
    _C = None
    _IMPORT_ERROR = exc

__all__ = ["apply_masks", "apply_masks_reference", "native_available", "backend_info"]

BACKENDS = ("auto", "native", "torch")
_NATIVE_DTYPES = (torch.float32, torch.float64)

#: Set once ``auto`` has warned that the extension is missing (one warning per process).
_warned_missing = False


class NativeKernelWarning(UserWarning):
    """``backend="auto"`` fell back to torch because ``mia_core._C`` could not be imported."""


def native_available() -> bool:
    """Whether the native extension ``mia_core._C`` imported in this process."""
    return _C is not None


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
        "native_available": _C is not None,
        "import_error": None if _IMPORT_ERROR is None else repr(_IMPORT_ERROR),
        "openmp": bool(_C.openmp_enabled()) if _C is not None else False,
        "max_threads": int(_C.max_threads()) if _C is not None else None,
        "torch_threads": torch.get_num_threads(),
        "build": dict(_C.build_info()) if _C is not None else None,
        "backends": BACKENDS,
    }


# --------------------------------------------------------------------------------------
# Mask application
# --------------------------------------------------------------------------------------


def apply_masks_reference(tensors: Iterable[torch.Tensor], masks: Iterable[torch.Tensor]) -> None:
    """Pure-torch mask application, in place: the fallback and the test oracle.

    For each pair, ``t.mul_(m)`` when ``m`` is floating point and ``t.masked_fill_(~m, 0)``
    when ``m`` is bool, in list order, under ``torch.no_grad()`` (autograd records nothing;
    the tensors' version counters are bumped as for any in-place op).

    Args:
        tensors (Sequence[Tensor[...]]): floating-point tensors, modified in place. Any
            iterable works (e.g. ``model.parameters()``).
        masks (Sequence[Tensor[...]]): ``masks[i]`` has ``tensors[i]``'s shape, on its device,
            with dtype ``torch.bool`` or ``tensors[i].dtype``.

    Raises:
        TypeError, ValueError: as :func:`apply_masks`, naming the offending index.
    """
    tensors, masks = _as_lists(tensors, masks)
    _validate_masks(tensors, masks)
    _reference_unchecked(tensors, masks)


def apply_masks(
    tensors: Iterable[torch.Tensor],
    masks: Iterable[torch.Tensor],
    *,
    backend: str = "auto",
) -> str:
    """Apply one mask per tensor, in place, for a whole model in one call.

    A floating-point mask multiplies (``w = w * m``, bit-identical to ``w.mul_(m)``: NaN * 0
    stays NaN, -1 * 0 gives -0.0); a bool mask zeroes where it is False (``w = m ? w : +0.0``,
    bit-identical to ``w.masked_fill_(~m, 0)``). The native kernel masks all tensors in one
    OpenMP region, split evenly over ``torch.get_num_threads()`` threads, and runs serially
    below 65536 elements in total.

    Args:
        tensors (Sequence[Tensor[...]]): floating-point tensors of any shapes, modified in
            place (parameters that require grad are fine: nothing is recorded by autograd).
            Any iterable works, e.g. ``model.parameters()``.
        masks (Sequence[Tensor[...]]): ``masks[i]`` has exactly ``tensors[i].shape`` (no
            broadcasting), lives on the same device, and has dtype ``torch.bool`` or
            ``tensors[i].dtype``. A mask may be shared by several tensors.
        backend (str): ``"auto"`` (default), ``"native"`` or ``"torch"``.

            * ``"auto"`` runs natively when the extension imported and every tensor and mask
              is a contiguous CPU tensor, every tensor is float32/float64, and no tensor
              shares memory with another tensor or with another tensor's mask; otherwise the
              whole list goes through the torch reference (one warning per process if the
              extension failed to import).
            * ``"native"`` requires all of that and raises ``RuntimeError`` (naming the index
              and why) otherwise.
            * ``"torch"`` always runs :func:`apply_masks_reference`.

    Returns:
        str: the backend that ran, ``"native"`` or ``"torch"``.

    Edge cases: an empty list and zero-size tensors are valid and change nothing (an empty
    list reports ``"native"`` when the extension is available). Inputs are validated before
    anything is written, so an error leaves every tensor untouched.

    Cost: the native path pays about 1 us per tensor and per mask to build zero-copy numpy
    views, so for many tiny tensors a Python loop of ``mul_`` can be faster; it wins on large
    tensors and bool masks (see benchmarks/RESULTS.md).

    Raises:
        ValueError: unknown ``backend``; different numbers of tensors and masks; a shape or
            device mismatch.
        TypeError: a non-tensor entry; a tensor that is not floating point; a mask dtype
            other than bool or the tensor's dtype.
        RuntimeError: ``backend="native"`` with the extension missing or an input it does not
            support.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(map(repr, BACKENDS))}")
    tensors, masks = _as_lists(tensors, masks)

    if backend == "torch" or _C is None:
        _validate_masks(tensors, masks)
        if backend == "native":
            raise RuntimeError(
                "backend='native' requested but the extension mia_core._C failed to import "
                f"({_IMPORT_ERROR!r}); rebuild it (pip install -e . or python setup.py "
                "build_ext --inplace) or use backend='auto' / 'torch'"
            )
        if backend == "auto":
            _warn_missing_once()
        _reference_unchecked(tensors, masks)
        return "torch"

    # Fast path: the extension validates dtypes, shapes, contiguity and aliasing itself
    # (before writing anything), so per-tensor Python checks are only paid when it refuses.
    try:
        # Zero-copy numpy views (inlined _numpy_view: this loop is the per-tensor cost).
        t_arrays = [(t.detach() if t.requires_grad else t).numpy() for t in tensors]
        m_arrays = [(m.detach() if m.requires_grad else m).numpy() for m in masks]
        _C.apply_masks(t_arrays, m_arrays, num_threads=torch.get_num_threads())
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        # Slow path. Invalid inputs raise the same errors as on the torch backend; valid
        # inputs the kernel cannot take go to the reference (auto) or raise (native).
        _validate_masks(tensors, masks)
        reason = _native_mask_unsupported(tensors, masks) or f"the extension refused the inputs: {exc}"
        if backend == "native":
            raise RuntimeError(
                f"backend='native' cannot run: {reason}; use backend='auto' or 'torch'"
            ) from exc
        _reference_unchecked(tensors, masks)
        return "torch"
    _bump_versions(tensors)
    return "native"


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _as_lists(tensors, masks) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    for name, value in (("tensors", tensors), ("masks", masks)):
        if isinstance(value, torch.Tensor) or not isinstance(value, Iterable):
            raise TypeError(
                f"{name} must be a sequence of tensors (e.g. a list), got {type(value).__name__}"
            )
    tensors, masks = list(tensors), list(masks)
    if len(tensors) != len(masks):
        raise ValueError(
            f"got {len(tensors)} tensors but {len(masks)} masks; pass exactly one mask per tensor"
        )
    return tensors, masks


def _validate_masks(tensors: List[torch.Tensor], masks: List[torch.Tensor]) -> None:
    for i, (t, m) in enumerate(zip(tensors, masks)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"masks[{i}] must be a torch.Tensor, got {type(m).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"tensors[{i}] has dtype {t.dtype}; allowed: a floating-point dtype "
                "(float32 and float64 run natively)"
            )
        md = m.dtype
        if md is not torch.bool and md is not t.dtype:
            raise TypeError(
                f"masks[{i}] has dtype {md}; allowed: torch.bool or {t.dtype} "
                f"(the dtype of tensors[{i}])"
            )
        if t.shape != m.shape:
            raise ValueError(
                f"masks[{i}] has shape {tuple(m.shape)} but tensors[{i}] has shape "
                f"{tuple(t.shape)}; they must be equal (no broadcasting)"
            )
        if not (t.is_cpu and m.is_cpu) and t.device != m.device:
            raise ValueError(
                f"masks[{i}] is on {m.device} but tensors[{i}] is on {t.device}; "
                "they must be on the same device"
            )


def _reference_unchecked(tensors: List[torch.Tensor], masks: List[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, m in zip(tensors, masks):
            if m.dtype is torch.bool:
                t.masked_fill_(~m, 0)
            else:
                t.mul_(m)


def _native_mask_unsupported(tensors: List[torch.Tensor], masks: List[torch.Tensor]) -> Optional[str]:
    """Why the native kernel cannot take these (validated) inputs, or None if it can."""
    for i, (t, m) in enumerate(zip(tensors, masks)):
        if t.dtype not in _NATIVE_DTYPES:
            return f"tensors[{i}] has dtype {t.dtype}; the native kernel supports float32 and float64"
        if not t.is_cpu:
            return f"tensors[{i}] is on {t.device}; the native kernel is CPU-only"
        if not m.is_cpu:
            return f"masks[{i}] is on {m.device}; the native kernel is CPU-only"
        if not t.is_contiguous():
            return (f"tensors[{i}] is not contiguous (strides {t.stride()}); the native kernel "
                    "writes in place and cannot take a contiguous copy")
        if not m.is_contiguous():
            return f"masks[{i}] is not contiguous (strides {m.stride()}); pass mask.contiguous()"
        for name, x in (("tensors", t), ("masks", m)):
            try:
                _numpy_view(x)
            except (TypeError, RuntimeError) as exc:
                return f"{name}[{i}] has no numpy view ({exc})"
    return _aliasing(tensors, masks)


def _aliasing(tensors: List[torch.Tensor], masks: List[torch.Tensor]) -> Optional[str]:
    """Overlapping buffers the one-region kernel cannot run concurrently, or None.

    A written range (a tensor) must not overlap another tensor, nor another tensor's mask;
    masks may be shared between tensors, and a mask may be its own tensor.
    """
    writes = []
    for i, t in enumerate(tensors):
        n = t.numel()
        if n:
            lo = t.data_ptr()
            writes.append((lo, lo + n * t.element_size(), i))
    writes.sort()
    for (lo0, hi0, i0), (lo1, _, i1) in zip(writes, writes[1:]):
        if lo1 < hi0:
            a, b = sorted((i0, i1))
            return (f"tensors[{a}] and tensors[{b}] share memory (e.g. tied weights); the "
                    "native kernel masks all tensors concurrently")
    ends = [w[1] for w in writes]  # sorted: the written ranges are disjoint
    for i, m in enumerate(masks):
        n = m.numel()
        if not n:
            continue
        lo = m.data_ptr()
        hi = lo + n * m.element_size()
        k = bisect.bisect_right(ends, lo)
        while k < len(writes) and writes[k][0] < hi:
            wlo, whi, j = writes[k]
            if not (j == i and wlo == lo and whi == hi):
                return (f"masks[{i}] overlaps the memory of tensors[{j}], which is written in "
                        "place; pass a separate mask tensor")
            k += 1
    return None


def _numpy_view(t: torch.Tensor):
    """Zero-copy numpy view of a CPU tensor (raises for other devices and dtypes numpy lacks)."""
    return (t.detach() if t.requires_grad else t).numpy()


def _bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    """Tell autograd the tensors changed in place, as ``mul_`` would have."""
    if not tensors:
        return
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.3 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _warn_missing_once() -> None:
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
