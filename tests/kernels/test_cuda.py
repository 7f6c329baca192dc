"""CUDA twins of the element-wise kernels (csrc/cuda/*.cu): CPU-vs-CUDA parity, torchvision style.

The parity tests need a CUDA device AND a MIAFW_CUDA=1 build of mia_core._C; they are marked
``needs_cuda`` and skipped with the reason otherwise. The tests at the bottom run everywhere:
they check the build flag and what the dispatch does when the extension has no CUDA kernels.
The parameter sweeps cover every pair of values (kernel_helpers.all_pairs), not every
combination.
"""

import math
import pathlib
import shutil
import subprocess

import pytest
import torch

from mia_core import kernels
from mia_core.kernels import _dispatch, _kl, _mask, _native, _quant
from kernel_helpers import all_pairs, assert_bitwise_equal, make_weights

C = _native._C
HAS_CUDA_KERNELS = _native.cuda_kernels() is not None
HAS_GPU = torch.cuda.is_available()

if not HAS_GPU:
    CUDA_SKIP_REASON = "no CUDA device (torch.cuda.is_available() is False)"
elif not HAS_CUDA_KERNELS:
    CUDA_SKIP_REASON = "mia_core._C was built without CUDA kernels (rebuild with MIAFW_CUDA=1 and nvcc)"
else:
    CUDA_SKIP_REASON = None


def needs_cuda(fn):
    """Marks ``needs_cuda`` and skips with the reason without a GPU or without CUDA kernels."""
    fn = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")(fn)
    return pytest.mark.needs_cuda(fn)


SIZES = [0, 1, 7, 1001, 300_003]
DTYPES = [torch.float32, torch.float64]


# ------------------------------------------------------------------------------ masks


@needs_cuda
@pytest.mark.parametrize("dtype,kind,seed", [(torch.float32, "bool", 0), (torch.float32, "float", 1),
                                             (torch.float64, "bool", 1), (torch.float64, "float", 0)])
def test_apply_masks_cuda_parity(dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [make_weights(n, dtype, g) for n in SIZES]
    if kind == "bool":
        ms = [torch.rand(n, generator=g) < 0.5 for n in SIZES]
    else:
        ms = [torch.where(torch.rand(n, generator=g) < 0.5, 0.0, 1.0).to(dtype) for n in SIZES]
        if SIZES[-1]:
            ms[-1][:5] = torch.tensor([math.nan, -0.0, 2.5, math.inf, 0.0], dtype=dtype)
    expected = [t.clone() for t in ts]
    _mask.apply_masks_reference(expected, ms)
    dev = [t.cuda() for t in ts]
    ran = kernels.apply_masks(dev, [m.cuda() for m in ms], backend="native")
    assert ran == "native"
    torch.cuda.synchronize()
    for a, e in zip(dev, expected):
        assert_bitwise_equal(a, e)


@needs_cuda
def test_apply_masks_cuda_mixed_kinds_one_call_and_stream():
    g = torch.Generator().manual_seed(3)
    ts = [make_weights(5, torch.float32, g), make_weights(0, torch.float64, g), make_weights(70_001, torch.float64, g),
          make_weights(3, torch.float32, g)]
    ms = [torch.rand(5, generator=g) < 0.5, torch.ones(0, dtype=torch.float64),
          torch.randn(70_001, generator=g, dtype=torch.float64), torch.tensor([0.0, 1.0, -1.0])]
    expected = [t.clone() for t in ts]
    _mask.apply_masks_reference(expected, ms)
    dev = [t.cuda() for t in ts]
    dms = [m.cuda() for m in ms]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        assert kernels.apply_masks(dev, dms, backend="native") == "native"
    s.synchronize()
    for a, e in zip(dev, expected):
        assert_bitwise_equal(a, e)


@needs_cuda
def test_apply_masks_cuda_refusals():
    t = torch.randn(4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="not contiguous"):
        kernels.apply_masks([t.t()], [torch.ones(4, 4, device="cuda")], backend="native")
    # auto falls back to the reference (which runs on the GPU) for a strided tensor
    u = t.clone()
    assert kernels.apply_masks([u.t()], [torch.zeros(4, 4, device="cuda")]) == "torch"
    assert torch.count_nonzero(u) == 0
    # float16 is not a CUDA-twin dtype
    h = torch.randn(8, device="cuda", dtype=torch.float16)
    assert kernels.apply_masks([h], [torch.ones(8, device="cuda", dtype=torch.bool)]) == "torch"


@needs_cuda
def test_mask_plan_cuda_one_launch_per_apply_and_stale_detection():
    g = torch.Generator().manual_seed(8)
    ts = [make_weights(n, torch.float32, g).cuda() for n in (5, 1001, 70_003)]
    ms = [(torch.rand(n, generator=g) < 0.5).cuda() for n in (5, 1001, 70_003)]
    expected = [t.cpu() for t in ts]
    _mask.apply_masks_reference(expected, [m.cpu() for m in ms])
    plan = kernels.MaskPlan(ts, ms, backend="native")
    assert plan.backend == "native"
    assert plan.apply() == "native"
    torch.cuda.synchronize()
    for a, e in zip(ts, expected):
        assert_bitwise_equal(a, e)
    ts[1].data = torch.ones(1001, device="cuda")
    assert plan.stale_index() == 1
    with pytest.raises(kernels.StaleMaskPlanError, match=r"tensors\[1\] was reallocated"):
        plan.apply()
    assert torch.all(ts[1] == 1)  # nothing was written
    plan.rebuild().apply()
    torch.cuda.synchronize()
    assert_bitwise_equal(ts[1], torch.where(ms[1], torch.ones(1001, device="cuda"), 0.0))


# ------------------------------------------------------------------------------ KL


@needs_cuda
@pytest.mark.parametrize("shape,direction,dtype", all_pairs(
    [(0,), (1,), (7,), (100_003,), (5, 3), (1001, 17), (0, 4)], ["forward", "reverse", "symmetric"],
    DTYPES))
def test_gaussian_kl_cuda_parity(dtype, direction, shape):
    g = torch.Generator().manual_seed(sum(shape) + 7)
    mu0 = torch.randn(shape, generator=g, dtype=dtype)
    mu1 = torch.randn(shape, generator=g, dtype=dtype)
    v0 = torch.rand(shape, generator=g, dtype=dtype) * 4 + 1e-3
    v1 = torch.rand(shape, generator=g, dtype=dtype) * 4 + 1e-3
    if mu0.numel() > 2:
        v0.view(-1)[0] = 1e-30 if dtype == torch.float32 else 1e-300  # extreme ratio: two-log path
    expected = _kl.gaussian_kl_reference(mu0, v0, mu1, v1, direction=direction)
    got = kernels.gaussian_kl(mu0.cuda(), v0.cuda(), mu1.cuda(), v1.cuda(), direction=direction,
                              backend="native")
    assert got.device.type == "cuda" and got.dtype == dtype and got.shape == expected.shape
    rtol, atol = (2e-5, 1e-5) if dtype == torch.float32 else (1e-10, 1e-12)
    torch.testing.assert_close(got.cpu(), expected, rtol=rtol, atol=atol)
    # and against the CPU native kernel where it is built
    if C is not None:
        cpu = kernels.gaussian_kl(mu0, v0, mu1, v1, direction=direction, backend="native")
        torch.testing.assert_close(got.cpu(), cpu, rtol=rtol, atol=atol)


@needs_cuda
@pytest.mark.parametrize("dim", [1, 2])
def test_gaussian_kl_cuda_first_bad_index(dim):
    shape = (50_000,) if dim == 1 else (10_000, 5)
    mu = torch.zeros(shape)
    v0 = torch.ones(shape)
    v1 = torch.ones(shape)
    v1.view(-1)[123] = -1.0
    v0.view(-1)[40_000] = math.nan
    v0.view(-1)[123] = 0.0  # same element: var0 is reported before var1
    with pytest.raises(ValueError) as ref:
        _kl.gaussian_kl_reference(mu, v0, mu, v1)
    with pytest.raises(ValueError) as got:
        kernels.gaussian_kl(mu.cuda(), v0.cuda(), mu.cuda(), v1.cuda(), backend="native")
    assert str(got.value) == str(ref.value)


@needs_cuda
def test_gaussian_kl_cuda_out_and_fallbacks():
    mu = torch.randn(9, 2, device="cuda")
    v = torch.rand(9, 2, device="cuda") + 0.5
    out = torch.empty(9, device="cuda")
    assert kernels.gaussian_kl(mu, v, mu.flip(0), v.flip(0), out=out, backend="native") is out
    # requires grad: auto -> reference (differentiable), native -> error
    vg = v.clone().requires_grad_()
    r = kernels.gaussian_kl(mu, vg, mu, v)
    r.sum().backward()
    with pytest.raises(RuntimeError, match="requires grad"):
        kernels.gaussian_kl(mu, vg, mu, v, backend="native")


# ------------------------------------------------------------------------------ fake quantize


@needs_cuda
@pytest.mark.parametrize("n,scheme_bits,dtype", all_pairs(
    SIZES, [("affine", 8), ("symmetric", 4), ("affine", 16)], DTYPES))
def test_fake_quantize_cuda_per_tensor_parity(dtype, n, scheme_bits):
    scheme, bits = scheme_bits
    g = torch.Generator().manual_seed(n + bits)
    x = make_weights(n, dtype, g) * 3
    scale = 0.0625 if scheme == "symmetric" else 0.02
    zp = 0 if scheme == "symmetric" else 7
    if n > 8:
        x[:8] = torch.tensor([0.5, 1.5, -0.5, -2.5, 2.5, -0.01, 0.01, -0.0], dtype=dtype) * scale
    kw = dict(bits=bits, scheme=scheme, scale=scale, zero_point=zp, return_codes=True)
    eo, ec = _quant.fake_quantize_reference(x, **kw)
    go, gc = kernels.fake_quantize(x.cuda(), backend="native", **kw)
    assert kernels.last_backend() == "native"
    assert_bitwise_equal(go, eo)
    assert torch.equal(gc.cpu(), ec)
    if C is not None:  # the CPU kernel agrees bit for bit too
        co, cc = kernels.fake_quantize(x, backend="native", **kw)
        assert_bitwise_equal(go, co)
        assert torch.equal(gc.cpu(), cc)
    if dtype == torch.float32:  # torch's own op (CUDA) on non-NaN input
        xf = torch.nan_to_num(x, nan=0.0).cuda()
        qmin, qmax = _quant.quant_range(bits, scheme)
        t = torch.fake_quantize_per_tensor_affine(xf, scale, zp, qmin, qmax)
        assert_bitwise_equal(kernels.fake_quantize(xf, backend="native", bits=bits, scheme=scheme,
                                                   scale=scale, zero_point=zp), t)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((3, 5, 7), 1), ((64, 1001), 0), ((33, 4), 1), ((0, 3), 1),
                                        ((2, 3, 4), -1)])
def test_fake_quantize_cuda_per_channel_parity(dtype, shape, axis):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=dtype) * 2
    C_ = shape[axis]
    scale = torch.rand(C_, generator=g, dtype=dtype) * 0.1 + 0.01
    zp = torch.randint(0, 256, (C_,), generator=g)
    kw = dict(bits=8, scheme="affine", axis=axis, scale=scale, zero_point=zp, return_codes=True)
    eo, ec = _quant.fake_quantize_reference(x, **kw)
    go, gc = kernels.fake_quantize(x.cuda(), backend="native", **{**kw, "scale": scale.cuda(),
                                                                  "zero_point": zp.cuda()})
    assert_bitwise_equal(go, eo)
    assert torch.equal(gc.cpu(), ec)
    if dtype == torch.float32 and x.numel():
        t = torch.fake_quantize_per_channel_affine(x.cuda(), scale.cuda(), zp.to(torch.int32).cuda(),
                                                   axis % x.dim(), 0, 255)
        assert_bitwise_equal(go, t)


@needs_cuda
def test_fake_quantize_cuda_in_place_and_fallbacks():
    x = torch.randn(1000, device="cuda")
    expected = _quant.fake_quantize_reference(x.cpu(), scale=0.05, zero_point=128)
    y = kernels.fake_quantize(x, scale=0.05, zero_point=128, out=x, backend="native")
    assert y is x
    assert_bitwise_equal(x, expected)
    # derived min-max parameters: torch's aminmax on the GPU, then the twin (CPU kernel's bits)
    z = torch.randn(100, 3, device="cuda")
    got = kernels.fake_quantize(z, axis=1, backend="native")
    assert kernels.last_backend() == "native"
    if C is not None:
        assert_bitwise_equal(got, kernels.fake_quantize(z.cpu(), axis=1, backend="native"))
    # out of the CUDA twin's scope (a strided x): auto -> the torch reference on the GPU,
    # native -> a clear error
    s = torch.randn(10, 10, device="cuda").t()
    r = kernels.fake_quantize(s, scale=0.1, zero_point=3)
    assert kernels.last_backend() == "torch" and r.device.type == "cuda"
    with pytest.raises(RuntimeError, match="cannot run"):
        kernels.fake_quantize(s, scale=0.1, zero_point=3, backend="native")


@needs_cuda
@pytest.mark.parametrize("mask_kind,dtype,rounding,axis", all_pairs(
    [None, "bool", "float"], DTYPES, ["nearest", "stochastic"], [None, 1]))
def test_fake_quantize_cuda_masked_and_stochastic_match_cpu_kernel(dtype, mask_kind, rounding, axis):
    g = torch.Generator().manual_seed(11)
    x = make_weights(3 * 1001 * 7, dtype, g).reshape(3, 1001, 7) * 2
    if mask_kind is None:
        mask = None
    elif mask_kind == "bool":
        mask = torch.rand(x.shape, generator=g) < 0.6
    else:
        mask = torch.randn(x.shape, generator=g, dtype=dtype)
    if axis is None:
        scale, zp = 0.03, 100
    else:
        scale = torch.rand(1001, generator=g, dtype=dtype) * 0.1 + 0.01
        zp = torch.randint(0, 256, (1001,), generator=g)
    kw = dict(axis=axis, scale=scale, zero_point=zp, rounding=rounding,
              seed=1234 if rounding == "stochastic" else None, return_codes=True)
    if mask is None:
        ref = kernels.fake_quantize(x, backend="native" if C is not None else "torch", **kw)
        got = kernels.fake_quantize(x.cuda(), backend="native", **_to_cuda(kw))
    else:
        ref = kernels.masked_fake_quantize(x, mask, backend="native" if C is not None else "torch", **kw)
        got = kernels.masked_fake_quantize(x.cuda(), mask.cuda(), backend="native", **_to_cuda(kw))
    assert kernels.last_backend() == "native"
    assert_bitwise_equal(got[0], ref[0])
    assert torch.equal(got[1].cpu(), ref[1])


def _to_cuda(kw):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


# ------------------------------------------------------------------------------ everywhere


def test_build_info_cuda_flag_matches_functions():
    if C is None:
        pytest.skip("mia_core._C is not built")
    info = C.build_info()
    has = [hasattr(C, f) for f in ("cuda_apply_masks", "cuda_gaussian_kl", "cuda_fake_quantize")]
    assert has == [info["cuda"]] * 3


class _NoCudaC:
    """An extension without CUDA kernels (whatever this build is): for the dispatch tests."""

    def __getattr__(self, name):
        if name.startswith("cuda_"):
            raise AttributeError(name)
        return getattr(C, name)


@pytest.fixture
def no_cuda_kernels(monkeypatch):
    if C is None:
        pytest.skip("mia_core._C is not built")
    monkeypatch.setattr(_native, "_C", _NoCudaC())


# The refusals below are what apply_masks / gaussian_kl / fake_quantize ask the dispatcher
# about for CUDA tensors; without a GPU they are driven with CPU tensors (only the decision
# is tested).


def test_cuda_dispatch_native_without_cuda_kernels_raises(no_cuda_kernels):
    x = torch.ones(4)
    t, m = [torch.ones(3)], [torch.ones(3, dtype=torch.bool)]
    refusals = [_mask._cuda_mask_refusal(t, m),
                _kl._cuda_refusal((x, x, x, x), ("mu0", "var0", "mu1", "var1"), "native"),
                _quant._cuda_refusal(x, None)]
    for refusal in refusals:
        with pytest.raises(RuntimeError, match="built without CUDA kernels; rebuild with MIAFW_CUDA=1"):
            _dispatch.choose("native", lambda b: refusal)


def test_cuda_dispatch_auto_without_cuda_kernels_falls_back(no_cuda_kernels):
    x = torch.ones(4)
    t, m = [torch.ones(3)], [torch.ones(3, dtype=torch.bool)]
    for refusal in (_mask._cuda_mask_refusal(t, m),
                    _kl._cuda_refusal((x, x, x, x), ("mu0", "var0", "mu1", "var1"), "auto"),
                    _quant._cuda_refusal(x, None)):
        assert refusal is _dispatch.NO_CUDA_KERNELS
        assert _dispatch.choose("auto", lambda b: refusal) == "torch"
        assert kernels.last_backend() == "torch"


def test_cuda_kernels_none_without_extension(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    assert _native.cuda_kernels() is None


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (the CUDA twins are only compiled where it is)")
@pytest.mark.parametrize("twin", sorted(p.name for p in (pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cuda").glob("*.cu")))
def test_twin_compiles_with_nvcc(twin, tmp_path):
    """Device compilation of each twin (sm_90 only, to stay quick) with setup.py's flags: the
    emulated tests compile the same sources as host C++, which cannot catch device-only errors
    (a host-only function called from a kernel, say). ``--ptx`` runs the device front end
    and NVVM, where those errors are found, in a quarter of a full compile's time; ptxas and
    nvcc's host pass run in every MIAFW_CUDA=1 build (and the emulation build compiles the
    host side as C++)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    setup_text = (root / "setup.py").read_text()
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--fmad=false"]
    for f in flags:
        assert f'"{f}"' in setup_text, f"setup.py no longer passes {f} to nvcc; update this test"
    cmd = [NVCC, *flags, "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC",
           "-I", str(root / "csrc"), "--ptx", str(root / "csrc" / "cuda" / twin),
           "-o", str(tmp_path / "twin.ptx")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]
