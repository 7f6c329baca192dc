"""The CUDA twins' own code (csrc/cuda/*.cu), run on the CPU through the host emulation.

``mia_core._cuda_emu`` is csrc/cuda/*.cu and csrc/cuda/bind_cuda.cpp compiled by the C++
compiler against csrc/cuda_emu/host_cuda.h, which runs a launch as every thread of every block
one after the other. These tests drive it through the same Python marshalling the CUDA path
uses (``_mask._cuda_launch``, ``_kl._diag_cuda_launch``, ``_quant._fq_cuda_launch``) with CPU
tensors, and check the results against the CPU kernels and the torch references: bit for bit
for masks and fake quantization, to rounding for KL (the twin sums in double; the CPU kernel
uses its own log).

What this covers without a GPU: index arithmetic and grid-stride loops (the emulated device
has 2 SMs, so grids are at most 16 blocks of 256 threads and every large input takes several
strides), variant dispatch, the first-bad-element report through atomicMin (also with the
thread order reversed), descriptor buffers and their freeing, the allocator fallback, and the
propagation of launch and allocation errors. What it cannot cover (device code generation,
the device libm, real concurrency, memory spaces, streams) is left to tests/kernels/test_cuda.py
on a GPU. The module is built only with MIAFW_CUDA_EMU=1 (as CI does); without it these tests skip.

The parameter sweeps cover every pair of values (kernel_helpers.all_pairs), not every
combination; the hypothesis properties sweep random combinations with a bounded number of
examples.
"""

import math
import pathlib
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core import kernels
from mia_core.kernels import _dispatch, _kl, _mask, _native, _quant
from kernel_helpers import all_pairs, assert_bitwise_equal, bits, make_weights

emu = pytest.importorskip(
    "mia_core._cuda_emu",
    reason="the CUDA host emulation mia_core._cuda_emu is not built: build with MIAFW_CUDA_EMU=1 "
    "(MIAFW_CUDA_EMU=1 pip install -e . --no-deps --no-build-isolation)")

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMES = ("mu0", "var0", "mu1", "var1")
NATIVE = "native" if _native._C is not None else "torch"  # CPU oracle: the CPU kernel if built
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def fresh_device():
    """Default emulated device and zeroed counters for every test; no leaked allocation after."""
    emu.reset()
    emu.configure()
    before = emu.stats()["live_allocations"]
    yield
    assert emu.stats()["live_allocations"] == before, "the twin leaked a device allocation"
    emu.reset()
    emu.configure()


# ------------------------------------------------------------------------------ the harness


def test_every_cuda_twin_is_emulated():
    """A new csrc/cuda/*.cu must get its csrc/cuda_emu wrapper, or it would go untested."""
    twins = sorted(p.stem for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert twins, "no CUDA twins found"
    for stem in twins:
        wrapper = ROOT / "csrc" / "cuda_emu" / f"{stem}.cpp"
        assert wrapper.is_file(), f"csrc/cuda/{stem}.cu has no emulation wrapper {wrapper}"
        assert f'#include "cuda/{stem}.cu"' in wrapper.read_text()
    bound = set(re.findall(r'm\.def\("(cuda_\w+)"', (ROOT / "csrc" / "cuda" / "bind_cuda.cpp").read_text()))
    assert bound and all(hasattr(emu, name) for name in bound)


def test_twins_launch_only_through_the_helper():
    """No raw <<< >>> in the twins: detail::launch is what the emulation intercepts."""
    for path in (ROOT / "csrc" / "cuda").glob("*.cu"):
        assert "<<<" not in path.read_text(), f"{path.name} launches a kernel directly"


def test_configure_rejects_bad_values():
    with pytest.raises(ValueError, match="multiprocessors=0"):
        emu.configure(multiprocessors=0)
    with pytest.raises(ValueError, match="unknown order 'sideways'"):
        emu.configure(order="sideways")
    with pytest.raises(ValueError, match="unknown CUDA error 'cudaErrorBogus'"):
        emu.configure(fail_next_launch="cudaErrorBogus")


# ------------------------------------------------------------------------------ masks


MASK_SIZES = [0, 1, 7, 1001, 0, 70_003, 3]


def _mask_inputs(dtype, kind, seed, sizes=MASK_SIZES):
    g = torch.Generator().manual_seed(seed)
    ts = [make_weights(n, dtype, g) for n in sizes]
    if kind == "bool":
        ms = [torch.rand(n, generator=g) < 0.5 for n in sizes]
    else:
        ms = [torch.where(torch.rand(n, generator=g) < 0.5, 0.0, 1.0).to(dtype) for n in sizes]
        big = max(range(len(sizes)), key=lambda i: sizes[i])
        if sizes[big] >= 5:
            ms[big][:5] = torch.tensor([math.nan, -0.0, 2.5, math.inf, 0.0], dtype=dtype)
    return ts, ms


@pytest.mark.parametrize("dtype,kind,order", all_pairs(DTYPES, ["bool", "float"], ["forward", "reverse"]))
def test_apply_masks_twin_matches_reference(dtype, kind, order):
    emu.configure(order=order)
    ts, ms = _mask_inputs(dtype, kind, seed=5)
    expected = [t.clone() for t in ts]
    _mask.apply_masks_reference(expected, ms)
    _mask._cuda_launch(emu, 0, ts, ms)
    for a, e in zip(ts, expected):
        assert_bitwise_equal(a, e)
    s = emu.stats()
    total = sum(MASK_SIZES)
    assert s["launches"] == 1 and s["last_kernel"] == "apply_masks_kernel"
    assert s["last_blocks"] * s["last_threads"] < total  # several grid-stride rounds
    assert s["pooled_allocations"] == 1 and s["synchronizations"] == 0


def test_apply_masks_twin_mixed_kinds_one_launch_on_the_given_stream():
    g = torch.Generator().manual_seed(3)
    ts = [make_weights(5, torch.float32, g), make_weights(0, torch.float64, g),
          make_weights(70_001, torch.float64, g), make_weights(3, torch.float32, g)]
    ms = [torch.rand(5, generator=g) < 0.5, torch.ones(0, dtype=torch.float64),
          torch.randn(70_001, generator=g, dtype=torch.float64), torch.tensor([0.0, 1.0, -1.0])]
    expected = [t.clone() for t in ts]
    _mask.apply_masks_reference(expected, ms)
    _mask._cuda_launch(emu, 0xBEEF, ts, ms)
    for a, e in zip(ts, expected):
        assert_bitwise_equal(a, e)
    s = emu.stats()
    assert s["launches"] == 1 and s["last_stream"] == 0xBEEF


def test_apply_masks_twin_all_empty_launches_nothing():
    ts = [torch.ones(0), torch.ones(0, dtype=torch.float64)]
    _mask._cuda_launch(emu, 0, ts, [torch.ones(0, dtype=torch.bool), torch.ones(0, dtype=torch.float64)])
    assert emu.stats()["launches"] == 0 and emu.stats()["pooled_allocations"] == 0


def test_apply_masks_twin_without_stream_ordered_allocator_synchronises_and_frees():
    emu.configure(malloc_async=False)
    ts, ms = _mask_inputs(torch.float32, "bool", seed=9)
    expected = [t.clone() for t in ts]
    _mask.apply_masks_reference(expected, ms)
    _mask._cuda_launch(emu, 7, ts, ms)
    for a, e in zip(ts, expected):
        assert_bitwise_equal(a, e)
    s = emu.stats()
    assert s["pooled_allocations"] == 0 and s["synchronizations"] == 1  # before the plain free


@pytest.mark.parametrize("malloc_async", [True, False])
def test_apply_masks_twin_launch_failure_raises_and_frees(malloc_async):
    emu.configure(malloc_async=malloc_async, fail_next_launch="cudaErrorLaunchFailure")
    ts, ms = _mask_inputs(torch.float32, "float", seed=1, sizes=[10, 20])
    before = [t.clone() for t in ts]
    with pytest.raises(RuntimeError, match="apply_masks_kernel: cudaErrorLaunchFailure: unspecified launch failure"):
        _mask._cuda_launch(emu, 0, ts, ms)
    for a, b in zip(ts, before):  # the kernel never ran
        assert_bitwise_equal(a, b)
    # the fixture checks that the descriptor buffer was freed


def test_apply_masks_twin_allocation_failure_raises():
    emu.configure(fail_next_malloc="cudaErrorMemoryAllocation")
    ts, ms = _mask_inputs(torch.float64, "bool", seed=2, sizes=[4])
    with pytest.raises(RuntimeError, match="allocating descriptors: cudaErrorMemoryAllocation: out of memory"):
        _mask._cuda_launch(emu, 0, ts, ms)
    assert emu.stats()["launches"] == 0


def test_apply_masks_twin_rejects_bad_descriptors():
    with pytest.raises(ValueError, match="one entry per segment"):
        emu.cuda_apply_masks([1, 2], [1], [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="segment 1 has an unknown kind 9"):
        emu.cuda_apply_masks([1, 2], [3, 4], [0, 0], [0, 9])
    with pytest.raises(RuntimeError, match="segment 0 has a negative size"):
        emu.cuda_apply_masks([1], [3], [-1], [0])
    with pytest.raises(RuntimeError, match="segment 0 has a null pointer"):
        emu.cuda_apply_masks([0], [3], [5], [1])


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
       sms=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), reverse=st.booleans())
def test_apply_masks_twin_property(sizes, sms, seed, reverse):
    emu.configure(multiprocessors=sms, order="reverse" if reverse else "forward")
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32 if torch.rand(1, generator=g) < 0.5 else torch.float64 for _ in sizes]
    ts = [make_weights(n, dt, g) for n, dt in zip(sizes, dtypes)]
    ms = [(torch.rand(n, generator=g) < 0.5) if torch.rand(1, generator=g) < 0.5
          else torch.randn(n, generator=g, dtype=dt) for n, dt in zip(sizes, dtypes)]
    expected = [t.clone() for t in ts]
    _mask.apply_masks_reference(expected, ms)
    _mask._cuda_launch(emu, 0, ts, ms)
    for a, e in zip(ts, expected):
        assert_bitwise_equal(a, e)
    assert emu.stats()["live_allocations"] == 0


def test_mask_plan_cuda_set_reapplies_in_one_launch_and_detects_moves():
    """MaskPlan's CUDA side (_CudaMaskSet): segment lists built once, one launch per apply,
    a reallocated tensor found before anything is written."""
    ts, ms = _mask_inputs(torch.float32, "bool", seed=4, sizes=[3000, 0, 17, 999])
    expected = [t.clone() for t in ts]
    _mask.apply_masks_reference(expected, ms)
    cset = _mask._CudaMaskSet(ts, ms)
    assert cset.moved() == -1
    cset.apply(emu, 0)
    cset.apply(emu, 0)  # idempotent: masking twice changes nothing
    for a, e in zip(ts, expected):
        assert_bitwise_equal(a, e)
    assert emu.stats()["launches"] == 2
    ts[2].data = torch.ones(17)  # reallocated: the plan must not write the old storage
    assert cset.moved() == 2


# ------------------------------------------------------------------------------ KL


def _kl_inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mu0 = torch.randn(shape, generator=g, dtype=dtype)
    mu1 = torch.randn(shape, generator=g, dtype=dtype)
    v0 = torch.rand(shape, generator=g, dtype=dtype) * 4 + 1e-3
    v1 = torch.rand(shape, generator=g, dtype=dtype) * 4 + 1e-3
    return mu0, v0, mu1, v1


def _kl_twin(inputs, direction="forward", out=None):
    return _kl._diag_cuda_launch(emu, 0, inputs, NAMES, out, direction)


@pytest.mark.parametrize("shape,direction,dtype", all_pairs(
    [(0,), (1,), (7,), (20_003,), (5, 3), (1001, 17), (0, 4)], ["forward", "reverse", "symmetric"],
    DTYPES))
def test_gaussian_kl_twin_matches_cpu_kernel_and_reference(dtype, direction, shape):
    mu0, v0, mu1, v1 = _kl_inputs(shape, dtype, seed=sum(shape) + 7)
    if mu0.numel() > 2:
        v0.view(-1)[0] = 1e-30 if dtype == torch.float32 else 1e-300  # extreme ratio: two-log path
    got = _kl_twin((mu0, v0, mu1, v1), direction)
    expected = _kl.gaussian_kl_reference(mu0, v0, mu1, v1, direction=direction)
    cpu = kernels.gaussian_kl(mu0, v0, mu1, v1, direction=direction, backend=NATIVE)
    assert got.dtype == dtype and got.shape == expected.shape
    rtol, atol = (2e-5, 1e-5) if dtype == torch.float32 else (1e-10, 1e-12)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(got, cpu, rtol=rtol, atol=atol)
    if shape[0] > 4096:  # one thread per row: the 16 x 256 grid strides over the rows
        s = emu.stats()
        assert s["last_kernel"] == "kl_diag_kernel" and s["last_blocks"] * s["last_threads"] < shape[0]


def test_gaussian_kl_twin_writes_into_out():
    mu0, v0, mu1, v1 = _kl_inputs((300, 2), torch.float64, seed=1)
    out = torch.full((300,), math.nan, dtype=torch.float64)
    assert _kl_twin((mu0, v0, mu1, v1), out=out) is out
    torch.testing.assert_close(out, _kl.gaussian_kl_reference(mu0, v0, mu1, v1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_gaussian_kl_twin_reports_the_first_bad_variance(dim, order):
    """atomicMin picks the first bad element in row-major order, var0 before var1, whatever
    order the threads run in: the message equals the CPU kernel's and the reference's."""
    emu.configure(order=order)
    shape = (50_000,) if dim == 1 else (10_000, 5)
    mu = torch.zeros(shape)
    v0, v1 = torch.ones(shape), torch.ones(shape)
    v1.view(-1)[123] = -1.0
    v0.view(-1)[40_000] = math.nan
    v0.view(-1)[123] = 0.0  # same element: var0 is reported before var1
    v1.view(-1)[49_999] = math.inf
    with pytest.raises(ValueError) as ref:
        _kl.gaussian_kl_reference(mu, v0, mu, v1)
    with pytest.raises(ValueError) as cpu:
        kernels.gaussian_kl(mu, v0, mu, v1, backend=NATIVE)
    with pytest.raises(ValueError) as got:
        _kl_twin((mu, v0, mu, v1))
    assert str(got.value) == str(ref.value) == str(cpu.value)
    assert "var0[" in str(got.value)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), d=st.integers(1, 6), bad=st.lists(st.tuples(st.integers(0, 10**9), st.booleans(),
       st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf])), min_size=1, max_size=4),
       reverse=st.booleans())
def test_gaussian_kl_twin_first_bad_property(n, d, bad, reverse):
    emu.configure(order="reverse" if reverse else "forward")
    mu0, v0, mu1, v1 = _kl_inputs((n, d), torch.float64, seed=n * 7 + d)
    for pos, second, val in bad:
        (v1 if second else v0).view(-1)[pos % (n * d)] = val
    with pytest.raises(ValueError) as ref:
        _kl.gaussian_kl_reference(mu0, v0, mu1, v1)
    with pytest.raises(ValueError) as got:
        _kl_twin((mu0, v0, mu1, v1))
    assert str(got.value) == str(ref.value)


def test_gaussian_kl_twin_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        emu.cuda_gaussian_kl(1, 1, 1, 1, 1, 1, 1, direction="sideways")
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        emu.cuda_gaussian_kl(1, 1, 1, 1, 1, 1, 1, dtype="float16")
    with pytest.raises(RuntimeError, match="need n >= 0 and d >= 1"):
        emu.cuda_gaussian_kl(1, 1, 1, 1, 1, 1, 0)
    with pytest.raises(RuntimeError, match="null pointer"):
        emu.cuda_gaussian_kl(0, 1, 1, 1, 1, 5, 1)
    x = torch.ones(4)
    emu.configure(fail_next_launch="cudaErrorInvalidValue")
    with pytest.raises(RuntimeError, match="kl_diag_kernel: cudaErrorInvalidValue"):
        _kl_twin((x, x, x, x))


# ------------------------------------------------------------------------------ fake quantize


def _quant_case(shape, axis, dtype, mask_kind, seed, scheme="affine", bits=8):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = (make_weights(n, dtype, g) * 3).reshape(shape)
    qmin, qmax = _quant.quant_range(bits, scheme)
    if axis is None:
        scale = 0.0625 if scheme == "symmetric" else 0.02
        zp = 0 if scheme == "symmetric" else min(qmax, (qmin + qmax) // 2 + 3)
        if n > 8:  # ties, in both directions
            x.view(-1)[:8] = torch.tensor([0.5, 1.5, -0.5, -2.5, 2.5, -0.01, 0.01, -0.0], dtype=dtype) * scale
    else:
        c = shape[axis]
        scale = torch.rand(c, generator=g, dtype=dtype) * 0.1 + 0.01
        zp = (torch.randint(qmin, qmax + 1, (c,), generator=g) if scheme == "affine"
              else torch.zeros(c, dtype=torch.int64))
    if mask_kind is None:
        mask = None
    elif mask_kind == "bool":
        mask = torch.rand(shape, generator=g) < 0.6
    else:
        mask = torch.randn(shape, generator=g, dtype=dtype)
        if n > 3:
            mask.view(-1)[:3] = torch.tensor([math.nan, 0.0, -0.0], dtype=dtype)
    return x, mask, dict(bits=bits, scheme=scheme, axis=axis, scale=scale, zero_point=zp)


def _quant_twin(x, mask, kw, rounding="nearest", seed=None, out=None, return_codes=True):
    """The twin through _fq_cuda_launch, with parameters validated as the public op does."""
    qmin, qmax = _quant.quant_range(kw["bits"], kw["scheme"])
    axis = _quant._norm_axis(x, kw["axis"])
    stochastic, seed_ = _quant._check_rounding(rounding, seed)
    given = _quant._given_params(x, axis, kw.get("scale"), kw.get("zero_point"), qmin, qmax, kw["scheme"],
                                 kw["bits"])
    assert _quant._cuda_refusal(x, mask) is None  # what the dispatcher asks for a CUDA x
    return _quant._fq_cuda_launch(emu, 0, x, mask, given, axis, qmin, qmax, kw["scheme"], stochastic, seed_,
                                  out, return_codes)


def _quant_cpu(x, mask, kw, rounding="nearest", seed=None):
    if mask is None:
        return kernels.fake_quantize(x, rounding=rounding, seed=seed, return_codes=True, backend=NATIVE, **kw)
    return kernels.masked_fake_quantize(x, mask, rounding=rounding, seed=seed, return_codes=True,
                                        backend=NATIVE, **kw)


@pytest.fixture
def twin_dispatch(monkeypatch):
    """Make the dispatcher see the emulated twins as this build's CUDA kernels."""
    if _native._C is None:
        pytest.skip("mia_core._C is not built")
    monkeypatch.setattr(_native, "cuda_kernels", lambda: emu)


@pytest.mark.parametrize("shape_axis,mask_kind,dtype,rounding", all_pairs(
    [((0,), None), ((1,), None), ((7,), None), ((30_011,), None), ((3, 1001, 7), 1), ((64, 513), 0),
     ((5, 6, 7), -1), ((0, 3), 1)], [None, "bool", "float"], DTYPES, ["nearest", "stochastic"]))
def test_fake_quantize_twin_is_bit_identical_to_cpu_kernel(twin_dispatch, dtype, mask_kind, rounding, shape_axis):
    shape, axis = shape_axis
    x, mask, kw = _quant_case(shape, axis, dtype, mask_kind, seed=sum(shape) + 3)
    seed = 2024 if rounding == "stochastic" else None
    got, got_codes = _quant_twin(x, mask, kw, rounding, seed)
    ref, ref_codes = _quant_cpu(x, mask, kw, rounding, seed)
    assert_bitwise_equal(got, ref)
    assert torch.equal(got_codes, ref_codes)
    if x.numel() > 4096:
        s = emu.stats()
        assert s["last_kernel"] == "fake_quant_kernel" and s["last_blocks"] * s["last_threads"] < x.numel()


@pytest.mark.parametrize("scheme,bits", [("symmetric", 4), ("affine", 16), ("affine", 1), ("symmetric", 2)])
def test_fake_quantize_twin_bit_widths(twin_dispatch, scheme, bits):
    x, mask, kw = _quant_case((5000,), None, torch.float32, None, seed=bits, scheme=scheme, bits=bits)
    got, got_codes = _quant_twin(x, mask, kw)
    ref, ref_codes = _quant_cpu(x, mask, kw)
    assert_bitwise_equal(got, ref)
    assert torch.equal(got_codes, ref_codes)


def test_fake_quantize_twin_matches_torch_op(twin_dispatch):
    """float32 nearest on non-NaN input: the bits of torch.fake_quantize_per_*_affine."""
    x, _, kw = _quant_case((4001,), None, torch.float32, None, seed=4)
    x = torch.nan_to_num(x, nan=0.0, posinf=1e3, neginf=-1e3)
    got, _ = _quant_twin(x, None, kw)
    assert_bitwise_equal(got, torch.fake_quantize_per_tensor_affine(x, kw["scale"], kw["zero_point"], 0, 255))
    x, _, kw = _quant_case((6, 301), 0, torch.float32, None, seed=5)
    x = torch.nan_to_num(x, nan=0.0, posinf=1e3, neginf=-1e3)
    got, _ = _quant_twin(x, None, kw)
    expected = torch.fake_quantize_per_channel_affine(x, kw["scale"], kw["zero_point"].to(torch.int32), 0, 0, 255)
    assert_bitwise_equal(got, expected)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fake_quantize_twin_in_place_and_without_codes(twin_dispatch, rounding):
    x, mask, kw = _quant_case((20_000,), None, torch.float64, "bool", seed=8)
    seed = 5 if rounding == "stochastic" else None
    ref, _ = _quant_cpu(x, mask, kw, rounding, seed)
    res, codes = _quant_twin(x, mask, kw, rounding, seed, out=x, return_codes=False)
    assert res is x and codes is None
    assert_bitwise_equal(x, ref)


@pytest.mark.parametrize("shape_axis,mask_kind,dtype,scheme", all_pairs(
    [((20_000,), None), ((3, 1001, 7), 1), ((40, 9), -1), ((0, 5), 1)], [None, "bool", "float"], DTYPES,
    ["affine", "symmetric"]))
def test_fake_quantize_twin_derived_parameters_match_cpu_kernel(twin_dispatch, dtype, mask_kind, scheme,
                                                                shape_axis):
    shape, axis = shape_axis
    """No scale given: min-max parameters from torch (the reference's code), then the twin."""
    x, mask, kw = _quant_case(shape, axis, dtype, mask_kind, seed=sum(shape), scheme=scheme)
    x = torch.nan_to_num(x, nan=0.5, posinf=4.0, neginf=-3.0)
    if mask is not None and mask.dtype != torch.bool:
        mask = torch.nan_to_num(mask, nan=2.0)
    kw = dict(bits=6, scheme=scheme, axis=axis)
    got, got_codes = _quant_twin(x, mask, kw, "stochastic", 99)
    ref, ref_codes = _quant_cpu(x, mask, kw, "stochastic", 99)
    assert_bitwise_equal(got, ref)
    assert torch.equal(got_codes, ref_codes)


def test_fake_quantize_twin_derived_parameters_reject_nonfinite_data(twin_dispatch):
    x = torch.randn(100)
    x[17] = math.inf
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        _quant_twin(x, None, dict(bits=8, scheme="affine", axis=None))
    assert emu.stats()["launches"] == 0


def test_fake_quantize_twin_stochastic_depends_only_on_seed_and_index(twin_dispatch):
    """Another grid (SM count) or thread order gives the same bits; another seed does not."""
    x, _, kw = _quant_case((50_000,), None, torch.float32, None, seed=6)
    first, _ = _quant_twin(x, None, kw, "stochastic", 77)
    emu.configure(multiprocessors=3, order="reverse")
    again, _ = _quant_twin(x, None, kw, "stochastic", 77)
    assert_bitwise_equal(again, first)
    other, _ = _quant_twin(x, None, kw, "stochastic", 78)
    assert not torch.equal(bits(other), bits(first))


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(0, 40), min_size=1, max_size=3), axis_pick=st.integers(-1, 2),
       dtype=st.sampled_from(DTYPES), mask_kind=st.sampled_from([None, "bool", "float"]),
       rounding=st.sampled_from(["nearest", "stochastic"]), seed=st.integers(0, 2**63 - 1),
       bits=st.integers(1, 16), scheme=st.sampled_from(["affine", "symmetric"]))
def test_fake_quantize_twin_property(shape, axis_pick, dtype, mask_kind, rounding, seed, bits, scheme):
    if _native._C is None:
        pytest.skip("mia_core._C is not built")
    if scheme == "symmetric" and bits < 2:
        bits = 2
    axis = None if axis_pick < 0 or axis_pick >= len(shape) else axis_pick
    x, mask, kw = _quant_case(tuple(shape), axis, dtype, mask_kind, seed=seed % 1000, scheme=scheme, bits=bits)
    original = _native.cuda_kernels
    _native.cuda_kernels = lambda: emu
    try:
        got, got_codes = _quant_twin(x, mask, kw, rounding, seed if rounding == "stochastic" else None)
    finally:
        _native.cuda_kernels = original
    ref, ref_codes = _quant_cpu(x, mask, kw, rounding, seed if rounding == "stochastic" else None)
    assert_bitwise_equal(got, ref)
    assert torch.equal(got_codes, ref_codes)


def test_fake_quantize_twin_dispatch_scope(twin_dispatch):
    """What the dispatcher sends to the twin: contiguous inputs, masked or not (given or
    derived parameters and any rounding are the twin's business); strided inputs go to the
    reference under auto and are an error under native (overlapping buffers are rejected
    before, on every device and backend)."""
    x = torch.randn(10, 10)
    m = torch.rand(10, 10) < 0.5

    def choose(backend, x, mask):
        return _dispatch.choose(backend, lambda b: _quant._cuda_refusal(x, mask))

    assert choose("auto", x, m) == "native"
    assert choose("auto", x, None) == "native"
    assert choose("auto", x.t(), None) == "torch"
    assert choose("auto", x, m.t()) == "torch"
    for args, msg in (((x.t(), None), r"backend='native' cannot run: x is not contiguous.*"
                                      r"falls back to the torch reference on the GPU"),
                      ((x, m.t()), "mask is not contiguous")):
        with pytest.raises(RuntimeError, match=msg):
            choose("native", *args)


@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
def test_fake_quantize_overlapping_buffers_are_errors_on_every_backend(backend):
    """Validated before any backend is chosen, so a CUDA call cannot differ from a CPU one."""
    if backend == "native" and _native._C is None:
        pytest.skip("mia_core._C is not built")
    x, fm = torch.randn(10, 10), torch.randn(10, 10)
    with pytest.raises(ValueError, match="mask overlaps the memory of out"):
        kernels.masked_fake_quantize(x, fm, scale=0.1, zero_point=3, out=fm, backend=backend)
    buf = torch.randn(200)
    with pytest.raises(ValueError, match="out partially overlaps x"):
        kernels.fake_quantize(buf[:100], scale=0.1, zero_point=3, out=buf[50:150], backend=backend)
    strided = buf[::2]  # spans buf[0..198]: out=buf[1:101] lies inside that span
    with pytest.raises(ValueError, match="out partially overlaps x"):
        kernels.fake_quantize(strided, scale=0.1, zero_point=3, out=buf[1:101], backend=backend)


def test_fake_quantize_twin_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown mask_kind 'int8'"):
        emu.cuda_fake_quantize(1, 1, 0, 1, 1, 1, 1, 1, quant_min=0, quant_max=255, mask_kind="int8")
    with pytest.raises(RuntimeError, match="null mask pointer"):
        emu.cuda_fake_quantize(1, 1, 0, 1, 1, 1, 1, 1, quant_min=0, quant_max=255, mask_kind="bool")
    with pytest.raises(RuntimeError, match="quant_min <= quant_max"):
        emu.cuda_fake_quantize(1, 1, 0, 1, 1, 1, 1, 1, quant_min=5, quant_max=4)
    x = torch.ones(8)
    emu.configure(fail_next_launch="cudaErrorLaunchFailure")
    with pytest.raises(RuntimeError, match="fake_quant_kernel: cudaErrorLaunchFailure"):
        emu.cuda_fake_quantize(x.data_ptr(), x.data_ptr(), 0, 1, 1, 8, torch.ones(1).data_ptr(),
                               torch.zeros(1).data_ptr(), quant_min=0, quant_max=255)
