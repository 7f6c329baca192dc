"""Multi-tensor mask application (the prune defense's kernel); public through :mod:`mia_core.kernels`."""

from __future__ import annotations

import bisect
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from mia_core import _native
from mia_core._native import bump_versions as _bump_versions
from mia_core._native import numpy_view as _numpy_view
from mia_core._native import warn_missing_once as _warn_missing_once

__all__ = ["apply_masks", "apply_masks_reference"]

_NATIVE_DTYPES = (torch.float32, torch.float64)


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
    _native.check_backend(backend)
    tensors, masks = _as_lists(tensors, masks)

    _C = _native._C
    if backend == "torch" or _C is None:
        _validate_masks(tensors, masks)
        if backend == "native":
            raise RuntimeError(_native.missing_message())
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


