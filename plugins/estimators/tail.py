"""The ``tail`` estimator: LiRA's TPR at low FPR predicted from one model's train and test losses.

After Dodd, Krčo, Shilov, de Montjoye, "The Tail Tells All: Estimating Model-Level Membership
Inference Vulnerability Without Reference Models" (arXiv:2510.19773, 2025).

What the paper says (abstract, and the public ICLR 2026 reviews of it, which quote its figures and
its Eq. 4; the method section itself could not be read here):

* loss distributions are asymmetric and heavy-tailed; the records at risk from a membership
  inference attack are the atypical ones that training moved from the *tail* (high loss) of the
  distribution to its *head* (low loss). A model's training-loss distribution has therefore lost
  the high-loss outliers its test-loss distribution still has;
* the predictor of model-level vulnerability (LiRA's TPR at low FPR) is the **TNR of the simple
  LOSS attack at a fixed, low FNR** ("LOSS TNR@FNR", Eq. 4: a pre-set operating point), computed
  from the target's training (member) and test (non-member) losses alone, with no reference model;
* LiRA's TPR is then read off a **linear** function of that TNR (the paper also tries an
  exponential fit, and for LLMs a non-linear function of the LOSS AUC).

What is implemented, per model ``m`` (members = the records it trained on, ``keep[m]``):

1. ``tau_m``: the LOSS attack ("member iff loss <= tau") with false-negative rate at most ``fnr``:
   the ``(n_in - k)``-th smallest member loss, ``k = floor(fnr * n_in)``, so at most ``k`` training
   records lie strictly above it (the high-loss tail the training set keeps);
2. ``TNR_m = #{non-members with loss > tau_m} / n_out``: the share of test records in the tail
   beyond the training set's;
3. ``prediction_m = clip(slope * TNR_m + intercept, 0, 1)``, the predicted LiRA TPR at ``fpr``.

Reconstructed, not read from the paper (say so when quoting results):

* the tie rule and the integer rounding of step 1 (chosen to match :func:`mia_core.metrics.tpr_at_fpr`:
  the best threshold whose empirical rate does not exceed the target);
* the operating point: ``fnr`` defaults to ``fpr``, the FPR at which LiRA's TPR is predicted;
* the linear map's coefficients. The paper fits them on its own experiments; those numbers could
  not be read, so the default is the identity (``slope=1, intercept=0``), which is right at both
  ends: with no leakage (member and non-member losses identically distributed) TNR at FNR ``a`` is
  ``a``, as is any attack's TPR at FPR ``a``; with perfect separation both are 1. For
  equal-variance Gaussian losses the LOSS attack's ROC is symmetric, so TNR at FNR ``a`` equals
  the loss threshold's TPR at FPR ``a`` exactly (:func:`gaussian_tail_tnr`). Pass ``slope`` and
  ``intercept`` fitted on populations of your own to calibrate it;
* pooling: the reported value is the **mean over models** of the per-model predictions (the paper
  predicts a single target model's vulnerability; here every model of the population is a target,
  as in miafw's default evaluation), not the TPR of one threshold pooled over models;
* the interval: a percentile bootstrap over records (a record's losses under every model resampled
  together, as the engine clusters a record's scores), seeded from the population's seed.

The method implies no upper bound on an attack's advantage (the tail statistic is itself the
operating point of a real attack, so ``TNR - FNR`` is a *lower* bound on the LOSS attack's
advantage), so no ``advantage_bound`` is reported.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

from mia_core.base import Estimator

#: How the estimate is computed, as stored in the report.
METHOD = ("mean over models of clip(slope * TNR + intercept, 0, 1), TNR = share of non-members whose loss exceeds "
          "the LOSS attack's threshold at FNR <= fnr (the member-loss tail); Dodd et al. 2025 (arXiv:2510.19773), "
          "linear map and operating point reconstructed (see the plugin docstring)")


def _check_pair(loss, keep) -> Tuple[np.ndarray, np.ndarray]:
    loss = np.asarray(loss, dtype=np.float64)
    keep = np.asarray(keep)
    if loss.ndim != 2:
        raise ValueError(f"loss must be a 2-D array [M, N], got shape {loss.shape}")
    if keep.shape != loss.shape:
        raise ValueError(f"keep must have the shape of loss {loss.shape}, got {keep.shape}")
    if keep.dtype != bool:
        if not np.isin(keep, (0, 1)).all():
            raise ValueError("keep must be boolean (or 0/1): True where the model trained on the record")
        keep = keep.astype(bool)
    if not np.isfinite(loss).all():
        raise ValueError(f"loss has {int((~np.isfinite(loss)).sum())} NaN or infinite values; losses must be finite")
    n_in = keep.sum(axis=1)
    bad = np.flatnonzero((n_in == 0) | (n_in == loss.shape[1]))
    if bad.size:
        raise ValueError(f"model {int(bad[0])} has {int(n_in[bad[0]])} members among {loss.shape[1]} records; "
                         "every model needs at least one member and one non-member")
    return loss, keep


def _check_rate(value, name: str, *, low_open: bool) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (0 < v < 1 if low_open else 0 <= v < 1)
    if not ok:
        raise ValueError(f"{name} must be a number in {'(0, 1)' if low_open else '[0, 1)'}, got {value!r}")
    return float(value)


def tail_tnr(*, loss, keep, fnr: float) -> Tuple[np.ndarray, np.ndarray]:
    """The LOSS attack's TNR at FNR ``<= fnr``, per model (Dodd et al. 2025, "LOSS TNR@FNR", Eq. 4).

    For model ``m`` let ``a_1 <= ... <= a_n`` be its members' losses and ``k = floor(fnr * n)``.
    The threshold ``tau_m = a_(n-k)`` is the lowest one that leaves at most ``k`` members strictly
    above it (the LOSS attack predicts "member" iff ``loss <= tau``, so ties go to the members);
    the TNR is the share of non-members strictly above it.

    Args:
        loss: float ``[M, N]`` each model's loss on each record (finite).
        keep: bool ``[M, N]`` model ``m`` trained on record ``j``; every model needs at least one
            member and one non-member.
        fnr: the LOSS attack's false-negative rate, in ``[0, 1)``; ``0`` puts the threshold at the
            highest training loss.

    Returns:
        ``(tnr, tau)``: float64 ``[M]`` TNR in ``[0, 1]`` and float64 ``[M]`` thresholds.

    Raises:
        ValueError: shapes differ, ``loss`` is not 2-D or not finite, ``keep`` is not boolean, a
            model has no member or no non-member, or ``fnr`` is outside ``[0, 1)``.
    """
    fnr = _check_rate(fnr, "fnr", low_open=False)
    loss, keep = _check_pair(loss, keep)
    n_in = keep.sum(axis=1)
    k = np.floor(fnr * n_in + 1e-9).astype(np.int64)  # +1e-9: 0.01 * 300 is 3, not 2.9999...
    ranked = np.sort(np.where(keep, loss, np.inf), axis=1)  # members' losses first, ascending
    tau = ranked[np.arange(loss.shape[0]), n_in - k - 1]
    above = (loss > tau[:, None]) & ~keep
    tnr = above.sum(axis=1) / (~keep).sum(axis=1)
    return tnr.astype(np.float64), tau


def head_tpr(*, loss, keep, fpr: float) -> np.ndarray:
    """The LOSS attack's TPR at FPR ``<= fpr`` per model: the low-loss *head* counterpart of
    :func:`tail_tnr` (its mirror image: members and non-members swapped, the loss negated), shown
    beside the tail statistic for comparison. A threshold ``t`` is the ``(k+1)``-th smallest
    non-member loss, ``k = floor(fpr * n_out)``; the TPR is the share of members with loss ``< t``.

    Args:
        loss, keep: as :func:`tail_tnr`.
        fpr: in ``[0, 1)``.

    Returns:
        float64 ``[M]``.
    """
    fpr = _check_rate(fpr, "fpr", low_open=False)
    loss, keep = _check_pair(loss, keep)
    return tail_tnr(loss=-loss, keep=~keep, fnr=fpr)[0]


def predict_tpr(*, tnr, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """The linear map from the tail statistic to LiRA's TPR (Dodd et al. 2025 fit one; its
    coefficients are reconstructed here, identity by default): ``clip(slope * tnr + intercept, 0, 1)``.

    Args:
        tnr: float ``[...]`` in ``[0, 1]``.

    Returns:
        float64, the shape of ``tnr``.
    """
    return np.clip(slope * np.asarray(tnr, dtype=np.float64) + intercept, 0.0, 1.0)


def gaussian_tail_tnr(*, shift: float, fnr: float, scale: float = 1.0) -> float:
    """Population value of :func:`tail_tnr` when member losses are ``N(0, 1)`` and non-member losses
    ``N(shift, scale^2)``: ``P(N(shift, scale^2) > z_(1-fnr)) = Phi((shift - z_(1-fnr)) / scale)``.

    With ``scale = 1`` this equals the loss threshold's TPR at FPR ``fnr``, ``Phi(shift - z_(1-fnr))``
    (an equal-variance Gaussian ROC is symmetric): the known answer the tests check against.
    """
    from statistics import NormalDist

    if not 0 < fnr < 1:
        raise ValueError(f"fnr must be in (0, 1) for the Gaussian closed form, got {fnr!r}")
    z = NormalDist().inv_cdf(1.0 - fnr)
    return NormalDist().cdf((shift - z) / scale)


def tail_estimate(*, loss, keep, fpr: float = 0.01, fnr: Optional[float] = None, slope: float = 1.0,
                  intercept: float = 0.0, n_boot: int = 200, confidence: float = 0.95,
                  seed: int = 0) -> Dict[str, Any]:
    """The estimator's whole computation on arrays (the plugin is a thin wrapper around it).

    Args:
        loss, keep: as :func:`tail_tnr`.
        fpr: the FPR at which LiRA's TPR is predicted; ``fnr`` (default: ``fpr``) the LOSS
            attack's operating point.
        slope, intercept: the linear map (:func:`predict_tpr`).
        n_boot: bootstrap resamples of the records for the interval (0: no interval).
        confidence: the interval's level; seed: the bootstrap's seed.

    Returns:
        ``{"value", "interval" (only with n_boot > 0), "per_model", "tnr", "tnr_per_model",
        "threshold_per_model", "loss_tpr_at_fpr", "loss_tpr_at_fpr_per_model", ...}``: plain Python.
    """
    fnr_used = fpr if fnr is None else fnr
    tnr, tau = tail_tnr(loss=loss, keep=keep, fnr=fnr_used)
    loss, keep = _check_pair(loss, keep)
    pred = predict_tpr(tnr=tnr, slope=slope, intercept=intercept)
    value = float(pred.mean())
    head = head_tpr(loss=loss, keep=keep, fpr=fpr)
    out: Dict[str, Any] = {"value": value}
    if n_boot:
        rng = np.random.default_rng([int(seed), 0x7461696C])  # "tail"
        n = loss.shape[1]
        boots = []
        for _ in range(int(n_boot)):
            cols = rng.integers(0, n, n)
            k = keep[:, cols]
            usable = k.any(axis=1) & (~k).any(axis=1)  # a resample may leave a tiny model one-sided
            if not usable.any():
                continue
            t, _ = tail_tnr(loss=loss[usable][:, cols], keep=k[usable], fnr=fnr_used)
            boots.append(float(predict_tpr(tnr=t, slope=slope, intercept=intercept).mean()))
        if boots:
            alpha = 1.0 - confidence
            lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
            out["interval"] = [min(float(lo), value), max(float(hi), value)]
    out.update({
        "fpr": float(fpr),
        "fnr": float(fnr_used),
        "slope": float(slope),
        "intercept": float(intercept),
        "n_models": int(loss.shape[0]),
        "per_model": [float(v) for v in pred],
        "tnr": float(tnr.mean()),
        "tnr_per_model": [float(v) for v in tnr],
        "threshold_per_model": [float(v) for v in tau],
        "loss_tpr_at_fpr": float(head.mean()),
        "loss_tpr_at_fpr_per_model": [float(v) for v in head],
        "n_boot": int(n_boot),
        "confidence": float(confidence),
        "method": METHOD,
    })
    return out


class TailEstimator(Estimator):
    """Reference-free prediction of LiRA's TPR at low FPR from each model's train/test loss tail (Dodd et al. 2025).

    The share of a model's test records whose loss lies beyond the high-loss tail of its training
    records (the LOSS attack's TNR at FNR ``fnr``), mapped linearly to LiRA's TPR at ``fpr`` and
    averaged over the population's models, with a bootstrap interval over records. Needs only the
    loss of each model on its members and non-members: no reference model. The equations, and what
    is reconstructed rather than read from the paper, are in :mod:`mia_plugins.estimators.tail`.

    Args:
        fpr: the FPR at which LiRA's TPR is predicted, in ``(0, 1)``.
        fnr: the LOSS attack's false-negative rate fixing the tail threshold, in ``[0, 1)``;
            ``None`` (default): the same as ``fpr``.
        slope, intercept: the linear map from the tail TNR to the TPR (default: the identity; the
            paper fits one on its experiments). ``slope`` finite and > 0, ``intercept`` in ``[-1, 1]``.
        n_boot: bootstrap resamples of the records for the interval; 0 (no interval) or >= 10.
        confidence: the interval's level, in ``(0, 1)``.

    Report: ``value`` (mean predicted TPR), ``interval``, ``per_model`` (each model's prediction),
    ``tnr`` / ``tnr_per_model`` (the tail statistic), ``threshold_per_model``, and for comparison
    ``loss_tpr_at_fpr`` (the LOSS attack's own TPR at ``fpr``, its low-loss head). No
    ``advantage_bound``: the method implies none.
    """

    api_version = "1.0"
    access = ("loss",)
    reference = ("E. Dodd, N. Krčo, I. Shilov, Y.-A. de Montjoye. The Tail Tells All: Estimating Model-Level "
                 "Membership Inference Vulnerability Without Reference Models. arXiv:2510.19773, 2025")

    def __init__(self, fpr: float = 0.01, fnr: Optional[float] = None, slope: float = 1.0, intercept: float = 0.0,
                 n_boot: int = 200, confidence: float = 0.95):
        self.fpr = fpr
        self.fnr = fnr
        self.slope = slope
        self.intercept = intercept
        self.n_boot = n_boot
        self.confidence = confidence

    def validate(self) -> None:
        _check_rate(self.fpr, "fpr", low_open=True)
        if self.fnr is not None:
            _check_rate(self.fnr, "fnr", low_open=False)
        s = self.slope
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"slope must be a finite number > 0 (TPR rises with the tail TNR), got {s!r}")
        b = self.intercept
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -1 <= b <= 1:
            raise ValueError(f"intercept must be a number in [-1, 1], got {b!r}")
        k = self.n_boot
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (k == 0 or k >= 10):
            raise ValueError(f"n_boot must be 0 (no interval) or an integer >= 10, got {k!r}")
        _check_rate(self.confidence, "confidence", low_open=True)

    def estimate(self, ctx) -> Dict[str, Any]:
        self.validate()
        return tail_estimate(loss=ctx.signal("loss"), keep=ctx.keep, fpr=self.fpr, fnr=self.fnr, slope=self.slope,
                             intercept=self.intercept, n_boot=self.n_boot, confidence=self.confidence,
                             seed=ctx.seed)
