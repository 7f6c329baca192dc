"""Regression tests for kernel edge cases found by an independent check (issue 9).

Each test names the behaviour it pins; native-only tests skip when the extension is missing.
"""

import pytest
import torch

from mia_core import kernels

NATIVE = kernels.native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="mia_core._C is not built")


def _neg(t):
    """A lazily negated view of -t (``is_neg()`` True): its values equal ``t``."""
    v = torch._neg_view(-t)
    assert v.is_neg()
    return v


# --- 1. lazily negated views: auto falls back (or resolves), never raises -------------

_X = torch.linspace(-3, 3, 32).reshape(4, 8)
_V = torch.linspace(0.5, 2, 32).reshape(4, 8)
_M = (torch.arange(32).reshape(4, 8) % 3) > 0
_I = torch.eye(3).expand(4, 3, 3).contiguous()


def _cases():
    x, v, m = _X, _V, _M
    return {
        "magnitude_masks": (lambda w: kernels.magnitude_masks([w(x)], 0.5)[0]),
        "gaussian_kl-mu": (lambda w: kernels.gaussian_kl(w(x), v, x * 0.5, v)),
        "gaussian_kl-var": (lambda w: kernels.gaussian_kl(x, w(v), x * 0.5, v)),
        "gaussian_kl_full": (lambda w: kernels.gaussian_kl_full(w(x[:, :3].contiguous()), _I,
                                                                x[:, :3] * 0.5, _I)),
        "fake_quantize": (lambda w: kernels.fake_quantize(w(x))),
        "fake_quantize-scale": (lambda w: kernels.fake_quantize(
            x, axis=0, scale=w(torch.full((4,), 0.1)), zero_point=torch.zeros(4))),
        "masked_fake_quantize": (lambda w: kernels.masked_fake_quantize(w(x), m)),
        "masked_fake_quantize-mask": (lambda w: kernels.masked_fake_quantize(x, w(m.float()))),
        "fake_quantize_sign": (lambda w: kernels.fake_quantize_sign(w(x))),
        "fake_quantize_sign-scale": (lambda w: kernels.fake_quantize_sign(
            x, axis=0, scale=w(torch.full((4,), 0.1)))),
        "fake_quantize_ternary": (lambda w: kernels.fake_quantize_ternary(w(x))),
    }


@pytest.mark.parametrize("op", sorted(_cases()))
def test_auto_takes_lazily_negated_views(op):
    f = _cases()[op]
    expected = f(lambda t: t.clone())
    got = f(_neg)  # used to raise "Can't call numpy() on Tensor that has negative bit set"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_auto_writes_lazily_negated_out_and_masks_in_place():
    base = torch.zeros(4)
    out = torch._neg_view(base)
    kernels.gaussian_kl(_X, _V, _X * 0.5, _V, out=out)
    torch.testing.assert_close(out.resolve_neg(), kernels.gaussian_kl(_X, _V, _X * 0.5, _V))
    base = torch.zeros(4, 8)
    kernels.fake_quantize(_X, out=torch._neg_view(base))
    torch.testing.assert_close(-base, kernels.fake_quantize(_X), rtol=0, atol=0)
    w = _X.clone().neg()
    wv = torch._neg_view(w)  # values of _X
    kernels.apply_masks([wv], [_M])
    torch.testing.assert_close(wv.resolve_neg(), _X * _M, rtol=0, atol=0)


@needs_native
def test_native_refuses_lazily_negated_views_by_name():
    with pytest.raises(RuntimeError, match="x is a lazily negated"):
        kernels.fake_quantize(_neg(_X), backend="native")
    with pytest.raises(RuntimeError, match="var0 is a lazily negated"):
        kernels.gaussian_kl(_X, _neg(_V), _X, _V, backend="native")
    with pytest.raises(RuntimeError, match=r"tensors\[0\] is a lazily negated"):
        kernels.magnitude_masks([_neg(_X)], 0.5, backend="native")


# --- 2. gaussian_kl_full: jitter rule (finite, >= 0) and a short message -------------

@pytest.mark.parametrize("jitter, shown", [
    (10 ** 400, "an integer of magnitude ~1e400"),
    (-10 ** 400, "a negative integer of magnitude ~1e400"),
    (float("inf"), "got inf"),
    (float("nan"), "got nan"),
    (-1e-300, "got -1e-300"),
    (-(10 ** 300), "got -1e+300"),
    ("x" * 500, "got 'xxx"),
])
def test_full_jitter_error_is_short(jitter, shown):
    m = torch.zeros(2, 2)
    eye = torch.eye(2).expand(2, 2, 2).contiguous()
    with pytest.raises(ValueError, match="jitter must be") as info:
        kernels.gaussian_kl_full(m, eye, m, eye, jitter=jitter)
    assert shown in str(info.value) and len(str(info.value)) < 100


@pytest.mark.parametrize("jitter", [0, 1e-300, 1e300, 10 ** 300, 1.7e308])
def test_full_accepts_any_finite_nonnegative_jitter(jitter):
    m = torch.zeros(2, 2, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64).expand(2, 2, 2).contiguous()
    got = kernels.gaussian_kl_full(m, eye, m, eye, jitter=jitter)
    assert torch.isfinite(got).all() and (got.abs() < 1e-9).all()
