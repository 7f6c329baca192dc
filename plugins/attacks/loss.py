"""The loss-threshold attack of Yeom et al. 2018."""

from __future__ import annotations

import numpy as np

from mia_core.base import Attack


class LossAttack(Attack):
    """Loss threshold (Yeom, Giacomelli, Fredrikson, Jha: "Privacy Risk in Machine Learning:
    Analyzing the Connection to Overfitting", IEEE CSF 2018, Sec. 3.2, "Adversary 2").

    The adversary predicts "member" when the target's loss on (x, y) is below a threshold tau;
    the score is therefore ``-loss(x, y)`` (higher = member) and the ROC sweeps every tau.
    Yeom et al. set tau to the expected training loss; the reported ROC and TPR-at-FPR sweep
    every tau instead, so the attack needs no reference models.
    """

    api_version = "1.0"

    access = ("loss",)
    min_reference_models = 0
    reference = (
        "S. Yeom, I. Giacomelli, M. Fredrikson, S. Jha. Privacy Risk in Machine Learning: Analyzing "
        "the Connection to Overfitting. IEEE CSF 2018. arXiv:1709.01604"
    )

    def __init__(self):
        pass

    def fit(self, ctx) -> "LossAttack":
        self.ctx_ = ctx
        return self

    def score(self, target: int, records: np.ndarray) -> np.ndarray:
        view = self.ctx_.for_target(target)
        return -view.target_signal("loss")[np.asarray(records, dtype=np.int64)]
