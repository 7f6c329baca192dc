"""Small datasets embedded in scikit-learn (no download): the default population."""

from __future__ import annotations

import numpy as np

from mia_core.base import DatasetSource
from mia_core.data import Records


class Digits(DatasetSource):
    """UCI optical handwritten digits as shipped with scikit-learn: 1,797 images of 8x8 pixels
    (64 features with values 0-16), 10 classes. Features are divided by 16 (a fixed scaling,
    identical for members and non-members).

    Args:
        n_records: use only the first ``n_records`` records (0 = all). Smaller populations
            overfit more and leak more.
    """

    api_version = "1.0"

    def __init__(self, n_records: int = 0):
        self.n_records = n_records

    def validate(self) -> None:
        if self.n_records < 0:
            raise ValueError(f"n_records must be >= 0 (0 = all), got {self.n_records}")

    def load(self) -> Records:
        from sklearn.datasets import load_digits

        self.validate()
        x, y = load_digits(return_X_y=True)
        if self.n_records:
            x, y = x[: self.n_records], y[: self.n_records]
        return Records.from_arrays(x / 16.0, y, name="digits", n_classes=10, image_shape=(8, 8))


class BreastCancer(DatasetSource):
    """Wisconsin diagnostic breast cancer data as shipped with scikit-learn: 569 records,
    30 real features, 2 classes. Features are standardised with the whole dataset's mean and
    standard deviation (public dataset statistics, the same for members and non-members)."""

    api_version = "1.0"

    def __init__(self):
        pass

    def load(self) -> Records:
        from sklearn.datasets import load_breast_cancer

        x, y = load_breast_cancer(return_X_y=True)
        x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-12)
        return Records.from_arrays(x, y, name="breast-cancer", n_classes=2)
