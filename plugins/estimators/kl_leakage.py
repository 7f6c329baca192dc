"""Kullback–Leibler membership leakage (Farokhi & Kaafar 2020) with per-record Gaussian fits.

The maths are pure keyword-only functions of numpy arrays (:func:`rho_kl`, :func:`per_record_kl`,
:func:`fit_record_gaussians`, :func:`pca_project`, :func:`bootstrap_mean_interval`, the bounds); the
plugin :class:`KLLeakage` only reads the population through its context and reports.

Shapes: ``M`` models, ``N`` records, ``d`` dimensions of what is modelled per (model, record).
``keep`` is bool ``[M, N]`` (model ``m`` trained on record ``j``: IN); ``values`` is float ``[M, N]``
(one number per model and record, e.g. a signal), ``[M, N, d]``, or ``[M, 1, d]`` / ``[M, 1]``: one
vector per model, the same for every record (the white-box parameters), broadcast over ``keep``'s
records without being copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple

import numpy as np

from mia_core.base import Estimator

#: Signals the black-box mode models, and the access level that reveals each (the least one).
SIGNAL_ACCESS_LEVEL = {"confidence": ("probs",), "loss": ("loss",), "logits": ("logits",)}
SOURCES = ("signal", "params")
COVARIANCES = ("auto", "full", "diag")
#: Largest dimension of the native full-covariance kernel (``mia_core.kernels.gaussian_kl_full``).
FULL_MAX_DIM = 128
#: Elements per chunk of records when the per-record statistics are formed (``B * d`` for diagonal,
#: ``B * d * d`` for full covariances): 4 Mi float64 = 32 MiB per array, so 19k parameters x 1,797
#: records never materialise as one 276 MB matrix.
CHUNK_ELEMENTS = 2**22


# ----------------------------------------------------------------------------- pure maths
def max_full_dim(n: int) -> int:
    """Largest dimension ``k`` that ``covariance="auto"`` (and the automatic PCA) fits with full
    covariances from ``n`` draws per group: ``k <= (n - 3) / 2``, at least 1.

    Why: a sample covariance ``S`` from ``n`` Gaussian draws in ``k`` dimensions has
    ``E[S^-1] = Sigma^-1 (n - 1) / (n - k - 2)`` (inverse Wishart), which the plug-in KL's trace and
    Mahalanobis terms inherit; ``k <= (n - 3) / 2`` keeps that inflation at most 2 (``n = 8``, i.e.
    16 models: ``k = 2``; ``n = 32``: ``k = 14``). Beyond it the estimate is dominated by the
    estimation noise of ``S^-1`` (singular outright for ``k >= n``)."""
    return max(1, (int(n) - 3) // 2)


def _check_keep(keep, m: int) -> np.ndarray:
    k = np.asarray(keep)
    if k.ndim != 2 or k.shape[0] != m:
        raise ValueError(f"keep must be bool [M, N] with M = {m} (values' first axis), got shape {k.shape}")
    if k.dtype != np.bool_:
        if not np.isin(k, (0, 1)).all():
            raise ValueError("keep must hold booleans (or 0/1)")
        k = k.astype(bool)
    return k


def _as_values(values, keep) -> Tuple[np.ndarray, np.ndarray]:
    """``(X float64 [M, N or 1, d], keep bool [M, N])`` after checking shapes and finiteness."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (2, 3):
        raise ValueError(f"values must be [M, N], [M, N, d] or [M, 1, d], got shape {x.shape}")
    if x.ndim == 2:
        x = x[:, :, None]
    k = _check_keep(keep, x.shape[0])
    if x.shape[1] not in (1, k.shape[1]):
        raise ValueError(f"values has {x.shape[1]} records but keep has {k.shape[1]} (values' record axis must "
                         f"match keep's, or be 1 for one vector per model)")
    if x.shape[2] == 0:
        raise ValueError("values has 0 dimensions per record")
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"values has {int(bad.sum())} non-finite entries (first at {first})")
    return x, k


def _group_sizes(keep: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    n1 = keep.sum(axis=0)
    n0 = keep.shape[0] - n1
    short = np.flatnonzero((n1 < 2) | (n0 < 2))
    if short.size:
        j = int(short[0])
        raise ValueError(f"record {j} has {int(n1[j])} IN and {int(n0[j])} OUT models; a Gaussian fit needs at "
                         f"least 2 of each (every record of a complementary-pair population has M/2 of each: "
                         f"use M >= 4)")
    return n1, n0


@dataclass(frozen=True)
class RecordGaussians:
    """The per-record Gaussian fits: IN ``N(mu_in, cov_in)``, OUT ``N(mu_out, cov_out)``.

    ``mu_*`` float64 ``[B, d]``; ``cov_*`` ``[B, d]`` (variances) for ``kind="diag"``, ``[B, d, d]`` for
    ``kind="full"``; ``n_in``/``n_out`` int ``[B]`` the models behind each fit."""

    mu_in: np.ndarray
    cov_in: np.ndarray
    mu_out: np.ndarray
    cov_out: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray
    kind: str


def fit_record_gaussians(*, values, keep, covariance: Literal["full", "diag"] = "diag",
                         ridge: float = 1e-3) -> RecordGaussians:
    """Fit ``N(mu_in, Sigma_in)`` to the IN models' values of each record and ``N(mu_out, Sigma_out)``
    to the OUT models' (Farokhi & Kaafar 2020, Remark 3: "extracted by Monte-Carlo simulation with
    and without" the record; here the population's models are the simulations).

    For group ``g`` of record ``j`` with ``n_g`` models: ``mu_g`` the sample mean, ``S_g`` the unbiased
    sample covariance (``ddof = 1``; only its diagonal for ``"diag"``), and

        ``Sigma_g = S_g + ridge * diag(s_j)``,

    ``s_j`` the pooled within-group variances of the record, ``((n_in - 1) diag S_in + (n_out - 1)
    diag S_out) / (n_in + n_out - 2)``; a coordinate whose pooled variance is 0 uses its variance over
    all ``M`` models instead, and 1 when that is 0 too (the coordinate is then equal in every model,
    the means agree and it adds 0 to the KL whatever the value). The ridge is thus relative to each
    coordinate's own spread, so the KL stays invariant to rescaling a coordinate (the exact KL is
    invariant to any invertible affine map); it makes ``Sigma_g`` positive definite when ``S_g`` is
    singular (fewer models than dimensions, or models that agree exactly on a record). ``ridge = 0``
    is the plain plug-in fit.

    Args:
        values: float ``[M, N]``, ``[M, N, d]``, or ``[M, 1, d]`` (broadcast over records).
        keep: bool ``[M, N]``; every record needs >= 2 IN and >= 2 OUT models.
        covariance: ``"diag"`` or ``"full"``.
        ridge: >= 0, see above.

    Returns:
        :class:`RecordGaussians` over all ``N`` records.

    Raises:
        ValueError: bad shapes, non-finite values, a record with fewer than 2 IN or OUT models,
            an unknown ``covariance``, a negative or non-finite ``ridge``.
    """
    x, k = _as_values(values, keep)
    if covariance not in ("full", "diag"):
        raise ValueError(f"covariance must be 'full' or 'diag', got {covariance!r}")
    _check_ridge(ridge)
    n1, n0 = _group_sizes(k)
    center = x.mean(axis=0, keepdims=True)  # per record (or global), so the moments do not cancel
    return _fit_chunk(x - center, k, n1, n0, covariance == "full", float(ridge))


def _check_ridge(ridge) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(ridge)) or float(ridge) < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")


def _fit_chunk(xc: np.ndarray, keep: np.ndarray, n1: np.ndarray, n0: np.ndarray, full: bool,
               ridge: float) -> RecordGaussians:
    """Moments of centred values ``xc`` [M, 1 or B, d] for the records of ``keep`` [M, B]."""
    m, _, d = xc.shape
    k1 = keep.astype(np.float64)
    k0 = 1.0 - k1
    if xc.shape[1] == 1:  # one vector per model: the sums are matrix products
        v = xc[:, 0, :]
        s1, s0 = k1.T @ v, k0.T @ v
        outer = (v[:, :, None] * v[:, None, :]).reshape(m, d * d) if full else v * v
        q1, q0 = k1.T @ outer, k0.T @ outer
        if full:
            q1, q0 = q1.reshape(-1, d, d), q0.reshape(-1, d, d)
    else:
        s1, s0 = np.einsum("mb,mbd->bd", k1, xc), np.einsum("mb,mbd->bd", k0, xc)
        if full:
            q1, q0 = np.einsum("mb,mbi,mbj->bij", k1, xc, xc), np.einsum("mb,mbi,mbj->bij", k0, xc, xc)
        else:
            q1, q0 = np.einsum("mb,mbd->bd", k1, xc * xc), np.einsum("mb,mbd->bd", k0, xc * xc)
    f1, f0 = n1.astype(np.float64)[:, None], n0.astype(np.float64)[:, None]
    mu1, mu0 = s1 / f1, s0 / f0
    ftot = f1 + f0
    mu_all = (s1 + s0) / ftot
    if full:
        cov1 = (q1 - f1[:, :, None] * mu1[:, :, None] * mu1[:, None, :]) / (f1[:, :, None] - 1.0)
        cov0 = (q0 - f0[:, :, None] * mu0[:, :, None] * mu0[:, None, :]) / (f0[:, :, None] - 1.0)
        cov1 = 0.5 * (cov1 + np.swapaxes(cov1, 1, 2))
        cov0 = 0.5 * (cov0 + np.swapaxes(cov0, 1, 2))
        var1 = np.diagonal(cov1, axis1=1, axis2=2)
        var0 = np.diagonal(cov0, axis1=1, axis2=2)
        sq_tot = np.diagonal(q1 + q0, axis1=1, axis2=2)
    else:
        cov1 = np.maximum((q1 - f1 * mu1 * mu1) / (f1 - 1.0), 0.0)  # rounding can dip below 0
        cov0 = np.maximum((q0 - f0 * mu0 * mu0) / (f0 - 1.0), 0.0)
        var1, var0 = cov1, cov0
        sq_tot = q1 + q0
    pooled = np.maximum(((f1 - 1.0) * var1 + (f0 - 1.0) * var0) / (ftot - 2.0), 0.0)
    total = np.maximum((sq_tot - ftot * mu_all * mu_all) / (ftot - 1.0), 0.0)
    scale = np.where(pooled > 0, pooled, np.where(total > 0, total, 1.0))
    if ridge > 0:
        if full:
            idx = np.arange(d)
            cov1 = cov1.copy()
            cov0 = cov0.copy()
            cov1[:, idx, idx] += ridge * scale
            cov0[:, idx, idx] += ridge * scale
        else:
            cov1 = cov1 + ridge * scale
            cov0 = cov0 + ridge * scale
    return RecordGaussians(mu1, cov1, mu0, cov0, n1.astype(np.int64), n0.astype(np.int64), "full" if full else "diag")


@dataclass(frozen=True)
class RecordKL:
    """Per-record divergences between the IN and OUT Gaussian fits.

    ``kl_in_out`` float64 ``[N]``: ``KL(p1 || p0)`` (IN to OUT, Farokhi & Kaafar's varrho_1);
    ``kl_out_in``: ``KL(p0 || p1)`` (varrho_2); ``symmetric``: their sum, the per-record term of
    rho_KL; ``covariance``: ``"univariate"``, ``"diag"`` or ``"full"``, what was fitted; ``dim``: d;
    ``n_in_min``/``n_out_min``: the fewest IN / OUT models behind any record's fit."""

    kl_in_out: np.ndarray
    kl_out_in: np.ndarray
    covariance: str
    dim: int
    n_in_min: int
    n_out_min: int

    @property
    def symmetric(self) -> np.ndarray:
        return self.kl_in_out + self.kl_out_in


def resolve_covariance(covariance: str, *, dim: int, n_min: int) -> str:
    """What ``covariance`` means for ``dim`` dimensions fitted from ``n_min`` models per group:
    ``"univariate"`` when ``dim == 1``; ``"auto"`` is ``"full"`` when ``dim <= min(128,
    max_full_dim(n_min))``, else ``"diag"``.

    Raises:
        ValueError: an unknown ``covariance``; ``"full"`` beyond the kernel's 128 dimensions."""
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}; got {covariance!r}")
    if dim == 1:
        return "univariate"
    if covariance == "auto":
        return "full" if dim <= min(FULL_MAX_DIM, max_full_dim(n_min)) else "diag"
    if covariance == "full" and dim > FULL_MAX_DIM:
        raise ValueError(f"covariance=full supports at most {FULL_MAX_DIM} dimensions (the kernel's limit), got "
                         f"{dim}; use covariance=diag or a PCA projection (dim=k)")
    return covariance


def per_record_kl(*, values, keep, covariance: Literal["auto", "full", "diag"] = "auto", ridge: float = 1e-3,
                  backend: str = "auto") -> RecordKL:
    """Per-record ``KL(p1 || p0)`` and ``KL(p0 || p1)`` of the Gaussian fits of
    :func:`fit_record_gaussians`, through the batched kernels ``mia_core.kernels.gaussian_kl``
    (univariate / diagonal) and ``gaussian_kl_full`` (full covariance), in float64:

        ``KL(N1 || N0) = 1/2 [tr(S0^-1 S1) + (mu0 - mu1)^T S0^-1 (mu0 - mu1) - d + ln det S0 - ln det S1]``

    (Farokhi & Kaafar 2020, Remark 3, with its ``tr(S0^-1 S0)`` read as ``tr(S0^-1 S1)``: as printed the
    term is the constant ``d`` and the divergence would not vanish at ``p1 = p0``).

    Records are processed in chunks of at most :data:`CHUNK_ELEMENTS` statistics, so white-box
    parameters (``values [M, 1, D]``, ``D`` ~ 1e4 with ``covariance="diag"``) never need an
    ``[N, D]`` matrix.

    Args:
        values, keep: as :func:`fit_record_gaussians`.
        covariance: ``"auto"``, ``"full"`` or ``"diag"`` (see :func:`resolve_covariance`).
        ridge: see :func:`fit_record_gaussians`.
        backend: the kernels' backend (``"auto"``, ``"native"``, ``"torch"``).

    Returns:
        :class:`RecordKL`; ``N = 0`` gives empty arrays.
    """
    import torch

    from mia_core.kernels import gaussian_kl, gaussian_kl_full

    x, k = _as_values(values, keep)
    _check_ridge(ridge)
    m, n = k.shape
    d = x.shape[2]
    if n == 0:
        kind = resolve_covariance(covariance, dim=d, n_min=m // 2)
        return RecordKL(np.zeros(0), np.zeros(0), kind, d, 0, 0)
    n1, n0 = _group_sizes(k)
    n_min = int(min(n1.min(), n0.min()))
    kind = resolve_covariance(covariance, dim=d, n_min=n_min)
    full = kind == "full"
    xc = x - x.mean(axis=0, keepdims=True)
    per_record = d * d if full else d
    step = max(1, CHUNK_ELEMENTS // per_record)
    fwd = np.empty(n)
    rev = np.empty(n)
    for a in range(0, n, step):
        b = min(n, a + step)
        chunk = xc if xc.shape[1] == 1 else xc[:, a:b]
        g = _fit_chunk(chunk, k[:, a:b], n1[a:b], n0[a:b], full, float(ridge))
        t = [torch.from_numpy(np.ascontiguousarray(arr)) for arr in (g.mu_in, g.cov_in, g.mu_out, g.cov_out)]
        if full:
            fwd[a:b] = gaussian_kl_full(*t, direction="forward", backend=backend).numpy()
            rev[a:b] = gaussian_kl_full(*t, direction="reverse", backend=backend).numpy()
        else:
            if d == 1:
                t = [v[:, 0] for v in t]
            fwd[a:b] = gaussian_kl(*t, direction="forward", backend=backend).numpy()
            rev[a:b] = gaussian_kl(*t, direction="reverse", backend=backend).numpy()
    return RecordKL(fwd, rev, kind, d, int(n1.min()), int(n0.min()))


def rho_kl(*, values, keep, covariance: Literal["auto", "full", "diag"] = "auto", ridge: float = 1e-3,
           backend: str = "auto") -> float:
    """Kullback–Leibler membership leakage under the Gaussian approximation (Farokhi & Kaafar 2020,
    Definition 2 and Remark 3): the mean over records of ``KL(p1 || p0) + KL(p0 || p1)``, in nats.

    Args and Raises: as :func:`per_record_kl`. Returns 0.0 for ``N = 0``."""
    r = per_record_kl(values=values, keep=keep, covariance=covariance, ridge=ridge, backend=backend)
    return float(r.symmetric.mean()) if r.symmetric.size else 0.0


def kl_advantage_bound(*, rho: float) -> float:
    """``min(1, sqrt(rho) / 2)``: the bound rho_KL puts on any adversary's membership advantage
    (Farokhi & Kaafar 2020, Theorem 1). As printed, the theorem bounds the probability of a correct
    guess, which cannot hold (guessing scores 1/2); its proof (Le Cam, Pinsker, Jensen) bounds the
    expected total variation ``E_j[TV(p1, p0)]``, i.e. the advantage ``max(TPR - FPR)`` of a
    per-record test with balanced membership, and that is what this returns."""
    rho = float(rho)
    if not rho >= 0 or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    return min(1.0, 0.5 * math.sqrt(rho))


def pinsker_advantage_bound(*, kl_in_out, kl_out_in) -> float:
    """``mean_j min(1, sqrt(min(KL_j(p1||p0), KL_j(p0||p1)) / 2))``: the same chain as
    :func:`kl_advantage_bound` stopped before Jensen's inequality (Pinsker per record, TV <= 1), so
    never larger than it; reported beside it."""
    a = np.asarray(kl_in_out, dtype=np.float64)
    b = np.asarray(kl_out_in, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"kl_in_out and kl_out_in must be 1-D of one shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.minimum(1.0, np.sqrt(np.maximum(np.minimum(a, b), 0.0) / 2.0)).mean())


def bootstrap_mean_interval(*, per_record, n_boot: int = 1000, confidence: float = 0.95,
                            seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_record`` (float ``[N]``), resampling records
    with replacement ``n_boot`` times from ``np.random.default_rng(seed)``; the interval always holds
    the mean itself. It reflects which records were drawn, not which models were trained (the
    Gaussian fits' own finite-M error, see :attr:`RecordKL` and the plugin's ``null_value``)."""
    v = np.asarray(per_record, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"per_record must be 1-D, got shape {v.shape}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0 < float(confidence) < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if v.size == 0:
        return 0.0, 0.0
    mean = float(v.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    rows = max(1, 2**20 // v.size)
    for a in range(0, n_boot, rows):
        b = min(n_boot, a + rows)
        means[a:b] = v[rng.integers(0, v.size, size=(b - a, v.size))].mean(axis=1)
    alpha = (1.0 - float(confidence)) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(min(lo, mean)), float(max(hi, mean))


def pca_project(*, params, dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """Project every model's flattened parameters on the population's first ``dim`` principal
    components (one PCA of all ``M`` models, membership-blind, so the same map for every record).

    Args:
        params: float ``[M, D]``.
        dim: ``1 <= dim <= min(M - 1, D)`` (centred, ``M`` models span at most ``M - 1`` directions).

    Returns:
        ``(z, ratio)``: float64 ``[M, dim]`` coordinates, and float64 ``[dim]`` the share of the total
        variance each component explains (0 where the parameters do not vary).
    """
    p = np.asarray(params, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"params must be [M, D], got shape {p.shape}")
    m, d = p.shape
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= min(m - 1, d):
        raise ValueError(f"dim must be an integer in [1, min(M - 1, D)] = [1, {min(m - 1, d)}] for {m} models of "
                         f"{d} parameters, got {dim!r}")
    pc = p - p.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(pc, full_matrices=False)
    z = u[:, :dim] * s[:dim]
    total = float((s * s).sum())
    ratio = (s[:dim] ** 2) / total if total > 0 else np.zeros(dim)
    return z, ratio


def shuffled_keep(*, keep, seed: int) -> np.ndarray:
    """``keep`` with each record's column permuted independently (same IN and OUT counts): a
    membership unrelated to training, on which the exact rho_KL is 0, so :func:`rho_kl` there measures
    the fits' finite-sample floor."""
    k = _check_keep(keep, np.asarray(keep).shape[0])
    return np.random.default_rng(seed).permuted(k, axis=0)


def _summary(v: np.ndarray) -> Dict[str, float]:
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "q05": float(q[0]),
            "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4]), "max": float(v.max())}


# ----------------------------------------------------------------------------- the plugin
class _AccessOfSource:
    """``access`` that depends on the mode. On the class: ``("params", "logits")``, everything some
    mode may read (what ``miafw info`` shows and the conformance kit grants). On an instance: only
    what its own mode reads, ``("params",)`` for ``source=params`` and the least level revealing the
    signal for ``source=signal`` (``confidence`` -> ``("probs",)``); the engine builds the context from
    the instance's ``access``, so the black-box mode is held to black-box access."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return ("params", "logits")
        if getattr(obj, "source", "signal") == "params":
            return ("params",)
        return SIGNAL_ACCESS_LEVEL.get(getattr(obj, "signal", None), ("logits",))


#: Salt of the seeds drawn from the population's seed (bootstrap, shuffled membership).
_SALT = 0x6B6C6C6B


class KLLeakage(Estimator):
    """KL membership leakage rho_KL from per-record IN/OUT Gaussian fits (Farokhi & Kaafar 2020).

    For each record the population gives the models that trained on it (IN) and those that did not
    (OUT). ``N(mu1, Sigma1)`` is fitted to what the IN models show and ``N(mu0, Sigma0)`` to the OUT
    models' (Remark 3), and rho_KL = mean over records of ``KL(p1||p0) + KL(p0||p1)`` (Definition 2),
    through the batched kernels ``mia_core.kernels.gaussian_kl`` / ``gaussian_kl_full``.

    What is modelled (``source``):

    * ``signal`` (default; black-box): a per-(model, record) signal, ``confidence`` (the logit-scaled
      confidence, 1-D Gaussians per record), ``loss`` (1-D) or ``logits`` (``C``-dimensional).
      By the data-processing inequality its true rho_KL is at most the parameters' (Remark 2).
    * ``params`` (white-box, the paper's setting): every model's flattened parameters. With ``M``
      models a record has only ``M/2`` IN and ``M/2`` OUT models, so a ``D``-dimensional covariance
      with ``D >> M`` is singular and its plug-in KL meaningless. Hence ``dim``: ``None`` (default)
      keeps the raw parameters when ``D <= max_full_dim(M/2)`` (then full covariance: linear models on
      few features with enough models) and otherwise projects on the population's first
      ``max_full_dim(M/2)`` principal components (one PCA of all ``M`` models; 2 components for 16
      models), with full covariance; ``dim=k`` projects on ``k`` components; ``dim=0`` keeps all ``D``
      raw parameters, which with ``covariance=auto`` means a diagonal covariance (per-coordinate
      variances, each with the relative ridge below).

    ``covariance``: ``auto`` (full when ``d <= min(128, max_full_dim(n))`` for ``n`` models per group,
    else diagonal; see :func:`max_full_dim`), ``full`` or ``diag``. Every covariance gets
    ``ridge * diag(pooled within-group variances)`` added (:func:`fit_record_gaussians`), so it is
    positive definite and the KL stays scale-invariant.

    Reported: ``value`` rho_KL (nats), ``interval`` its percentile bootstrap over records (seeded by
    the population's seed), ``advantage_bound`` = ``min(1, sqrt(rho_KL)/2)`` (Theorem 1, read as a
    bound on the advantage, which its proof gives; as printed it bounds P(correct), impossible below
    1/2) and its interval; ``rho_mi_bound`` = rho_KL/4 (Corollary 1; membership being one bit, the
    mutual information is also at most ln 2); ``advantage_bound_pinsker``, the tighter
    ``mean_j min(1, sqrt(min KL_j / 2))`` of the same proof; the per-record distribution and the
    ``top_k`` most exposed records; and ``null_value``, rho_KL of the same fits with each record's
    IN/OUT split shuffled, where the true value is 0: the finite-sample floor of the plug-in estimate
    (about ``4/(n - 3)`` for 1-D Gaussian values with ``n`` models per group, 0.8 for 16 models; larger
    in more dimensions), which the estimate always carries: finite samples bias it upwards (the bound
    is conservative on that count and vacuous when the floor is large, e.g. ``dim=0`` on a
    19k-parameter MLP), while the Gaussian approximation itself can err either way. The signal mode's
    bound covers attacks that read only that signal of the record (LiRA); one that reads more (RMIA
    compares with other records' outputs) is bounded only by the white-box quantity.

    With ``source=params`` every record sees the same ``M`` parameter vectors and differs only in which
    of them are IN, so records with the same IN/OUT split share one KL (a complementary-pair population
    of 16 models has at most 2^8 = 256 splits): ties among the most exposed records are expected there.

    Records are identified by their stable ids (``ctx.record_index``: row numbers of the source data).

    Args:
        source: ``signal`` or ``params``.
        signal: ``confidence``, ``loss`` or ``logits`` (``source=signal``; unused with ``params``).
        covariance: ``auto``, ``full`` or ``diag``.
        dim: ``source=params`` only: ``None`` automatic, ``0`` raw parameters, ``k >= 1`` PCA components.
        ridge: relative ridge (>= 0), see above.
        n_bootstrap: bootstrap resamples of the records (>= 10).
        confidence: level of the interval, in (0, 1).
        top_k: how many most exposed records to report (>= 0).
    """

    api_version = "1.0"
    access = _AccessOfSource()  # type: ignore[assignment]
    reference = (
        "F. Farokhi, M. A. Kaafar. Modelling and Quantifying Membership Information Leakage in Machine "
        "Learning. arXiv:2001.10648, 2020 (Definition 2, Remark 3, Corollary 1, Theorem 1)"
    )

    def __init__(self, source: Literal["signal", "params"] = "signal",
                 signal: Literal["confidence", "loss", "logits"] = "confidence",
                 covariance: Literal["auto", "full", "diag"] = "auto", dim: Optional[int] = None,
                 ridge: float = 1e-3, n_bootstrap: int = 1000, confidence: float = 0.95, top_k: int = 10):
        self.source = source
        self.signal = signal
        self.covariance = covariance
        self.dim = dim
        self.ridge = ridge
        self.n_bootstrap = n_bootstrap
        self.confidence = confidence
        self.top_k = top_k

    @staticmethod
    def _is_int(v) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, np.integer))

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if self.signal not in SIGNAL_ACCESS_LEVEL:
            raise ValueError(f"signal must be one of {', '.join(SIGNAL_ACCESS_LEVEL)}; got {self.signal!r}")
        if self.covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}; got {self.covariance!r}")
        if self.dim is not None:
            if not self._is_int(self.dim) or self.dim < 0:
                raise ValueError(f"dim must be none (automatic), 0 (raw parameters) or a number of PCA components "
                                 f">= 1, got {self.dim!r}")
            if self.source != "params":
                raise ValueError(f"dim={self.dim} applies to source=params only (the parameters' PCA); "
                                 f"source={self.source} models the signal itself")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not math.isfinite(self.ridge) \
                or self.ridge < 0:
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge!r}")
        if not self._is_int(self.n_bootstrap) or self.n_bootstrap < 10:
            raise ValueError(f"n_bootstrap must be an integer >= 10, got {self.n_bootstrap!r}")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) \
                or not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be a number in (0, 1), got {self.confidence!r}")
        if not self._is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    def _params_values(self, ctx, keep: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
        import torch

        params = ctx.parameters()
        m = keep.shape[0]
        theta = np.concatenate([v.detach().cpu().to(torch.float64).reshape(m, -1).numpy() for v in params.values()],
                               axis=1)
        n_params = int(theta.shape[1])
        n_min = int(min(keep.sum(0).min(), (~keep).sum(0).min())) if keep.size else 0
        dim = self.dim
        if dim is None:
            dim = 0 if n_params <= max_full_dim(n_min) else min(max_full_dim(n_min), max(1, m - 1), n_params)
        fit: Dict[str, Any] = {"n_parameters": n_params}
        if dim == 0:
            fit["projection"] = "none (raw parameters)"
            return theta[:, None, :], fit
        if dim > min(m - 1, n_params):
            raise ValueError(f"dim={dim} exceeds the {min(m - 1, n_params)} principal components that {m} models of "
                             f"{n_params} parameters span (at most M - 1)")
        z, ratio = pca_project(params=theta, dim=int(dim))
        fit["projection"] = f"pca ({dim} of {n_params} parameters, fitted once on all {m} models)"
        fit["explained_variance_ratio"] = [float(r) for r in ratio]
        return z[:, None, :], fit

    def estimate(self, ctx) -> Dict[str, Any]:
        self.validate()
        keep = np.asarray(ctx.keep, dtype=bool)
        if self.source == "params":
            values, fit = self._params_values(ctx, keep)
        else:
            values, fit = np.asarray(ctx.signal(self.signal), dtype=np.float64), {"signal": self.signal}
        ridge = float(self.ridge)
        res = per_record_kl(values=values, keep=keep, covariance=self.covariance, ridge=ridge)
        seeds = np.random.SeedSequence([int(ctx.seed), _SALT]).generate_state(2)
        # same IN/OUT counts per record, so the same covariance kind is resolved
        null = per_record_kl(values=values, keep=shuffled_keep(keep=keep, seed=int(seeds[1])),
                             covariance=self.covariance, ridge=ridge)
        per = res.symmetric
        rho = float(per.mean())
        lo, hi = bootstrap_mean_interval(per_record=per, n_boot=int(self.n_bootstrap),
                                         confidence=float(self.confidence), seed=int(seeds[0]))
        ids = np.asarray(ctx.record_index, dtype=np.int64)  # stable record ids (row numbers of the data)
        order = np.argsort(-per, kind="stable")[: int(self.top_k)]
        fit.update({"source": self.source, "dimension": res.dim, "covariance": res.covariance, "ridge": ridge,
                    "n_in_min": res.n_in_min, "n_out_min": res.n_out_min})
        return {
            "value": rho,
            "interval": [lo, hi],
            "advantage_bound": kl_advantage_bound(rho=rho),
            "advantage_bound_interval": [kl_advantage_bound(rho=lo), kl_advantage_bound(rho=hi)],
            "advantage_bound_pinsker": pinsker_advantage_bound(kl_in_out=res.kl_in_out, kl_out_in=res.kl_out_in),
            "rho_mi_bound": rho / 4.0,
            "kl_in_out": float(res.kl_in_out.mean()),
            "kl_out_in": float(res.kl_out_in.mean()),
            "null_value": float(null.symmetric.mean()),
            "per_record": _summary(per),
            "most_exposed": [{"record": int(ids[j]), "kl": float(per[j])} for j in order],
            "fit": fit,
            "units": "nats",
            "confidence": float(self.confidence),
        }


__all__ = [
    "KLLeakage",
    "RecordGaussians",
    "RecordKL",
    "bootstrap_mean_interval",
    "fit_record_gaussians",
    "kl_advantage_bound",
    "max_full_dim",
    "pca_project",
    "per_record_kl",
    "pinsker_advantage_bound",
    "resolve_covariance",
    "rho_kl",
    "shuffled_keep",
]
