"""Benchmarks of the batched Gaussian KL kernels (``miafw bench --kernel kl``).

Cases, each timed in one process next to its torch baselines:

* ``univariate``: N pairs of univariate Gaussians into a preallocated ``out``. Baselines:
  ``torch.distributions.kl_divergence(Normal, Normal)`` (the ratio's reference; standard
  deviations precomputed, argument validation off), the hand formula in eager torch, and the
  same formula under ``torch.compile`` when it compiles here (otherwise a note says why).
  bytes = 5 * N * itemsize (4 reads + 1 write per pair), as a fraction of stream copy.
* ``full-d2``, ``full-d8``, ``full-d64``: full covariances. Baseline:
  ``kl_divergence(MultivariateNormal, MultivariateNormal)`` built from the covariances (the
  constructor's Cholesky factorisation included, as a user would pay it). N is chosen per d
  so one call takes ~10-100 ms and capped at ``max(sizes)`` for quick sanity runs; it is the
  row's ``size``.

``backends``: ``native`` (the extension, skipped with a note when it is not built) and
``torch`` (our float64 reference, :func:`gaussian_kl_reference`).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from mia_core import kernels
from mia_core.kernels.bench.common import dtype_of, Measurement, compare, median_time, with_bandwidth

#: Pairs per call for the full-covariance cases (before the max(sizes) cap).
FULL_SIZES = {2: 200_000, 8: 50_000, 64: 2_000}



def _hand_formula(mu0, var0, mu1, var1):
    r = var0 / var1
    return 0.5 * (r - 1.0 - torch.log(r) + (mu1 - mu0) ** 2 / var1)


def _compiled_formula() -> tuple[Optional[Callable], str]:
    try:
        return torch.compile(_hand_formula, dynamic=False), ""
    except Exception as exc:  # no compiler, unsupported platform, ...
        return None, f"torch.compile unavailable: {type(exc).__name__}: {exc}"[:200]


def _spd(n: int, d: int, dtype, g) -> torch.Tensor:
    a = torch.randn(n, d, d, generator=g, dtype=torch.float64)
    return (a @ a.mT / d + 0.5 * torch.eye(d, dtype=torch.float64)).to(dtype)


def _univariate(n: int, dtype_name: str, backends: Sequence[str], repeat: int) -> List[Measurement]:
    dtype = dtype_of(dtype_name)
    g = torch.Generator().manual_seed(0)
    mu0 = torch.randn(n, generator=g).to(dtype)
    mu1 = torch.randn(n, generator=g).to(dtype)
    var0 = (torch.rand(n, generator=g) + 0.5).to(dtype)
    var1 = (torch.rand(n, generator=g) + 0.5).to(dtype)
    sd0, sd1 = var0.sqrt(), var1.sqrt()
    out = torch.empty(n, dtype=dtype)
    rows: List[Measurement] = []

    def add(variant, fn, note=""):
        secs = median_time(fn, repeat=repeat)
        row = Measurement("kl", "univariate", n, dtype_name, variant, secs, note=note)
        rows.append(with_bandwidth(row, 5 * n * out.element_size()))

    add("torch.distributions",
        lambda: kl_divergence(Normal(mu0, sd0, validate_args=False), Normal(mu1, sd1, validate_args=False)),
        note="Normal(mu, sqrt(var)) built per call (sqrt precomputed); allocates its output")
    add("torch-eager-formula", lambda: _hand_formula(mu0, var0, mu1, var1), note="allocates")
    compiled, why = _compiled_formula()
    if compiled is not None:
        try:
            compiled(mu0, var0, mu1, var1)  # compile outside the timing
            add("torch.compile-formula", lambda: compiled(mu0, var0, mu1, var1),
                note="inductor, dynamic=False; allocates its output")
        except Exception as exc:
            why = f"torch.compile failed: {type(exc).__name__}: {exc}"[:200]
            compiled = None
    if compiled is None:
        rows.append(Measurement("kl", "univariate", n, dtype_name, "torch.compile-formula",
                                float("nan"), note=why))
    for backend in backends:
        if backend == "native" and not kernels.native_available():
            rows.append(Measurement("kl", "univariate", n, dtype_name, "native", float("nan"),
                                    note="extension not built"))
            continue
        if backend == "native":
            add("native", lambda: kernels.gaussian_kl(mu0, var0, mu1, var1, out=out, backend="native"),
                note=f"out= preallocated; {torch.get_num_threads()} threads")
        elif backend == "torch":
            add("torch-reference", lambda: kernels.gaussian_kl(mu0, var0, mu1, var1, out=out, backend="torch"),
                note="miafw float64 reference")
    return rows


def _full(d: int, n: int, dtype_name: str, backends: Sequence[str], repeat: int) -> List[Measurement]:
    dtype = dtype_of(dtype_name)
    g = torch.Generator().manual_seed(d)
    mu0 = torch.randn(n, d, generator=g).to(dtype)
    mu1 = torch.randn(n, d, generator=g).to(dtype)
    cov0, cov1 = _spd(n, d, dtype, g), _spd(n, d, dtype, g)
    out = torch.empty(n, dtype=dtype)
    case = f"full-d{d}"
    note_n = f"N={n} pairs of d={d} (scaled to d)"
    rows: List[Measurement] = []

    def add(variant, fn, note):
        rows.append(Measurement("kl", case, n, dtype_name, variant,
                                median_time(fn, repeat=repeat), note=f"{note_n}; {note}"))

    add("torch.distributions",
        lambda: kl_divergence(MultivariateNormal(mu0, covariance_matrix=cov0, validate_args=False),
                              MultivariateNormal(mu1, covariance_matrix=cov1, validate_args=False)),
        "MultivariateNormal built from covariances per call")
    for backend in backends:
        if backend == "native" and not kernels.native_available():
            rows.append(Measurement("kl", case, n, dtype_name, "native", float("nan"),
                                    note="extension not built"))
        elif backend == "native":
            add("native", lambda: kernels.gaussian_kl_full(mu0, cov0, mu1, cov1, out=out, backend="native"),
                f"out= preallocated; {torch.get_num_threads()} threads; float64 maths")
        elif backend == "torch":
            add("torch-reference",
                lambda: kernels.gaussian_kl_full(mu0, cov0, mu1, cov1, out=out, backend="torch"),
                "miafw float64 reference")
    return rows


def run(*, sizes: Sequence[int], dtypes: Sequence[str], backends: Sequence[str],
        repeat: int = 21) -> List[Measurement]:
    """Time every case; ``sizes`` are univariate pair counts and cap the full-covariance N.

    Returns rows whose ``ratio`` is against ``torch.distributions`` (> 1: faster).
    """
    for name in dtypes:
        dtype_of(name)  # ValueError for an unknown dtype
    rows: List[Measurement] = []
    cap = max(sizes) if sizes else max(FULL_SIZES.values())
    for dtype_name in dtypes:
        for n in sizes:
            rows += _univariate(int(n), dtype_name, backends, repeat)
        for d, n_full in FULL_SIZES.items():
            rows += _full(d, max(1, min(n_full, cap)), dtype_name, backends, repeat)
    return compare(rows, "torch.distributions")


__all__ = ["FULL_SIZES", "run"]
