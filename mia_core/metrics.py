"""Membership-inference metrics: ROC, AUC, advantage, TPR at low FPR, empirical ε lower bounds.

Pure functions on two 1-D arrays, numpy only (plus :mod:`scipy.special` for the beta quantile
behind Clopper–Pearson intervals). Stateful wrappers (attacks, reports) live elsewhere and call these.

Conventions
-----------
* **Members are the positive class**, always. ``membership[i]`` is ``True`` (or ``1``) when record
  ``i`` was in the target model's training set.
* **Scores are oriented higher = more likely member.** An attack whose natural statistic points the
  other way (a loss, say) must negate it before calling these functions.
* A **threshold** ``t`` predicts "member" for every record with ``score >= t``. Records with equal
  scores therefore always enter the prediction together: a tie group is never split, and every
  distinct score value is one ROC point. The ROC starts at ``(FPR, TPR) = (0, 0)`` with threshold
  ``+inf`` (nobody predicted member) and ends at ``(1, 1)`` with threshold ``min(scores)``.
* TPR = true positives / members, FPR = false positives / non-members.
* Signatures: ``f(scores, membership, ..., *, keyword_only=...)``. Every function validates its
  inputs and raises :class:`ValueError` naming the offending value: ``scores`` must be a 1-D array
  of finite real numbers, ``membership`` a 1-D boolean (or 0/1 integer) array of the same length,
  with at least one member and one non-member.
* All results are plain Python ``float``/``int``/``bool`` (or numpy arrays for the ROC itself), so
  :func:`summarize` output can go straight into ``json.dumps(..., allow_nan=False)``.
* Cost: one ``O(N log N)`` sort per call; everything after it is linear. :func:`summarize` sorts
  once for all the metrics it reports.

Low-FPR resolution
------------------
With ``n`` non-members the smallest non-zero FPR that can be observed is ``1/n``. When
``n < 1/fpr_target`` no threshold with even one false positive fits under the target, so "TPR at
that FPR" is really the TPR at *zero* observed false positives, whose true FPR is poorly known.
:class:`TprAtFpr` records this as ``resolvable=False`` and :func:`tpr_at_fpr` / :func:`summarize`
emit a :class:`MetricsWarning`.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy import special

__all__ = [
    "MetricsWarning",
    "TprAtFpr",
    "roc_curve",
    "auc",
    "advantage",
    "balanced_accuracy",
    "clopper_pearson",
    "crossed_auc_interval",
    "crossed_mean_interval",
    "tpr_at_fpr",
    "epsilon_lower_bound",
    "summarize",
    "summarize_with_curve",
    "RocCurve",
    "auc_interval",
    "advantage_interval",
    "slice_metrics",
    "AUC_INTERVAL_METHOD",
    "EPSILON_METHOD",
]


class MetricsWarning(UserWarning):
    """A metric was computed but cannot be trusted as an estimate (e.g. too few non-members)."""


@dataclass(frozen=True)
class TprAtFpr:
    """TPR of the best threshold whose empirical FPR does not exceed ``fpr_target``.

    Attributes:
        fpr_target: the requested FPR, in ``(0, 1)``.
        tpr: the largest TPR among thresholds with ``FPR <= fpr_target`` (0.0 when only the
            trivial threshold ``+inf`` fits).
        ci_low, ci_high: Clopper–Pearson interval for ``tpr`` (true positives out of
            ``n_members``) at the confidence level that was asked for. It covers the sampling
            noise of the members only: the threshold itself is taken as given.
        threshold: the score threshold used (predict member iff ``score >= threshold``); the
            highest threshold that reaches ``tpr``. ``+inf`` when ``tpr`` is 0.
        achieved_fpr: the empirical FPR at ``threshold`` (``<= fpr_target``).
        n_members, n_nonmembers: the sample sizes.
        resolvable: ``n_nonmembers >= 1/fpr_target``, i.e. a single false positive can be
            represented below the target. When ``False`` the value is the TPR at zero observed
            false positives, an optimistic guess rather than an estimate at ``fpr_target``.
    """

    fpr_target: float
    tpr: float
    ci_low: float
    ci_high: float
    threshold: float
    achieved_fpr: float
    n_members: int
    n_nonmembers: int
    resolvable: bool

    def to_dict(self) -> Dict[str, Any]:
        """Plain-Python, strict-JSON dict of the fields (an infinite ``threshold`` becomes ``None``)."""
        d = asdict(self)
        if not math.isfinite(d["threshold"]):
            d["threshold"] = None
        return d


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_inputs(scores: Any, membership: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (float64 scores, bool membership)."""
    s = np.asarray(scores)
    m = np.asarray(membership)
    if s.ndim != 1:
        raise ValueError(f"scores must be a 1-D array, got shape {s.shape}")
    if m.ndim != 1:
        raise ValueError(f"membership must be a 1-D array, got shape {m.shape}")
    if s.dtype == np.bool_ or not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)):
        raise ValueError(f"scores must be real numbers (integer or float dtype), got dtype {s.dtype}")
    if s.shape[0] != m.shape[0]:
        raise ValueError(
            f"scores and membership must have the same length, got {s.shape[0]} and {m.shape[0]}"
        )
    s = s.astype(np.float64, copy=False)
    finite = np.isfinite(s)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"scores contains {bad.size} NaN/inf values (first at index {int(bad[0])})"
        )
    if m.dtype != np.bool_:
        if m.size and not np.issubdtype(m.dtype, np.integer):
            raise ValueError(f"membership must be boolean or 0/1 integers, got dtype {m.dtype}")
        bad = np.flatnonzero((m != 0) & (m != 1))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"membership must be boolean or 0/1 integers, got value {m[i].item()!r} at index {i}"
            )
        m = m.astype(np.bool_)
    n_members = int(np.count_nonzero(m))
    n = m.shape[0]
    if n_members == 0 or n_members == n:
        missing = "members" if n_members == 0 else "non-members"
        raise ValueError(
            f"membership has no {missing} ({n_members} members out of {n} records); "
            "need at least one member and one non-member"
        )
    return s, m


def _check_open_unit(value: Any, name: str) -> float:
    """``value`` as a float strictly between 0 and 1, else ValueError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if not (0.0 < v < 1.0):
        raise ValueError(f"{name} must be in (0, 1) (exclusive), got {value!r}")
    return v


def _check_confidence(confidence: Any) -> float:
    return _check_open_unit(confidence, "confidence")


def _check_fpr(fpr: Any, name: str = "fpr") -> float:
    return _check_open_unit(fpr, name)


# --------------------------------------------------------------------------------------------
# the one sort
# --------------------------------------------------------------------------------------------


class _Roc(NamedTuple):
    """Cumulative counts at every distinct threshold, the (0, 0) point first."""

    tps: np.ndarray  # int64[K+1] true positives, nondecreasing, tps[-1] == n_pos
    fps: np.ndarray  # int64[K+1] false positives, nondecreasing, fps[-1] == n_neg
    thresholds: np.ndarray  # float64[K+1], thresholds[0] == +inf, strictly decreasing
    n_pos: int
    n_neg: int


def _roc_counts(s: np.ndarray, m: np.ndarray) -> _Roc:
    order = np.argsort(s)[::-1]  # descending; order inside a tie group is irrelevant
    s_sorted = s[order]
    # last index of each tie group (in descending order)
    ends = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    ends = np.append(ends, s_sorted.size - 1)
    cum_pos = np.cumsum(m[order], dtype=np.int64)
    tps = np.empty(ends.size + 1, dtype=np.int64)
    fps = np.empty(ends.size + 1, dtype=np.int64)
    tps[0] = 0
    fps[0] = 0
    tps[1:] = cum_pos[ends]
    fps[1:] = ends + 1 - tps[1:]
    thresholds = np.empty(ends.size + 1, dtype=np.float64)
    thresholds[0] = np.inf
    thresholds[1:] = s_sorted[ends]
    return _Roc(tps, fps, thresholds, int(tps[-1]), int(fps[-1]))


def _auc(r: _Roc) -> float:
    # Trapezoid in integer counts (exact): sum over steps of dFP * (TP_prev + TP_cur) / 2.
    area2 = int(np.sum(np.diff(r.fps) * (r.tps[1:] + r.tps[:-1])))
    return area2 / (2.0 * r.n_pos * r.n_neg)


def _advantage(r: _Roc) -> float:
    # max TPR - FPR in integer arithmetic, so it is exactly 0 for the trivial thresholds
    best = int(np.max(r.tps * r.n_neg - r.fps * r.n_pos))
    return max(best, 0) / (r.n_pos * r.n_neg)


# --------------------------------------------------------------------------------------------
# ROC-based metrics
# --------------------------------------------------------------------------------------------


def roc_curve(scores: Any, membership: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve at every distinct score threshold.

    Args:
        scores: float[N], higher = more likely member.
        membership: bool[N] (or 0/1 integers), ``True`` for members.

    Returns:
        ``(fpr, tpr, thresholds)``, each float64[K + 1] where K is the number of distinct scores.
        Point 0 is ``(0, 0)`` at threshold ``+inf``; point ``j >= 1`` predicts member for
        ``score >= thresholds[j]``; ``thresholds`` is strictly decreasing and the last point is
        ``(1, 1)``. Identical to ``sklearn.metrics.roc_curve(membership, scores,
        drop_intermediate=False)``.
    """
    r = _roc_counts(*_check_inputs(scores, membership))
    return r.fps / r.n_neg, r.tps / r.n_pos, r.thresholds


def auc(scores: Any, membership: Any) -> float:
    """Area under the ROC curve (trapezoid rule over :func:`roc_curve`).

    Equals the Mann–Whitney probability ``P(score_member > score_nonmember) + P(tie)/2``; 0.5 for
    an uninformative attack, 1.0 for perfect separation, 0.0 for perfectly reversed scores.
    Computed from integer counts, so it is exact up to the final division.
    """
    return _auc(_roc_counts(*_check_inputs(scores, membership)))


def advantage(scores: Any, membership: Any) -> float:
    """Membership advantage ``max_t TPR(t) - FPR(t)`` (Yeom et al., CSF 2018), in ``[0, 1]``.

    The maximum runs over all thresholds including the trivial ones (``+inf`` and
    ``min(scores)``, both giving 0), so the result is never negative. Like
    :func:`balanced_accuracy` this is the best-threshold (oracle) value: the threshold is chosen
    on the same data it is evaluated on, so it is optimistically biased for small samples.
    """
    return _advantage(_roc_counts(*_check_inputs(scores, membership)))


def balanced_accuracy(scores: Any, membership: Any) -> float:
    """Best balanced accuracy over thresholds, ``(1 + advantage) / 2``, in ``[0.5, 1]``.

    Balanced accuracy at a threshold is ``(TPR + TNR) / 2``; this returns its maximum over all
    thresholds, i.e. the accuracy of an **oracle** that picks the threshold knowing the
    membership labels. It is an optimistic summary, not the accuracy of a deployable attack
    whose threshold was fixed in advance.
    """
    return (1.0 + advantage(scores, membership)) / 2.0


# --------------------------------------------------------------------------------------------
# binomial intervals
# --------------------------------------------------------------------------------------------


def _cp_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Vectorised Clopper–Pearson upper end (two-sided level 1 - alpha) for counts k of n."""
    k = np.asarray(k, dtype=np.float64)
    out = np.ones_like(k)
    inner = k < n
    if np.any(inner):
        ki = k[inner]
        out[inner] = special.betaincinv(ki + 1.0, n - ki, 1.0 - alpha / 2.0)
    return out


def clopper_pearson(k: int, n: int, *, confidence: float = 0.95) -> Tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided binomial confidence interval for ``k`` successes in ``n``.

    ``low = Beta.ppf(alpha/2; k, n-k+1)`` and ``high = Beta.ppf(1-alpha/2; k+1, n-k)`` with
    ``alpha = 1 - confidence``; ``low = 0`` when ``k = 0``, ``high = 1`` when ``k = n``, and
    ``(0.0, 1.0)`` when ``n = 0``. Matches ``scipy.stats.binomtest(k, n).proportion_ci(
    confidence_level=confidence, method="exact")``.

    Raises:
        ValueError: if ``k``/``n`` are not integers with ``0 <= k <= n`` or ``confidence`` is not
            in ``(0, 1)``.
    """
    try:
        k_i = operator.index(k)
        n_i = operator.index(n)
    except TypeError:
        raise ValueError(f"k and n must be integers, got k={k!r}, n={n!r}") from None
    if not (0 <= k_i <= n_i):
        raise ValueError(f"need 0 <= k <= n, got k={k_i}, n={n_i}")
    c = _check_confidence(confidence)
    if n_i == 0:
        return 0.0, 1.0
    alpha = 1.0 - c
    low = 0.0 if k_i == 0 else float(special.betaincinv(k_i, n_i - k_i + 1.0, alpha / 2.0))
    high = 1.0 if k_i == n_i else float(special.betaincinv(k_i + 1.0, n_i - k_i, 1.0 - alpha / 2.0))
    return low, high


# --------------------------------------------------------------------------------------------
# TPR at low FPR
# --------------------------------------------------------------------------------------------


def _min_nonmembers(fpr: float) -> int:
    """Smallest n with 1/n <= fpr (same floating-point comparison as the threshold choice)."""
    n = max(1, math.ceil(1.0 / fpr))
    while n > 1 and 1.0 / (n - 1) <= fpr:
        n -= 1
    while 1.0 / n > fpr:
        n += 1
    return n


def _tpr_at_fpr(r: _Roc, fpr_target: float, confidence: float) -> TprAtFpr:
    fpr = r.fps / r.n_neg  # nondecreasing
    last = int(np.searchsorted(fpr, fpr_target, side="right")) - 1  # >= 0: fpr[0] == 0
    # highest threshold that reaches the same TPR (the lowest FPR at that TPR)
    j = int(np.searchsorted(r.tps, r.tps[last], side="left"))
    tp = int(r.tps[j])
    lo, hi = clopper_pearson(tp, r.n_pos, confidence=confidence)
    return TprAtFpr(
        fpr_target=float(fpr_target),
        tpr=tp / r.n_pos,
        ci_low=lo,
        ci_high=hi,
        threshold=float(r.thresholds[j]),
        achieved_fpr=float(fpr[j]),
        n_members=r.n_pos,
        n_nonmembers=r.n_neg,
        resolvable=bool(1.0 / r.n_neg <= fpr_target),
    )


def _format_percent(fpr: float) -> str:
    return f"{float(format(fpr * 100.0, '.10g')):g}%"


def _resolution_message(t: TprAtFpr) -> str:
    pct = _format_percent(t.fpr_target)
    return (
        f"only {t.n_nonmembers} non-members: TPR at {pct} FPR needs at least "
        f"{_min_nonmembers(t.fpr_target)} to be resolved (the value shown is the TPR at zero false positives and may overstate it)"
    )


def tpr_at_fpr(scores: Any, membership: Any, fpr: float, *, confidence: float = 0.95) -> TprAtFpr:
    """TPR at a fixed low FPR, as reported for LiRA-style attacks (Carlini et al., S&P 2022).

    Among all thresholds whose empirical FPR is ``<= fpr``, take the one with the largest TPR
    (the highest such threshold if several tie). Because tie groups enter together, a threshold
    inside a group of equal scores is usable only if the whole group fits under ``fpr``. The
    trivial threshold ``+inf`` (TPR 0, FPR 0) always fits.

    Args:
        scores: float[N], higher = more likely member.
        membership: bool[N], ``True`` for members.
        fpr: the target false-positive rate, in ``(0, 1)``.
        confidence: level of the Clopper–Pearson interval on the TPR.

    Returns:
        a :class:`TprAtFpr`. When fewer than ``1/fpr`` non-members are available it has
        ``resolvable=False`` and a :class:`MetricsWarning` is emitted.
    """
    s, m = _check_inputs(scores, membership)
    f = _check_fpr(fpr)
    c = _check_confidence(confidence)
    res = _tpr_at_fpr(_roc_counts(s, m), f, c)
    if not res.resolvable:
        warnings.warn(_resolution_message(res), MetricsWarning, stacklevel=2)
    return res


# --------------------------------------------------------------------------------------------
# empirical epsilon lower bound
# --------------------------------------------------------------------------------------------


def _epsilon_lower_bound(r: _Roc, confidence: float, delta: float) -> float:
    alpha = 1.0 - confidence
    fp = r.fps
    fn = r.n_pos - r.tps
    # Only "corner" points can attain the maximum: the objective decreases in both FP and FN,
    # so drop a point when the next one has the same FP (and fewer FN) or the previous one has
    # the same FN (and fewer FP).
    keep = np.ones(fp.size, dtype=bool)
    keep[:-1] &= fp[1:] != fp[:-1]
    keep[1:] &= fn[1:] != fn[:-1]
    fp = fp[keep]
    fn = fn[keep]
    # Cheap lower bounds on the Clopper-Pearson upper ends: the CP interval contains k/n and its
    # upper end grows with k, so it is >= max(k/n, upper end at k=0 = 1 - (alpha/2)^(1/n)).
    # They give an upper bound on each point's epsilon; evaluate the exact (costly) beta
    # quantiles best-bound-first and stop once no remaining point can beat the best so far.
    fp_lb = np.maximum(fp / r.n_neg, -math.expm1(math.log(alpha / 2.0) / r.n_neg))
    fn_lb = np.maximum(fn / r.n_pos, -math.expm1(math.log(alpha / 2.0) / r.n_pos))
    with np.errstate(divide="ignore", invalid="ignore"):
        ub = np.maximum(
            np.log(np.maximum(1.0 - delta - fp_lb, 0.0) / fn_lb),
            np.log(np.maximum(1.0 - delta - fn_lb, 0.0) / fp_lb),
        )
    candidates = np.flatnonzero(ub > 0.0)
    if candidates.size == 0:
        return 0.0
    candidates = candidates[np.argsort(-ub[candidates], kind="stable")]
    best = 0.0
    start, chunk = 0, 256
    while start < candidates.size:
        idx = candidates[start : start + chunk]
        if ub[idx[0]] <= best:
            break
        fpr_hi = _cp_upper(fp[idx], r.n_neg, alpha)
        fnr_hi = _cp_upper(fn[idx], r.n_pos, alpha)
        with np.errstate(divide="ignore", invalid="ignore"):
            eps = np.maximum(
                np.log(np.maximum(1.0 - delta - fpr_hi, 0.0) / fnr_hi),
                np.log(np.maximum(1.0 - delta - fnr_hi, 0.0) / fpr_hi),
            )
        eps = eps[np.isfinite(eps)]
        if eps.size:
            best = max(best, float(np.max(eps)))
        start += chunk
        chunk *= 4
    return best


def epsilon_lower_bound(
    scores: Any, membership: Any, *, confidence: float = 0.95, delta: float = 0.0
) -> float:
    """Empirical lower bound on the DP ε implied by the attack's ROC.

    Follows Jagielski, Ullman & Oprea, "Auditing Differentially Private Machine Learning: How
    Private is Private SGD?", NeurIPS 2020. An (ε, δ)-DP mechanism forces every test with false
    positive rate FPR and false negative rate FNR to satisfy ``FPR + e^ε FNR >= 1 - δ`` and
    ``FNR + e^ε FPR >= 1 - δ``. For every threshold this function takes the Clopper–Pearson
    upper ends ``FPR_hi`` (false positives out of the non-members) and ``FNR_hi`` (missed members
    out of the members) of the two-sided interval at ``confidence`` and computes::

        ε_t = max( log((1 - δ - FPR_hi) / FNR_hi),  log((1 - δ - FNR_hi) / FPR_hi) )

    and returns ``max(0, max_t ε_t)`` (0.0 when no threshold gives a positive value).

    Caveats -- read before quoting the number as "the model is at least ε-DP":
      * The bound is about the **distinguishing game** between neighbouring training sets. The
        binomial intervals treat every record as an independent trial of that game; records
        scored against one trained model are not independent trials (they share the model), so
        the statistical guarantee holds only under that independence assumption. A rigorous
        audit trains one model per trial.
      * The maximum over thresholds is taken on the same data, so the nominal confidence does
        not account for that selection; choose the threshold on held-out data for a formal audit.
      * Record-level membership inference bounds the ε of the record-level guarantee only when
        the membership split matches the DP neighbouring relation (add/remove one record).

    Args:
        scores: float[N], higher = more likely member.
        membership: bool[N], ``True`` for members.
        confidence: confidence level of each Clopper–Pearson interval, in ``(0, 1)``.
        delta: the δ of the (ε, δ) guarantee being audited, in ``[0, 1)``.
    """
    s, m = _check_inputs(scores, membership)
    c = _check_confidence(confidence)
    try:
        d = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"delta must be a number in [0, 1), got {delta!r}") from None
    if not (0.0 <= d < 1.0):
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return _epsilon_lower_bound(_roc_counts(s, m), c, d)


# --------------------------------------------------------------------------------------------
# AUC interval (bootstrap)
# --------------------------------------------------------------------------------------------

#: How :func:`auc_interval` computes its interval, as recorded in ``metrics.json``.
AUC_INTERVAL_METHOD = ("percentile bootstrap over records (a record's scores against every target are resampled "
                       "together, since they share the record)")


class _Prepared(NamedTuple):
    """Scores sorted once for weighted resampling: ties contiguous, each score's cluster."""

    m: np.ndarray  # bool [n], in ascending score order
    cluster: np.ndarray  # int [n] cluster index of each sorted score, in [0, n_clusters)
    starts: np.ndarray  # int [T] first position of each tie group
    n_clusters: int


def _prepare(s: np.ndarray, m: np.ndarray, groups: Any) -> _Prepared:
    g = np.arange(s.size) if groups is None else np.asarray(groups)
    if g.shape != s.shape:
        raise ValueError(f"groups must have one id per score ({s.size}), got shape {g.shape}")
    _, cluster = np.unique(g, return_inverse=True)
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups, contiguous
    return _Prepared(m[order], cluster.reshape(-1)[order], starts, int(cluster.max()) + 1)


def _weighted_stats(p: _Prepared, w: np.ndarray, fprs: Sequence[float] = ()) -> Tuple[np.ndarray, ...]:
    """AUC (ties 1/2), advantage (max over thresholds ``score >= t`` of TPR - FPR, >= 0) and TPR
    at each of ``fprs`` (the largest TPR over thresholds whose FPR is ``<= fpr``, ties entering
    together, as :func:`tpr_at_fpr`) of the scores weighted by ``w`` (float ``[b, n]``, in
    :class:`_Prepared` order): ``(auc [b'], advantage [b'], tpr [b', len(fprs)], ok [b])`` for the
    ``b'`` rows with both classes (``ok``)."""
    pos = np.add.reduceat(w * p.m, p.starts, axis=1)
    neg = np.add.reduceat(w * ~p.m, p.starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    ok = (n_pos > 0) & (n_neg > 0)
    aucs = (pos * (below + 0.5 * neg)).sum(axis=1)[ok] / (n_pos[ok] * n_neg[ok])
    tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1][ok]  # threshold at tie group k: scores >= its value
    fp = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1][ok]
    tpr, fpr = tp / n_pos[ok, None], fp / n_neg[ok, None]
    advs = np.maximum((tpr - fpr).max(axis=1), 0.0) if ok.any() else np.zeros(0)
    at = np.zeros((int(ok.sum()), len(fprs)))
    for i, f in enumerate(fprs):
        at[:, i] = np.where(fpr <= f, tpr, 0.0).max(axis=1, initial=0.0)
    return aucs, advs, at, ok


def _bootstrap(*, scores: Any, membership: Any, groups: Any, n_boot: int, confidence: float,
               seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The resampled AUCs and advantages of :func:`auc_interval` / :func:`advantage_interval`
    (the same resamples for both): float ``[B']`` each, resamples without both classes dropped."""
    s, m = _check_inputs(scores, membership)
    _check_confidence(confidence)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    p = _prepare(s, m, groups)
    rng = np.random.default_rng(seed)
    aucs, advs = [], []
    for lo in range(0, n_boot, 64):  # resamples in blocks: [b, n] weights stay small
        b = min(64, n_boot - lo)
        counts = rng.multinomial(p.n_clusters, np.full(p.n_clusters, 1.0 / p.n_clusters), size=b).astype(np.float64)
        a, v, _, _ = _weighted_stats(p, counts[:, p.cluster])
        aucs.append(a)
        advs.append(v)
    return np.concatenate(aucs), np.concatenate(advs)


def _metric_spec(metric: str) -> Tuple[str, Optional[float]]:
    text = str(metric).strip().lower()
    if text in ("auc", "advantage"):
        return text, None
    if text.startswith("tpr@"):
        try:
            return "tpr", _check_fpr(float(text[4:]), "the FPR of tpr@F")
        except ValueError:
            pass
    raise ValueError(f"metric must be 'auc', 'advantage' or 'tpr@F' with F in (0, 1) (e.g. tpr@0.01), got {metric!r}")


def _pick(stats: Tuple[np.ndarray, ...], kind: str) -> np.ndarray:
    if kind == "tpr":
        return stats[2][:, 0]
    return stats[0] if kind == "auc" else stats[1]


def difference_interval(*, scores_a: Any, membership_a: Any, scores_b: Any, membership_b: Any, groups_a: Any = None,
                        groups_b: Any = None, metric: str = "auc", paired: bool = False, n_boot: int = 200,
                        confidence: float = 0.95, seed: int = 0) -> Tuple[float, float, float]:
    """The difference ``metric(b) - metric(a)`` between two attacks' (or two runs') scores, with
    a percentile-bootstrap interval (Efron & Tibshirani 1993, ch. 13 and 16).

    Clusters (``groups``: e.g. record ids, one record's scores against several targets) are
    resampled with replacement. ``paired=True``: the two score sets come from the same records
    (cluster ids shared between ``groups_a`` and ``groups_b``), so each resample draws the clusters
    once and weights both sides with the same multiplicities, which cancels the records' own
    variability from the difference; ``paired=False``: the two sides are resampled independently.

    Args:
        scores_a, membership_a, scores_b, membership_b: float ``[n_a]``, bool ``[n_a]``, and the
            same for ``b``.
        groups_a, groups_b: cluster ids (``None``: every score its own cluster; ``paired`` needs
            both).
        metric: ``"auc"``, ``"advantage"`` or ``"tpr@F"`` (TPR at FPR ``F``, as :func:`tpr_at_fpr`).
        n_boot, confidence, seed: as :func:`auc_interval`.

    Returns:
        ``(difference, low, high)``; ``low``/``high`` are NaN if every resample lacked a class.
    """
    kind, f = _metric_spec(metric)
    sa, ma = _check_inputs(scores_a, membership_a)
    sb, mb = _check_inputs(scores_b, membership_b)
    c = _check_confidence(confidence)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    fprs = () if f is None else (f,)
    if paired:
        if groups_a is None or groups_b is None:
            raise ValueError("paired=True needs groups_a and groups_b (the shared cluster ids)")
        ids, inverse = np.unique(np.concatenate([np.asarray(groups_a).ravel(), np.asarray(groups_b).ravel()]),
                                 return_inverse=True)
        ga, gb = inverse[:sa.size], inverse[sa.size:]
    else:
        ga, gb = groups_a, groups_b
    pa, pb = _prepare(sa, ma, ga), _prepare(sb, mb, gb)
    if paired:  # one cluster numbering for both: the shared ids
        order_a, order_b = np.argsort(sa, kind="stable"), np.argsort(sb, kind="stable")
        pa = pa._replace(cluster=np.asarray(ga)[order_a], n_clusters=int(ids.size))
        pb = pb._replace(cluster=np.asarray(gb)[order_b], n_clusters=int(ids.size))
    point = (_pick(_weighted_stats(pb, np.ones((1, sb.size)), fprs), kind)[0]
             - _pick(_weighted_stats(pa, np.ones((1, sa.size)), fprs), kind)[0])
    rng = np.random.default_rng(seed)
    diffs = []
    for lo in range(0, n_boot, 64):
        b = min(64, n_boot - lo)
        ca = rng.multinomial(pa.n_clusters, np.full(pa.n_clusters, 1.0 / pa.n_clusters), size=b).astype(np.float64)
        cb = ca if paired else \
            rng.multinomial(pb.n_clusters, np.full(pb.n_clusters, 1.0 / pb.n_clusters), size=b).astype(np.float64)
        xa, xb = _weighted_stats(pa, ca[:, pa.cluster], fprs), _weighted_stats(pb, cb[:, pb.cluster], fprs)
        both = xa[3] & xb[3]
        va = _pick(xa, kind)[both[xa[3]]]
        vb = _pick(xb, kind)[both[xb[3]]]
        diffs.append(vb - va)
    low, high = _percentiles(np.concatenate(diffs), c)
    return float(point), low, high


def _percentiles(values: np.ndarray, confidence: float) -> Tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = 1.0 - confidence
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def auc_interval(*, scores: Any, membership: Any, groups: Any = None, n_boot: int = 200,
                 confidence: float = 0.95, seed: int = 0) -> Tuple[float, float]:
    """Percentile-bootstrap interval of the AUC (Efron & Tibshirani 1993, ch. 13).

    Resamples the clusters ``groups`` (e.g. record ids: the scores of one record against several
    target models are not independent) with replacement, ``n_boot`` times, and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled AUCs. Each
    resample's AUC counts ties as 1/2, like :func:`auc`; it is computed from one global sort by
    weighting every score with its cluster's multiplicity (``O(n)`` per resample).

    Args:
        scores: float ``[n]``; membership: bool ``[n]``.
        groups: int ``[n]`` cluster ids (``None``: every score its own cluster).
        n_boot: resamples, >= 1. confidence: in (0, 1). seed: the resampling seed.

    Returns:
        ``(low, high)``. A resample that happens to draw no member or no non-member is skipped;
        ``(nan, nan)`` if every resample was.
    """
    aucs, _ = _bootstrap(scores=scores, membership=membership, groups=groups, n_boot=n_boot,
                         confidence=confidence, seed=seed)
    return _percentiles(aucs, float(confidence))


def _crossed_factors(n: int, rows: Any, cols: Any, order: Optional[np.ndarray] = None):
    """Each factor's level index per score (in ``order`` if given) and its number of levels."""
    out = []
    for name, g in (("rows", rows), ("cols", cols)):
        g = np.asarray(g)
        if g.shape != (n,):
            raise ValueError(f"{name} must have one id per score ({n}), got shape {g.shape}")
        _, idx = np.unique(g, return_inverse=True)
        idx = idx.reshape(-1)
        out.append((idx if order is None else idx[order], int(idx.max()) + 1 if n else 0))
    return out


def _pigeonhole_weights(rng: np.random.Generator, factors, b: int, n: int) -> np.ndarray:
    """``[b, n]`` weights of ``b`` pigeonhole resamples: the product of each score's row and column
    multiplicities, each factor's levels drawn with replacement."""
    w = np.ones((b, n))
    for idx, k in factors:
        w *= rng.multinomial(k, np.full(k, 1.0 / k), size=b).astype(np.float64)[:, idx]
    return w


def _check_n_boot(n_boot: Any) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")


def crossed_auc_interval(*, scores: Any, membership: Any, rows: Any, cols: Any, n_boot: int = 200,
                         confidence: float = 0.95, seed: int = 0) -> Tuple[float, float]:
    """Percentile interval of the AUC by the pigeonhole bootstrap for crossed random effects
    (Owen, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2), 2007): when every score belongs to
    one level of each of two crossed factors (``rows``, e.g. the model, and ``cols``, e.g. the
    record), both are resampled independently with replacement and each score weighs the product
    of its row's and its column's multiplicities. Resampling one factor only (:func:`auc_interval`
    with ``groups``) ignores the other's shared effects and gives intervals that are too narrow
    when both matter; Owen shows the product weights err on the conservative side.

    Args:
        scores: float ``[n]``; membership: bool ``[n]``; rows, cols: ``[n]`` the two factors' ids.
        n_boot, confidence, seed: as for :func:`auc_interval`.

    Returns:
        ``(low, high)``; ``(nan, nan)`` if no resample drew both classes.
    """
    s, m = _check_inputs(scores, membership)
    _check_confidence(confidence)
    _check_n_boot(n_boot)
    p = _prepare(s, m, None)
    factors = _crossed_factors(s.size, rows, cols, np.argsort(s, kind="stable"))  # _prepare's order
    rng = np.random.default_rng(seed)
    aucs = [_weighted_stats(p, _pigeonhole_weights(rng, factors, min(64, n_boot - lo), s.size))[0]
            for lo in range(0, n_boot, 64)]
    return _percentiles(np.concatenate(aucs), float(confidence))


def crossed_mean_interval(*, values: Any, rows: Any, cols: Any, n_boot: int = 1000, confidence: float = 0.95,
                          seed: int = 0) -> Tuple[float, float]:
    """Percentile interval of the mean of ``values`` (e.g. 0/1 hits, so a rate) by the pigeonhole
    bootstrap over two crossed factors (see :func:`crossed_auc_interval`).

    Returns:
        ``(low, high)``.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError("values must be a non-empty array of finite numbers")
    _check_confidence(confidence)
    _check_n_boot(n_boot)
    factors = _crossed_factors(v.size, rows, cols)
    rng = np.random.default_rng(seed)
    means = []
    for lo in range(0, n_boot, 64):
        w = _pigeonhole_weights(rng, factors, min(64, n_boot - lo), v.size)
        total = w.sum(axis=1)
        means.append((w @ v)[total > 0] / total[total > 0])
    return _percentiles(np.concatenate(means), float(confidence))


def advantage_interval(*, scores: Any, membership: Any, groups: Any = None, n_boot: int = 200,
                       confidence: float = 0.95, seed: int = 0) -> Tuple[float, float]:
    """Percentile-bootstrap interval of the membership advantage ``max_t TPR - FPR``, from the
    same resamples as :func:`auc_interval` (same arguments). Each resample's advantage is the
    best threshold *on that resample*, like :func:`advantage` on the data."""
    _, advs = _bootstrap(scores=scores, membership=membership, groups=groups, n_boot=n_boot,
                         confidence=confidence, seed=seed)
    return _percentiles(advs, float(confidence))


# --------------------------------------------------------------------------------------------
# slices
# --------------------------------------------------------------------------------------------


def slice_metrics(*, scores: Any, membership: Any, slices: Mapping[str, Any], fprs: Sequence[float] = (0.001, 0.01),
                  confidence: float = 0.95) -> Dict[str, Dict[str, Any]]:
    """The attack's metrics restricted to each slice of the scores (e.g. by class, or by
    whether the target classifies the record correctly).

    Args:
        scores: float ``[n]``; membership: bool ``[n]``.
        slices: ``{slice name: bool [n] mask}``.

    Returns:
        ``{slice name: {"n_members", "n_nonmembers", "auc", "advantage", "tpr_at_fpr": {key:
        {"tpr", "resolvable"}}}}``; a slice without members or without non-members gets only its
        counts (its AUC is undefined). No warnings are emitted: ``resolvable`` says where fewer
        than ``1/fpr`` non-members back a TPR.
    """
    s, m = _check_inputs(scores, membership)
    c = _check_confidence(confidence)
    out: Dict[str, Dict[str, Any]] = {}
    for name, mask in slices.items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != s.shape:
            raise ValueError(f"slice {name!r} has shape {mask.shape}, expected {s.shape}")
        ss, mm = s[mask], m[mask]
        entry: Dict[str, Any] = {"n_members": int(mm.sum()), "n_nonmembers": int((~mm).sum())}
        if entry["n_members"] and entry["n_nonmembers"]:
            r = _roc_counts(ss, mm)
            entry["auc"] = _auc(r)
            entry["advantage"] = _advantage(r)
            entry["tpr_at_fpr"] = {}
            for f in fprs:
                t = _tpr_at_fpr(r, _check_fpr(f, "each of fprs"), c)
                entry["tpr_at_fpr"][_fpr_key(f)] = {"tpr": t.tpr, "resolvable": t.resolvable}
        out[str(name)] = entry
    return out


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def _fpr_key(fpr: float) -> str:
    """Stable, short key for an FPR: 0.001 -> "0.001", 0.1 -> "0.1" (no float noise)."""
    return format(float(fpr), ".12g")


class RocCurve(NamedTuple):
    """The ROC curve behind a :func:`summarize_with_curve` call (for plots): float64 ``[K + 1]``
    false and true positive rates from ``(0, 0)`` to ``(1, 1)``, and the AUC."""

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float


def summarize(
    scores: Any,
    membership: Any,
    *,
    fprs: Sequence[float] = (0.001, 0.01, 0.1),
    confidence: float = 0.95,
) -> Dict[str, Any]:
    """All metrics of one attack, as a JSON-serialisable dict (one sort).

    The same as ``summarize_with_curve(...)[0]``; see there.
    """
    return summarize_with_curve(scores, membership, fprs=fprs, confidence=confidence)[0]


#: How the ``epsilon`` entry of a summary is computed, as recorded in ``metrics.json``.
EPSILON_METHOD = ("Jagielski, Ullman & Oprea (NeurIPS 2020): max over thresholds of the (epsilon, delta)-DP "
                  "hypothesis-testing inequalities, with Clopper-Pearson upper ends of FPR and FNR at the stated "
                  "confidence; treats every score as an independent trial (see metrics.epsilon_lower_bound)")


def summarize_with_curve(
    scores: Any,
    membership: Any,
    *,
    fprs: Sequence[float] = (0.001, 0.01, 0.1),
    confidence: float = 0.95,
    groups: Any = None,
    n_boot: int = 200,
    seed: int = 0,
    delta: float = 0.0,
) -> Tuple[Dict[str, Any], RocCurve]:
    """All metrics of one attack, as a JSON-serialisable dict, and the ROC curve they came from
    (one sort serves both, so a plot never recomputes the curve).

    Returns:
        ``{"auc", "balanced_accuracy", "advantage", "epsilon_lower_bound", "n_members",
        "n_nonmembers", "confidence", "tpr_at_fpr": {"0.001": TprAtFpr.to_dict(), ...},
        "auc_ci": [low, high], "auc_ci_method", "epsilon": {"value", "delta", "confidence",
        "method"}, "warnings": [...]}`` with plain Python values. ``balanced_accuracy`` and
        ``advantage`` are best-threshold (oracle) values; ``auc_ci`` is :func:`auc_interval`
        (clusters ``groups``, ``n_boot`` resamples, ``seed``); ``epsilon_lower_bound`` (kept for
        readers of schema 2) equals ``epsilon["value"]``, :func:`epsilon_lower_bound` at ``delta``. Each FPR
        in ``fprs`` with fewer than ``1/fpr`` non-members adds a message to ``"warnings"`` and
        emits a :class:`MetricsWarning`.
    """
    s, m = _check_inputs(scores, membership)
    c = _check_confidence(confidence)
    if isinstance(fprs, (str, bytes)) or not hasattr(fprs, "__iter__"):
        raise ValueError(f"fprs must be a sequence of numbers in (0, 1), got {fprs!r}")
    checked = [_check_fpr(f, "each of fprs") for f in fprs]
    keys = [_fpr_key(f) for f in checked]
    if len(set(keys)) != len(keys):
        raise ValueError(f"fprs contains duplicates: {list(fprs)!r}")

    r = _roc_counts(s, m)
    adv = _advantage(r)
    tprs: Dict[str, Any] = {}
    messages = []
    for key, f in zip(keys, checked):
        res = _tpr_at_fpr(r, f, c)
        tprs[key] = res.to_dict()
        if not res.resolvable:
            messages.append(_resolution_message(res))
    for msg in messages:
        warnings.warn(msg, MetricsWarning, stacklevel=2)
    area = _auc(r)
    aucs, advs = _bootstrap(scores=s, membership=m, groups=groups, n_boot=n_boot, confidence=c, seed=seed)
    lo, hi = _percentiles(aucs, c)
    eps = _epsilon_lower_bound(r, c, float(delta))
    summary = {
        "auc": area,
        "auc_ci": [lo, hi],
        "auc_ci_method": AUC_INTERVAL_METHOD + f", {n_boot} resamples",
        "balanced_accuracy": (1.0 + adv) / 2.0,
        "advantage": adv,
        "advantage_ci": list(_percentiles(advs, c)),
        "epsilon_lower_bound": eps,
        "epsilon": {"value": eps, "delta": float(delta), "confidence": c, "method": EPSILON_METHOD},
        "n_members": r.n_pos,
        "n_nonmembers": r.n_neg,
        "confidence": c,
        "tpr_at_fpr": tprs,
        "warnings": messages,
    }
    return summary, RocCurve(r.fps / r.n_neg, r.tps / r.n_pos, area)
