"""The loss-threshold attack of Yeom et al. 2018."""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np

from mia_core.base import Attack
from mia_core.params import check_n_references

THRESHOLD_RULES = ("sweep", "yeom")


def mean_member_loss(*, ref_loss, ref_in) -> float:
    """The attacker's estimate of the target's average training loss: the mean loss of the reference
    models on the records they trained on, pooled over every (model, record) pair with ``ref_in``.

    Yeom et al.'s threshold adversary assumes the target's expected training loss is known; a reference
    model trained like the target on the same distribution estimates it.

    Args:
        ref_loss: float ``[R, N]`` loss of each reference model on each record.
        ref_in: bool ``[R, N]`` reference model ``r`` trained on record ``j``.

    Returns:
        ``mean(ref_loss[ref_in])``.

    Raises:
        ValueError: mismatched shapes, or no IN pair at all.
    """
    loss = np.asarray(ref_loss, dtype=np.float64)
    keep = np.asarray(ref_in, dtype=bool)
    if loss.shape != keep.shape:
        raise ValueError(f"ref_loss and ref_in must have the same shape, got {loss.shape} and {keep.shape}")
    if not keep.any():
        raise ValueError("mean_member_loss needs at least one (reference model, record) pair with ref_in")
    return float(loss[keep].mean())


def yeom_decision(*, loss, tau: float) -> np.ndarray:
    """Yeom et al.'s threshold adversary: ``1.0`` (member) where ``loss <= tau``, else ``0.0``.

    Args:
        loss: float ``[N]`` the target's loss on each record.
        tau: the threshold (the expected training loss).

    Returns:
        float64 ``[N]`` of 0.0 and 1.0.
    """
    return (np.asarray(loss, dtype=np.float64) <= float(tau)).astype(np.float64)


class LossAttack(Attack):
    """Loss threshold (Yeom, Giacomelli, Fredrikson, Jha: "Privacy Risk in Machine Learning:
    Analyzing the Connection to Overfitting", IEEE CSF 2018, Sec. 3.2, "Adversary 2").

    The adversary predicts "member" when the target's loss on (x, y) is below a threshold tau.

    Args:
        threshold: ``sweep`` (default): the score is ``-loss(x, y)`` (higher = member) and the ROC and
            TPR-at-FPR sweep every tau, so no reference models are needed. ``yeom``: the binary decision
            ``1[loss <= tau]`` with Yeom et al.'s tau, the target's average training loss, which they
            assume known; here it is estimated as the mean loss of the reference models on their own
            training records (:func:`mean_member_loss`), so it needs reference models and its ROC is a
            single point.
        n_references: with ``yeom``, how many reference models estimate tau (``None``: all), an even
            number (half IN, half OUT for every record); unused by ``sweep``.
    """

    api_version = "1.0"

    access = ("loss",)
    min_reference_models = 0  # the default sweep needs none; threshold=yeom checks its own need in fit
    reference = (
        "S. Yeom, I. Giacomelli, M. Fredrikson, S. Jha. Privacy Risk in Machine Learning: Analyzing "
        "the Connection to Overfitting. IEEE CSF 2018. arXiv:1709.01604"
    )

    def __init__(self, threshold: Literal["sweep", "yeom"] = "sweep", n_references: Optional[int] = None):
        self.threshold = threshold
        self.n_references = n_references

    def validate(self) -> None:
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(f"threshold must be one of {', '.join(THRESHOLD_RULES)}; got {self.threshold!r}")
        check_n_references(self.n_references, even=True)

    def reference_budget(self):
        return (self.n_references if self.threshold == "yeom" else None), True

    def fit(self, ctx) -> "LossAttack":
        self.validate()
        if self.threshold == "yeom" and ctx.n_models - 2 < 2:
            raise ValueError(
                "LossAttack with threshold=yeom estimates the average training loss on reference models and "
                f"needs at least 2 besides the target and its partner (n_models >= 4), got n_models={ctx.n_models}; "
                "use threshold=sweep or more models")
        self.ctx_ = ctx
        #: ``{target: tau}`` with ``threshold=yeom``: the estimated average training loss, per target.
        self.tau_ = {}
        return self

    def score(self, target: int, records: np.ndarray) -> np.ndarray:
        records = np.asarray(records, dtype=np.int64)
        if self.threshold == "sweep":
            return -self.ctx_.for_target(target).target_signal("loss")[records]
        view = self.ctx_.for_target(target, n_references=self.n_references, online=True)
        t = int(target)
        if t not in self.tau_:
            self.tau_[t] = mean_member_loss(ref_loss=view.ref_signal("loss"), ref_in=view.ref_keep)
        return yeom_decision(loss=view.target_signal("loss")[records], tau=self.tau_[t])
