"""Op tests for mia_core.kernels mask application (torchvision test_ops style).

The oracle is ``apply_masks_reference`` (pure torch); every backend must match it bit for bit.
Native-only tests skip with a reason when the extension is not built.

Grid: the size/count/dtype/mask-kind sweep runs on the native kernel, covering every pair of
values (kernel_helpers.all_pairs) rather than every combination; ``auto`` (the same kernel
after the dispatcher's choice) and ``torch`` (the reference itself) get one case each there,
and the random sweep is hypothesis with a bounded number of examples.
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
from kernel_helpers import all_pairs, assert_bitwise_equal, bits, make_weights

NATIVE = kernels.native_available()
needs_native = pytest.mark.skipif(
    not NATIVE,
    reason="mia_core._C is not built (run `python setup.py build_ext --inplace`): "
    f"{kernels.backend_info()['import_error']}",
)
BACKENDS = ["native", "auto", "torch"]
THRESHOLD = 65536  # csrc/kernels/mask.h kMaskParallelThreshold


def _backend_param(name):
    return pytest.param(name, marks=needs_native) if name == "native" else name


BACKEND_PARAMS = [_backend_param(b) for b in BACKENDS]


# ------------------------------------------------------------------------------ helpers


def make_mask(n, dtype, kind, g):
    if kind == "bool":
        return torch.rand(n, generator=g) < 0.5
    # Mostly a 0/1 pruning mask, plus values that exercise IEEE corner cases.
    # Only the default (positive, quiet) NaN is used, so NaN * NaN has one possible result.
    vals = torch.tensor([0.0, 1.0, 0.0, 1.0, -0.0, 0.5, -1.0, 3.0, math.nan, math.inf, 1e-10],
                        dtype=dtype)
    return vals[torch.randint(0, len(vals), (n,), generator=g)]


def make_case(seed, dtype, kind, sizes):
    g = torch.Generator().manual_seed(seed)
    tensors = [make_weights(n, dtype, g) for n in sizes]
    masks = [make_mask(n, dtype, kind, g) for n in sizes]
    return tensors, masks


def check_against_reference(tensors, masks, backend):
    expected = [t.clone() for t in tensors]
    kernels.apply_masks_reference(expected, masks)
    ran = kernels.apply_masks(tensors, masks, backend=backend)
    for a, e in zip(tensors, expected):
        assert_bitwise_equal(a, e)
    return ran


# ------------------------------------------------------------------------------ reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_formula(dtype):
    w = torch.tensor([1.5, -1.0, math.nan, math.inf, -0.0, 2.0], dtype=dtype)
    fm = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -0.0], dtype=dtype)
    bm = torch.tensor([False, False, True, False, True, False])
    a, b = w.clone(), w.clone()
    kernels.apply_masks_reference([a, b], [fm, bm])
    assert_bitwise_equal(a, w * fm)
    assert_bitwise_equal(b, torch.where(bm, w, torch.zeros((), dtype=dtype)))
    # The corner cases the kernel must reproduce.
    assert math.copysign(1.0, a[1].item()) == -1.0  # -1 * 0 = -0.0
    assert math.isnan(a[2].item()) and math.isnan(a[3].item())  # NaN * 0, inf * 0
    assert math.copysign(1.0, a[5].item()) == -1.0  # 2 * -0.0 = -0.0
    assert bits(b[[0, 1, 3, 5]]).eq(0).all()  # dropped -> +0.0, whatever the weight
    assert math.isnan(b[2].item()) and math.copysign(1.0, b[4].item()) == -1.0  # kept bits


# ------------------------------------------------------------------------------ correctness


# sizes 0, 1, odd, and large (>= 65536: the OpenMP path) x 1, 3, 50 tensors x dtype x mask
# kind, every pair of values on the native kernel; auto and torch once each.
APPLY_GRID = [pytest.param(*row, "native", marks=needs_native) for row in all_pairs(
    [0, 1, 7, 1023, 70001], [1, 3, 50], [torch.float32, torch.float64], ["bool", "float"])] + [
    (1023, 3, torch.float32, "float", "auto"), (7, 3, torch.float64, "bool", "torch")]


@pytest.mark.parametrize("size,count,dtype,kind,backend", APPLY_GRID)
def test_apply_masks_matches_reference(dtype, kind, size, count, backend):
    seed = zlib.crc32(f"{dtype}-{kind}-{size}-{count}".encode())  # stable across processes
    tensors, masks = make_case(seed, dtype, kind, [size] * count)
    ran = check_against_reference(tensors, masks, backend)
    assert ran == ("torch" if backend == "torch" or not NATIVE else "native")


@pytest.mark.parametrize("seed,backend", [pytest.param(0, "native", marks=needs_native), (1, "auto")])
def test_many_small_tensors_cross_parallel_threshold(seed, backend):
    # Each tensor is far below the threshold, their total is above it: the native kernel
    # opens one parallel region whose thread ranges start and end inside tensors.
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 1500, (120,), generator=g).tolist()
    assert max(sizes) < THRESHOLD < sum(sizes)
    for dtype, kind in [(torch.float32, "float"), (torch.float64, "bool")]:
        tensors, masks = make_case(seed, dtype, kind, sizes)
        check_against_reference(tensors, masks, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_mixed_dtypes_and_mask_kinds_in_one_call(backend):
    g = torch.Generator().manual_seed(7)
    tensors, masks = [], []
    for i, (dtype, kind) in enumerate(
        [(torch.float32, "bool"), (torch.float64, "float"), (torch.float32, "float"),
         (torch.float64, "bool")] * 6
    ):
        n = 5000 + 37 * i
        w = make_weights(n, dtype, g)
        tensors.append(w.reshape(-1, 1) if i % 2 else w)
        masks.append(make_mask(n, dtype, kind, g).reshape(tensors[-1].shape))
    check_against_reference(tensors, masks, backend)


@needs_native
@pytest.mark.parametrize("num_threads", [1, 3, 64])
def test_native_thread_splits_are_exact(num_threads):
    # More threads than cores is fine: it exercises the static split, not the speed.
    tensors, masks = make_case(11, torch.float32, "float", [1, 70001, 0, 3, 4099, 65536, 17])
    expected = [t.clone() for t in tensors]
    kernels.apply_masks_reference(expected, masks)
    _native._C.apply_masks([t.numpy() for t in tensors], [m.numpy() for m in masks],
                           num_threads=num_threads)
    for a, e in zip(tensors, expected):
        assert_bitwise_equal(a, e)


@pytest.mark.parametrize("backend", [_backend_param("native"), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ieee_corner_cases_bitwise(dtype, backend):
    w = torch.tensor([1.0, -1.0, math.nan, math.inf, -math.inf, 0.0, -0.0, 2.0, 1e-40, -3.0],
                     dtype=dtype)
    fm = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -0.0, math.nan, -0.0, 1e-10, math.inf],
                      dtype=dtype)
    # A NaN with a payload: a kept element must keep its exact bits under a bool mask.
    odd_nan = torch.tensor([0x7FC00123 if dtype == torch.float32 else 0x7FF8000000000123],
                           dtype=torch.int32 if dtype == torch.float32 else torch.int64)
    w_nan = torch.cat([w, odd_nan.view(dtype)])
    bm = torch.tensor([False, True, True, False, True, False, True, False, True, False, True])
    a = w.clone()
    check_against_reference([a], [fm], backend)
    assert math.copysign(1.0, a[1].item()) == -1.0 and math.isnan(a[2].item())
    b = w_nan.clone()
    check_against_reference([b], [bm], backend)
    assert bits(b[-1:]).item() == odd_nan.item()
    assert bits(b[~bm]).eq(0).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_multidim_views_and_shared_masks(backend):
    g = torch.Generator().manual_seed(3)
    big = make_weights(2 * 40 * 30, torch.float32, g)
    halves = [big[: 1200].view(40, 30), big[1200:].view(40, 30)]  # disjoint views, one storage
    mask = make_mask(1200, torch.float32, "float", g).view(40, 30)
    expected = big.clone()
    kernels.apply_masks_reference([expected[:1200].view(40, 30), expected[1200:].view(40, 30)],
                                  [mask, mask])
    kernels.apply_masks(halves, [mask, mask], backend=backend)  # one mask shared by both
    assert_bitwise_equal(big, expected)  # the writes landed in the original storage


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_mask_is_its_own_tensor(backend):
    t = make_weights(1000, torch.float64, torch.Generator().manual_seed(5))
    expected = t.clone()
    expected.mul_(expected)
    kernels.apply_masks([t], [t], backend=backend)
    assert_bitwise_equal(t, expected)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_empty_list(backend):
    ran = kernels.apply_masks([], [], backend=backend)
    assert ran == ("torch" if backend == "torch" or not NATIVE else "native")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_parameters_requiring_grad(backend):
    g = torch.Generator().manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    params = list(model.parameters())
    masks = [torch.rand(p.shape, generator=g) < 0.5 for p in params]
    expected = [p.detach().clone() for p in params]
    kernels.apply_masks_reference(expected, masks)
    versions = [p._version for p in params]
    ptrs = [p.data_ptr() for p in params]
    kernels.apply_masks(model.parameters(), masks, backend=backend)  # outside no_grad
    for p, e, v, ptr in zip(params, expected, versions, ptrs):
        assert p.requires_grad and p.grad_fn is None
        assert p.data_ptr() == ptr and p._version > v  # in place; autograd was told
        assert_bitwise_equal(p.detach(), e)


# ------------------------------------------------------------------------------ property


@st.composite
def mask_problems(draw):
    count = draw(st.integers(0, 6))
    items = []
    for _ in range(count):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(0, 50), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        kind = draw(st.sampled_from(["bool", "float"]))
        items.append((shape, dtype, kind))
    return items, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problem=mask_problems(), backend=st.sampled_from(["auto", "torch"]))
def test_property_matches_reference(problem, backend):
    items, seed = problem
    g = torch.Generator().manual_seed(seed)
    tensors, masks = [], []
    for shape, dtype, kind in items:
        n = math.prod(shape)
        tensors.append(make_weights(n, dtype, g).reshape(shape))
        masks.append(make_mask(n, dtype, kind, g).reshape(shape))
    ran = check_against_reference(tensors, masks, backend)
    assert ran == ("native" if backend == "auto" and NATIVE else "torch")


# ------------------------------------------------------------------------------ input errors


def _pair(n=4, dtype=torch.float32):
    return torch.ones(n, dtype=dtype), torch.ones(n, dtype=torch.bool)


def _err_cases():
    t, m = _pair()
    return {
        "length mismatch": ([t, t.clone()], [m], ValueError, r"2 tensors but 1 masks"),
        "shape mismatch": ([t, torch.ones(3, 2)], [m, torch.ones(2, 3, dtype=torch.bool)],
                           ValueError, r"masks\[1\] has shape \(2, 3\) but tensors\[1\] has shape \(3, 2\)"),
        "int tensor": ([torch.ones(4, dtype=torch.int64)], [m], TypeError,
                       r"tensors\[0\] has dtype torch.int64; allowed: a floating-point dtype"),
        "mask dtype": ([t, t.clone()], [m, torch.ones(4, dtype=torch.float64)], TypeError,
                       r"masks\[1\] has dtype torch.float64; allowed: torch.bool or torch.float32"),
        "int mask": ([t], [torch.ones(4, dtype=torch.uint8)], TypeError, r"masks\[0\] has dtype torch.uint8"),
        "not a tensor": ([t, np.ones(4, dtype=np.float32)], [m, m], TypeError,
                         r"tensors\[1\] must be a torch.Tensor, got ndarray"),
        "bare tensor": (t, [m], TypeError, r"tensors must be a sequence of tensors"),
    }


@pytest.mark.parametrize("case", list(_err_cases()))
def test_input_errors(case):
    # Every backend: the errors do not depend on which one would have run.
    tensors, masks, exc, match = _err_cases()[case]
    before = [t.clone() if isinstance(t, torch.Tensor) else t.copy() for t in tensors] \
        if isinstance(tensors, list) else None
    for backend in ["auto", "torch"] + (["native"] if NATIVE else []):
        with pytest.raises(exc, match=match):
            kernels.apply_masks(tensors, masks, backend=backend)
        if before is not None:  # validation happens before anything is written
            for t, b in zip(tensors, before):
                assert (t == b).all()
    with pytest.raises(exc, match=match):
        kernels.apply_masks_reference(tensors, masks)


def test_error_leaves_earlier_tensors_untouched():
    tensors, masks = make_case(1, torch.float32, "bool", [100, 100, 100])
    masks[2] = masks[2][:50]
    before = [t.clone() for t in tensors]
    for backend in ["auto", "torch"] + (["native"] if NATIVE else []):
        with pytest.raises(ValueError, match=r"masks\[2\]"):
            kernels.apply_masks(tensors, masks, backend=backend)
        for t, b in zip(tensors, before):
            assert_bitwise_equal(t, b)


def test_unknown_backend():
    t, m = _pair()
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; allowed: 'auto', 'native', 'torch'"):
        kernels.apply_masks([t], [m], backend="cuda")


def _noncontiguous():
    g = torch.Generator().manual_seed(2)
    t = make_weights(600, torch.float32, g).view(20, 30).t()  # transposed: not contiguous
    m = make_mask(600, torch.float32, "float", g).view(30, 20)
    return t, m


@needs_native
def test_native_rejects_noncontiguous_clearly():
    t, m = _noncontiguous()
    before = t.clone()
    with pytest.raises(RuntimeError, match=r"tensors\[0\] is not contiguous"):
        kernels.apply_masks([t], [m], backend="native")
    with pytest.raises(RuntimeError, match=r"masks\[1\] is not contiguous"):
        kernels.apply_masks([t.contiguous(), t.contiguous()], [m.contiguous(), m.t().contiguous().t()],
                            backend="native")
    assert_bitwise_equal(t, before)


def test_auto_noncontiguous_falls_back_and_is_correct():
    t, m = _noncontiguous()
    expected = t.clone()
    expected.mul_(m)
    assert kernels.apply_masks([t], [m]) == "torch"
    assert_bitwise_equal(t, expected)


@needs_native
def test_native_rejects_half_and_auto_falls_back():
    t = torch.randn(64, dtype=torch.float16)
    m = torch.rand(64) < 0.5
    with pytest.raises(RuntimeError,
                       match=r"tensors\[0\] has dtype torch.float16; the native kernel supports"):
        kernels.apply_masks([t], [m], backend="native")
    expected = t.clone()
    expected.masked_fill_(~m, 0)
    assert kernels.apply_masks([t], [m]) == "torch"
    assert torch.equal(t.view(torch.int16), expected.view(torch.int16))


@needs_native
def test_aliased_tensors_fall_back_in_order():
    # Tied weights passed twice: the reference masks twice, in order; native refuses.
    t = make_weights(5000, torch.float32, torch.Generator().manual_seed(4), specials=False)
    m = torch.full((5000,), 0.5)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] and tensors\[1\] share memory"):
        kernels.apply_masks([t, t], [m, m], backend="native")
    other = torch.ones(5000)
    with pytest.raises(RuntimeError, match=r"masks\[1\] overlaps the memory of tensors\[0\]"):
        kernels.apply_masks([t, other], [m, t], backend="native")
    expected = t.clone()
    expected.mul_(m).mul_(m)
    assert kernels.apply_masks([t, t], [m, m]) == "torch"
    assert_bitwise_equal(t, expected)


@needs_native
def test_extension_validates_numpy_inputs():
    C = _native._C
    a = np.ones((4, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"1 tensors but 2 masks"):
        C.apply_masks([a], [a, a])
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype int32; allowed: float32 or float64"):
        C.apply_masks([np.ones(3, dtype=np.int32)], [np.ones(3, dtype=bool)])
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype >f4"):
        C.apply_masks([np.ones(3, dtype=">f4")], [np.ones(3, dtype=bool)])
    with pytest.raises(TypeError, match=r"masks\[0\] has dtype float64; allowed: bool or float32"):
        C.apply_masks([a], [np.ones((4, 5))])
    with pytest.raises(ValueError,
                       match=r"masks\[0\] has shape \(5, 4\) but tensors\[0\] has shape \(4, 5\)"):
        C.apply_masks([a], [np.ones((5, 4), dtype=bool)])
    with pytest.raises(ValueError, match=r"tensors\[0\] is not C-contiguous"):
        C.apply_masks([a.T], [np.ones((5, 4), dtype=bool)])
    ro = np.ones(3, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"tensors\[0\] is read-only"):
        C.apply_masks([ro], [np.zeros(3, dtype=bool)])
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a numpy.ndarray, got list"):
        C.apply_masks([[1.0]], [np.ones(1, dtype=bool)])
    # In place on the caller's buffer, no copy.
    C.apply_masks([a], [np.eye(4, 5, dtype=bool)])
    assert a.sum() == 4 and a[0, 0] == 1 and a[0, 1] == 0


# ------------------------------------------------------------------------------ backends


def test_auto_without_extension_warns_exactly_once(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("simulated: _C.so missing"))
    monkeypatch.setattr(_dispatch, "_warned_missing", False)
    assert not kernels.native_available()
    tensors, masks = make_case(8, torch.float32, "float", [100, 200])
    expected = [t.clone() for t in tensors]
    kernels.apply_masks_reference(expected, masks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.apply_masks(tensors, masks) == "torch"
        assert kernels.apply_masks([t.clone() for t in tensors], masks) == "torch"
        assert kernels.apply_masks([t.clone() for t in tensors], masks, backend="torch") == "torch"
    relevant = [w for w in caught if issubclass(w.category, kernels.NativeKernelWarning)]
    assert len(relevant) == 1 and len(caught) == 1
    assert "simulated: _C.so missing" in str(relevant[0].message)
    for a, e in zip(tensors, expected):
        assert_bitwise_equal(a, e)
    with pytest.raises(RuntimeError, match=r"backend='native'.*simulated: _C.so missing"):
        kernels.apply_masks(tensors, masks, backend="native")
    info = kernels.backend_info()
    assert info["native_available"] is False and "simulated" in info["import_error"]


@needs_native
def test_native_backend_is_used_when_available():
    info = kernels.backend_info()
    assert info["native_available"] and info["import_error"] is None
    assert info["build"]["cuda"] is False
    assert info["build"]["mask_parallel_threshold"] == THRESHOLD
    assert isinstance(info["openmp"], bool) and info["max_threads"] >= 1
    t = torch.arange(1, 9, dtype=torch.float32)
    m = torch.tensor([1, 0] * 4, dtype=torch.bool)
    ptr = t.data_ptr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when the extension loaded
        assert kernels.apply_masks([t], [m]) == "native"
        assert kernels.apply_masks([t], [m], backend="native") == "native"
    assert t.data_ptr() == ptr
    assert t.tolist() == [1, 0, 3, 0, 5, 0, 7, 0]


# ============================================================================== MaskPlan


@pytest.mark.parametrize("dtype,kind,backend", [
    pytest.param(torch.float32, "bool", "native", marks=needs_native),
    pytest.param(torch.float64, "float", "native", marks=needs_native),
    (torch.float32, "float", "auto"), (torch.float64, "bool", "torch")])
def test_mask_plan_matches_reference_repeatedly(dtype, kind, backend):
    sizes = [0, 1, 7, 1023, 70001, 3]
    tensors, masks = make_case(zlib.crc32(f"plan-{dtype}-{kind}".encode()), dtype, kind, sizes)
    expected = [t.clone() for t in tensors]
    plan = kernels.MaskPlan(tensors, masks, backend=backend)
    assert plan.backend == ("torch" if backend == "torch" or not NATIVE else "native")
    assert len(plan) == len(sizes)
    for step in range(3):  # re-applied, as after every fine-tuning step
        kernels.apply_masks_reference(expected, masks)
        assert plan.apply() == plan.backend
        for a, e in zip(tensors, expected):
            assert_bitwise_equal(a, e)
        for t, e in zip(tensors, expected):  # weights change in place between applications
            t.add_(1.0)
            e.add_(1.0)


def test_mask_plan_snapshots_masks_and_shares_copies():
    t = torch.ones(10)
    m = torch.zeros(10)
    plan = kernels.MaskPlan([t, t.clone().view(2, 5)], [m, m.view(2, 5)])
    m.fill_(1.0)  # later changes do not reach the plan
    plan.apply()
    assert t.eq(0).all()
    assert plan.masks[0].data_ptr() != m.data_ptr()


@needs_native
def test_mask_plan_detects_reallocated_storage_and_rebuilds():
    tensors, masks = make_case(21, torch.float32, "bool", [500, 600, 700])
    params = [torch.nn.Parameter(t) for t in tensors]
    plan = kernels.MaskPlan(params, masks, backend="native")
    assert plan.stale_index() is None
    old = params[1].detach().clone()
    params[1].data = torch.randn(600)  # new storage
    new = params[1].detach().clone()
    before0 = params[0].detach().clone()
    with pytest.raises(kernels.StaleMaskPlanError, match=r"tensors\[1\] was reallocated"):
        plan.apply()
    assert plan.stale_index() == 1
    assert_bitwise_equal(params[0].detach(), before0)  # nothing written
    assert_bitwise_equal(params[1].detach(), new)
    del old
    plan.rebuild()
    assert plan.stale_index() is None and plan.apply() == "native"
    assert_bitwise_equal(params[1].detach(), new.masked_fill(~masks[1], 0))
    # A rebuild re-validates: a reallocation to another shape is an error.
    params[2].data = torch.randn(3)
    with pytest.raises(ValueError, match=r"masks\[2\] has shape \(700,\) but tensors\[2\] has shape \(3,\)"):
        plan.rebuild()


@needs_native
def test_mask_plan_bumps_versions_and_writes_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 4))
    params = list(model.parameters())
    masks = [torch.rand(p.shape) < 0.5 for p in params]
    plan = kernels.MaskPlan(model.parameters(), masks)
    versions = [p._version for p in params]
    ptrs = [p.data_ptr() for p in params]
    assert plan.apply() == "native"
    for p, v, ptr, m in zip(params, versions, ptrs, masks):
        assert p._version > v and p.data_ptr() == ptr and p.grad_fn is None
        assert not p.detach()[~m].any()


def test_mask_plan_input_errors():
    t, m = _pair()
    with pytest.raises(ValueError, match=r"2 tensors but 1 masks"):
        kernels.MaskPlan([t, t.clone()], [m])
    with pytest.raises(TypeError, match=r"masks\[0\] has dtype torch.uint8"):
        kernels.MaskPlan([t], [torch.ones(4, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"unknown backend"):
        kernels.MaskPlan([t], [m], backend="gpu")
    # Valid inputs the kernel cannot take: auto falls back, native says why.
    nc, nm = _noncontiguous()
    assert kernels.MaskPlan([nc], [nm]).backend == "torch"
    if NATIVE:
        with pytest.raises(RuntimeError, match=r"tensors\[0\] is not contiguous"):
            kernels.MaskPlan([nc], [nm], backend="native")
        with pytest.raises(RuntimeError, match=r"tensors\[0\] and tensors\[1\] share memory"):
            kernels.MaskPlan([t, t], [m, m], backend="native")


def test_mask_plan_without_extension(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("simulated"))
    monkeypatch.setattr(_dispatch, "_warned_missing", True)
    t, m = _pair()
    assert kernels.MaskPlan([t], [m]).apply() == "torch"
    with pytest.raises(RuntimeError, match=r"simulated"):
        kernels.MaskPlan([t], [m], backend="native")


# ============================================================================== magnitude masks


def _mag_case(seed, dtype, shapes, *, ties=False, specials=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        n = math.prod(shape)
        if ties:  # few distinct magnitudes of both signs: heavy ties at every threshold
            w = (torch.randint(-3, 4, (n,), generator=g)).to(dtype)
            w[torch.rand(n, generator=g) < 0.2] = -0.0
        else:
            w = make_weights(n, dtype, g, specials=specials)
        out.append(w.reshape(shape))
    return out


def _check_mag(tensors, sparsity, scope, stacked, backend="native"):
    expected = kernels.magnitude_masks_reference(tensors, sparsity, scope=scope, stacked=stacked)
    got = kernels.magnitude_masks(tensors, sparsity, scope=scope, stacked=stacked, backend=backend)
    assert len(got) == len(expected)
    for g_, e, t in zip(got, expected, tensors):
        assert g_.dtype == torch.bool and g_.shape == t.shape and g_.is_contiguous()
        assert torch.equal(g_, e)
    return got


def _removed_counts(masks, scope, stacked):
    if not masks:
        return []
    m = masks[0].shape[0] if stacked else 1
    flat = [(~(mk if stacked else mk.unsqueeze(0))).reshape(m, -1).sum(1) for mk in masks]
    return [sum(flat).tolist()] if scope == "global" else [f.tolist() for f in flat]


def test_magnitude_reference_semantics():
    w1 = torch.tensor([1.0, -5.0, 0.5, 3.0])
    w2 = torch.tensor([0.1, -0.2, 4.0, 2.0])
    g = kernels.magnitude_masks_reference([w1, w2], 0.5)
    assert g[0].tolist() == [False, True, False, True] and g[1].tolist() == [False, False, True, True]
    # ties by position (global: concatenation order), -0.0 == +0.0, NaN largest
    a = torch.tensor([2.0, -0.0, math.nan, 1.0])
    b = torch.tensor([0.0, -2.0, -math.nan, 1.0])
    masks = kernels.magnitude_masks_reference([a, b], 0.75)  # remove 6 of 8: both NaNs kept
    assert masks[0].tolist() == [False, False, True, False]
    assert masks[1].tolist() == [False, False, True, False]
    masks = kernels.magnitude_masks_reference([a, b], 0.875)  # remove 7: the first NaN goes
    assert masks[0].tolist() == [False, False, False, False]
    assert masks[1].tolist() == [False, False, True, False]
    assert kernels.magnitude_masks_reference([a], 0.5)[0].tolist() == [True, False, True, False]


# dtype x scope x stacked, every pair on the native kernel; the torch rows check the reference's
# own counts (the oracle of the native rows).
MAGNITUDE_GRID = [pytest.param(*row, "native", marks=needs_native) for row in all_pairs(
    [torch.float32, torch.float64], ["global", "tensor"], [False, True])] + [
    (torch.float32, "global", True, "torch"), (torch.float64, "tensor", False, "torch")]


@pytest.mark.parametrize("dtype,scope,stacked,backend", MAGNITUDE_GRID)
def test_magnitude_masks_match_reference(dtype, scope, stacked, backend):
    shapes = [(3, 0), (3, 1), (3, 7, 5), (3, 1023), (3, 250, 90)]  # sizes 0, 1, odd, large
    for seed, kw in enumerate([{}, {"ties": True}, {"specials": True}]):
        tensors = _mag_case(seed, dtype, shapes, **kw)
        for sparsity in [0.0, 0.1, 0.5, 0.9, 0.999]:
            got = _check_mag(tensors, sparsity, scope, stacked, backend)
            m = 3 if stacked else 1
            inner = [math.prod(s) // m for s in shapes]
            counts = _removed_counts(got, scope, stacked)
            if scope == "global":
                assert counts == [[round(sparsity * sum(inner))] * m]
            else:
                assert counts == [[round(sparsity * n)] * m for n in inner]


@needs_native
@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_magnitude_native_thread_counts_agree(num_threads):
    # One large problem (split over threads, with a tie run crossing the thread boundary)
    # and many problems (one thread each).
    big = _mag_case(5, torch.float32, [(300_001,)], ties=True)
    many = _mag_case(6, torch.float64, [(16, 9000), (16, 31)], ties=True)
    try:
        old = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        for sparsity in [0.3, 0.61]:
            _check_mag(big, sparsity, "global", False)
            _check_mag(many, sparsity, "global", True)
            _check_mag(many, sparsity, "tensor", True)
    finally:
        torch.set_num_threads(old)


@needs_native
def test_magnitude_all_equal_and_all_nan():
    for fill in [0.0, -1.5, math.nan, math.inf]:
        t = torch.full((2, 70000), fill)
        got = _check_mag([t], 0.25, "global", True)
        assert got[0][:, :17500].logical_not().all() and got[0][:, 17500:].all()


def test_magnitude_rounding_and_edges():
    t = torch.arange(1.0, 11.0)
    for backend in ["torch"] + (["native"] if NATIVE else []):
        # round() is Python's: 0.25 * 10 = 2.5 -> 2 (half to even); 0.35 * 10 = 3.5 -> 4
        assert (~kernels.magnitude_masks([t], 0.25, backend=backend)[0]).sum() == 2
        assert (~kernels.magnitude_masks([t], 0.35, backend=backend)[0]).sum() == 4
        assert kernels.magnitude_masks([], 0.5, backend=backend) == []
        empty = kernels.magnitude_masks([torch.empty(0, 4)], 0.5, stacked=True, backend=backend)
        assert empty[0].shape == (0, 4)
        one = kernels.magnitude_masks([torch.tensor(3.0)], 0.9, backend=backend)  # 0-d, unstacked
        assert one[0].shape == () and not one[0].item()


def test_magnitude_auto_backend_and_fallbacks():
    t = torch.randn(4, 100)
    ref = kernels.magnitude_masks_reference([t], 0.5, stacked=True)
    assert torch.equal(kernels.magnitude_masks([t], 0.5, stacked=True)[0], ref[0])
    # Non-contiguous input: read through a contiguous copy natively.
    assert torch.equal(kernels.magnitude_masks([t.t()], 0.5)[0],
                       kernels.magnitude_masks_reference([t.t()], 0.5)[0])
    # Half precision and mixed dtypes: the reference runs under auto; native refuses.
    h = [t.half(), t.double()]
    got = kernels.magnitude_masks(h, 0.3, stacked=True)
    for a, b in zip(got, kernels.magnitude_masks_reference(h, 0.3, stacked=True)):
        assert torch.equal(a, b)
    if NATIVE:
        with pytest.raises(RuntimeError, match=r"tensors\[0\] has dtype torch.float16"):
            kernels.magnitude_masks(h, 0.3, backend="native")
        with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype torch.float64 but tensors\[0\]"):
            kernels.magnitude_masks([t, t.double()], 0.3, backend="native")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_magnitude_input_errors(backend):
    t = torch.randn(2, 5)
    cases = [
        (([t], 1.0), ValueError, r"sparsity must be in \[0, 1\), got 1.0"),
        (([t], -0.1), ValueError, r"sparsity must be in \[0, 1\)"),
        (([t], math.nan), ValueError, r"sparsity must be in \[0, 1\)"),
        (([t], "0.5"), TypeError, r"sparsity must be a real number"),
        (([t], True), TypeError, r"sparsity must be a real number"),
        (([torch.ones(3, dtype=torch.int64)], 0.5), TypeError,
         r"tensors\[0\] has dtype torch.int64; allowed: a floating-point dtype"),
        (([t, np.ones(3)], 0.5), TypeError, r"tensors\[1\] must be a torch.Tensor, got ndarray"),
        ((t, 0.5), TypeError, r"tensors must be a sequence of tensors"),
        (([t, torch.randn(3, 5, device="meta")], 0.5), ValueError,
         r"tensors\[1\] is on meta but tensors\[0\] is on cpu; all tensors must be on one device"),
    ]
    for (tensors, sparsity), exc, match in cases:
        with pytest.raises(exc, match=match):
            kernels.magnitude_masks(tensors, sparsity, backend=backend)
    with pytest.raises(ValueError, match=r"unknown scope 'layer'"):
        kernels.magnitude_masks([t], 0.5, scope="layer", backend=backend)
    with pytest.raises(ValueError, match=r"tensors\[1\] has 3 models \(leading dimension\) but tensors\[0\] has 2"):
        kernels.magnitude_masks([t, torch.randn(3, 5)], 0.5, stacked=True, backend=backend)
    with pytest.raises(ValueError, match=r"tensors\[0\] is 0-d"):
        kernels.magnitude_masks([torch.tensor(1.0)], 0.5, stacked=True, backend=backend)


@st.composite
def magnitude_problems(draw):
    stacked = draw(st.booleans())
    m = draw(st.integers(0, 3)) if stacked else None
    count = draw(st.integers(0, 4))
    shapes = []
    for _ in range(count):
        inner = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=2)))
        shapes.append(((m,) + inner) if stacked else inner)
    return (shapes, stacked, draw(st.sampled_from([torch.float32, torch.float64])),
            draw(st.sampled_from(["global", "tensor"])),
            draw(st.floats(0.0, 1.0, exclude_max=True)), draw(st.booleans()),
            draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problem=magnitude_problems())
def test_magnitude_property_matches_reference(problem):
    shapes, stacked, dtype, scope, sparsity, ties, seed = problem
    tensors = _mag_case(seed, dtype, shapes, ties=ties, specials=not ties)
    got = _check_mag(tensors, sparsity, scope, stacked, backend="auto")
    removed = sum(int((~g_).sum()) for g_ in got)
    m = (shapes[0][0] if shapes else 0) if stacked else 1
    inner = [math.prod(s) // m if m else 0 for s in shapes] if stacked else [math.prod(s) for s in shapes]
    want = m * (round(sparsity * sum(inner)) if scope == "global" else sum(round(sparsity * n) for n in inner))
    assert removed == (want if shapes else 0)


@needs_native
def test_extension_mask_set_direct():
    C = _native._C
    t = torch.arange(1.0, 7.0)
    m = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    s = C.MaskSet([t.numpy()], [m], [t])
    assert len(s) == 1 and s.total == 6 and s.moved() == -1
    s.apply(num_threads=1)
    assert t.tolist() == [1, 0, 3, 0, 5, 0]
    with pytest.raises(ValueError, match=r"owners\[0\]\.data_ptr\(\) differs"):
        C.MaskSet([t.numpy()], [m], [torch.ones(6)])
    with pytest.raises(ValueError, match=r"got 2 owners for 1 tensors"):
        C.MaskSet([t.numpy()], [m], [t, t])
    with pytest.raises(ValueError, match=r"tensors\[0\] and tensors\[1\] share memory"):
        C.MaskSet([t.numpy(), t.numpy()], [m, m])
    t.set_(torch.ones(6))
    assert s.moved() == 0
    with pytest.raises(RuntimeError, match=r"tensors\[0\] no longer uses the storage") as info:
        s.apply()
    assert type(info.value).__name__ == "StaleMaskSetError"
    assert t.tolist() == [1.0] * 6
