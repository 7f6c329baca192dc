"""Op tests for the fake-quantize family in mia_core.kernels (torchvision test_ops style).

Oracles: torch.fake_quantize_per_tensor_affine / _per_channel_affine (bit for bit, float32,
given parameters), the pure-torch *_reference functions (bit for bit with the native kernel),
and a numpy float64 formula for the derived min-max parameters.

Grid: the sweeps run on the native kernel, covering every pair of parameter values
(kernel_helpers.all_pairs) rather than every combination; the ``torch`` backend gets the cases
that check the reference against an independent oracle (torch's ops, the numpy formula),
``auto`` one case each; the random sweep is hypothesis with a bounded number of examples.
"""

import math
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mia_core import kernels
from mia_core.kernels import _dispatch, _native
from kernel_helpers import all_pairs, assert_bitwise_equal

NATIVE = kernels.native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="mia_core._C is not built")
BACKENDS = [pytest.param("native", marks=needs_native), "auto", "torch"]
SIZES = [0, 1, 7, 1023, 70001]  # 70001 > 65536: the OpenMP path


def seed_of(*args):
    return zlib.crc32(repr(args).encode())


def make_x(shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def expected_ran(backend):
    return "torch" if backend == "torch" or not NATIVE else "native"


# ------------------------------------------------------------------------------ torch parity


def _on_native(*values):
    return pytest.param(*values, marks=needs_native)


BITS_SCHEMES = [(8, "affine"), (4, "affine"), (1, "affine"), (16, "affine"), (8, "symmetric"),
                (2, "symmetric")]
# Every bit width / scheme at an odd size past the SIMD width, every size (the loops' tails
# and the OpenMP path) at 8-bit affine and 2-bit symmetric: natively, and on the reference.
PER_TENSOR_GRID = [
    *(_on_native(b, sc, 1023, "native") for b, sc in BITS_SCHEMES),
    *(_on_native(8, "affine", n, "native") for n in (0, 1, 7, 70001)),
    _on_native(2, "symmetric", 70001, "native"),
    *((b, sc, 7, "torch") for b, sc in BITS_SCHEMES),
    (8, "affine", 0, "torch"), (8, "affine", 70001, "torch"), (4, "affine", 1023, "auto")]


@pytest.mark.parametrize("bits,scheme,size,backend", PER_TENSOR_GRID)
def test_per_tensor_matches_torch(bits, scheme, size, backend):
    qmin, qmax = kernels.quant_range(bits, scheme)
    x = make_x(size, seed=seed_of(bits, scheme, size))
    if size > 3:
        x[:3] = torch.tensor([math.inf, -math.inf, -0.0])
    scale = 0.037 if bits > 2 else 0.9
    zp = (qmin + qmax + 1) // 2 if scheme == "affine" else 0
    out = kernels.fake_quantize(x, bits=bits, scheme=scheme, scale=scale, zero_point=zp,
                                backend=backend)
    assert kernels.last_backend() == expected_ran(backend)
    assert_bitwise_equal(out, torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax))


PER_CHANNEL_SHAPES = [((0, 3), 1), ((1,), 0), ((5, 7), 0), ((5, 7), -1), ((3, 5, 4667), 1),
                      ((70001, 3), 1), ((3, 4, 5), 2)]


@pytest.mark.parametrize("shape,axis,backend", [
    *(_on_native(shape, axis, "native") for shape, axis in PER_CHANNEL_SHAPES),
    ((0, 3), 1, "torch"), ((5, 7), -1, "torch"), ((70001, 3), 1, "torch"), ((3, 4, 5), 2, "torch"),
    ((3, 5, 4667), 1, "auto")])
def test_per_channel_matches_torch(shape, axis, backend):
    x = make_x(shape, seed=seed_of(shape, axis))
    C = shape[axis]
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(C, generator=g) * 0.1 + 0.01
    zp = torch.randint(0, 256, (C,), generator=g, dtype=torch.int32)
    out = kernels.fake_quantize(x, axis=axis, scale=scale, zero_point=zp, backend=backend)
    assert_bitwise_equal(out, torch.fake_quantize_per_channel_affine(x, scale, zp, axis % len(shape),
                                                                     0, 255))
    # symmetric through quant_min/quant_max
    out = kernels.fake_quantize(x, axis=axis, scale=scale, scheme="symmetric", bits=6,
                                backend=backend)
    ref = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros_like(zp), axis % len(shape),
                                                 -32, 31)
    assert_bitwise_equal(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_round_to_even_like_torch(backend):
    # x / scale lands exactly on k + 0.5 (scale a power of two): ties to even, as nearbyint.
    x = (torch.arange(-40, 40, dtype=torch.float32) + 0.5) * 0.25
    out, codes = kernels.fake_quantize(x, scale=0.25, zero_point=50, return_codes=True,
                                       backend=backend)
    assert_bitwise_equal(out, torch.fake_quantize_per_tensor_affine(x, 0.25, 50, 0, 255))
    assert torch.equal(codes, (torch.round(x / 0.25) + 50).to(torch.int32))
    assert codes[40].item() == 50 and codes[41].item() == 52  # 0.5 -> 0, 1.5 -> 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_input_auto_path(layout, backend):
    base = make_x((300, 400), seed=3)
    x = base.t() if layout == "transposed" else base[:, ::3]
    assert not x.is_contiguous()
    kw = dict(axis=1, scale=torch.full((x.shape[1],), 0.05), zero_point=128)
    if backend == "native":
        with pytest.raises(RuntimeError, match=r"backend='native' cannot run: x is not contiguous"):
            kernels.fake_quantize(x, **kw, backend=backend)
        return
    out = kernels.fake_quantize(x, **kw, backend=backend)
    assert kernels.last_backend() == "torch"
    ref = torch.fake_quantize_per_channel_affine(x, kw["scale"], torch.full((x.shape[1],), 128,
                                                 dtype=torch.int32), 1, 0, 255)
    assert_bitwise_equal(out, ref)


# ------------------------------------------------------------------------------ native == reference


@needs_native
@pytest.mark.parametrize("shape_axis,dtype,scheme,rounding", all_pairs(
    [((0,), None), ((1,), None), ((70001,), None), ((257, 301), 0), ((257, 301), 1),
     ((9, 11, 719), 1), ((2, 3), None)],
    [torch.float32, torch.float64], ["affine", "symmetric"], ["nearest", "stochastic"]))
def test_native_matches_reference(shape_axis, dtype, scheme, rounding):
    shape, axis = shape_axis
    x = make_x(shape, dtype, seed=seed_of(dtype, shape, axis, scheme, rounding))
    kw = dict(bits=5, scheme=scheme, axis=axis, rounding=rounding,
              seed=12345 if rounding == "stochastic" else None, return_codes=True)
    a, ca = kernels.fake_quantize(x, backend="native", **kw)
    b, cb = kernels.fake_quantize_reference(x, **kw)
    assert_bitwise_equal(a, b)
    assert torch.equal(ca, cb) and ca.dtype == torch.int32


@needs_native
@pytest.mark.parametrize("num_threads", [1, 3])
def test_native_thread_splits_are_exact(num_threads):
    x = make_x((71003, 3), seed=5)
    ref = kernels.fake_quantize_reference(x, axis=1, rounding="stochastic", seed=9)
    s, z = kernels.quantization_params(x, axis=1)
    out = torch.empty_like(x)
    _native._C.fake_quantize(x.numpy(), out.numpy(), axis=1, quant_min=0, quant_max=255,
                             scale=s.numpy().copy(), zero_point=z.to(torch.float32).numpy(),
                             derive=False, stochastic=True, seed=9, num_threads=num_threads)
    assert_bitwise_equal(out, ref)


def supported_isas():
    if not NATIVE:
        return []
    order = ["baseline", "avx2", "avx512"]
    return order[: order.index(_native._C.quant_best_isa()) + 1]


def adversarial_x(n, scale, zp, qmin, qmax, seed):
    """Values at and around every rounding tie and clamp boundary, plus +-inf, -0.0, huge."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(qmin - zp - 3, qmax - zp + 4, (n,), generator=g).to(torch.float32)
    frac = torch.tensor([0.0, 0.5, -0.5, 0.49999997, 0.50000006, 0.25], dtype=torch.float32)
    f = frac[torch.randint(0, len(frac), (n,), generator=g)]
    x = (k + f) * torch.tensor(scale, dtype=torch.float32)
    x = torch.where(torch.rand(n, generator=g) < 0.3, torch.randn(n, generator=g) * 3, x)
    special = torch.tensor([math.inf, -math.inf, -0.0, 0.0, 3e38, -3e38, 1e-40, -1e-40])
    pick = torch.rand(n, generator=g) < 0.02
    x[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=g)]
    return x


@needs_native
@pytest.mark.parametrize("isa,code_range,n,store", all_pairs(
    supported_isas(),
    [(8, "affine", "mid"), (8, "affine", "min"), (8, "affine", "max"), (16, "affine", "mid"),
     (1, "affine", "min"), (4, "symmetric", "zero"), (16, "symmetric", "zero")],
    [1, 15, 1023, 70001], ["regular", "streaming"]))
def test_every_isa_matches_torch_bitwise(isa, code_range, n, store):
    bits, scheme, zp_kind = code_range
    qmin, qmax = kernels.quant_range(bits, scheme)
    zp = {"mid": (qmin + qmax + 1) // 2, "min": qmin, "max": qmax, "zero": 0}[zp_kind]
    scale = 0.0371 if bits > 1 else 0.9
    x = adversarial_x(n, scale, zp, qmin, qmax, seed_of(isa, bits, scheme, zp_kind, n))
    C = _native._C
    p = lambda v: np.array([v], dtype=np.float32)  # noqa: E731
    out = np.empty(n + 3, dtype=np.float32)[3:]  # not 64-byte aligned: the streamed head
    codes = np.empty(n, dtype=np.int32)
    C.fake_quantize(x.numpy(), out, quant_min=qmin, quant_max=qmax, scale=p(scale),
                    zero_point=p(zp), derive=False, codes=codes, isa=isa, store=store)
    want = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    assert_bitwise_equal(torch.from_numpy(out), want)
    _, wc = kernels.fake_quantize_reference(x, bits=bits, scheme=scheme, scale=scale,
                                            zero_point=zp, return_codes=True)
    assert torch.equal(torch.from_numpy(codes), wc)
    # per channel, channels innermost (per-element parameters) and outermost (constant spans)
    for shape, axis in [((n, 3), 1), ((3, n), 0)]:
        xc = adversarial_x(3 * n, scale, zp, qmin, qmax, seed_of(isa, shape)).reshape(shape)
        sc = torch.tensor([scale, scale * 0.5, scale * 3.0], dtype=torch.float32)
        zc = torch.tensor([zp, qmin, qmax], dtype=torch.int32) if scheme == "affine" \
            else torch.zeros(3, dtype=torch.int32)
        oc = np.empty(shape, dtype=np.float32)
        C.fake_quantize(xc.numpy(), oc, axis=axis, quant_min=qmin, quant_max=qmax,
                        scale=sc.numpy(), zero_point=zc.to(torch.float32).numpy(), derive=False,
                        isa=isa, store=store)
        ref = torch.fake_quantize_per_channel_affine(xc, sc, zc, axis, qmin, qmax)
        # torch's per-channel op sends +inf and values beyond the int64 range through an
        # undefined float -> int cast (the documented exception); the reference covers them.
        fin = xc.abs() < 1e30
        assert_bitwise_equal(torch.from_numpy(oc)[fin], ref[fin])
        assert_bitwise_equal(torch.from_numpy(oc), kernels.fake_quantize_reference(
            xc, bits=bits, scheme=scheme, axis=axis, scale=sc, zero_point=zc))
    # fused bool / float mask, NaN included: against the pure-torch reference
    xn = x.clone()
    xn[:: 7] = math.nan
    for m in (torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5,
              torch.randn(n, generator=torch.Generator().manual_seed(n + 1))):
        om = np.empty(n, dtype=np.float32)
        cm = np.empty(n, dtype=np.int32)
        C.fake_quantize(xn.numpy(), om, quant_min=qmin, quant_max=qmax, scale=p(scale),
                        zero_point=p(zp), derive=False, codes=cm, mask=m.numpy(), isa=isa,
                        store=store)
        wm, wmc = kernels.masked_fake_quantize_reference(xn, m, bits=bits, scheme=scheme,
                                                         scale=scale, zero_point=zp,
                                                         return_codes=True)
        assert_bitwise_equal(torch.from_numpy(om), wm)
        assert torch.equal(torch.from_numpy(cm), wmc)


@needs_native
@pytest.mark.parametrize("isa,dtype,rounding,store,in_place", all_pairs(
    supported_isas(), [torch.float32, torch.float64], ["nearest", "stochastic"],
    ["regular", "streaming"], [False, True]))
def test_every_isa_matches_reference_float64_and_stochastic(isa, dtype, rounding, store,
                                                            in_place):
    x = make_x((70001,), dtype, seed=seed_of(isa, dtype, rounding), scale=40.0)
    x[::11] = math.nan
    kw = dict(bits=6, scale=0.3, zero_point=17, rounding=rounding,
              seed=7 if rounding == "stochastic" else None, return_codes=True)
    want, wc = kernels.fake_quantize_reference(x, **kw)
    xa = x.numpy().copy()
    out = xa if in_place else np.empty(x.shape, dtype=xa.dtype)
    codes = np.empty(x.shape, dtype=np.int32)
    one = lambda v: np.array([v], dtype=out.dtype)  # noqa: E731
    _native._C.fake_quantize(xa, out, quant_min=0, quant_max=63,
                             scale=want.new_tensor([0.3]).numpy(), zero_point=one(17),
                             derive=False, stochastic=rounding == "stochastic", seed=7,
                             codes=codes, isa=isa, store=store)
    assert_bitwise_equal(torch.from_numpy(out), want)
    assert torch.equal(torch.from_numpy(codes), wc)


@needs_native
def test_large_output_auto_streaming_matches_torch():
    # >= 16 MiB of output: the default (store="auto") path writes with non-temporal stores
    n = (16 << 20) // 4 + 21
    x = adversarial_x(n, 0.0371, 128, 0, 255, seed=77)
    out = torch.empty(n + 1)[1:]
    kernels.fake_quantize(x, scale=0.0371, zero_point=128, out=out, backend="native")
    assert_bitwise_equal(out, torch.fake_quantize_per_tensor_affine(x, 0.0371, 128, 0, 255))
    m = torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.5
    y = kernels.masked_fake_quantize(x, m, scale=0.0371, zero_point=128, backend="native")
    assert_bitwise_equal(y, torch.fake_quantize_per_tensor_affine(x.masked_fill(~m, 0), 0.0371,
                                                                  128, 0, 255))


@needs_native
def test_isa_argument_is_validated():
    C = _native._C
    assert C.quant_best_isa() in ("baseline", "avx2", "avx512")
    a = np.ones(4, dtype=np.float32)
    kw = dict(quant_min=0, quant_max=255, scale=np.ones(1, np.float32),
              zero_point=np.zeros(1, np.float32), derive=False)
    with pytest.raises(ValueError, match=r"unknown isa 'sse9'"):
        C.fake_quantize(a, a.copy(), isa="sse9", **kw)
    with pytest.raises(ValueError, match=r"unknown store 'fast'"):
        C.fake_quantize(a, a.copy(), store="fast", **kw)
    unsupported = [i for i in ("avx2", "avx512") if i not in supported_isas()]
    for i in unsupported:
        with pytest.raises(ValueError, match=rf"isa '{i}' is not supported"):
            C.fake_quantize(a, a.copy(), isa=i, **kw)


# ------------------------------------------------------------------------------ derived params


def numpy_params(x, bits, scheme, axis):
    qmin, qmax = kernels.quant_range(bits, scheme)
    a = x.numpy()
    if axis is None:
        a = a.reshape(1, -1)
    else:
        a = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    mn = np.minimum(a.min(axis=1, initial=0.0).astype(np.float64), 0.0)
    mx = np.maximum(a.max(axis=1, initial=0.0).astype(np.float64), 0.0)
    if scheme == "symmetric":
        s = np.maximum(np.maximum(-mn, mx) / ((qmax - qmin) / 2.0), 2.0 ** -23)
        z = np.zeros_like(s)
    else:
        s = np.maximum((mx - mn) / (qmax - qmin), 2.0 ** -23)
        st = s.astype(a.dtype).astype(np.float64)
        z = np.clip(qmin - np.round(mn / st), qmin, qmax)
    return s.astype(a.dtype), z


DERIVED_SHAPES = [((1000,), None), ((40, 70001 // 40), 0), ((6, 0), 0), ((0,), None), ((8, 9), 1)]


@pytest.mark.parametrize("shape,axis,scheme,dtype,backend", [
    *(_on_native(shape, axis, scheme, dtype, "native") for (shape, axis), scheme, dtype in all_pairs(
        DERIVED_SHAPES, ["affine", "symmetric"], [torch.float32, torch.float64])),
    ((1000,), None, "affine", torch.float64, "torch"), ((8, 9), 1, "symmetric", torch.float32, "torch"),
    ((40, 70001 // 40), 0, "affine", torch.float32, "auto")])
def test_derived_params_match_numpy_formula(shape, axis, scheme, dtype, backend):
    x = make_x(shape, dtype, seed=seed_of(shape, axis, scheme)) + 0.7  # skewed: zp != midpoint
    if x.numel():
        x.reshape(-1)[: min(9, x.numel())] = 0.25  # part of a constant channel (axis=1 case)
    s_np, z_np = numpy_params(x, 7, scheme, axis)
    s, z = kernels.quantization_params(x, bits=7, scheme=scheme, axis=axis)
    assert np.array_equal(s.numpy(), s_np) and np.array_equal(z.numpy(), z_np.astype(np.int32))
    got = kernels.fake_quantize(x, bits=7, scheme=scheme, axis=axis, backend=backend)
    explicit = kernels.fake_quantize_reference(
        x, bits=7, scheme=scheme, axis=axis, scale=torch.from_numpy(s_np),
        zero_point=torch.from_numpy(z_np) if scheme == "affine" else None)
    assert_bitwise_equal(got, explicit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_and_zero_channels_use_the_floor(backend):
    x = torch.zeros(4, 5)
    x[1] = 2.0
    s, z = kernels.quantization_params(x, axis=0)
    assert s[0].item() == pytest.approx(2.0 ** -23) and z[0].item() == 0
    assert s[1].item() == np.float32(2.0 / 255) and z[1].item() == 0
    out = kernels.fake_quantize(x, axis=0, backend=backend)
    assert torch.isfinite(out).all() and out[0].eq(0).all()
    assert torch.allclose(out[1], torch.full((5,), 2.0), atol=1e-6)


# ------------------------------------------------------------------------------ NaN / inf / empty


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_propagates_inf_clamps(dtype, backend):
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0], dtype=dtype)
    out, codes = kernels.fake_quantize(x, scale=0.1, zero_point=10, return_codes=True,
                                       backend=backend)
    assert math.isnan(out[0].item())
    assert codes.tolist() == [0, 255, 0, 20]
    assert out[1].item() == pytest.approx(24.5) and out[2].item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match=r"x contains NaN or inf"):
        kernels.fake_quantize(x, backend=backend)
    with pytest.raises(ValueError, match=r"x contains NaN or inf"):
        kernels.fake_quantize(torch.tensor([1.0, math.inf], dtype=dtype), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_scalar(backend):
    e = torch.empty(0, 3)
    assert kernels.fake_quantize(e, axis=1, backend=backend).shape == (0, 3)
    out, codes = kernels.fake_quantize(torch.empty(0), return_codes=True, backend=backend)
    assert out.shape == (0,) and codes.dtype == torch.int32
    s = torch.tensor(1.3)
    assert kernels.fake_quantize(s, scale=0.5, zero_point=0, backend=backend).item() == 1.5


# ------------------------------------------------------------------------------ stochastic


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_reproducible_and_thread_independent(backend):
    x = make_x(100003, seed=4)
    kw = dict(scale=0.05, zero_point=128, rounding="stochastic", backend=backend)
    a = kernels.fake_quantize(x, seed=7, **kw)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = kernels.fake_quantize(x, seed=7, **kw)
        torch.set_num_threads(2)
        c = kernels.fake_quantize(x, seed=7, **kw)
    finally:
        torch.set_num_threads(old)
    assert_bitwise_equal(a, b)
    assert_bitwise_equal(a, c)
    d = kernels.fake_quantize(x, seed=8, **kw)
    assert not torch.equal(a, d)
    assert_bitwise_equal(a, kernels.fake_quantize_reference(x, seed=7, scale=0.05, zero_point=128,
                                                            rounding="stochastic"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stochastic_unbiased_and_on_neighbouring_levels(dtype, backend):
    scale = 0.125
    x = torch.tensor([0.3, -0.3, 0.05, 1.01, -2.2], dtype=dtype).repeat_interleave(20000)
    out = kernels.fake_quantize(x, scale=scale, zero_point=0, bits=8, scheme="symmetric",
                                rounding="stochastic", seed=2024, backend=backend)
    lo = torch.floor(x / scale) * scale
    assert ((out == lo) | (out == lo + scale)).all()
    means = out.view(5, -1).mean(dim=1, dtype=torch.float64)
    # std of a mean of 20000 Bernoulli draws times scale <= 0.125 * 0.5 / sqrt(20000) ~ 4.4e-4
    assert torch.allclose(means, x.view(5, -1)[:, 0].double(), atol=2.5e-3)


# ------------------------------------------------------------------------------ masked (fused)


@pytest.mark.parametrize("given,size,axis,dtype,kind,backend", [
    *(_on_native(given, size, axis, dtype, kind, "native") for (size, axis), given, dtype, kind in all_pairs(
        [(0, None), (1, None), (1023, None), (70001, None), (70001, 0)], [True, False],
        [torch.float32, torch.float64], ["bool", "float"])),
    (True, 1023, None, torch.float32, "bool", "torch"), (False, 70001, 0, torch.float64, "float", "torch"),
    (True, 70001, 0, torch.float32, "float", "auto")])
def test_masked_equals_mask_then_quantize(given, size, axis, dtype, kind, backend):
    seed = seed_of(given, size, axis, dtype, kind)
    shape = (size,) if axis is None else (7, size // 7)
    x = make_x(shape, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        m = torch.rand(shape, generator=g) < 0.6
    else:
        m = torch.tensor([0.0, 1.0, 1.0, -0.0, 0.5], dtype=dtype)[torch.randint(0, 5, shape,
                                                                               generator=g)]
    kw = dict(bits=6, axis=axis)
    if given:
        kw.update(scale=0.07, zero_point=20)
    masked = x.masked_fill(~m, 0) if kind == "bool" else x * m
    ref = kernels.fake_quantize_reference(masked, **kw)
    x_before = x.clone()
    out = kernels.masked_fake_quantize(x, m, **kw, backend=backend)
    assert kernels.last_backend() == expected_ran(backend)
    assert_bitwise_equal(out, ref)
    assert_bitwise_equal(x, x_before)
    if given and dtype == torch.float32 and axis is None:
        assert_bitwise_equal(out, torch.fake_quantize_per_tensor_affine(masked, 0.07, 20, 0, 63))
    buf = x.clone()  # in place
    res = kernels.masked_fake_quantize(buf, m, **kw, out=buf, backend=backend)
    assert res is buf
    assert_bitwise_equal(buf, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_derived_params_use_kept_entries(backend):
    x = torch.tensor([100.0, -1.0, 0.5, 2.0])
    m = torch.tensor([False, True, True, True])
    out = kernels.masked_fake_quantize(x, m, bits=8, backend=backend)
    s, z = kernels.quantization_params(torch.tensor([-1.0, 0.5, 2.0]))
    assert out[0].item() == 0.0
    ref = kernels.fake_quantize(torch.tensor([-1.0, 0.5, 2.0]), scale=s, zero_point=z)
    assert_bitwise_equal(out[1:], ref)


# ------------------------------------------------------------------------------ out=


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_preallocated_and_in_place(backend):
    x = make_x((300, 250), seed=8)
    ref = kernels.fake_quantize_reference(x, axis=0)
    out = torch.empty_like(x)
    ptr = out.data_ptr()
    assert kernels.fake_quantize(x, axis=0, out=out, backend=backend) is out
    assert out.data_ptr() == ptr
    assert_bitwise_equal(out, ref)
    y = x.clone()
    assert kernels.fake_quantize(y, axis=0, out=y, backend=backend) is y
    assert_bitwise_equal(y, ref)


# ------------------------------------------------------------------------------ sign / ternary


SIGN_SHAPES = [((0,), None), ((1,), None), ((70001,), None), ((31, 17), 0), ((31, 17), 1), ((4, 0), 0)]


@pytest.mark.parametrize("shape,axis,dtype,backend", [
    *(_on_native(shape, axis, [torch.float32, torch.float64][i % 2], "native")
      for i, (shape, axis) in enumerate(SIGN_SHAPES)),
    _on_native((70001,), None, torch.float64, "native"),
    ((31, 17), 1, torch.float32, "torch"), ((70001,), None, torch.float64, "torch"),
    ((31, 17), 0, torch.float64, "auto")])
def test_sign_levels_and_reference(shape, axis, dtype, backend):
    x = make_x(shape, dtype, seed=seed_of(shape, axis))
    if x.numel() > 2:
        x.reshape(-1)[:2] = torch.tensor([0.0, -0.0], dtype=dtype)
    out = kernels.fake_quantize_sign(x, axis=axis, backend=backend)
    ref = kernels.fake_quantize_sign_reference(x, axis=axis)
    # s sums |x| in float64 in different orders on the two backends (documented)
    rtol = 2 * torch.finfo(torch.float32).eps if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=rtol, atol=0)
    if x.numel():
        flat = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
        s = flat.abs().double().mean(dim=1).to(dtype).reshape(
            (1,) * x.dim() if axis is None else [-1 if d == axis else 1 for d in range(x.dim())])
        torch.testing.assert_close(out.abs(), s.expand(x.shape), rtol=rtol, atol=0)
        assert torch.equal(out < 0, x < 0)  # sign(0) = sign(-0.0) = +s
    given = kernels.fake_quantize_sign(x, axis=axis, scale=0.5, backend=backend)
    assert set(given.unique().tolist()) <= {-0.5, 0.5}


@pytest.mark.parametrize("shape,axis,backend", [
    *(_on_native(shape, axis, "native")
      for shape, axis in [((101,), None), ((70001,), None), ((12, 33), 0), ((12, 33), 1),
                          ((3, 5, 7), 2)]),
    ((101,), None, "torch"), ((12, 33), 1, "torch"), ((3, 5, 7), 2, "auto")])
def test_ternary_exact_sparsity_and_levels(shape, axis, backend):
    for sparsity in [0.0, 0.25, 0.5, 0.9]:
        x = make_x(shape, seed=seed_of(shape, axis, sparsity))
        x.reshape(-1)[::5] = 0.5  # many ties in |x|
        out = kernels.fake_quantize_ternary(x, sparsity=sparsity, axis=axis, backend=backend)
        ref = kernels.fake_quantize_ternary_reference(x, sparsity=sparsity, axis=axis)
        assert torch.equal(out == 0, ref == 0) and torch.equal(out < 0, ref < 0)
        torch.testing.assert_close(out, ref, rtol=2e-7, atol=0)
        C = 1 if axis is None else shape[axis]
        flat = out.reshape(1, -1) if axis is None else out.movedim(axis, 0).reshape(C, -1)
        k = round(sparsity * flat.shape[1])
        assert flat.eq(0).sum(dim=1).tolist() == [k] * C
        for row in flat:
            assert len(set(row[row != 0].abs().tolist())) <= 1  # one magnitude s per channel


def test_ternary_ties_by_position():
    x = torch.tensor([1.0, -1.0, 1.0, 3.0, -1.0, 2.0])
    for backend in ["torch"] + (["native"] if NATIVE else []):
        out = kernels.fake_quantize_ternary(x, sparsity=0.5, backend=backend)
        assert out.tolist() == [0.0, 0.0, 0.0, 2.0, -2.0, 2.0]


# ------------------------------------------------------------------------------ STE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [None, 1])
def test_ste_gradient_matches_torch(axis, backend):
    x = make_x((64, 9), seed=6) * 2
    x[0, :3] = torch.tensor([math.nan, 100.0, -100.0])
    g = make_x((64, 9), seed=7)
    if axis is None:
        s, z = 0.03, 120
        ref_fn = lambda t: torch.fake_quantize_per_tensor_affine(t, s, z, 0, 255)  # noqa: E731
    else:
        s = torch.linspace(0.01, 0.09, 9)
        z = torch.arange(100, 109, dtype=torch.int32)
        ref_fn = lambda t: torch.fake_quantize_per_channel_affine(t, s, z, 1, 0, 255)  # noqa: E731
    a = x.clone().requires_grad_()
    y = kernels.fake_quantize_ste(a, axis=axis, scale=s, zero_point=z, backend=backend)
    y.backward(g)
    b = x.clone().requires_grad_()
    ref_fn(b).backward(g)
    assert torch.equal(a.grad, b.grad)
    fin = ~torch.isnan(x)
    assert torch.equal(y.detach()[fin], ref_fn(x)[fin])
    assert torch.isnan(y.detach()[0, 0])


def test_ste_derived_params_pass_gradient_inside_range():
    x = make_x(100, seed=1).requires_grad_()
    y = kernels.fake_quantize_ste(x, bits=4)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(100))  # min-max range: everything inside
    assert_bitwise_equal(y.detach(), kernels.fake_quantize(x.detach(), bits=4))


# ------------------------------------------------------------------------------ properties


@st.composite
def quant_problems(draw):
    n = draw(st.integers(0, 300))
    bits = draw(st.integers(2, 16))
    scheme = draw(st.sampled_from(["affine", "symmetric"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    mag = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return n, bits, scheme, dtype, seed, mag


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problem=quant_problems(), backend=st.sampled_from(["auto", "torch"]))
def test_property_grid_idempotence_error(problem, backend):
    n, bits, scheme, dtype, seed, mag = problem
    x = make_x(n, dtype, seed=seed, scale=mag)
    qmin, qmax = kernels.quant_range(bits, scheme)
    s, z = kernels.quantization_params(x, bits=bits, scheme=scheme)
    zp = z if scheme == "affine" else None
    y, codes = kernels.fake_quantize(x, bits=bits, scheme=scheme, scale=s, zero_point=zp,
                                     return_codes=True, backend=backend)
    sd, zd = s.double(), z.double()
    # on the grid: y == (code - zp) * scale with the code in range
    assert ((codes >= qmin) & (codes <= qmax)).all()
    assert_bitwise_equal(y, ((codes.to(dtype) - z.to(dtype)) * s))
    # idempotent with the same parameters
    y2 = kernels.fake_quantize(y, bits=bits, scheme=scheme, scale=s, zero_point=zp,
                               backend=backend)
    assert_bitwise_equal(y2, y)
    # error <= scale / 2 inside the representable range, up to the rounding of x * inv_scale
    # and of (q - zp) * scale in x.dtype (a few ulps of |x|)
    lo, hi = (qmin - zd) * sd, (qmax - zd) * sd
    xd = x.double()
    inside = (xd >= lo) & (xd <= hi)
    err = (y.double() - xd).abs()
    slack = 4 * torch.finfo(dtype).eps * (xd.abs() + sd)
    assert (err <= sd * 0.5 + slack)[inside].all()


# ------------------------------------------------------------------------------ input errors


def _x():
    return torch.ones(4, 3)


ERRORS = {
    "bits=0": (lambda b: kernels.fake_quantize(_x(), bits=0, backend=b), ValueError,
               r"bits=0 is out of range; allowed: an integer in 1\.\.16"),
    "bits=17": (lambda b: kernels.fake_quantize(_x(), bits=17, backend=b), ValueError,
                r"bits=17 is out of range"),
    "bad axis": (lambda b: kernels.fake_quantize(_x(), axis=2, backend=b), ValueError,
                 r"axis=2 is out of range for x with 2 dimensions; allowed: -2\.\.1 or None"),
    "bad scheme": (lambda b: kernels.fake_quantize(_x(), scheme="asym", backend=b), ValueError,
                   r"unknown scheme 'asym'; allowed: 'affine', 'symmetric'"),
    "symmetric 1 bit": (lambda b: kernels.fake_quantize(_x(), bits=1, scheme="symmetric",
                                                        backend=b), ValueError,
                        r"needs bits >= 2.*fake_quantize_sign"),
    "scale <= 0": (lambda b: kernels.fake_quantize(_x(), scale=0.0, zero_point=0, backend=b),
                   ValueError, r"scale=0\.0 .*finite and > 0"),
    "negative channel scale": (lambda b: kernels.fake_quantize(
        _x(), axis=1, scale=torch.tensor([1.0, -2.0, 1.0]), zero_point=0, backend=b),
        ValueError, r"scale\[1\]=-2\.0 \(as torch.float32\) is invalid"),
    "zero_point out of range": (lambda b: kernels.fake_quantize(_x(), scale=0.1, zero_point=256,
                                                                backend=b), ValueError,
                                r"zero_point=256\.0 is invalid; it must be an integer in \[0, 255\]"),
    "affine scale without zero_point": (lambda b: kernels.fake_quantize(_x(), scale=0.1,
                                                                        backend=b),
                                        ValueError, r"needs zero_point too"),
    "out shape": (lambda b: kernels.fake_quantize(_x(), out=torch.empty(3, 4), backend=b),
                  ValueError, r"out has shape \(3, 4\) but x has shape \(4, 3\)"),
    "out dtype": (lambda b: kernels.fake_quantize(_x(), out=torch.empty(4, 3, dtype=torch.float64),
                                                  backend=b),
                  TypeError, r"out has dtype torch.float64 but x has dtype torch.float32"),
    "out not contiguous": (lambda b: kernels.fake_quantize(_x(), out=torch.empty(3, 4).t(),
                                                           backend=b),
                           ValueError, r"out is not contiguous"),
    "stochastic without seed": (lambda b: kernels.fake_quantize(_x(), rounding="stochastic",
                                                                backend=b),
                                ValueError, r"rounding='stochastic' requires an integer seed"),
    "bad rounding": (lambda b: kernels.fake_quantize(_x(), rounding="up", backend=b), ValueError,
                     r"unknown rounding 'up'"),
    "sparsity=1.5": (lambda b: kernels.fake_quantize_ternary(_x(), sparsity=1.5, backend=b),
                     ValueError, r"sparsity=1\.5 is out of range; allowed: 0 <= sparsity < 1"),
    "ternary NaN": (lambda b: kernels.fake_quantize_ternary(torch.tensor([math.nan, 1.0]),
                                                            backend=b),
                    ValueError, r"x contains NaN"),
    "int tensor": (lambda b: kernels.fake_quantize(torch.ones(4, dtype=torch.int64), backend=b),
                   TypeError, r"x has dtype torch.int64; allowed: torch.float32 or torch.float64"),
    "int tensor sign": (lambda b: kernels.fake_quantize_sign(torch.ones(4, dtype=torch.int32),
                                                             backend=b),
                        TypeError, r"x has dtype torch.int32"),
    "mask shape": (lambda b: kernels.masked_fake_quantize(_x(), torch.ones(3, 4, dtype=torch.bool),
                                                          backend=b),
                   ValueError, r"mask has shape \(3, 4\) but x has shape \(4, 3\)"),
    "mask dtype": (lambda b: kernels.masked_fake_quantize(_x(), torch.ones(4, 3, dtype=torch.int64),
                                                          backend=b),
                   TypeError, r"mask has dtype torch.int64"),
    "unknown backend": (lambda b: kernels.fake_quantize(_x(), backend="cuda"), ValueError,
                        r"unknown backend 'cuda'"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_input_errors(case):
    # Every backend: the errors do not depend on which one would have run.
    fn, exc, match = ERRORS[case]
    for backend in ["auto", "torch"] + (["native"] if NATIVE else []):
        with pytest.raises(exc, match=match):
            fn(backend)


@needs_native
def test_native_rejects_noncontiguous():
    x = make_x((30, 20), seed=1).t()
    for call in (lambda: kernels.fake_quantize(x, backend="native"),
                 lambda: kernels.fake_quantize_sign(x, backend="native"),
                 lambda: kernels.masked_fake_quantize(x.contiguous(),
                                                      torch.ones(30, 20, dtype=torch.bool).t(),
                                                      backend="native")):
        with pytest.raises(RuntimeError, match=r"backend='native' cannot run: (x|mask) is not contiguous"):
            call()


@needs_native
def test_extension_validates_numpy_inputs():
    # What keeps the kernel in bounds. The VALUE rules (scale > 0, zero point in range, out
    # not partially overlapping x) are the kernels module's, checked once on every backend
    # (ERRORS above, test_cuda_emulated's overlapping-buffers test).
    C = _native._C
    a = np.ones((4, 5), dtype=np.float32)
    p = np.ones(1, dtype=np.float32)
    kw = dict(quant_min=0, quant_max=255, scale=p, zero_point=p.copy(), derive=False)
    with pytest.raises(TypeError, match=r"x has dtype int32"):
        C.fake_quantize(np.ones(3, dtype=np.int32), np.ones(3, dtype=np.int32), **kw)
    with pytest.raises(ValueError, match=r"out has shape \(5, 4\) but x has shape \(4, 5\)"):
        C.fake_quantize(a, np.ones((5, 4), dtype=np.float32), **kw)
    with pytest.raises(ValueError, match=r"x is not C-contiguous"):
        C.fake_quantize(a.T, np.ones((5, 4), dtype=np.float32), **kw)
    with pytest.raises(ValueError, match=r"scale has shape \(1,\); expected \(5,\)"):
        C.fake_quantize(a, a.copy(), axis=1, **kw)
    with pytest.raises(ValueError, match=r"axis 2 is out of range"):
        C.fake_quantize(a, a.copy(), axis=2, **kw)
    with pytest.raises(ValueError, match=r"quant_min=5, quant_max=5"):
        C.fake_quantize(a, a.copy(), **{**kw, "quant_min": 5, "quant_max": 5})


# ------------------------------------------------------------------------------ backends


def test_auto_without_extension_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("simulated: no _C"))
    monkeypatch.setattr(_dispatch, "_warned_missing", False)
    x = make_x(1000, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = kernels.fake_quantize(x)
        kernels.masked_fake_quantize(x, x > 0)
        kernels.fake_quantize_sign(x)
    assert kernels.last_backend() == "torch"
    assert len([w for w in caught if issubclass(w.category, kernels.NativeKernelWarning)]) == 1
    assert_bitwise_equal(a, kernels.fake_quantize_reference(x))
    with pytest.raises(RuntimeError, match=r"simulated: no _C"):
        kernels.fake_quantize(x, backend="native")


def test_public_names_exported():
    for name in ["fake_quantize", "fake_quantize_reference", "fake_quantize_sign",
                 "fake_quantize_ternary", "masked_fake_quantize", "FakeQuantizeSTE",
                 "fake_quantize_ste", "quantization_params", "quant_range"]:
        assert name in kernels.__all__ and hasattr(kernels, name)
