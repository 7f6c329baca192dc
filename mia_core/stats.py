"""Pure statistics behind the attacks: Gaussian fits and likelihood-ratio scores.

Everything here is a keyword-only function of numpy arrays with no state, so it can be
property-tested on its own; the attack plugins are thin wrappers around it.

Shapes: ``R`` reference models, ``N`` records. ``ref_scores`` is float ``[R, N]`` (a signal of
every reference model on every record), ``ref_in`` bool ``[R, N]`` says which reference models
trained on which record, ``obs`` is float ``[N]``, the target model's signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

_LOG_2PI = math.log(2.0 * math.pi)

#: Smallest standard deviation used in a Gaussian fit, relative to the signal's global spread;
#: keeps a record whose reference scores happen to coincide from producing an infinite ratio.
MIN_STD_FRACTION = 1e-3


@dataclass(frozen=True)
class GaussianFit:
    """Per-record Gaussian parameters of the IN and OUT reference distributions (float ``[N]``).

    ``n_in``/``n_out`` count the reference models behind each fit (int ``[N]``).
    """

    mu_in: np.ndarray
    std_in: np.ndarray
    mu_out: np.ndarray
    std_out: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray

    def take(self, idx) -> "GaussianFit":
        """The fits of records ``idx`` only."""
        return GaussianFit(*(a[idx] for a in (self.mu_in, self.std_in, self.mu_out, self.std_out, self.n_in, self.n_out)))


def gaussian_logpdf(x, *, mu, std) -> np.ndarray:
    """log N(x; mu, std^2), elementwise."""
    z = (np.asarray(x, dtype=np.float64) - mu) / std
    return -0.5 * z * z - np.log(std) - 0.5 * _LOG_2PI


def normal_logsf(x, *, mu, std) -> np.ndarray:
    """log Pr[Z > x] for Z ~ N(mu, std^2), accurate far in the upper tail."""
    z = (np.asarray(x, dtype=np.float64) - mu) / std
    return special.log_ndtr(-z)


def _masked_mean_var(values: np.ndarray, mask: np.ndarray):
    n = mask.sum(axis=0)
    safe = np.maximum(n, 1)
    mean = np.where(mask, values, 0.0).sum(axis=0) / safe
    resid = np.where(mask, values - mean, 0.0)
    ss = (resid * resid).sum(axis=0)
    return n, mean, ss


def _masked_median(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-column median of the entries where ``mask`` holds (nan for an empty column)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns: no reference on that side
        return np.nanmedian(np.where(mask, values, np.nan), axis=0)


def fit_gaussians(*, ref_scores, ref_in, variance: str = "per-example", stat: str = "mean") -> GaussianFit:
    """Fit the IN and OUT Gaussians of LiRA (Carlini et al. 2022, Sec. IV-B) for each record.

    For record ``j``, ``mu_in[j]`` is the mean of ``ref_scores[m, j]`` over the reference models
    that trained on ``j`` and ``mu_out[j]`` over those that did not.

    Args:
        ref_scores: float ``[R, N]``.
        ref_in: bool ``[R, N]``.
        variance: ``"per-example"`` — the unbiased variance of each record's own IN (OUT)
            scores, which needs at least two IN and two OUT models per record; ``"global"`` —
            one variance per side shared by all records (the paper's "fixed variance" variant
            for few reference models), estimated as the pooled within-record variance
            ``sum_j sum_m (s_mj - mu_j)^2 / sum_j (n_j - 1)``; when no record has two references
            on a side (one reference model per record, offline), that side's variance is the
            variance of all its scores across records, as the authors' reference code does for
            every budget.
        stat: the centre ``mu``: ``"mean"`` (the sample mean) or ``"median"`` (the reference code's
            choice, more robust to an outlying reference model). The variance is about the sample
            mean either way.

    Records whose IN (OUT) side is empty get ``mu = nan``; callers decide what that means.
    """
    s = np.asarray(ref_scores, dtype=np.float64)
    k = np.asarray(ref_in, dtype=bool)
    if s.ndim != 2 or s.shape != k.shape:
        raise ValueError(f"ref_scores and ref_in must both be [R, N]; got {s.shape} and {k.shape}")
    if variance not in ("per-example", "global"):
        raise ValueError(f"variance must be 'per-example' or 'global', got {variance!r}")
    if stat not in ("mean", "median"):
        raise ValueError(f"stat must be 'mean' or 'median', got {stat!r}")
    n_in, mu_in, ss_in = _masked_mean_var(s, k)
    n_out, mu_out, ss_out = _masked_mean_var(s, ~k)
    centre_in, centre_out = (mu_in, mu_out) if stat == "mean" else (_masked_median(s, k), _masked_median(s, ~k))
    mu_in = np.where(n_in > 0, centre_in, np.nan)
    mu_out = np.where(n_out > 0, centre_out, np.nan)
    finite = s[np.isfinite(s)]
    floor = MIN_STD_FRACTION * (float(finite.std()) if finite.size else 1.0) or 1e-12
    if variance == "per-example":
        if (n_in < 2).any() or (n_out < 2).any():
            raise ValueError(
                "per-example variance needs at least 2 IN and 2 OUT reference models for every record "
                f"(smallest: {int(n_in.min())} IN, {int(n_out.min())} OUT); use variance='global' "
                "or more models"
            )
        std_in = np.sqrt(ss_in / (n_in - 1))
        std_out = np.sqrt(ss_out / (n_out - 1))
    else:
        std_in = np.full(s.shape[1], _global_std(s, k, n_in, ss_in))
        std_out = np.full(s.shape[1], _global_std(s, ~k, n_out, ss_out))
    std_in = np.maximum(std_in, floor)
    std_out = np.maximum(std_out, floor)
    return GaussianFit(mu_in, std_in, mu_out, std_out, n_in, n_out)


def _global_std(s: np.ndarray, mask: np.ndarray, n: np.ndarray, ss: np.ndarray) -> float:
    """One side's global standard deviation: pooled within-record, or across records when no
    record has two references on that side (see :func:`fit_gaussians`). nan for an empty side."""
    dof = np.maximum(n - 1, 0).sum()
    if dof >= 1:
        return math.sqrt(ss.sum() / dof)
    values = s[mask]
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if values.size >= 2 else float("nan")


def lira_online(*, obs, fit: GaussianFit) -> np.ndarray:
    """Online LiRA score (Carlini et al. 2022, Algorithm 1): the log likelihood ratio

        log Lambda = log N(phi_obs; mu_in, sigma_in^2) - log N(phi_obs; mu_out, sigma_out^2).

    Higher = member. Records without IN or OUT references get 0 (no evidence).
    """
    obs = np.asarray(obs, dtype=np.float64)
    out = gaussian_logpdf(obs, mu=fit.mu_in, std=fit.std_in) - gaussian_logpdf(obs, mu=fit.mu_out, std=fit.std_out)
    return np.where(np.isfinite(out), out, 0.0)


def lira_offline(*, obs, fit: GaussianFit) -> np.ndarray:
    """Offline LiRA score (Carlini et al. 2022, Sec. IV-D): a one-sided test against OUT only,

        Lambda = 1 - Pr[Z > phi_obs],   Z ~ N(mu_out, sigma_out^2),

    returned as ``-log Pr[Z > phi_obs]``, a strictly increasing function of Lambda (same ROC)
    that does not saturate at 1 in the upper tail, where low-FPR thresholds live.
    Higher = member. Records without OUT references get 0.
    """
    obs = np.asarray(obs, dtype=np.float64)
    out = -normal_logsf(obs, mu=fit.mu_out, std=fit.std_out)
    return np.where(np.isfinite(out), out, 0.0)


__all__ = [
    "GaussianFit",
    "MIN_STD_FRACTION",
    "fit_gaussians",
    "gaussian_logpdf",
    "lira_offline",
    "lira_online",
    "normal_logsf",
]
