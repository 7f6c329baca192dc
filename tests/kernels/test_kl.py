"""Op tests for the batched Gaussian KL kernels (torchvision test_ops style).

Oracles: ``gaussian_kl_reference`` / ``gaussian_kl_full_reference`` (pure torch, float64), which
are themselves checked against ``torch.distributions.kl_divergence`` (an independent
implementation). Native-only tests skip with a reason when the extension is not built.

Tolerances (asserted below):
  * float64, any path: rtol 1e-9, atol 1e-9 (observed ~1e-14).
  * float32 univariate / diagonal (native computes in float32):
    |err| <= 4e-6 * sum_j (1 + v0/v1 + v1/v0 + |ln(v0/v1)| + dm^2/v0 + dm^2/v1), per row.
  * float32 full covariance (native computes in float64, rounds once): rtol 1e-5, atol 1e-5
    against the reference evaluated on the same float32 inputs.

Grid: the dtype/direction/shape/size sweeps run on the native kernel, covering every pair of
values (kernel_helpers.all_pairs) rather than every combination; ``auto`` gets the strided-copy
path and ``torch`` (the reference itself) a case or two; the random sweeps are hypothesis with
a bounded number of examples.
"""

import math
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from mia_core import kernels
from mia_core.kernels import _dispatch, _native
from kernel_helpers import all_pairs

NATIVE = kernels.native_available()
needs_native = pytest.mark.skipif(
    not NATIVE,
    reason="mia_core._C is not built (run `python setup.py build_ext --inplace`): "
    f"{kernels.backend_info()['import_error']}",
)
DIRECTIONS = ["forward", "reverse", "symmetric"]
DTYPES = [torch.float32, torch.float64]
LARGE = 70001  # > 65536: the OpenMP path runs
BACKENDS = [pytest.param("native", marks=needs_native), "auto", "torch"]


def _seed(*parts):
    return zlib.crc32("-".join(map(str, parts)).encode())


# ------------------------------------------------------------------------------ helpers


def make_diag(n, d, dtype, seed, *, spread=2.0):
    """Means and variances; d = None gives univariate [N] inputs. Variances in [e^-spread, e^spread]."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if d is None else (n, d)
    mu0 = torch.randn(shape, generator=g, dtype=torch.float64)
    mu1 = mu0 + torch.randn(shape, generator=g, dtype=torch.float64)
    var0 = torch.exp(spread * (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1))
    var1 = torch.exp(spread * (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1))
    return [t.to(dtype) for t in (mu0, var0, mu1, var1)]


def make_full(n, d, dtype, seed):
    """Well-conditioned SPD covariances (eigenvalues roughly in [0.5, 5]) and their means."""
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(n, d, d, generator=g, dtype=torch.float64)
    a1 = torch.randn(n, d, d, generator=g, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    cov0 = a0 @ a0.mT / d + 0.5 * eye
    cov1 = a1 @ a1.mT / d + 0.5 * eye
    mu0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    mu1 = mu0 + torch.randn(n, d, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (mu0, cov0, mu1, cov1)]


def diag_float32_bound(mu0, var0, mu1, var1):
    m0, v0, m1, v1 = (t.double() for t in (mu0, var0, mu1, var1))
    dm2 = (m1 - m0) ** 2
    scale = 1 + v0 / v1 + v1 / v0 + torch.log(v0 / v1).abs() + dm2 / v0 + dm2 / v1
    if scale.dim() == 2:
        scale = scale.sum(1)
    return 4e-6 * scale


def assert_diag_close(actual, expected, inputs):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
    else:
        err = (actual.double() - expected.double()).abs()
        bound = diag_float32_bound(*inputs)
        assert bool((err <= bound).all()), float((err - bound).max())


def assert_full_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = 1e-9 if actual.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def strided(t):
    """A non-contiguous view with t's values (every other element of a larger buffer)."""
    big = torch.empty((t.shape[0] * 2,) + tuple(t.shape[1:]), dtype=t.dtype)
    big[::2] = t
    view = big[::2]
    assert not view.is_contiguous() or t.shape[0] <= 1  # torch ignores strides of size-1 dims
    return view


# ------------------------------------------------------------------------------ reference vs torch.distributions


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_reference_matches_torch_distributions_univariate(direction):
    mu0, var0, mu1, var1 = make_diag(257, None, torch.float64, 1)
    p, q = Normal(mu0, var0.sqrt()), Normal(mu1, var1.sqrt())
    expected = {"forward": kl_divergence(p, q), "reverse": kl_divergence(q, p),
                "symmetric": kl_divergence(p, q) + kl_divergence(q, p)}[direction]
    actual = kernels.gaussian_kl_reference(mu0, var0, mu1, var1, direction=direction)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_reference_matches_torch_distributions_diagonal():
    from torch.distributions import Independent
    mu0, var0, mu1, var1 = make_diag(65, 7, torch.float64, 2)
    p = Independent(Normal(mu0, var0.sqrt()), 1)
    q = Independent(Normal(mu1, var1.sqrt()), 1)
    torch.testing.assert_close(kernels.gaussian_kl_reference(mu0, var0, mu1, var1),
                               kl_divergence(p, q), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [1, 3, 16])
def test_reference_matches_torch_distributions_full(d):
    mu0, cov0, mu1, cov1 = make_full(33, d, torch.float64, _seed("ref", d))
    p = MultivariateNormal(mu0, covariance_matrix=cov0)
    q = MultivariateNormal(mu1, covariance_matrix=cov1)
    for direction in DIRECTIONS:
        expected = {"forward": kl_divergence(p, q), "reverse": kl_divergence(q, p),
                    "symmetric": kl_divergence(p, q) + kl_divergence(q, p)}[direction]
        actual = kernels.gaussian_kl_full_reference(mu0, cov0, mu1, cov1, direction=direction)
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_reference_known_values():
    one = torch.ones(1, dtype=torch.float64)
    # KL(N(0, 1) || N(1, 2)) = 1/2 (1/2 + 1/2 - 1 + ln 2)
    kl = kernels.gaussian_kl_reference(0 * one, one, one, 2 * one)
    assert math.isclose(kl.item(), 0.5 * math.log(2.0), rel_tol=1e-15)
    kl = kernels.gaussian_kl_full_reference(torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, 1, dtype=torch.float64),
                                            torch.ones(1, 1, dtype=torch.float64), 2 * torch.ones(1, 1, 1, dtype=torch.float64))
    assert math.isclose(kl.item(), 0.5 * math.log(2.0), rel_tol=1e-15)


# ------------------------------------------------------------------------------ native / auto vs reference


# (backend, contiguous inputs): native needs contiguous inputs (see
# test_native_rejects_noncontiguous); auto copies strided ones; torch is the reference itself.
# Sizes 0, 1, odd and large (> 65536 components: the OpenMP path); the SIMD main loop of every
# direction and instruction set is test_every_simd_variant_matches_reference's.
DIAG_GRID = [pytest.param(*row, True, "native", marks=needs_native) for row in all_pairs(
    DTYPES, DIRECTIONS, [None, 5], [0, 1, 7, LARGE])] + [
    (torch.float32, "symmetric", None, LARGE, False, "auto"),
    (torch.float64, "reverse", 5, 7, False, "auto"),
    (torch.float32, "forward", 5, 1, True, "auto"),
    (torch.float64, "forward", None, 7, False, "torch")]


@pytest.mark.parametrize("dtype,direction,d,n,contiguous,backend", DIAG_GRID)
def test_gaussian_kl_matches_reference(dtype, direction, d, n, contiguous, backend):
    if d is not None and n == LARGE:
        n = LARGE // 5 + 3  # still > 65536 components
    inputs = make_diag(n, d, dtype, _seed(dtype, direction, d, n))
    expected = kernels.gaussian_kl_reference(*inputs, direction=direction)
    args = inputs if contiguous else [strided(t) for t in inputs]
    actual = kernels.gaussian_kl(*args, direction=direction, backend=backend)
    assert actual.shape == (n,) and actual.dtype == dtype
    assert_diag_close(actual, expected, inputs)


# (2000, 8): N (d^3/3 + d^2) > 65536, the OpenMP path runs. Every direction of every lane
# batch is test_native_full_lane_batches's.
FULL_SHAPES = [(0, 3), (1, 1), (1, 4), (7, 2), (13, 8), (5, 33), (3, 128), (2000, 8)]
FULL_GRID = [pytest.param(dtype, DIRECTIONS[i % 3], n, d, True, "native", marks=needs_native)
             for i, ((n, d), dtype) in enumerate(all_pairs(FULL_SHAPES, DTYPES))] + [
    (torch.float32, "reverse", 13, 8, False, "auto"),
    (torch.float64, "symmetric", 2000, 8, False, "auto"),
    (torch.float64, "forward", 5, 33, False, "torch")]


@pytest.mark.parametrize("dtype,direction,n,d,contiguous,backend", FULL_GRID)
def test_gaussian_kl_full_matches_reference(dtype, direction, n, d, contiguous, backend):
    inputs = make_full(n, d, dtype, _seed(dtype, direction, n, d))
    expected = kernels.gaussian_kl_full_reference(*inputs, direction=direction)
    args = inputs if contiguous else [strided(t) for t in inputs]
    actual = kernels.gaussian_kl_full(*args, direction=direction, backend=backend)
    assert actual.shape == (n,) and actual.dtype == dtype
    assert_full_close(actual, expected)


@pytest.mark.parametrize("dtype,direction,backend", [
    pytest.param(torch.float32, "forward", "native", marks=needs_native),
    pytest.param(torch.float64, "reverse", "native", marks=needs_native),
    pytest.param(torch.float32, "symmetric", "native", marks=needs_native),
    (torch.float64, "symmetric", "auto"), (torch.float64, "forward", "torch")])
def test_cholesky_input_equals_covariance_input(dtype, direction, backend):
    mu0, cov0, mu1, cov1 = make_full(40, 6, torch.float64, _seed("chol", dtype, direction))
    # (.contiguous(): LAPACK returns column-major factors; backend="native" wants C order)
    L0, L1 = torch.linalg.cholesky(cov0).contiguous(), torch.linalg.cholesky(cov1).contiguous()
    # Garbage in the upper triangle must be ignored.
    L0 = L0 + torch.triu(torch.full_like(L0, 7.0), diagonal=1)
    L1 = L1 + torch.triu(torch.full_like(L1, -3.0), diagonal=1)
    a = kernels.gaussian_kl_full(*(t.to(dtype) for t in (mu0, cov0, mu1, cov1)),
                                 direction=direction, backend=backend)
    b = kernels.gaussian_kl_full(*(t.to(dtype) for t in (mu0, L0, mu1, L1)), direction=direction,
                                 cholesky=True, backend=backend)
    assert_full_close(b, a)


@needs_native
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_simd_variant_matches_reference(dtype, isa):
    # Variants above what the CPU has are clamped to the best available one.
    C = _native._C
    for direction in DIRECTIONS:
        for d in (None, 3):
            inputs = make_diag(3001, d, dtype, _seed(isa, dtype, direction, d))
            out = torch.empty(3001, dtype=dtype)
            C.gaussian_kl(*(t.numpy() for t in inputs), out.numpy(), direction=direction, isa=isa)
            assert_diag_close(out, kernels.gaussian_kl_reference(*inputs, direction=direction), inputs)
        inputs = make_full(50, 9, dtype, _seed("full", isa, dtype, direction))
        out = torch.empty(50, dtype=dtype)
        C.gaussian_kl_full(*(t.numpy() for t in inputs), out.numpy(), direction=direction, isa=isa)
        assert_full_close(out, kernels.gaussian_kl_full_reference(*inputs, direction=direction))


@needs_native
@pytest.mark.parametrize("num_threads", [1, 3])
def test_native_thread_splits_are_exact(num_threads):
    C = _native._C
    inputs = make_diag(LARGE, None, torch.float32, 3)
    expected = kernels.gaussian_kl(*inputs, backend="native")
    out = torch.empty(LARGE)
    C.gaussian_kl(*(t.numpy() for t in inputs), out.numpy(), num_threads=num_threads)
    assert torch.equal(out, expected)  # the split does not change any element's arithmetic


# The full-covariance kernel runs covariance input W pairs at a time, one pair per SIMD lane
# (W = 2, 4 or 8 by instruction set; a short last batch repeats its last pair in the spare
# lanes), and redoes a batch with a failing lane on the scalar path. The tests below use N
# that are not multiples of 8 and failures inside a batch.
ISAS = ["baseline", "avx2", "avx512"]


@needs_native
@pytest.mark.parametrize("d,num_threads", [(3, 2), (3, 7), (40, 3)])
def test_native_full_thread_splits_are_exact(d, num_threads):
    C = _native._C
    n = 203 if d == 3 else 29
    arrays = [t.numpy() for t in make_full(n, d, torch.float64, _seed("split", d))]
    for isa in ISAS:
        for direction in DIRECTIONS:
            one, many = np.empty(n), np.empty(n)
            C.gaussian_kl_full(*arrays, one, direction=direction, num_threads=1, isa=isa)
            C.gaussian_kl_full(*arrays, many, direction=direction, num_threads=num_threads, isa=isa)
            assert np.array_equal(one, many)  # each pair's arithmetic is independent of the split


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_full_lane_batches(dtype, isa):
    C = _native._C
    for n, d in ((37, 6), (19, 40), (11, 64)):
        mu0, cov0, mu1, cov1 = make_full(n, d, torch.float64, _seed("lanes", isa, n, d))
        for direction in DIRECTIONS:
            # Garbage in the upper triangle is ignored (only the lower one is read).
            up = torch.triu(torch.full_like(cov0, 5.0), diagonal=1)
            args = [t.to(dtype) for t in (mu0, cov0 - up, mu1, cov1 + up)]
            out = torch.empty(n, dtype=dtype)
            C.gaussian_kl_full(*(t.numpy() for t in args), out.numpy(), direction=direction, isa=isa)
            expected = kernels.gaussian_kl_full_reference(*(t.to(dtype) for t in (mu0, cov0, mu1, cov1)),
                                                          direction=direction)
            assert_full_close(out, expected)
    # A failure inside a batch names the first failing index (arg 0 before arg 1).
    n, d = 37, 5
    mu0, cov0, mu1, cov1 = make_full(n, d, torch.float64, _seed("lanes-bad", isa))
    ones = torch.ones(d, d, dtype=torch.float64)  # rank one: the factorisation hits a 0 pivot
    cov1[21] = ones
    cov0[30, 2, 1] = float("nan")
    out = torch.empty(n, dtype=dtype)

    def run(c0, c1, **kw):
        C.gaussian_kl_full(*(t.to(dtype).numpy() for t in (mu0, c0, mu1, c1)), out.numpy(), isa=isa, **kw)

    with pytest.raises(ValueError, match=r"cov1\[21\] is not positive definite"):
        run(cov0, cov1)
    c0 = cov0.clone()
    c0[21, 0, 0] = -1.0
    with pytest.raises(ValueError, match=r"cov0\[21\] is not positive definite"):
        run(c0, cov1)
    c1 = cov1.clone()
    c1[21] = cov0[21]
    with pytest.raises(ValueError, match=r"cov0\[30\] is not positive definite"):
        run(cov0, c1)
    c0 = cov0.clone()
    c0[30] = cov1[30]
    run(c0, cov1, jitter=1e-3)  # jitter rescues the rank-one matrix
    assert_full_close(out, kernels.gaussian_kl_full_reference(*(t.to(dtype) for t in (mu0, c0, mu1, cov1)),
                                                              jitter=1e-3))


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_native_full_log_det_out_of_range(isa):
    # prod of the pivots over/underflows double: the kernel falls back to a sum of logs.
    C = _native._C
    n, d = 21, 8
    mu0, cov0, mu1, cov1 = make_full(n, d, torch.float64, _seed("logdet", isa))
    scale = torch.tensor([1e100, 1e-100, 1.0], dtype=torch.float64).repeat(7)
    cov0 = cov0 * scale[:, None, None]
    cov1 = cov1 * scale.flip(0)[:, None, None]
    mu1 = mu0 + (mu1 - mu0) * 1e-50
    for direction in DIRECTIONS:
        out = np.empty(n)
        C.gaussian_kl_full(*(t.numpy() for t in (mu0, cov0, mu1, cov1)), out, direction=direction, isa=isa)
        expected = kernels.gaussian_kl_full_reference(mu0, cov0, mu1, cov1, direction=direction)
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-9, atol=1e-9)


def test_extreme_variance_ratios_stay_finite():
    # The ratio v0/v1 under/overflows float32's normal range: the kernel falls back to two logs.
    var0 = torch.tensor([1e-30, 1e30, 1e-44, 3.0] * 200, dtype=torch.float32)
    var1 = torch.tensor([1e20, 1e-5, 1.0, 3.0] * 200, dtype=torch.float32)
    mu = torch.zeros(800)
    for backend in ["auto", "torch"] + (["native"] if NATIVE else []):
        for direction in DIRECTIONS:
            actual = kernels.gaussian_kl(mu, var0, mu, var1, direction=direction, backend=backend)
            expected = kernels.gaussian_kl_reference(mu, var0, mu, var1, direction=direction)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, equal_nan=False)


# ------------------------------------------------------------------------------ out=


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("full", [False, True])
def test_out_is_written_in_place_and_returned(full, backend):
    if full:
        inputs, fn, ref = make_full(9, 3, torch.float64, 4), kernels.gaussian_kl_full, kernels.gaussian_kl_full_reference
    else:
        inputs, fn, ref = make_diag(9, None, torch.float64, 4), kernels.gaussian_kl, kernels.gaussian_kl_reference
    out = torch.full((9,), float("nan"), dtype=torch.float64)
    ptr = out.data_ptr()
    result = fn(*inputs, out=out, backend=backend)
    assert result is out and out.data_ptr() == ptr
    torch.testing.assert_close(out, ref(*inputs), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------ properties


_settings = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


@st.composite
def diag_problems(draw):
    n = draw(st.integers(0, 40))
    d = draw(st.sampled_from([None, 1, 3]))
    dtype = draw(st.sampled_from(DTYPES))
    return make_diag(n, d, dtype, draw(st.integers(0, 2**31 - 1))), dtype


@_settings
@given(problem=diag_problems(), backend=st.sampled_from(["auto", "torch"]))
def test_property_diag_nonnegative_zero_and_symmetric(problem, backend):
    (mu0, var0, mu1, var1), dtype = problem
    # Tolerance: forward/reverse >= -1e-5 (float32) / -1e-12 (float64); identical Gaussians
    # give |KL| <= the same; symmetric == forward + reverse to the diag bound above.
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    fwd = kernels.gaussian_kl(mu0, var0, mu1, var1, backend=backend)
    rev = kernels.gaussian_kl(mu0, var0, mu1, var1, direction="reverse", backend=backend)
    sym = kernels.gaussian_kl(mu0, var0, mu1, var1, direction="symmetric", backend=backend)
    assert bool((fwd >= -tol).all()) and bool((rev >= -tol).all())
    same = kernels.gaussian_kl(mu0, var0, mu0, var0, direction="symmetric", backend=backend)
    assert bool((same.abs() <= tol).all())
    err = (sym.double() - fwd.double() - rev.double()).abs()
    assert bool((err <= 3 * diag_float32_bound(mu0, var0, mu1, var1) + tol).all())


@st.composite
def full_problems(draw):
    n = draw(st.integers(0, 6))
    d = draw(st.integers(1, 10))
    dtype = draw(st.sampled_from(DTYPES))
    return make_full(n, d, dtype, draw(st.integers(0, 2**31 - 1))), dtype


@_settings
@given(problem=full_problems(), shift=st.floats(-50, 50), backend=st.sampled_from(["auto", "torch"]))
def test_property_full(problem, shift, backend):
    (mu0, cov0, mu1, cov1), dtype = problem
    # Tolerances: >= -1e-4 / -1e-10 for KL >= 0 and KL(P||P) = 0; translation invariance and
    # symmetric == forward + reverse to rtol/atol 1e-4 (float32: the shifted means are
    # rounded to float32 first) / 1e-8 (float64).
    tol = 1e-4 if dtype == torch.float32 else 1e-8
    fwd = kernels.gaussian_kl_full(mu0, cov0, mu1, cov1, backend=backend)
    rev = kernels.gaussian_kl_full(mu0, cov0, mu1, cov1, direction="reverse", backend=backend)
    sym = kernels.gaussian_kl_full(mu0, cov0, mu1, cov1, direction="symmetric", backend=backend)
    assert bool((fwd >= -tol).all()) and bool((rev >= -tol).all())
    same = kernels.gaussian_kl_full(mu0, cov0, mu0, cov0, backend=backend)
    assert bool((same.abs() <= tol).all())
    torch.testing.assert_close(sym, fwd + rev, rtol=tol, atol=tol)
    t = torch.full_like(mu0[:1], shift)
    shifted = kernels.gaussian_kl_full(mu0 + t, cov0, mu1 + t, cov1, backend=backend)
    expected = kernels.gaussian_kl_full((mu0 + t) - t, cov0, (mu1 + t) - t, cov1, backend="torch")
    torch.testing.assert_close(shifted, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(shifted, fwd, rtol=max(tol, 1e-4 * (dtype == torch.float32)) * 10, atol=tol * 10 * (1 + abs(shift)))


# ------------------------------------------------------------------------------ input errors


def _diag_args(n=6, d=None, dtype=torch.float64):
    return make_diag(n, d, dtype, 5)


# Every bad value for each argument on the native kernel (inside its parallel region), both
# layouts; the reference's own first-bad search once per layout; auto once.
BAD_VARIANCE_GRID = [pytest.param(d, which, bad, "native", marks=needs_native)
                     for d, which, bad in all_pairs([None, 3], ["var0", "var1"],
                                                    [0.0, -1.0, math.nan, math.inf])] + [
    (None, "var1", math.nan, "torch"), (3, "var0", -1.0, "torch"), (3, "var1", math.inf, "auto")]


@pytest.mark.parametrize("d,which,bad,backend", BAD_VARIANCE_GRID)
def test_bad_variance_names_first_batch_index(d, which, bad, backend):
    n = LARGE if d is None else 25000  # the error is found inside the parallel region too
    mu0, var0, mu1, var1 = make_diag(n, d, torch.float32, 6)
    target = var0 if which == "var0" else var1
    other = var1 if which == "var0" else var0
    idx = (n * 3) // 4
    target[idx] = bad
    target[-1] = bad  # a later bad index must not be the one reported
    other[-2] = -5.0
    where = str(idx) if d is None else f"{idx}, 0"
    if d is not None:
        target[idx, 1] = bad
    msg = rf"{which}\[{where}\] is not a positive finite variance \(batch index {idx}\)"
    with pytest.raises(ValueError, match=msg):
        kernels.gaussian_kl(mu0, var0, mu1, var1, backend=backend)


def _psd_singular(n=5, d=4, bad=3):
    mu0, cov0, mu1, cov1 = make_full(n, d, torch.float64, 7)
    v = torch.ones(1, d, dtype=torch.float64)
    cov1[bad] = v.T @ v  # rank one: positive semi-definite, singular
    return mu0, cov0, mu1, cov1


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_pd_names_index_and_jitter_rescues(backend):
    mu0, cov0, mu1, cov1 = _psd_singular()
    with pytest.raises(ValueError, match=r"cov1\[3\] is not positive definite.*batch index 3.*jitter"):
        kernels.gaussian_kl_full(mu0, cov0, mu1, cov1, backend=backend)
    cov0[4] = -torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cov1\[3\] is not positive definite"):  # first index wins
        kernels.gaussian_kl_full(mu0, cov0, mu1, cov1, backend=backend)
    cov0[4] = torch.eye(4, dtype=torch.float64)
    kl = kernels.gaussian_kl_full(mu0, cov0, mu1, cov1, jitter=1e-3, backend=backend)
    assert torch.isfinite(kl).all()
    eye = 1e-3 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(kl, kernels.gaussian_kl_full_reference(mu0, cov0 + eye, mu1, cov1 + eye),
                               rtol=1e-9, atol=1e-9)
    # With cholesky=True a non-positive diagonal is the error.
    L = torch.linalg.cholesky(cov0).contiguous()
    L[2, 1, 1] = 0.0
    with pytest.raises(ValueError, match=r"cov0\[2\] has a diagonal entry that is not positive"):
        kernels.gaussian_kl_full(mu0, L, mu1, L.clone(), cholesky=True, backend=backend)


def _err_cases():
    mu0, var0, mu1, var1 = _diag_args()
    fm0, fc0, fm1, fc1 = make_full(3, 2, torch.float64, 8)
    big = make_full(1, 129, torch.float64, 9)
    return {
        "shape mismatch": (kernels.gaussian_kl, (mu0, var0, mu1[:5], var1), {}, ValueError,
                           r"mu1 has shape \(5,\) but mu0 has shape \(6,\).*no broadcasting"),
        "3-d input": (kernels.gaussian_kl, (mu0.view(1, 2, 3),) * 4, {}, ValueError,
                      r"expected \[N\] \(univariate\) or \[N, D\]"),
        "dtype mismatch": (kernels.gaussian_kl, (mu0, var0.float(), mu1, var1), {}, TypeError,
                           r"var0 has dtype torch.float32 but mu0 has dtype torch.float64"),
        "int dtype": (kernels.gaussian_kl, tuple(t.long() for t in (mu0, var0, mu1, var1)), {},
                      TypeError, r"mu0 has dtype torch.int64; allowed: a floating-point dtype"),
        "not a tensor": (kernels.gaussian_kl, (mu0, var0.numpy(), mu1, var1), {}, TypeError,
                         r"var0 must be a torch.Tensor, got ndarray"),
        "bad direction": (kernels.gaussian_kl, (mu0, var0, mu1, var1), {"direction": "both"},
                          ValueError, r"unknown direction 'both'; allowed: 'forward', 'reverse', 'symmetric'"),
        "out shape": (kernels.gaussian_kl, (mu0, var0, mu1, var1), {"out": torch.empty(5, dtype=torch.float64)},
                      ValueError, r"out has shape \(5,\); expected \(6,\)"),
        "out dtype": (kernels.gaussian_kl, (mu0, var0, mu1, var1), {"out": torch.empty(6)},
                      TypeError, r"out has dtype torch.float32; expected torch.float64"),
        "out strided": (kernels.gaussian_kl, (mu0, var0, mu1, var1),
                        {"out": torch.empty(12, dtype=torch.float64)[::2]}, ValueError, r"out is not contiguous"),
        "out aliases": (kernels.gaussian_kl, (mu0, var0, mu1, var1), {"out": var1}, ValueError,
                        r"out overlaps the memory of var1"),
        "d > 128": (kernels.gaussian_kl_full, big, {}, ValueError,
                    r"dimension d = 129 is out of range.*1 <= d <= 128"),
        "cov shape": (kernels.gaussian_kl_full, (fm0, fc0[:, :1], fm1, fc1), {}, ValueError,
                      r"cov0 has shape \(3, 1, 2\); expected \(3, 2, 2\)"),
        "full dtype": (kernels.gaussian_kl_full, (fm0, fc0, fm1, fc1.float()), {}, TypeError,
                       r"cov1 has dtype torch.float32 but mu0 has dtype torch.float64"),
        "bad jitter": (kernels.gaussian_kl_full, (fm0, fc0, fm1, fc1), {"jitter": -1.0}, ValueError,
                       r"jitter must be finite and >= 0"),
        "full direction": (kernels.gaussian_kl_full, (fm0, fc0, fm1, fc1), {"direction": "Forward"},
                           ValueError, r"unknown direction 'Forward'"),
    }


@pytest.mark.parametrize("case", list(_err_cases()))
def test_input_errors(case):
    # Every backend: the errors do not depend on which one would have run.
    fn, args, kwargs, exc, match = _err_cases()[case]
    for backend in ["auto", "torch"] + (["native"] if NATIVE else []):
        with pytest.raises(exc, match=match):
            fn(*args, **kwargs, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'"):
        kernels.gaussian_kl(*_diag_args(), backend="cuda")


@needs_native
def test_native_rejects_noncontiguous():
    args = [strided(t) for t in _diag_args()]
    with pytest.raises(RuntimeError, match=r"backend='native' cannot run: mu0 is not contiguous"):
        kernels.gaussian_kl(*args, backend="native")
    fm0, fc0, fm1, fc1 = make_full(4, 3, torch.float64, 10)
    with pytest.raises(RuntimeError, match=r"cov1 is not contiguous"):
        kernels.gaussian_kl_full(fm0, fc0, fm1, fc1.mT, backend="native")
    # auto copies the read-only inputs and runs natively; the result matches the reference
    torch.testing.assert_close(kernels.gaussian_kl_full(fm0, fc0, fm1, fc1.mT.contiguous().mT),
                               kernels.gaussian_kl_full_reference(fm0, fc0, fm1, fc1), rtol=1e-9, atol=1e-9)


@needs_native
def test_autograd_goes_through_reference_on_auto():
    mu0, var0, mu1, var1 = _diag_args()
    var0.requires_grad_(True)
    kl = kernels.gaussian_kl(mu0, var0, mu1, var1)
    kl.sum().backward()
    assert var0.grad is not None and torch.isfinite(var0.grad).all()
    with pytest.raises(RuntimeError, match=r"requires grad"):
        kernels.gaussian_kl(mu0, var0, mu1, var1, backend="native")
    with torch.no_grad():
        assert kernels.gaussian_kl(mu0, var0, mu1, var1, backend="native").shape == (6,)


@needs_native
def test_extension_validates_numpy_inputs():
    # What keeps the kernel in bounds; out overlapping an input and a bad jitter are the
    # kernels module's errors, checked once on every backend (_err_cases above).
    C = _native._C
    a = np.ones(4)
    out = np.empty(4)
    with pytest.raises(TypeError, match=r"var1 has dtype float32 but mu0 has dtype float64"):
        C.gaussian_kl(a, a, a, a.astype(np.float32), out)
    with pytest.raises(ValueError, match=r"var0 is not C-contiguous"):
        C.gaussian_kl(a, np.ones(8)[::2], a, a, out)
    ro = np.empty(4)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"out is read-only"):
        C.gaussian_kl(a, a, a, a, ro)
    with pytest.raises(TypeError, match=r"mu0 must be a numpy.ndarray, got list"):
        C.gaussian_kl([1.0], a, a, a, out)
    with pytest.raises(ValueError, match=r"unknown direction"):
        C.gaussian_kl(a, a, a, a, out, direction="x")
    with pytest.raises(ValueError, match=r"dimension d = 129"):
        C.gaussian_kl_full(np.ones((1, 129)), np.ones((1, 129, 129)), np.ones((1, 129)),
                           np.ones((1, 129, 129)), np.empty(1))
    C.gaussian_kl(a, a, a, 2 * a, out)
    assert np.allclose(out, 0.5 * (0.5 - 1 + math.log(2)))


# ------------------------------------------------------------------------------ backends


def test_auto_without_extension_warns_once(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("simulated: _C.so missing"))
    monkeypatch.setattr(_dispatch, "_warned_missing", False)
    inputs = _diag_args()
    full = make_full(3, 2, torch.float64, 11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels.gaussian_kl(*inputs)
        kernels.gaussian_kl_full(*full)
        kernels.gaussian_kl(*inputs, backend="torch")
    relevant = [w for w in caught if issubclass(w.category, kernels.NativeKernelWarning)]
    assert len(relevant) == 1 and "simulated" in str(relevant[0].message)
    with pytest.raises(RuntimeError, match=r"backend='native'.*simulated"):
        kernels.gaussian_kl_full(*full, backend="native")
