"""Helpers the kernel tests share: bitwise comparison and weights with IEEE special values."""

import math

import torch


def bits(t):
    """Integer view of a float tensor: equal bits <=> identical floats (NaN, -0.0 included)."""
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def assert_bitwise_equal(actual, expected):
    """Same dtype, shape and bits; tensors on other devices are compared on the CPU."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.cpu(), expected.cpu()
    assert torch.equal(bits(a), bits(e)), (a, e)


def make_weights(n, dtype, g, *, specials=True):
    """n normal weights; with ``specials``, about n/8 of them replaced by NaN, +-inf, -0.0, 0.0,
    -1.0 or a subnormal (1e-40)."""
    w = torch.randn(n, generator=g, dtype=dtype)
    if specials and n:
        vals = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, -1.0, 1e-40], dtype=dtype)
        k = max(1, n // 8)
        pos = torch.randint(0, n, (k,), generator=g)
        w[pos] = vals[torch.randint(0, len(vals), (k,), generator=g)]
    return w
