"""Synthetic datasets with known structure: a Gaussian mixture, scikit-learn's
``make_classification`` and ``make_regression``, all determined by their ``seed``."""

from __future__ import annotations

import math
from typing import Literal, Tuple

import numpy as np

from mia_core.base import DatasetSource
from mia_core.data import Records

KINDS = ("mixture", "classification", "regression")


def gaussian_mixture(*, n_records: int, dim: int, n_classes: int, separation: float, noise: float,
                     seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Records from an equal-weight mixture of ``n_classes`` unit-covariance Gaussians in ``dim``
    dimensions, the class the component.

    The means are ``separation / sqrt(2)`` times orthonormal directions (``n_classes <= dim``; a
    random rotation of the first axes), so every two means lie exactly ``separation`` apart, in
    units of the within-class standard deviation (two classes: Bayes accuracy
    ``Phi(separation / 2)``); with ``n_classes > dim`` the directions are random unit vectors.
    A fraction ``noise`` of the labels is then redrawn uniformly at random (as ``make_classification``'s
    ``flip_y``). Labels are balanced: record ``j`` draws from component ``j mod n_classes`` before a
    seeded shuffle.

    Returns:
        ``(x, y)``: float64 ``[n_records, dim]`` and int64 ``[n_records]``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6D6978]))  # "mix"
    g = rng.standard_normal((dim, max(dim, n_classes)))
    if n_classes <= dim:
        q, r = np.linalg.qr(g[:, :dim])
        q = q * np.sign(np.diag(r))  # a Haar-distributed rotation
        directions = q[:, :n_classes].T  # [K, dim], orthonormal rows
    else:
        directions = (g / np.linalg.norm(g, axis=0, keepdims=True)).T[:n_classes]
    means = separation / math.sqrt(2.0) * directions
    y = rng.permutation(np.arange(n_records) % n_classes)
    x = means[y] + rng.standard_normal((n_records, dim))
    flip = rng.random(n_records) < noise
    y = np.where(flip, rng.integers(0, n_classes, n_records), y)
    return x, y.astype(np.int64)


class Synthetic(DatasetSource):
    """Synthetic data of known structure: a Gaussian mixture (``mixture``), scikit-learn's
    ``make_classification`` (``classification``) or ``make_regression`` (``regression``, a
    regression dataset: use ``--model linreg``); deterministic given ``seed``.

    Args:
        kind: ``mixture``, ``classification`` or ``regression``.
        n_records: number of records (>= 4).
        dim: number of features (>= 1).
        n_classes: classes (mixture components), >= 2; unused by ``regression``.
        separation: distance between class means in within-class standard deviations (mixture;
            see :func:`gaussian_mixture`), or ``make_classification``'s ``class_sep``; unused by
            ``regression``.
        noise: ``mixture``/``classification``: the fraction of labels redrawn at random (``flip_y``,
            in [0, 1]); ``regression``: the standard deviation of Gaussian noise added to the target,
            which is standardised to variance 1 before the noise is added.
        seed: the generator's seed.

    ``classification`` uses every feature as informative (``n_informative=dim``, no redundant
    features, one cluster per class), so it needs ``n_classes <= 2**dim``; ``regression`` likewise
    (``n_informative=dim``).
    """

    api_version = "1.0"

    def __init__(self, kind: Literal["mixture", "classification", "regression"] = "mixture",
                 n_records: int = 1000, dim: int = 10, n_classes: int = 2, separation: float = 1.0,
                 noise: float = 0.1, seed: int = 0):
        self.kind = kind
        self.n_records = n_records
        self.dim = dim
        self.n_classes = n_classes
        self.separation = separation
        self.noise = noise
        self.seed = seed

    def validate(self) -> None:
        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not integer(self.n_records) or self.n_records < 4:
            raise ValueError(f"n_records must be an integer >= 4, got {self.n_records!r}")
        if not integer(self.dim) or self.dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {self.dim!r}")
        if not integer(self.n_classes) or self.n_classes < 2:
            raise ValueError(f"n_classes must be an integer >= 2, got {self.n_classes!r}")
        if self.kind == "classification" and self.n_classes > 2 ** min(self.dim, 30):
            raise ValueError(f"n_classes={self.n_classes} needs more than dim={self.dim} features for "
                             f"kind=classification (at most 2**dim classes)")
        if self.kind != "regression" and self.n_classes > self.n_records:
            raise ValueError(f"n_classes={self.n_classes} exceeds n_records={self.n_records}")
        if not isinstance(self.separation, (int, float)) or not 0 <= self.separation < math.inf:
            raise ValueError(f"separation must be a finite number >= 0, got {self.separation!r}")
        top = math.inf if self.kind == "regression" else 1.0
        if not isinstance(self.noise, (int, float)) or not 0 <= self.noise <= top or math.isinf(self.noise):
            what = "a finite number >= 0" if self.kind == "regression" else "a fraction in [0, 1]"
            raise ValueError(f"noise must be {what} for kind={self.kind}, got {self.noise!r}")
        if not integer(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")

    def load(self) -> Records:
        self.validate()
        name = f"synthetic-{self.kind}"
        if self.kind == "mixture":
            x, y = gaussian_mixture(n_records=self.n_records, dim=self.dim, n_classes=self.n_classes,
                                    separation=float(self.separation), noise=float(self.noise), seed=self.seed)
            return Records.from_arrays(x, y, name=name, n_classes=self.n_classes)
        if self.kind == "classification":
            from sklearn.datasets import make_classification

            x, y = make_classification(n_samples=self.n_records, n_features=self.dim, n_informative=self.dim,
                                       n_redundant=0, n_repeated=0, n_classes=self.n_classes,
                                       n_clusters_per_class=1, flip_y=float(self.noise),
                                       class_sep=float(self.separation), random_state=self.seed)
            return Records.from_arrays(x, y, name=name, n_classes=self.n_classes)
        from sklearn.datasets import make_regression

        x, y = make_regression(n_samples=self.n_records, n_features=self.dim, n_informative=self.dim, noise=0.0,
                               random_state=self.seed)
        y = (y - y.mean()) / max(float(y.std()), 1e-12)
        y = y + float(self.noise) * np.random.default_rng(np.random.SeedSequence([self.seed, 0x6E6F6973])) \
            .standard_normal(self.n_records)  # "nois"
        return Records.from_arrays(x, y, name=name, task="regression")
