"""Benchmarks of the fake-quantize kernels (``miafw bench --kernel fake_quantize``).

Cases (each compares the native kernel with its torch baseline in one process, into
preallocated outputs, with given scale / zero point unless the variant says "derived"):

* ``per-tensor-affine``: baseline ``torch.fake_quantize_per_tensor_affine`` (float32 only: the
  torch op is float32-centred; float64 rows have no baseline) vs :func:`fake_quantize` native /
  torch backends, plus native with derived (min-max) parameters. Target at 1e7 float32:
  native >= 10x torch and >= 60% of the stream-copy bandwidth (bytes = read x + write out).
* ``per-channel-affine``: ``x`` as ``[64, size / 64]``, axis 0; baseline
  ``torch.fake_quantize_per_channel_affine``. Same targets.
* ``fused-mask-quant``: bool mask; baseline ``apply_masks([w], [m])`` (in place, native) then
  ``fake_quantize(w, out=out)`` (native), one after the other, vs
  ``masked_fake_quantize(x, m, out=out)`` in one pass. Target >= 1.5x. Bytes of the fused
  pass: read x + read mask + write out. Re-masking an already masked ``w`` with the same bool
  mask keeps its values, so every timed call does the same work. This case's variants are
  timed interleaved (one batch of each per round), so a drift of the machine's speed hits both.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from mia_core import kernels
from mia_core.kernels.bench.common import (Measurement, compare, dtype_of, median_times_interleaved,
                                           timed_row, with_bandwidth)

KERNEL = "fake_quantize"


def _row(*args, **kwargs) -> Measurement:
    return timed_row(KERNEL, *args, **kwargs)
SCALE, ZERO_POINT, QMIN, QMAX = 0.02, 128, 0, 255
CHANNELS = 64




def _x(shape, dt) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * 1.5).to(dt)


def bench_per_tensor(size: int, dtype: str, backends: Sequence[str], repeat: int):
    dt = dtype_of(dtype)
    x = _x(size, dt)
    out = torch.empty_like(x)
    case = "per-tensor-affine"
    base = "torch.fake_quantize_per_tensor_affine"
    rows = []
    if dt == torch.float32:
        rows.append(_row(case, size, dtype, base, lambda: torch.fake_quantize_per_tensor_affine(
            x, SCALE, ZERO_POINT, QMIN, QMAX), repeat, note="allocates its output"))
    kw = dict(scale=SCALE, zero_point=ZERO_POINT, out=out)
    for b in backends:
        if b == "native" and not kernels.native_available():
            continue
        rows.append(_row(case, size, dtype, f"fake_quantize {b}",
                         lambda b=b: kernels.fake_quantize(x, backend=b, **kw), repeat))
    if "native" in backends and kernels.native_available():
        rows.append(_row(case, size, dtype, "fake_quantize native derived",
                         lambda: kernels.fake_quantize(x, out=out, backend="native"), repeat,
                         note="min-max pass + quantize pass (reads x twice)"))
    compare(rows, base)
    for r in rows:
        with_bandwidth(r, 2 * size * x.element_size())
    return rows


def bench_per_channel(size: int, dtype: str, backends: Sequence[str], repeat: int):
    dt = dtype_of(dtype)
    C = CHANNELS if size >= CHANNELS else 1
    n = (size // C) * C
    x = _x((C, n // C), dt)
    out = torch.empty_like(x)
    scale = torch.linspace(0.01, 0.03, C)
    zp = torch.full((C,), ZERO_POINT, dtype=torch.int32)
    case = "per-channel-affine"
    base = "torch.fake_quantize_per_channel_affine"
    rows = []
    if dt == torch.float32:
        rows.append(_row(case, n, dtype, base, lambda: torch.fake_quantize_per_channel_affine(
            x, scale, zp, 0, QMIN, QMAX), repeat, note="allocates its output"))
    for b in backends:
        if b == "native" and not kernels.native_available():
            continue
        rows.append(_row(case, n, dtype, f"fake_quantize {b}",
                         lambda b=b: kernels.fake_quantize(x, axis=0, scale=scale, zero_point=zp,
                                                           out=out, backend=b), repeat))
    compare(rows, base)
    for r in rows:
        with_bandwidth(r, 2 * n * x.element_size())
    return rows


def bench_fused(size: int, dtype: str, backends: Sequence[str], repeat: int):
    if not kernels.native_available():
        return []
    dt = dtype_of(dtype)
    x = _x(size, dt)
    g = torch.Generator().manual_seed(1)
    m = torch.rand(size, generator=g) < 0.5
    w = x.clone()
    out = torch.empty_like(x)
    case = "fused-mask-quant"
    base = "apply_masks then fake_quantize (native)"

    def two_pass():
        kernels.apply_masks([w], [m], backend="native")
        kernels.fake_quantize(w, scale=SCALE, zero_point=ZERO_POINT, out=out, backend="native")

    # Timed interleaved (one batch of each variant per round): at 1e7 the ratio is a
    # comparison of memory-bound passes, and timing each variant in its own block let a drift
    # of the machine's bandwidth read as 0.8-1.0x (benchmarks/RESULTS.md, issue 9).
    names = [base] + [f"masked_fake_quantize {b}" for b in backends]
    fns = [two_pass] + [lambda b=b: kernels.masked_fake_quantize(
        x, m, scale=SCALE, zero_point=ZERO_POINT, out=out, backend=b) for b in backends]
    times = median_times_interleaved(fns, repeat=repeat)
    rows = [Measurement(kernel=KERNEL, case=case, size=int(size), dtype=dtype, variant=v,
                        seconds=t, note="two passes" if v == base else "")
            for v, t in zip(names, times)]
    compare(rows, base)
    for r in rows:
        # fused minimum: read x + read mask + write out; bandwidth probe on x's size
        with_bandwidth(r, size * (2 * x.element_size() + 1), probe_bytes=size * x.element_size())
    return rows


def run(*, sizes: Sequence[int], dtypes: Sequence[str], backends: Sequence[str],
        repeat: int = 21) -> List[Measurement]:
    """All fake-quantize cases at every size and dtype; ``backends`` picks the variants run."""
    for b in backends:
        if b not in ("native", "torch", "auto"):
            raise ValueError(f"unknown backend {b!r}; valid: native, torch, auto")
    rows: List[Measurement] = []
    for dtype in dtypes:
        for size in sizes:
            rows += bench_per_tensor(int(size), dtype, backends, repeat)
            rows += bench_per_channel(int(size), dtype, backends, repeat)
            rows += bench_fused(int(size), dtype, backends, repeat)
    return rows


__all__ = ["KERNEL", "run"]
