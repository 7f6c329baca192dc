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


def all_pairs(*axes):
    """Rows that cover every PAIR of values of any two axes, instead of every combination.

    ``all_pairs(sizes, dtypes, kinds)`` returns tuples ``(size, dtype, kind)`` in which each
    (size, dtype), (size, kind) and (dtype, kind) pair appears at least once: about
    ``len(largest axis) * len(second largest)`` rows instead of the full product. Greedy and
    deterministic (the same rows on every run). Kernel bugs that need a particular value of
    three axes at once are what the hypothesis sweeps and the dedicated edge-case tests are for.
    """
    axes = [list(a) for a in axes]
    n = len(axes)
    if n < 2:
        return [(v,) for v in (axes[0] if axes else [])]
    uncovered = {(i, a, j, b) for i in range(n) for j in range(i + 1, n)
                 for a in range(len(axes[i])) for b in range(len(axes[j]))}
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row = {i: a, j: b}
        for k in range(n):
            if k in row:
                continue

            def gain(v, k=k):
                return sum(((min(k, m), v if k < m else w, max(k, m), w if k < m else v)
                            in uncovered) for m, w in row.items())

            row[k] = max(range(len(axes[k])), key=lambda v: (gain(v), -v))
        for p in range(n):
            for q in range(p + 1, n):
                uncovered.discard((p, row[p], q, row[q]))
        rows.append(tuple(axes[k][row[k]] for k in range(n)))
    return rows
