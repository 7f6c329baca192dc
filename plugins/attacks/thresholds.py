"""Metric-threshold attacks: prediction confidence, entropy and modified entropy (Song & Mittal
2021), and the label-only gap attack (Yeom et al. 2018; Choquette-Choo et al. 2021).

Song & Mittal ("Systematic Evaluation of Privacy Risks of Machine Learning Models", USENIX Security
2021, arXiv:2003.10595, Sec. 3.2) benchmark four metric-based attacks, each a threshold on one
statistic of the target's output ``p = F(x)`` on a record ``(x, y)``:

* correctness  ``1{argmax_i p_i = y}``                 (eq. 2; here :class:`GapAttack`)
* confidence   ``1{p_y >= tau_y}``                      (eq. 3)
* entropy      ``1{H(p) <= tau_y}``,  ``H(p) = -sum_i p_i log p_i``   (eq. 4)
* modified entropy ``1{Mentr(p, y) <= tau_y}`` with     (eqs. 5-6)
  ``Mentr(p, y) = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``.

The thresholds ``tau_y`` are class-dependent and set on shadow models' training (IN) and test (OUT)
records of class ``y`` to maximise the shadow attack's accuracy. In miafw the shadow models are the
target's reference models (``ctx.for_target(t)``): every record of a class is IN for half of them and
OUT for the other half, so per class the IN and OUT sets are equally large and the accuracy the paper
maximises is the balanced accuracy ``(TPR + TNR) / 2`` that :func:`best_threshold` maximises (which is
also what the authors' code maximises).

Every statistic is oriented here so that **higher = member** (``s = p_y``, ``-H``, ``-Mentr``); an
attack with threshold ``tau_y`` on that scale outputs the score ``s - tau_y``: the paper's decision is
``score >= 0``, and the ROC sweeps one global offset on top of the class thresholds.

The maths are pure, keyword-only functions; the plugin classes are thin wrappers.
"""

from __future__ import annotations

import abc

from typing import Dict, Literal, Optional

import numpy as np
from scipy import special

from mia_core.base import Attack
from mia_core.params import check_n_references

#: Floor inside the logarithms of :func:`modified_entropy`: only a probability (or complement) that
#: underflowed to exactly 0 reaches it, and its log is then ``log(tiny)`` = -708.4 instead of -inf.
LOG_FLOOR = float(np.finfo(np.float64).tiny)

THRESHOLD_MODES = ("class", "global", "none")


# ----------------------------------------------------------------------------- statistics
def _check_probs(probs, labels):
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim < 2:
        raise ValueError(f"probs must be [..., N, C], got shape {p.shape}")
    if y.shape != p.shape[-2:-1]:
        raise ValueError(f"labels must be [N] = [{p.shape[-2]}] to match probs {p.shape}, got {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[-1]):
        raise ValueError(f"labels must be integers in [0, {p.shape[-1]}), got {y.dtype} in "
                         f"[{y.min()}, {y.max()}]")
    return p, y.astype(np.int64)


def true_label_probability(*, probs, labels) -> np.ndarray:
    """``p_y``: the probability of each record's true label (Song & Mittal eq. 3's statistic).

    Args:
        probs: float ``[..., N, C]`` probability rows.
        labels: int ``[N]`` in ``[0, C)``.

    Returns:
        float64 ``[..., N]``.
    """
    p, y = _check_probs(probs, labels)
    idx = np.broadcast_to(y[:, None], p.shape[:-1] + (1,))
    return np.take_along_axis(p, idx, axis=-1)[..., 0]


def prediction_entropy(*, probs) -> np.ndarray:
    """Shannon entropy ``H(p) = -sum_i p_i log p_i`` (natural log, ``0 log 0 = 0``) of each row
    (Song & Mittal eq. 4's statistic).

    Args:
        probs: float ``[..., C]``.

    Returns:
        float64 ``[...]``, in ``[0, log C]`` for probability rows.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim < 1:
        raise ValueError("probs must be [..., C], got a scalar")
    return special.entr(p).sum(axis=-1)


def modified_entropy(*, probs, labels) -> np.ndarray:
    """Song & Mittal's modified prediction entropy (eq. 5):

        Mentr(p, y) = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i).

    It is 0 for a certain, correct prediction and grows both as ``p_y`` falls and as the mass on a
    wrong label rises, so unlike the entropy it separates a confident correct prediction from a
    confident wrong one.

    Numerics (an exact rewrite, not a change of the quantity): the complement ``1 - p_i`` of the
    largest entry of each row is computed as the sum of the row's other entries, so a confident
    prediction whose ``p_i`` rounds to 1 keeps a finite, correctly ordered ``log(1 - p_i)``; other
    entries are at most 1/2 and ``1 - p_i`` is exact enough. Only an entry (or complement) that is
    exactly 0 is floored, at :data:`LOG_FLOOR`, inside the logarithm.

    Args:
        probs: float ``[..., N, C]`` probability rows.
        labels: int ``[N]`` in ``[0, C)`` (broadcast over the leading axes).

    Returns:
        float64 ``[..., N]``, finite and ``>= 0``.
    """
    p, y = _check_probs(probs, labels)
    cls = np.arange(p.shape[-1])
    top = p.argmax(axis=-1)[..., None]
    rest = np.where(cls == top, 0.0, p).sum(axis=-1, keepdims=True)  # 1 - p_top without cancellation
    comp = np.where(cls == top, rest, 1.0 - p)
    log_p = np.log(np.maximum(p, LOG_FLOOR))
    log_comp = np.log(np.maximum(comp, LOG_FLOOR))
    is_y = cls == y[:, None]  # [N, C], broadcast over leading axes
    terms = np.where(is_y, comp * log_p, p * log_comp)
    return np.maximum(-terms.sum(axis=-1), 0.0)


# ----------------------------------------------------------------------------- thresholds
def best_threshold(*, values, is_member) -> float:
    """The threshold ``tau`` maximising the balanced accuracy of the rule "member iff value >= tau"
    (Song & Mittal Sec. 3.2: thresholds chosen on shadow IN/OUT records to maximise attack accuracy).

    The candidates are the observed values (as in the authors' code). With ``n_in`` members and
    ``n_out`` non-members, the balanced accuracy of ``tau`` is
    ``(#{in: v >= tau} / n_in + #{out: v < tau} / n_out) / 2``; it is compared exactly, in integers
    (``n_out * #{in: v >= tau} + n_in * #{out: v < tau}``), and ties go to the **smallest** maximising
    ``tau``. One sort: ``O(n log n)``.

    Args:
        values: float ``[n]`` (any shape; flattened), finite, oriented higher = member.
        is_member: bool, same shape.

    Returns:
        ``tau``, one of ``values``.

    Raises:
        ValueError: mismatched shapes, non-finite values, or no member or no non-member.
    """
    v = np.asarray(values, dtype=np.float64)
    m = np.asarray(is_member)
    if v.shape != m.shape:
        raise ValueError(f"values and is_member must have the same shape, got {v.shape} and {m.shape}")
    v, m = v.ravel(), m.ravel().astype(bool)
    n_in = int(m.sum())
    n_out = m.size - n_in
    if n_in == 0 or n_out == 0:
        raise ValueError(f"best_threshold needs members and non-members, got {n_in} and {n_out}")
    if not np.isfinite(v).all():
        raise ValueError("best_threshold needs finite values")
    uniq, inv = np.unique(v, return_inverse=True)
    in_at = np.bincount(inv[m], minlength=uniq.size)
    out_at = np.bincount(inv[~m], minlength=uniq.size)
    in_below = np.cumsum(in_at) - in_at  # members with value < uniq[k]
    out_below = np.cumsum(out_at) - out_at
    gain = n_out * (n_in - in_below).astype(np.int64) + n_in * out_below.astype(np.int64)
    return float(uniq[int(np.argmax(gain))])  # argmax takes the first, i.e. smallest, maximiser


def class_thresholds(*, values, is_member, labels, n_classes: int, per_class: bool = True) -> np.ndarray:
    """Song & Mittal's class-dependent thresholds ``tau_y`` (or one global threshold) from
    reference models: :func:`best_threshold` over the IN and OUT values of each class's records.

    Args:
        values: float ``[R, N]`` the statistic (higher = member) of each reference model on each record.
        is_member: bool ``[R, N]`` reference model ``r`` trained on record ``j``.
        labels: int ``[N]`` in ``[0, n_classes)``.
        n_classes: ``C``.
        per_class: ``False``: one threshold over all records, repeated ``C`` times.

    Returns:
        float64 ``[C]``. A class without both IN and OUT values (absent from ``labels``) gets the
        global threshold.
    """
    v = np.asarray(values, dtype=np.float64)
    m = np.asarray(is_member, dtype=bool)
    y = np.asarray(labels)
    if v.ndim != 2 or v.shape != m.shape or y.shape != v.shape[1:]:
        raise ValueError(f"values and is_member must be [R, N] and labels [N]; got {v.shape}, {m.shape}, {y.shape}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes}), got [{y.min()}, {y.max()}]")
    tau = np.full(int(n_classes), np.nan)
    if per_class:
        for c in np.unique(y):
            cols = y == c
            mc = m[:, cols]
            if mc.any() and not mc.all():
                tau[c] = best_threshold(values=v[:, cols], is_member=mc)
    if np.isnan(tau).any():  # global mode, or classes without IN and OUT values
        tau[np.isnan(tau)] = best_threshold(values=v, is_member=m)
    return tau


def _check_n_references(n_references) -> None:
    check_n_references(n_references, even=True)


# ----------------------------------------------------------------------------- plugins
class _CalibratedMetricAttack(Attack):
    """Shared wrapper: a per-record statistic of the target's output, minus a threshold calibrated
    on the target's reference models (class-dependent, global, or none)."""

    api_version = "1.0"
    access = ("probs",)
    min_reference_models = 2  # the default, class-dependent thresholds need one IN/OUT pair of references
    reference = (
        "L. Song, P. Mittal. Systematic Evaluation of Privacy Risks of Machine Learning Models. USENIX "
        "Security 2021. arXiv:2003.10595"
    )

    def __init__(self, thresholds: Literal["class", "global", "none"] = "class", n_references: Optional[int] = None):
        self.thresholds = thresholds
        self.n_references = n_references

    @abc.abstractmethod
    def statistic(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The statistic, higher = member: float ``[N]`` from probs ``[N, C]`` and labels ``[N]``."""

    def validate(self) -> None:
        if self.thresholds not in THRESHOLD_MODES:
            raise ValueError(f"thresholds must be one of {', '.join(THRESHOLD_MODES)}; got {self.thresholds!r}")
        _check_n_references(self.n_references)

    def _calibrated(self) -> bool:
        return self.thresholds != "none"

    def reference_budget(self):
        return (self.n_references if self._calibrated() else None), True

    def fit(self, ctx) -> "_CalibratedMetricAttack":
        self.validate()
        if self._calibrated() and ctx.n_models - 2 < 2:
            raise ValueError(
                f"{type(self).__name__} with thresholds={self.thresholds} calibrates on reference models and needs "
                f"at least 2 besides the target and its partner (n_models >= 4), got n_models={ctx.n_models}; "
                f"use thresholds=none or more models")
        self.ctx_ = ctx
        #: ``{target: float [C]}``: the thresholds on the statistic's (higher = member) scale, per target.
        self.tau_: Dict[int, np.ndarray] = {}
        return self

    def _tau(self, target: int, view, labels: np.ndarray) -> np.ndarray:
        if target not in self.tau_:
            probs = view.ref_signal("probs")  # [R, N, C]
            values = np.stack([self.statistic(probs[r], labels) for r in range(probs.shape[0])])
            n_classes = max(int(self.ctx_.n_classes), int(labels.max()) + 1 if labels.size else 1)
            self.tau_[target] = class_thresholds(values=values, is_member=view.ref_keep, labels=labels,
                                                 n_classes=n_classes, per_class=self.thresholds == "class")
        return self.tau_[target]

    def score(self, target: int, records: np.ndarray) -> np.ndarray:
        records = np.asarray(records, dtype=np.int64)
        labels = np.asarray(self.ctx_.labels, dtype=np.int64)
        if self._calibrated():
            view = self.ctx_.for_target(target, n_references=self.n_references, online=True)
        else:
            view = self.ctx_.for_target(target)
        s = self.statistic(view.target_signal("probs"), labels)  # every record, then select
        if self._calibrated():
            s = s - self._tau(int(target), view, labels)[labels]
        return s[records]


class ConfidenceAttack(_CalibratedMetricAttack):
    """Confidence threshold: member iff p_y >= tau_y (Song & Mittal 2021, eq. 3).

    Score ``p_y - tau_y``: the target's probability of the true label minus a threshold for class
    ``y`` chosen on the reference models (:func:`class_thresholds`), so ``score >= 0`` is the paper's
    decision and the ROC sweeps a global offset on top.

    Args:
        thresholds: ``class`` (the paper's ``tau_y``), ``global`` (one threshold: the same ROC as ``none``,
            but a calibrated decision at 0) or ``none`` (score ``p_y``; no reference models used).
        n_references: reference models to calibrate on (``None``: all), an even number (half IN, half
            OUT for every record).

    ``p_y`` is a float64 probability: it rounds to 1 when the other labels' mass is below about 1e-16
    (a logit margin above about 37), and such records tie; LiRA's logit-scaled confidence does not.
    """

    reference = _CalibratedMetricAttack.reference + " (confidence attack, Sec. 3.2)"

    def statistic(self, probs, labels):
        return true_label_probability(probs=probs, labels=labels)


class EntropyAttack(_CalibratedMetricAttack):
    """Prediction-entropy threshold: member iff H(p) <= tau_y (Song & Mittal 2021, eq. 4).

    Score ``tau_y - H(p)`` with ``H(p) = -sum_i p_i log p_i`` of the target's output (label-blind, so
    a confident wrong prediction looks like a member; :class:`MEntrAttack` fixes that) and ``tau_y``
    chosen per class on the reference models.

    Args:
        thresholds: ``class`` (the paper's ``tau_y``), ``global`` or ``none`` (score ``-H``; no reference
            models used).
        n_references: reference models to calibrate on (``None``: all), an even number.
    """

    reference = _CalibratedMetricAttack.reference + " (entropy attack, Sec. 3.2)"

    def statistic(self, probs, labels):
        return -prediction_entropy(probs=probs)


class MEntrAttack(_CalibratedMetricAttack):
    """Modified-entropy threshold: member iff Mentr(p, y) <= tau_y (Song & Mittal 2021, eqs. 5-6).

    Score ``tau_y - Mentr(p, y)`` with ``Mentr(p, y) = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``
    of the target's output (:func:`modified_entropy`) and ``tau_y`` chosen per class on the reference
    models' IN and OUT records to maximise the balanced accuracy (:func:`class_thresholds`).

    Args:
        thresholds: ``class`` (the paper's ``tau_y``), ``global`` or ``none`` (score ``-Mentr``; no
            reference models used).
        n_references: reference models to calibrate on (``None``: all), an even number.
    """

    reference = _CalibratedMetricAttack.reference + " (modified entropy, Sec. 3.2)"

    def statistic(self, probs, labels):
        return -modified_entropy(probs=probs, labels=labels)


class GapAttack(Attack):
    """Gap attack (label-only): member iff the target classifies the record correctly.

    The baseline of Yeom et al. 2018 (the membership advantage of this adversary is the generalization
    gap) and of Choquette-Choo et al. 2021, and Song & Mittal's correctness attack (eq. 2): the score is
    ``1.0`` for a correct prediction and ``0.0`` otherwise, so its ROC is a single point (TPR = the
    train accuracy on members, FPR = the accuracy on non-members) joined to (0, 0) and (1, 1), and its
    TPR at a small FPR is 0 unless the target misclassifies every non-member. It reads only the
    predicted label and needs no reference models.
    """

    api_version = "1.0"
    access = ("label",)
    min_reference_models = 0
    reference = (
        "S. Yeom, I. Giacomelli, M. Fredrikson, S. Jha. Privacy Risk in Machine Learning: Analyzing the "
        "Connection to Overfitting. IEEE CSF 2018. arXiv:1709.01604; C. A. Choquette-Choo, F. Tramèr, "
        "N. Carlini, N. Papernot. Label-Only Membership Inference Attacks. ICML 2021. arXiv:2007.14321 "
        "(gap attack)"
    )

    def __init__(self):
        pass

    def fit(self, ctx) -> "GapAttack":
        self.ctx_ = ctx
        return self

    def score(self, target: int, records: np.ndarray) -> np.ndarray:
        correct = self.ctx_.for_target(target).target_signal("correct")
        return np.asarray(correct, dtype=np.float64)[np.asarray(records, dtype=np.int64)]


__all__ = [
    "ConfidenceAttack",
    "EntropyAttack",
    "GapAttack",
    "LOG_FLOOR",
    "MEntrAttack",
    "THRESHOLD_MODES",
    "best_threshold",
    "class_thresholds",
    "modified_entropy",
    "prediction_entropy",
    "true_label_probability",
]
