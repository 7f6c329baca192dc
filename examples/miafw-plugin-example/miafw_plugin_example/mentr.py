"""The modified-prediction-entropy attack of Song & Mittal (USENIX Security 2021)."""

from __future__ import annotations

import numpy as np

from mia_core.base import Attack


def modified_entropy(probs: np.ndarray, labels: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Mentr of each row of ``probs`` with respect to its label.

    ``Mentr(p, y) = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``.

    Args:
        probs: float ``[K, C]`` probability rows (softmax outputs).
        labels: int ``[K]`` true labels in ``[0, C)``.
        eps: floor for the arguments of the logarithms: ``log p_y`` uses ``max(p_y, eps)`` and
            ``log(1 - p_i)`` uses ``max(1 - p_i, eps)``, so a row with ``p_y = 0`` or a wrong class
            at ``p_i = 1`` gives a large finite value instead of ``inf``.

    Returns:
        float64 ``[K]``, ``>= 0``; lower means a more confident correct prediction.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [K, C], got shape {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape [{p.shape[0]}], got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]})")
    rows = np.arange(p.shape[0])
    p_y = p[rows, y]
    log_eps = np.log(eps)
    with np.errstate(divide="ignore"):  # log(0) = -inf is floored at log(eps) just below
        # log max(x, eps) = max(log x, log eps); log1p keeps log(1 - p_i) exact for small p_i
        log_p_y = np.maximum(np.log(p_y), log_eps)
        log_complement = np.maximum(np.log1p(-p), log_eps)
    true_term = -(1.0 - p_y) * log_p_y
    wrong = -p * log_complement
    wrong[rows, y] = 0.0
    return true_term + wrong.sum(axis=1)


class Mentr(Attack):
    """Modified prediction entropy (Song & Mittal, USENIX Security 2021); score = -Mentr.

    Song and Mittal ("Systematic Evaluation of Privacy Risks of Machine Learning Models", USENIX
    Security 2021, arXiv:2003.10595) define the modified prediction entropy of the
    output ``p = F(x)`` on a record with true label ``y`` as

        Mentr(p, y) = -(1 - p_y) log(p_y) - sum_{i != y} p_i log(1 - p_i)

    and infer "member" when ``Mentr <= tau_y``. Unlike the plain entropy it is label-aware: it is
    near 0 only for a confident *correct* prediction (``p_y`` close to 1) and large for a
    confident wrong one. The score here is ``-Mentr`` (higher = member), so the ROC
    sweeps every global threshold; the paper's class-dependent thresholds ``tau_y``, tuned on
    shadow models, are not used and no reference models are needed.

    Args:
        eps: floor inside the logarithms (``log max(p_y, eps)`` and ``log max(1 - p_i, eps)``),
            in (0, 1e-3); it only matters for probabilities that round to 0 or 1.
    """

    api_version = "1.0"

    access = ("probs",)
    min_reference_models = 0
    reference = (
        "L. Song, P. Mittal. Systematic Evaluation of Privacy Risks of Machine Learning Models. "
        "USENIX Security 2021. arXiv:2003.10595 (modified prediction entropy)"
    )

    def __init__(self, eps: float = 1e-12):
        self.eps = eps

    def validate(self) -> None:
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1e-3:
            raise ValueError(f"eps must be a number in (0, 1e-3), got {eps!r}")

    def fit(self, ctx) -> "Mentr":
        self.validate()
        self.ctx_ = ctx
        return self

    def score(self, target: int, records: np.ndarray) -> np.ndarray:
        records = np.asarray(records, dtype=np.int64)
        view = self.ctx_.for_target(target)
        probs = view.target_signal("probs")[records]  # float64 [K, C]
        labels = self.ctx_.labels[records]
        return -modified_entropy(probs, labels, eps=float(self.eps))
