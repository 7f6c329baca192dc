"""Benchmarks of the mask kernels (``miafw bench --kernel mask``, ``benchmarks/kernels.py``).

Cases (each compares the native kernel with its torch baseline in one process):

* ``model-50-tensors``: a 50-tensor model with ~1e5 parameters (alternating weight- and
  bias-sized tensors) and float 0/1 masks. Baseline: a Python loop of ``w.mul_(m)``;
  variants: ``apply_masks`` (native and torch backends; the native one builds numpy views on
  every call) and ``MaskPlan.apply`` (views and segment lists built once). Target:
  ``MaskPlan.apply`` >= 3x the loop. Independent of ``sizes``.
* ``bool-mask`` at each size: ``torch.where(m, w, 0)`` (baseline; allocates its output every
  call), ``w.masked_fill_(~m, 0)`` (in place; ``~m`` allocates) and native ``apply_masks`` (in
  place, allocates nothing). Bytes: read w + read m + write w.
* ``float-mask`` at each size: ``w.mul_(m)`` (baseline) and native ``apply_masks``; bandwidth
  fraction against a stream copy of a buffer of w's size (target >= 90% at 1e7).
* ``magnitude-masks`` at each size: ``magnitude_masks`` of one tensor (global, sparsity 0.9):
  the stable-argsort reference (baseline) vs native; and ``magnitude-masks-stacked`` the
  same elements as ``[16, size / 16]`` (16 independent models, as the prune defense calls it).

Masks are 0/1 (or bool), so re-applying them in the timing loop keeps the weights' values
(and the work) the same on every call.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from mia_core import kernels
from mia_core.kernels.bench.common import Measurement, compare, dtype_of, timed_row, with_bandwidth

KERNEL = "mask"


def _row(*args, **kwargs) -> Measurement:
    return timed_row(KERNEL, *args, **kwargs)


def model_sizes(n_tensors: int = 50, total: int = 100_000, seed: int = 0) -> List[int]:
    """Layer-like sizes summing to about ``total``: weights large, biases small, alternating."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(n_tensors, generator=g) + torch.tensor(
        [1.0, 0.05] * (n_tensors // 2) + [1.0] * (n_tensors % 2))
    return [max(1, int(r)) for r in (raw / raw.sum() * total).tolist()]


def bench_model(dtype: str, backends: Sequence[str], repeat: int) -> List[Measurement]:
    dt = dtype_of(dtype)
    sizes = model_sizes()
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(n, generator=g, dtype=dt) for n in sizes]
    ms = [(torch.rand(n, generator=g) < 0.5).to(dt) for n in sizes]
    total = sum(sizes)
    case = "model-50-tensors"

    def loop():
        for w, m in zip(ws, ms):
            w.mul_(m)

    base = "python loop w.mul_(m)"
    rows = [_row(case, total, dtype, base, loop, repeat)]
    if "torch" in backends:
        rows.append(_row(case, total, dtype, "apply_masks torch",
                         lambda: kernels.apply_masks(ws, ms, backend="torch"), repeat))
    if "native" in backends and kernels.native_available():
        rows.append(_row(case, total, dtype, "apply_masks native",
                         lambda: kernels.apply_masks(ws, ms, backend="native"), repeat,
                         note="builds 100 numpy views per call"))
        plan = kernels.MaskPlan(ws, ms, backend="native")
        rows.append(_row(case, total, dtype, "MaskPlan.apply native", plan.apply, repeat,
                         note="views + segments cached; data_ptr check per tensor"))
    if "torch" in backends:
        tplan = kernels.MaskPlan(ws, ms, backend="torch")
        rows.append(_row(case, total, dtype, "MaskPlan.apply torch", tplan.apply, repeat))
    for r in rows:  # bytes only (no copy fraction: this case measures per-call overhead)
        r.bytes_moved = total * dt.itemsize * 3
        r.gbps = r.bytes_moved / r.seconds / 1e9
    return compare(rows, base)


def bench_bool(n: int, dtype: str, backends: Sequence[str], repeat: int) -> List[Measurement]:
    dt = dtype_of(dtype)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(n, generator=g, dtype=dt)
    m = torch.rand(n, generator=g) < 0.5
    zero = torch.zeros((), dtype=dt)
    case = "bool-mask"
    base = "torch.where(m, w, 0)"
    rows = [
        _row(case, n, dtype, base, lambda: torch.where(m, w, zero), repeat,
             note="allocates its output every call"),
        _row(case, n, dtype, "w.masked_fill_(~m, 0)", lambda: w.masked_fill_(~m, 0), repeat,
             note="in place; ~m allocates"),
    ]
    if "native" in backends and kernels.native_available():
        rows.append(_row(case, n, dtype, "apply_masks native",
                         lambda: kernels.apply_masks([w], [m], backend="native"), repeat,
                         note="in place, allocates nothing"))
    if "torch" in backends:
        rows.append(_row(case, n, dtype, "apply_masks torch",
                         lambda: kernels.apply_masks([w], [m], backend="torch"), repeat))
    for r in rows:
        with_bandwidth(r, n * dt.itemsize * 2 + n, probe_bytes=n * dt.itemsize)
    return compare(rows, base)


def bench_float(n: int, dtype: str, backends: Sequence[str], repeat: int) -> List[Measurement]:
    dt = dtype_of(dtype)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, generator=g, dtype=dt)
    m = (torch.rand(n, generator=g) < 0.5).to(dt)
    case = "float-mask"
    base = "w.mul_(m)"
    rows = [_row(case, n, dtype, base, lambda: w.mul_(m), repeat)]
    if "native" in backends and kernels.native_available():
        rows.append(_row(case, n, dtype, "apply_masks native",
                         lambda: kernels.apply_masks([w], [m], backend="native"), repeat))
        plan = kernels.MaskPlan([w], [m], backend="native")
        rows.append(_row(case, n, dtype, "MaskPlan.apply native", plan.apply, repeat))
    for r in rows:
        # read w + read m + write w, against a copy of a buffer of w's size
        with_bandwidth(r, 3 * n * dt.itemsize, probe_bytes=n * dt.itemsize)
    return compare(rows, base)


def bench_magnitude(n: int, dtype: str, backends: Sequence[str], repeat: int) -> List[Measurement]:
    dt = dtype_of(dtype)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(n, generator=g, dtype=dt)
    # The stable argsort reference is slow at large sizes: fewer repeats there.
    ref_repeat = repeat if n < 1_000_000 else min(repeat, 3)
    rows: List[Measurement] = []
    base = "reference (stable argsort)"
    models = 16 if n >= 16 and n % 16 == 0 else 1
    for case, tensors, stacked in (("magnitude-masks", [w], False),
                                   ("magnitude-masks-stacked", [w.view(models, -1)], True)):
        if case.endswith("stacked") and models == 1:
            continue
        part = [_row(case, n, dtype, base,
                     lambda: kernels.magnitude_masks_reference(tensors, 0.9, stacked=stacked),
                     ref_repeat)]
        if "native" in backends and kernels.native_available():
            part.append(_row(case, n, dtype, "native",
                             lambda: kernels.magnitude_masks(tensors, 0.9, stacked=stacked,
                                                             backend="native"), repeat,
                             note=f"{models if stacked else 1} problem(s), sparsity 0.9"))
        for r in part:
            # read w (at least once) + write the bool mask
            with_bandwidth(r, n * dt.itemsize + n, probe_bytes=n * dt.itemsize)
        rows += compare(part, base)
    return rows


def run(*, sizes: Sequence[int], dtypes: Sequence[str], backends: Sequence[str],
        repeat: int = 21) -> List[Measurement]:
    """All mask cases; ``sizes`` are element counts for the size-dependent cases."""
    rows: List[Measurement] = []
    for dtype in dtypes:
        rows += bench_model(dtype, backends, repeat)
        for n in sizes:
            n = int(n)
            rows += bench_bool(n, dtype, backends, repeat)
            rows += bench_float(n, dtype, backends, repeat)
            rows += bench_magnitude(n, dtype, backends, repeat)
    return rows


__all__ = ["run", "model_sizes"]
