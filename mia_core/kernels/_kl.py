"""Batched Gaussian KL divergences (LiRA / KL-leakage estimators); public through :mod:`mia_core.kernels`."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from mia_core.kernels import _dispatch, _native
from mia_core.kernels._dispatch import Refusal

__all__ = [
    "KL_DIRECTIONS",
    "gaussian_kl",
    "gaussian_kl_full",
    "gaussian_kl_full_reference",
    "gaussian_kl_reference",
]

#: Accepted values of ``direction``.
KL_DIRECTIONS = ("forward", "reverse", "symmetric")
#: Largest dimension ``d`` of :func:`gaussian_kl_full`.
KL_MAX_DIM = 128

_NATIVE_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------
# References (pure torch, float64): the fallback and the test oracle
# --------------------------------------------------------------------------------------


def gaussian_kl_reference(
    mu0: torch.Tensor,
    var0: torch.Tensor,
    mu1: torch.Tensor,
    var1: torch.Tensor,
    *,
    direction: str = "forward",
) -> torch.Tensor:
    """Pure-torch KL divergence of univariate or diagonal Gaussians, computed in float64.

    ``KL(N0 || N1) = 1/2 * sum_j [ v0/v1 - 1 + (mu1 - mu0)^2 / v1 + ln v1 - ln v0 ]``, the sum
    over ``D`` for ``[N, D]`` inputs. Differentiable (autograd flows through the float64 cast).

    Args and Raises: as :func:`gaussian_kl` (without ``out`` and ``backend``).

    Returns:
        Tensor[N]: in the inputs' dtype and on their device.
    """
    _check_diag(mu0, var0, mu1, var1, direction)
    return _diag_reference_unchecked(mu0, var0, mu1, var1, direction)


def gaussian_kl_full_reference(
    mu0: torch.Tensor,
    cov0: torch.Tensor,
    mu1: torch.Tensor,
    cov1: torch.Tensor,
    *,
    direction: str = "forward",
    cholesky: bool = False,
    jitter: float = 0.0,
) -> torch.Tensor:
    """Pure-torch KL divergence of full-covariance Gaussians, computed in float64.

    ``KL(N0 || N1) = 1/2 [ ||L1^-1 L0||_F^2 + ||L1^-1 (mu1 - mu0)||^2 - d + 2 sum ln diag L1
    - 2 sum ln diag L0 ]`` with ``S = L L^T`` (``torch.linalg.cholesky_ex`` and
    ``torch.linalg.solve_triangular``), i.e. the closed form
    ``tr(S1^-1 S0) + (mu1-mu0)^T S1^-1 (mu1-mu0) - d + ln det S1 - ln det S0``.

    Args and Raises: as :func:`gaussian_kl_full` (without ``out`` and ``backend``).

    Returns:
        Tensor[N]: in the inputs' dtype and on their device.
    """
    _check_full(mu0, cov0, mu1, cov1, direction, jitter)
    return _full_reference_unchecked(mu0, cov0, mu1, cov1, direction, cholesky, jitter)


# --------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------


def gaussian_kl(
    mu0: torch.Tensor,
    var0: torch.Tensor,
    mu1: torch.Tensor,
    var1: torch.Tensor,
    *,
    direction: str = "forward",
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """KL divergences of a batch of univariate or diagonal Gaussian pairs.

    .. math::
        KL(N_0 \\| N_1) = \\frac12 \\sum_j \\Big[ \\frac{v_0}{v_1} - 1 - \\ln\\frac{v_0}{v_1}
        + \\frac{(\\mu_1 - \\mu_0)^2}{v_1} \\Big]

    summed over the ``D`` components of a diagonal Gaussian (``D = 1``: univariate).

    Args:
        mu0 (Tensor[N] or Tensor[N, D]): means of the first Gaussians.
        var0 (Tensor[N] or Tensor[N, D]): their variances (not standard deviations), > 0 and finite.
        mu1 (Tensor[N] or Tensor[N, D]): means of the second Gaussians.
        var1 (Tensor[N] or Tensor[N, D]): their variances, > 0 and finite.
            All four have exactly one shape (no broadcasting), one dtype (float32 or float64)
            and one device.
        direction (str): ``"forward"`` = KL(N0 || N1), ``"reverse"`` = KL(N1 || N0),
            ``"symmetric"`` = their sum (Jeffreys divergence).
        out (Tensor[N], optional): contiguous tensor of the inputs' dtype and device, not
            overlapping any input; written in place and returned (the native path then
            allocates nothing).
        backend (str): ``"auto"`` (default), ``"native"`` or ``"torch"``.

            * ``"auto"`` runs natively when the extension imported, the inputs are float32 /
              float64 CPU tensors and no input requires grad (with grad enabled);
              non-contiguous inputs are copied to contiguous ones first (they are only
              read). Otherwise it runs :func:`gaussian_kl_reference` (one warning per process
              if the extension failed to import).
            * ``"native"`` requires all of that, and contiguous inputs, and raises
              ``RuntimeError`` saying why otherwise.
            * ``"torch"`` always runs the float64 reference.

            CUDA inputs: in a ``MIAFW_CUDA=1`` build, ``"auto"`` / ``"native"`` run the CUDA
            twin (same formula, components summed in float64, on the current stream; an
            invalid variance raises the same ValueError, which synchronises once); otherwise
            ``"auto"`` runs the reference on the GPU and ``"native"`` raises ``RuntimeError``.

    Returns:
        Tensor[N]: the divergences, in the inputs' dtype (``out`` itself when given). N = 0
        gives an empty tensor.

    Accuracy: float64 matches the float64 reference to ~1e-12 relative. float32 is computed
    in float32 (one log of the variance ratio, < 1 ulp): per component the error against the
    float64 reference is within ``4e-6 * (1 + v0/v1 + |ln(v0/v1)| + (mu1-mu0)^2/v1)`` (the
    tests assert this bound), the D components being summed in float64.

    Native kernel: a single pass (4 reads, 1 write per component) vectorised with
    AVX-512 / AVX2 where the CPU has them, split over ``torch.get_num_threads()`` OpenMP
    threads, serial below 65536 components. Blocks whose variance ratio is denormal or
    overflows are recomputed with two ``log`` calls, so extreme ratios stay finite.

    Raises:
        ValueError: a variance that is not positive and finite, naming the first such batch
            index and the argument (``var1[3] is not a positive finite variance (batch index
            3)``); shapes that differ or are not [N] / [N, D]; an unknown ``direction`` or
            ``backend``; a bad ``out`` shape, a non-contiguous ``out``, or ``out``
            overlapping an input.
        TypeError: a non-tensor argument; a dtype that is not floating point, or dtypes that
            differ; ``out`` of another dtype.
        RuntimeError: ``backend="native"`` when the extension is missing or cannot take the
            inputs.
    """
    _check_diag(mu0, var0, mu1, var1, direction)
    names = ("mu0", "var0", "mu1", "var1")
    inputs = (mu0, var0, mu1, var1)
    _check_out(out, mu0, inputs, names)
    if _dispatch.choose(backend, lambda b: _out_refusal(out) or _refusal(inputs, names, b, cuda_twin=True)) == "torch":
        return _into_out(_diag_reference_unchecked(mu0, var0, mu1, var1, direction), out)
    if mu0.is_cuda:
        device = mu0.device
        with torch.cuda.device(device):
            return _diag_cuda_launch(_native.cuda_kernels(), _native.cuda_stream(device), inputs,
                                     names, out, direction)
    arrays, result = _native_args(inputs, out)
    _native._C.gaussian_kl(*arrays, _native.numpy_view(result), direction=direction,
                           num_threads=torch.get_num_threads())
    return result


def gaussian_kl_full(
    mu0: torch.Tensor,
    cov0: torch.Tensor,
    mu1: torch.Tensor,
    cov1: torch.Tensor,
    *,
    direction: str = "forward",
    cholesky: bool = False,
    jitter: float = 0.0,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """KL divergences of a batch of full-covariance Gaussian pairs (dimension d <= 128).

    .. math::
        KL(N_0 \\| N_1) = \\frac12 \\Big[ \\operatorname{tr}(S_1^{-1} S_0)
        + (\\mu_1-\\mu_0)^T S_1^{-1} (\\mu_1-\\mu_0) - d + \\ln\\det S_1 - \\ln\\det S_0 \\Big]

    evaluated through Cholesky factors ``S = L L^T`` and triangular solves
    (``tr(S1^-1 S0) = ||L1^-1 L0||_F^2``); never an explicit inverse.

    Args:
        mu0 (Tensor[N, d]): means of the first Gaussians.
        cov0 (Tensor[N, d, d]): their covariances, symmetric positive definite; only the
            lower triangle is read. With ``cholesky=True``: lower-triangular Cholesky
            factors ``L0`` (``cov0 = L0 L0^T``, upper triangle ignored, diagonal > 0).
        mu1 (Tensor[N, d]): means of the second Gaussians.
        cov1 (Tensor[N, d, d]): their covariances (or factors), as ``cov0``.
            One dtype (float32 or float64), one device, ``1 <= d <= 128``.
        direction (str): ``"forward"`` = KL(N0 || N1), ``"reverse"`` = KL(N1 || N0),
            ``"symmetric"`` = their sum.
        cholesky (bool): the covariance arguments are Cholesky factors.
        jitter (float): >= 0; ``jitter * I`` is added to each covariance before it is
            factorised (a positive semi-definite but singular covariance then works).
            Ignored with ``cholesky=True``.
        out (Tensor[N], optional): as in :func:`gaussian_kl`.
        backend (str): as in :func:`gaussian_kl`.

    Returns:
        Tensor[N]: the divergences in the inputs' dtype (``out`` when given); N = 0 gives an
        empty tensor.

    Accuracy: the native kernel factorises and solves in float64 for both dtypes, so float32
    results are the float64 result rounded once (plus the reference's own rounding of order
    ``cond(S) * 1e-16``); the tests use rtol 1e-5 (float32) / 1e-9 (float64) for
    well-conditioned covariances.

    Native kernel: pairs split statically over ``torch.get_num_threads()`` OpenMP threads
    (serial below ``N * (d^3/3 + d^2) = 65536``), each thread working in its own scratch
    buffer, no allocation per pair. Covariance input runs 2, 4 or 8 pairs at a time (one per
    SIMD lane of the baseline / AVX2 / AVX-512 variant) through LDL^T factorisations
    (``tr(S1^-1 S0) = sum X_ic^2 D0_c / D1_i`` with ``X = L1^-1 L0``); factor input
    (``cholesky=True``) and a batch holding a failing pair take a per-pair Cholesky path.
    A pair's result does not depend on N or on the thread split.

    Raises:
        ValueError: a covariance that is not positive definite (its factorisation fails),
            naming the first failing batch index and the argument (``cov1[7] is not positive
            definite ...``), or with ``cholesky=True`` a factor whose diagonal is not
            positive and finite, or is a float64 subnormal (below 2.2e-308: its reciprocal
            overflows, and the result would be NaN); ``d`` outside ``[1, 128]``; mismatched shapes; a negative
            or non-finite ``jitter``; unknown ``direction`` / ``backend``; a bad ``out``.
        TypeError: as :func:`gaussian_kl`.
        RuntimeError: ``backend="native"`` when the extension is missing or cannot take the
            inputs.
    """
    _check_full(mu0, cov0, mu1, cov1, direction, jitter)
    names = ("mu0", "cov0", "mu1", "cov1")
    inputs = (mu0, cov0, mu1, cov1)
    _check_out(out, mu0, inputs, names)
    if _dispatch.choose(backend, lambda b: _out_refusal(out) or _refusal(inputs, names, b, cuda_twin=False)) == "torch":
        result = _full_reference_unchecked(mu0, cov0, mu1, cov1, direction, cholesky, jitter)
        return _into_out(result, out)
    arrays, result = _native_args(inputs, out)
    _native._C.gaussian_kl_full(*arrays, _native.numpy_view(result), direction=direction,
                                cholesky=bool(cholesky), jitter=float(jitter),
                                num_threads=torch.get_num_threads())
    return result


# --------------------------------------------------------------------------------------
# Validation (identical on every backend)
# --------------------------------------------------------------------------------------


def _check_tensors(tensors: Sequence, names: Sequence[str]) -> None:
    for t, name in zip(tensors, names):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    first = tensors[0]
    if not first.is_floating_point():
        raise TypeError(f"{names[0]} has dtype {first.dtype}; allowed: a floating-point dtype "
                        "(float32 and float64 run natively)")
    for t, name in zip(tensors[1:], names[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {names[0]} has dtype {first.dtype}; "
                            "all inputs must share one dtype")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}; "
                             "all inputs must be on one device")


def _check_direction(direction) -> None:
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; allowed: "
                         f"{', '.join(map(repr, KL_DIRECTIONS))}")


def _check_diag(mu0, var0, mu1, var1, direction) -> None:
    names = ("mu0", "var0", "mu1", "var1")
    tensors = (mu0, var0, mu1, var1)
    _check_tensors(tensors, names)
    _check_direction(direction)
    if mu0.dim() not in (1, 2):
        raise ValueError(f"mu0 has shape {tuple(mu0.shape)}; expected [N] (univariate) or "
                         "[N, D] (diagonal)")
    for t, name in zip(tensors[1:], names[1:]):
        if t.shape != mu0.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mu0 has shape "
                             f"{tuple(mu0.shape)}; all inputs must have the same shape "
                             "(no broadcasting)")


def _check_full(mu0, cov0, mu1, cov1, direction, jitter) -> None:
    names = ("mu0", "cov0", "mu1", "cov1")
    tensors = (mu0, cov0, mu1, cov1)
    _check_tensors(tensors, names)
    _check_direction(direction)
    if mu0.dim() != 2:
        raise ValueError(f"mu0 has shape {tuple(mu0.shape)}; expected [N, d]")
    n, d = mu0.shape
    if not 1 <= d <= KL_MAX_DIM:
        raise ValueError(f"dimension d = {d} is out of range; the full covariance kernel "
                         f"supports 1 <= d <= {KL_MAX_DIM}")
    if mu1.shape != mu0.shape:
        raise ValueError(f"mu1 has shape {tuple(mu1.shape)} but mu0 has shape "
                         f"{tuple(mu0.shape)}; they must be equal (no broadcasting)")
    for t, name in ((cov0, "cov0"), (cov1, "cov1")):
        if t.shape != (n, d, d):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(n, d, d)} for mu0 "
                             f"of shape {tuple(mu0.shape)}")
    _check_jitter(jitter)


def _check_jitter(jitter) -> None:
    """``jitter`` must be a real number, finite (as a float64) and >= 0; the error shows it
    short (``:g``), whatever its type or size."""
    try:
        value = float(jitter)
    except OverflowError:  # an int beyond float64 (the only finite value float() rejects)
        size = int(jitter.bit_length() * 0.30103)
        shown = f"{'a negative' if jitter < 0 else 'an'} integer of magnitude ~1e{size}"
        raise ValueError(f"jitter must be finite and >= 0, got {shown}") from None
    except (TypeError, ValueError):
        shown = repr(jitter)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f"jitter must be a finite number >= 0, got {shown}") from None
    if not 0.0 <= value < float("inf"):
        raise ValueError(f"jitter must be finite and >= 0, got {value:g}")


def _check_out(out, mu0, inputs, names) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != mu0.dtype:
        raise TypeError(f"out has dtype {out.dtype}; expected {mu0.dtype} (the inputs' dtype)")
    n = mu0.shape[0]
    if out.shape != (n,):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected ({n},), one value per "
                         "batch index")
    if out.device != mu0.device:
        raise ValueError(f"out is on {out.device} but the inputs are on {mu0.device}")
    if not out.is_contiguous():
        raise ValueError(f"out is not contiguous (strides {out.stride()}); pass a contiguous tensor")
    for t, name in zip(inputs, names):
        if _native.overlaps(out, t):
            raise ValueError(f"out overlaps the memory of {name}; pass a separate output buffer")


# --------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------


def _out_refusal(out) -> Optional[Refusal]:
    """``out`` that a native kernel cannot write: a lazily negated view."""
    lazy = _native.lazy_bit_refusal((out,), ("out",))
    return None if lazy is None else Refusal(lazy)


def _refusal(inputs, names, backend: str, *, cuda_twin: bool) -> Optional[Refusal]:
    """Why the native implementation cannot take these (validated) inputs, or None: the CUDA
    twin for CUDA tensors when the op has one (``cuda_twin``), else the CPU kernel."""
    if cuda_twin and inputs[0].is_cuda:
        return _cuda_refusal(inputs, names, backend)
    return _cpu_refusal(inputs, names, backend)


def _cpu_refusal(inputs, names, backend: str) -> Optional[Refusal]:
    """Why the CPU kernel cannot take these inputs, or None."""
    if not inputs[0].is_cpu:
        return Refusal(f"{names[0]} is on {inputs[0].device}; the native kernel is CPU-only")
    return _kernel_refusal(inputs, names, backend, "the native kernel")


def _cuda_refusal(inputs, names, backend: str) -> Optional[Refusal]:
    """Why the CUDA twin cannot take these inputs, or None (device-agnostic: the tests drive
    it with CPU tensors and the host emulation)."""
    if _native.cuda_kernels() is None:
        return _dispatch.NO_CUDA_KERNELS
    return _kernel_refusal(inputs, names, backend, "the CUDA kernel")


def _kernel_refusal(inputs, names, backend: str, kernel: str) -> Optional[Refusal]:
    first = inputs[0]
    lazy = _native.lazy_bit_refusal(inputs, names)
    if lazy is not None:
        return Refusal(lazy)
    if first.dtype not in _NATIVE_DTYPES:
        return Refusal(f"{names[0]} has dtype {first.dtype}; {kernel} supports float32 and float64")
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return Refusal(f"an input requires grad; {kernel} does not record autograd")
    # Contiguity binds backend="native" only: "auto" reads a contiguous copy (inputs are read).
    if backend == "native":
        for t, name in zip(inputs, names):
            if not t.is_contiguous():
                return Refusal(f"{name} is not contiguous (strides {t.stride()}); pass "
                               f"{name}.contiguous()")
    return None


def _diag_cuda_launch(kernels, stream: int, inputs, names, out, direction) -> torch.Tensor:
    """One call of the CUDA twin ``kernels.cuda_gaussian_kl`` on ``stream``, then the decoded
    first-bad-variance report. Device-agnostic on purpose: the tests pass the host emulation
    (``mia_core._cuda_emu``) with CPU tensors."""
    first = inputs[0]
    device = first.device
    n = first.shape[0]
    d = first.shape[1] if first.dim() == 2 else 1
    arrays = [t.detach().contiguous() for t in inputs]
    result = out if out is not None else torch.empty(n, dtype=first.dtype, device=device)
    if n == 0 or d == 0:
        with torch.no_grad():
            result.zero_()  # an empty sum (as the CPU kernel and the reference)
        return result
    # One uint64 preset to all ones; the kernel atomicMin's 2 * flat_index + arg into it.
    err = torch.full((1,), -1, dtype=torch.int64, device=device)
    kernels.cuda_gaussian_kl(*(a.data_ptr() for a in arrays), result.data_ptr(), n, d,
                             direction=direction, dtype=str(first.dtype).replace("torch.", ""),
                             err=err.data_ptr(), stream=stream)
    key = int(err.item())  # synchronises with the stream, as the reference's check does
    if key != -1:
        flat, arg = key >> 1, key & 1
        name = names[1] if arg == 0 else names[3]
        if first.dim() == 2:
            i, j = divmod(flat, d)
            where = f"{i}, {j}"
        else:
            i, where = flat, str(flat)
        raise ValueError(f"{name}[{where}] is not a positive finite variance (batch index {i})")
    return result


def _native_args(inputs, out) -> Tuple[list, torch.Tensor]:
    """Zero-copy numpy views of the (contiguous, if need be copied) inputs, and the output."""
    arrays = [_native.numpy_view(t.contiguous()) for t in inputs]
    first = inputs[0]
    result = out if out is not None else torch.empty(first.shape[0], dtype=first.dtype)
    return arrays, result


def _into_out(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return result
    with torch.no_grad():
        out.copy_(result)
    return out


# --------------------------------------------------------------------------------------
# Reference maths (float64)
# --------------------------------------------------------------------------------------


def _first_bad(bad: torch.Tensor) -> int:
    idx = torch.nonzero(bad.reshape(-1))
    return int(idx[0, 0]) if idx.numel() else -1


def _diag_reference_unchecked(mu0, var0, mu1, var1, direction) -> torch.Tensor:
    dtype = mu0.dtype
    m0, v0, m1, v1 = (t.to(torch.float64) for t in (mu0, var0, mu1, var1))
    # First element (row-major) whose variance is invalid; var0 before var1 at one element.
    bad0 = ~((v0 > 0) & torch.isfinite(v0))
    bad1 = ~((v1 > 0) & torch.isfinite(v1))
    flat = _first_bad(bad0 | bad1)
    if flat >= 0:
        name = "var0" if bool(bad0.reshape(-1)[flat]) else "var1"
        if mu0.dim() == 2:
            i, j = divmod(flat, mu0.shape[1])
            where = f"{i}, {j}"
        else:
            i, where = flat, str(flat)
        raise ValueError(f"{name}[{where}] is not a positive finite variance (batch index {i})")

    def kl(ma, va, mb, vb):  # KL(N(ma, va) || N(mb, vb)), elementwise
        # ((mb-ma)/vb) (mb-ma), not (mb-ma)^2/vb: the square overflows (float64: from ~1e154)
        # where the term is finite; the log ratio as a difference of logs, for the same reason.
        dm = mb - ma
        return 0.5 * (va / vb - 1.0 + (dm / vb) * dm + torch.log(vb) - torch.log(va))

    if direction == "forward":
        terms = kl(m0, v0, m1, v1)
    elif direction == "reverse":
        terms = kl(m1, v1, m0, v0)
    else:
        terms = kl(m0, v0, m1, v1) + kl(m1, v1, m0, v0)
    if terms.dim() == 2:
        terms = terms.sum(dim=1)
    return terms.to(dtype)


def _factor64(cov: torch.Tensor, name: str, cholesky: bool, jitter: float):
    """(lower factor in float64, bool[N] of failures)."""
    c = cov.to(torch.float64)
    if cholesky:
        L = torch.tril(c)
        diag = torch.diagonal(L, dim1=-2, dim2=-1)
        # A subnormal diagonal is refused too: its reciprocal overflows, and the solves would
        # give 0 * inf = NaN (the native kernel's rule: a normal positive finite number).
        tiny = torch.finfo(torch.float64).tiny
        failed = ~((diag >= tiny) & torch.isfinite(diag)).all(dim=-1)
        return L, failed
    if jitter:
        c = c + jitter * torch.eye(c.shape[-1], dtype=torch.float64, device=c.device)
    L, info = torch.linalg.cholesky_ex(c)
    diag = torch.diagonal(L, dim1=-2, dim2=-1)
    # LAPACK flags NaN / non-positive pivots; an inf entry can slip through as an inf pivot.
    failed = (info != 0) | ~torch.isfinite(L).all(dim=-1).all(dim=-1) | ~(diag > 0).all(dim=-1)
    return L, failed


def _full_reference_unchecked(mu0, cov0, mu1, cov1, direction, cholesky, jitter) -> torch.Tensor:
    dtype = mu0.dtype
    n, d = mu0.shape
    if n == 0:
        return torch.empty(0, dtype=dtype, device=mu0.device)
    L0, failed0 = _factor64(cov0, "cov0", cholesky, jitter)
    L1, failed1 = _factor64(cov1, "cov1", cholesky, jitter)
    first = _first_bad(failed0 | failed1)
    if first >= 0:
        name = "cov0" if bool(failed0[first]) else "cov1"
        if cholesky:
            raise ValueError(f"{name}[{first}] has a diagonal entry that is not positive and "
                             f"finite, or is subnormal (< 2.2e-308) (batch index {first}); with "
                             "cholesky=True the covariance arguments are lower-triangular "
                             "Cholesky factors")
        raise ValueError(f"{name}[{first}] is not positive definite: its Cholesky factorisation "
                         f"failed (batch index {first}); pass jitter > 0 to factorise "
                         "cov + jitter * I")
    dm = mu1.to(torch.float64) - mu0.to(torch.float64)

    def kl(La, Lb, delta):  # KL(N(., La La^T) || N(. + delta, Lb Lb^T))
        M = torch.linalg.solve_triangular(Lb, La, upper=False)
        y = torch.linalg.solve_triangular(Lb, delta.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = torch.log(torch.diagonal(Lb, dim1=-2, dim2=-1)).sum(-1) - \
            torch.log(torch.diagonal(La, dim1=-2, dim2=-1)).sum(-1)
        return 0.5 * (M.square().sum((-2, -1)) + y.square().sum(-1) - d + 2.0 * logdet)

    if direction == "forward":
        res = kl(L0, L1, dm)
    elif direction == "reverse":
        res = kl(L1, L0, -dm)
    else:
        res = kl(L0, L1, dm) + kl(L1, L0, -dm)
    return res.to(dtype)
