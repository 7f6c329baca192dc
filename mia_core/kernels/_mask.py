"""Mask kernels of the prune defense; public through :mod:`mia_core.kernels`.

* :func:`apply_masks` -- one mask per tensor, in place, a whole model in one call;
* :class:`MaskPlan` -- the same, validated once and re-applied cheaply (after every
  fine-tuning step);
* :func:`magnitude_masks` -- keep-masks that remove exactly ``round(sparsity * count)``
  smallest-magnitude weights, per model for stacked ensembles.

Threading and processes (verified by tests/kernels/test_openmp_threading.py on the 2-core CI
machine): the native kernels use OpenMP through the one libgomp already in the process (torch's bundled
copy, whichever of torch and ``mia_core._C`` is imported first), with
``torch.get_num_threads()`` threads, so ``torch.set_num_threads(n)`` governs them too. Do not
``fork`` a process that has run an OpenMP region (any torch op or native kernel that used
threads): GNU libgomp's thread pool does not survive a fork, and the child can hang in its
first parallel region. Use the ``spawn`` (or ``forkserver``) multiprocessing context, or
joblib's default loky backend, which is what miafw's executors do.
"""

from __future__ import annotations

import bisect
import numbers
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from mia_core.kernels import _dispatch, _native
from mia_core.kernels._dispatch import Refusal
from mia_core.kernels._native import bump_versions as _bump_versions
from mia_core.kernels._native import numpy_view as _numpy_view

__all__ = [
    "MaskPlan",
    "StaleMaskPlanError",
    "apply_masks",
    "apply_masks_reference",
    "magnitude_masks",
    "magnitude_masks_reference",
]

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

            CUDA tensors: in a ``MIAFW_CUDA=1`` build, ``"auto"`` / ``"native"`` run the CUDA
            twin (one launch for all tensors on ``torch.cuda.current_stream()``, same bits)
            when all tensors share one CUDA device, are float32/float64, contiguous and do not
            alias; otherwise ``"auto"`` runs the reference (torch ops on the GPU) and
            ``"native"`` raises ``RuntimeError`` (in a CPU-only build: "this miafw was built
            without CUDA kernels; rebuild with MIAFW_CUDA=1").

    Returns:
        str: the backend that ran, ``"native"`` (CPU kernel or CUDA twin) or ``"torch"``.

    Edge cases: an empty list and zero-size tensors are valid and change nothing (an empty
    list reports ``"native"`` when the extension is available). Inputs are validated before
    anything is written, so an error leaves every tensor untouched.

    Cost: the native path pays about 1 us per tensor and per mask to build zero-copy numpy
    views, so for many tiny tensors a Python loop of ``mul_`` can be faster; it wins on large
    tensors and bool masks. To apply the same masks repeatedly (e.g. after every fine-tuning
    step) build a :class:`MaskPlan` once: its ``apply()`` beats the loop (see
    ``mia_core/kernels/bench/mask.py``).

    Raises:
        ValueError: unknown ``backend``; different numbers of tensors and masks; a shape or
            device mismatch.
        TypeError: a non-tensor entry; a tensor that is not floating point; a mask dtype
            other than bool or the tensor's dtype.
        RuntimeError: ``backend="native"`` with the extension missing or an input it does not
            support.
    """
    tensors, masks = _as_lists(tensors, masks)
    refused = None
    _C = _native._C
    if (backend == "auto" or backend == "native") and _C is not None:
        # Fast path: the extension validates dtypes, shapes, contiguity and aliasing itself
        # (before writing anything), so the per-tensor Python checks below are only paid when
        # it refuses (invalid inputs, or valid ones it cannot take).
        try:
            # Zero-copy numpy views (inlined _numpy_view: this loop is the per-tensor cost).
            t_arrays = [(t.detach() if t.requires_grad else t).numpy() for t in tensors]
            m_arrays = [(m.detach() if m.requires_grad else m).numpy() for m in masks]
            _C.apply_masks(t_arrays, m_arrays, num_threads=torch.get_num_threads())
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            refused = exc
        else:
            _bump_versions(tensors)
            return _dispatch.record("native")
    # Invalid inputs raise the same errors on every backend; valid inputs the CPU kernel
    # refused go to the CUDA twin (CUDA tensors) or to the reference (auto) or raise (native).
    _validate_masks(tensors, masks)
    if _dispatch.choose(backend, lambda b: _refusal(tensors, masks, refused)) == "torch":
        _reference_unchecked(tensors, masks)
        return "torch"
    device = tensors[0].device  # only CUDA tensors get here: the CPU kernel refused the rest
    with torch.cuda.device(device):
        _cuda_launch(_native.cuda_kernels(), _native.cuda_stream(device), tensors, masks)
    return "native"


def _refusal(tensors: List[torch.Tensor], masks: List[torch.Tensor],
             refused: Optional[BaseException]) -> Optional[Refusal]:
    """Why the native implementation cannot take these (validated) inputs, or None (CUDA
    tensors the twin takes). ``refused`` is the CPU kernel's own refusal, if it was tried."""
    if any(t.is_cuda for t in tensors):  # CUDA tensors have no numpy view
        return _cuda_mask_refusal(tensors, masks)
    reason = _native_mask_unsupported(tensors, masks)
    return Refusal(reason or f"the extension refused the inputs: {refused}")


_CUDA_MASK_KINDS = {
    (torch.float32, False): 0,  # float32 * float32 mask
    (torch.float32, True): 1,   # float32, bool mask
    (torch.float64, False): 2,
    (torch.float64, True): 3,
}


def _cuda_mask_refusal(tensors: List[torch.Tensor], masks: List[torch.Tensor]) -> Optional[Refusal]:
    """Why the CUDA twin cannot take these (validated) inputs, or None if it can."""
    if _native.cuda_kernels() is None:
        return _dispatch.NO_CUDA_KERNELS
    device = tensors[0].device
    for i, (t, m) in enumerate(zip(tensors, masks)):
        lazy = _native.lazy_bit_refusal((t, m), (f"tensors[{i}]", f"masks[{i}]"))
        if lazy is not None:
            return Refusal(lazy)
        if t.dtype not in _NATIVE_DTYPES:
            return Refusal(f"tensors[{i}] has dtype {t.dtype}; the CUDA kernel supports float32 "
                           "and float64")
        if t.device != device:
            return Refusal(f"tensors[{i}] is on {t.device} but tensors[0] is on {device}; the "
                           "CUDA kernel masks the tensors of one device per call")
        if not t.is_contiguous():
            return Refusal(f"tensors[{i}] is not contiguous (strides {t.stride()}); the CUDA "
                           "kernel writes in place and cannot take a contiguous copy")
        if not m.is_contiguous():
            return Refusal(f"masks[{i}] is not contiguous (strides {m.stride()}); pass "
                           "mask.contiguous()")
    reason = _aliasing(tensors, masks)
    return None if reason is None else Refusal(reason)


def _cuda_launch(kernels, stream: int, tensors: List[torch.Tensor], masks: List[torch.Tensor]) -> None:
    """One call of the CUDA twin ``kernels.cuda_apply_masks`` on ``stream`` (inputs accepted by
    :func:`_cuda_mask_refusal`). Device-agnostic on purpose: the tests pass the host
    emulation (``mia_core._cuda_emu``) with CPU tensors."""
    _CudaMaskSet(tensors, masks).apply(kernels, stream)
    _bump_versions(tensors)


class _CudaMaskSet:
    """A :class:`MaskPlan`'s CUDA side: the segment lists of the CUDA twin, built once.

    Holds the tensors' ``data_ptr()`` at build time, so :meth:`moved` finds a reallocated
    tensor before anything is written (the plan keeps the tensors and its mask copies alive).
    Device-agnostic like :func:`_cuda_launch`: the tests drive it with the host emulation.
    """

    def __init__(self, tensors: List[torch.Tensor], masks: List[torch.Tensor]):
        self._tensors = tensors
        self.data = [t.data_ptr() for t in tensors]
        self.masks = [m.data_ptr() for m in masks]
        self.sizes = [t.numel() for t in tensors]
        self.kinds = [_CUDA_MASK_KINDS[(t.dtype, m.dtype is torch.bool)] for t, m in zip(tensors, masks)]
        self.device = tensors[0].device if tensors else None

    def moved(self) -> int:
        """Index of the first tensor whose storage moved since the build, or -1."""
        for i, (t, p) in enumerate(zip(self._tensors, self.data)):
            if t.data_ptr() != p:
                return i
        return -1

    def apply(self, kernels, stream: int) -> None:
        kernels.cuda_apply_masks(self.data, self.masks, self.sizes, self.kinds, stream=stream)


# --------------------------------------------------------------------------------------
# Cached plans
# --------------------------------------------------------------------------------------


class StaleMaskPlanError(RuntimeError):
    """A :class:`MaskPlan`'s tensor no longer uses the storage the plan was built for."""


class MaskPlan:
    """Masks for a fixed list of tensors, validated once and re-applied with one cheap call.

    ``plan = MaskPlan(tensors, masks)`` validates exactly as :func:`apply_masks` (same errors),
    takes a private contiguous copy of every mask (the plan owns its masks: later changes to
    the mask tensors do not reach it), and, on the native backend, hands the extension a
    prepared ``mia_core._C.MaskSet`` holding the zero-copy numpy views and the kernel's
    segment lists. ``plan.apply()`` then costs one call plus a ``data_ptr()`` check per
    tensor, so it beats a Python loop of ``w.mul_(m)`` even for many small tensors (see
    ``mia_core/kernels/bench/mask.py``, case ``model-50-tensors``). CUDA tensors, in a
    ``MIAFW_CUDA=1`` build: the plan keeps the CUDA twin's segment lists, and ``apply()`` is
    the same ``data_ptr()`` check plus ONE kernel launch on the current stream (a loop of
    ``mul_`` is one launch per tensor); otherwise the plan runs the torch loop on the GPU.

    Args:
        tensors (Sequence[Tensor[...]]): floating-point tensors masked in place at every
            :meth:`apply` (e.g. ``model.parameters()``). The plan keeps references to them.
        masks (Sequence[Tensor[...]]): as for :func:`apply_masks`; copied at construction.
        backend (str): ``"auto"`` (native when :func:`apply_masks` would run natively on these
            inputs, else torch), ``"native"`` (raises ``RuntimeError`` naming the reason when
            it cannot) or ``"torch"`` (a plain loop over the reference ops).

    Validity: the plan is tied to the tensors' storage. In-place updates (optimizer steps,
    ``copy_``, ``load_state_dict``) keep it valid; anything that reallocates a tensor's
    storage (``p.data = ...``, ``p.set_(...)``) makes the native plan
    stale: :meth:`apply` detects the changed ``data_ptr()``, writes nothing and raises
    :class:`StaleMaskPlanError`; :meth:`rebuild` re-validates against the tensors' current
    storage (same masks). The plan's views keep the storage they were built on alive, so a
    stale plan never touches freed memory (it holds that memory until rebuilt or dropped).
    The torch plan always acts on the tensors' current storage. Shrinking a tensor in place
    (``resize_`` to fewer elements keeps the storage) is not detected: rebuild after any
    shape change. A growing ``resize_`` cannot happen on the native backend: its numpy views
    (``Tensor.numpy()``) mark each tensor's storage non-resizable, permanently (even after the
    plan is dropped), so it raises ``RuntimeError: Trying to resize storage that is not
    resizable``; the same holds for every tensor any native op has run on (see
    :mod:`mia_core.kernels`).

    Attributes:
        backend (str): ``"native"`` or ``"torch"``, what :meth:`apply` runs.
        tensors (list[Tensor]): the tensors, in order.
        masks (list[Tensor]): the plan's private mask copies.
    """

    def __init__(self, tensors: Iterable[torch.Tensor], masks: Iterable[torch.Tensor], *,
                 backend: str = "auto"):
        tensors, masks = _as_lists(tensors, masks)
        _validate_masks(tensors, masks)
        self.tensors: List[torch.Tensor] = tensors
        # Private copies; a mask shared by several tensors is copied once.
        copies = {}
        self.masks: List[torch.Tensor] = []
        for m in masks:
            key = id(m)
            if key not in copies:
                copies[key] = m.detach().clone(memory_format=torch.contiguous_format)
            self.masks.append(copies[key])
        self._requested = backend
        self._set = None
        self.backend = "torch"
        self._build()

    def _build(self) -> None:
        self._set = None
        self._cuda = None
        refused = None
        _C = _native._C
        on_cuda = any(t.is_cuda for t in self.tensors)
        if self._requested != "torch" and _C is not None and not on_cuda:
            try:
                # The extension validates dtypes, contiguity and aliasing itself; the Python
                # reasons are only worked out when it refuses. Views of detached aliases: their
                # base tensors hold the storage, so the arrays stay valid even if a user's
                # tensor is later re-pointed (the owner check then reports the plan stale
                # instead of writing freed memory).
                self._set = _C.MaskSet(
                    [t.detach().numpy() for t in self.tensors],
                    [m.detach().numpy() for m in self.masks],
                    self.tensors,
                )
            except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
                refused = exc
        ran = _dispatch.choose(self._requested, lambda b: None if self._set is not None
                               else _refusal(self.tensors, self.masks, refused))
        if ran == "native" and on_cuda:
            self._cuda = _CudaMaskSet(self.tensors, self.masks)
        self.backend = ran

    def rebuild(self) -> "MaskPlan":
        """Re-validate against the tensors' current storage (after a reallocation); returns self.

        Raises the errors of the constructor if the tensors no longer match their masks.
        """
        _validate_masks(self.tensors, self.masks)
        self._build()
        return self

    def stale_index(self) -> Optional[int]:
        """Index of the first tensor whose storage moved since the plan was built, or None."""
        if self._cuda is not None:
            i = self._cuda.moved()
            return None if i < 0 else i
        if self._set is None:
            return None
        i = self._set.moved()
        return None if i < 0 else int(i)

    def apply(self) -> str:
        """Apply every mask in place; returns the backend that ran (``"native"``/``"torch"``).

        Bit-identical to :func:`apply_masks_reference` with the plan's masks. Autograd is told
        the tensors changed (version counters bumped), as for ``mul_`` under ``no_grad``.

        Raises:
            StaleMaskPlanError: a tensor's storage was reallocated since the plan was built
                (nothing is written); call :meth:`rebuild`.
        """
        if self._cuda is not None:
            i = self._cuda.moved()
            if i >= 0:
                raise self._stale(i)
            with torch.cuda.device(self._cuda.device):
                self._cuda.apply(_native.cuda_kernels(), _native.cuda_stream(self._cuda.device))
            _bump_versions(self.tensors)
            return _dispatch.record("native")
        s = self._set
        if s is None:
            _reference_unchecked(self.tensors, self.masks)
            return _dispatch.record("torch")
        try:
            s.apply(num_threads=torch.get_num_threads())
        except RuntimeError as exc:
            if type(exc).__name__ != "StaleMaskSetError":
                raise
            raise self._stale(s.moved()) from None
        _bump_versions(self.tensors)
        return _dispatch.record("native")

    @staticmethod
    def _stale(i: int) -> StaleMaskPlanError:
        return StaleMaskPlanError(
            f"tensors[{i}] was reallocated since this MaskPlan was built (its data_ptr() "
            "changed, e.g. by `p.data = ...` or `set_`); nothing was written; call "
            "plan.rebuild()")

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self.tensors)
        return f"MaskPlan({len(self.tensors)} tensors, {n} elements, backend={self.backend!r})"


# --------------------------------------------------------------------------------------
# Magnitude masks
# --------------------------------------------------------------------------------------

_SCOPES = ("global", "tensor")


def magnitude_masks_reference(
    tensors: Sequence[torch.Tensor], sparsity: float, *, scope: str = "global", stacked: bool = False
) -> List[torch.Tensor]:
    """Pure-torch magnitude masks (a stable argsort): the fallback and the test oracle.

    Same arguments, validation and result as :func:`magnitude_masks`; float16/bfloat16 and
    non-CPU tensors work here too. Global scope with mixed dtypes ranks in the promoted dtype
    (``torch.cat``), which is exact for float32 -> float64.
    """
    tensors = _validate_magnitude(tensors, sparsity, scope, stacked)
    return _magnitude_reference_unchecked(tensors, float(sparsity), scope, stacked)


def _magnitude_reference_unchecked(tensors, sparsity, scope, stacked):
    if not tensors:
        return []
    views = [t.detach() if stacked else t.detach().unsqueeze(0) for t in tensors]
    m = views[0].shape[0]
    if m == 0:  # no models: nothing to rank
        return [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in tensors]
    if scope == "global":
        flat = torch.cat([v.reshape(m, -1).abs() for v in views], dim=1)
        groups = [(flat, list(range(len(views))))]
    else:
        groups = [(v.reshape(m, -1).abs(), [i]) for i, v in enumerate(views)]
    masks: List[Optional[torch.Tensor]] = [None] * len(views)
    for mags, idx in groups:
        count = mags.shape[1]
        k = int(round(sparsity * count))
        keep = torch.ones(mags.shape, dtype=torch.bool, device=mags.device)
        if k > 0 and mags.numel():
            # Stable: equal magnitudes are removed in position order; torch sorts NaN last.
            order = torch.argsort(mags, dim=1, stable=True)
            keep.scatter_(1, order[:, :k], False)
        offset = 0
        for i in idx:
            size = views[i][0].numel() if m else 0
            masks[i] = keep[:, offset: offset + size].reshape(views[i].shape).contiguous()
            offset += size
    if not stacked:
        masks = [mk[0] for mk in masks]  # type: ignore[index]
    return masks  # type: ignore[return-value]


def magnitude_masks(
    tensors: Sequence[torch.Tensor],
    sparsity: float,
    *,
    scope: str = "global",
    stacked: bool = False,
    backend: str = "auto",
) -> List[torch.Tensor]:
    """Keep-masks (``True`` = kept) that remove the smallest-magnitude weights.

    Exactly ``k = round(sparsity * count)`` entries are removed per problem (Python's
    ``round``, half to even), where a problem is:

    * ``scope="global"``: all tensors together, in list order (one threshold per model);
    * ``scope="tensor"``: each tensor on its own (``k`` per tensor).

    With ``stacked=True`` every tensor is ``Tensor[M, ...]`` with the same leading model
    dimension ``M`` and each model ``m`` (``tensors[i][m]``) is an independent problem: this
    is how the prune defense masks a whole vmap ensemble in one call.

    Order: by ``|w|``; equal magnitudes (including ``-0.0`` and ``+0.0``) are broken by
    position, the lower flat position (in concatenation order for global scope) removed
    first. NaN (any sign or payload) counts as the LARGEST magnitude, larger than ``inf``, so
    NaNs are kept unless ``k`` exceeds the number of non-NaN entries (then the first NaNs by
    position go). This is exactly a stable ``argsort`` of ``|w|``
    (:func:`magnitude_masks_reference`); the native result is bit-identical to it.

    Args:
        tensors (Sequence[Tensor[...]] or Sequence[Tensor[M, ...]]): floating-point tensors on
            one device; read only.
        sparsity (float): fraction in ``[0, 1)`` to remove.
        scope (str): ``"global"`` (default) or ``"tensor"``.
        stacked (bool): tensors carry a leading model dimension ``M`` (see above).
        backend (str): ``"auto"``, ``"native"`` or ``"torch"``. The native kernel (O(n):
            a histogram of the magnitudes' top bits, then ``nth_element`` on one bin; models /
            tensors in parallel, or one large problem split over ``torch.get_num_threads()``
            threads) takes CPU float32/float64 tensors of one dtype (non-contiguous ones are
            read through a contiguous copy); ``auto`` falls back to the reference otherwise.

    Returns:
        list[Tensor]: bool masks, ``masks[i]`` with ``tensors[i].shape``, contiguous, on the
        tensors' device. ``[]`` for an empty list.

    Raises:
        ValueError: ``sparsity`` outside ``[0, 1)`` (or NaN); unknown ``scope``/``backend``;
            tensors on different devices; ``stacked=True`` with a 0-d tensor or differing
            leading dimensions.
        TypeError: ``sparsity`` not a real number; a non-tensor or non-floating-point entry.
        RuntimeError: ``backend="native"`` with the extension missing or inputs it cannot take.
    """
    tensors = _validate_magnitude(tensors, sparsity, scope, stacked)
    sparsity = float(sparsity)
    if _dispatch.choose(backend, lambda b: _magnitude_refusal(tensors)) == "torch":
        return _magnitude_reference_unchecked(tensors, sparsity, scope, stacked)
    if not tensors:
        return []
    models = tensors[0].shape[0] if stacked else 1
    inner = [(t[0].numel() if models else 0) if stacked else t.numel() for t in tensors]
    if scope == "global":
        ks = [int(round(sparsity * sum(inner)))]
    else:
        ks = [int(round(sparsity * n)) for n in inner]
    keeps = [torch.empty(t.shape, dtype=torch.bool) for t in tensors]
    _native._C.magnitude_masks(
        [_numpy_view(t.detach().contiguous()) for t in tensors],
        [k.numpy() for k in keeps],
        ks,
        models=models,
        global_scope=scope == "global",
        num_threads=torch.get_num_threads(),
    )
    return keeps


def _validate_magnitude(tensors, sparsity, scope, stacked) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Iterable):
        raise TypeError(f"tensors must be a sequence of tensors (e.g. a list), got {type(tensors).__name__}")
    tensors = list(tensors)
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a real number in [0, 1), got {type(sparsity).__name__}")
    if not 0.0 <= float(sparsity) < 1.0:  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if scope not in _SCOPES:
        raise ValueError(f"unknown scope {scope!r}; allowed: {', '.join(map(repr, _SCOPES))}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"tensors[{i}] has dtype {t.dtype}; allowed: a floating-point dtype "
                            "(float32 and float64 run natively)")
        if t.device != tensors[0].device:
            raise ValueError(f"tensors[{i}] is on {t.device} but tensors[0] is on "
                             f"{tensors[0].device}; all tensors must be on one device")
        if stacked:
            if t.ndim == 0:
                raise ValueError(f"tensors[{i}] is 0-d; stacked=True needs a leading model dimension")
            if t.shape[0] != tensors[0].shape[0]:
                raise ValueError(f"tensors[{i}] has {t.shape[0]} models (leading dimension) but "
                                 f"tensors[0] has {tensors[0].shape[0]}; stacked tensors must agree")
    return tensors


def _magnitude_refusal(tensors: List[torch.Tensor]) -> Optional[Refusal]:
    """Why the native kernel cannot rank these (validated) tensors, or None."""
    for i, t in enumerate(tensors):
        lazy = _native.lazy_bit_refusal((t,), (f"tensors[{i}]",))
        if lazy is not None:
            return Refusal(lazy)
        if t.dtype not in _NATIVE_DTYPES:
            return Refusal(f"tensors[{i}] has dtype {t.dtype}; the native kernel supports "
                           "float32 and float64")
        if not t.is_cpu:
            return Refusal(f"tensors[{i}] is on {t.device}; the native kernel is CPU-only")
        if t.dtype != tensors[0].dtype:
            return Refusal(f"tensors[{i}] has dtype {t.dtype} but tensors[0] has "
                           f"{tensors[0].dtype}; the native kernel ranks one dtype at a time")
    return None


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


