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
        image: declare the records as one-channel images, ``image_shape=(1, 8, 8)`` (channel
            first, as ``--model cnn`` reads them) instead of ``(8, 8)``. The features are the same
            64 values in the same order either way; only the declared shape differs.
    """

    api_version = "1.0"
    #: ``image`` arrived after populations of ``digits`` were cached; at ``False`` (the old
    #: behaviour) it is meant to stay out of cache keys (read by mia_core once it supports this).
    key_defaults = {"image": False}

    def __init__(self, n_records: int = 0, image: bool = False):
        self.n_records = n_records
        self.image = image

    def validate(self) -> None:
        if self.n_records < 0:
            raise ValueError(f"n_records must be >= 0 (0 = all), got {self.n_records}")
        if not isinstance(self.image, (bool, np.bool_)):
            raise ValueError(f"image must be true or false, got {self.image!r}")

    def load(self) -> Records:
        from sklearn.datasets import load_digits

        self.validate()
        x, y = load_digits(return_X_y=True)
        if self.n_records:
            x, y = x[: self.n_records], y[: self.n_records]
        shape = (1, 8, 8) if self.image else (8, 8)
        return Records.from_arrays(x / 16.0, y, name="digits", n_classes=10, image_shape=shape)


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


def pca_project(x: np.ndarray, k: int) -> np.ndarray:
    """Project ``x`` (float ``[N, D]``, already centred) onto its first ``k`` principal components.

    Returns float64 ``[N, k]``: ``x V_k`` with ``V_k`` the top ``k`` right singular vectors of ``x``
    (``k <= D``), each signed so that its largest-magnitude entry is positive (the SVD's signs are
    arbitrary; this makes the projection deterministic across LAPACK builds).
    """
    x = np.asarray(x, dtype=np.float64)
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"pca must be in [1, {x.shape[1]}], got {k}")
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    v = vt[:k].T  # [D, k]
    signs = np.sign(v[np.abs(v).argmax(axis=0), np.arange(k)])
    return x @ (v * np.where(signs == 0, 1.0, signs))


class Diabetes(DatasetSource):
    """Diabetes progression data as shipped with scikit-learn: 442 records, 10 real features, a
    real-valued target (disease progression one year after baseline): a **regression** dataset
    (use ``--model linreg``). Features are standardised with the whole dataset's mean and
    standard deviation (public dataset statistics, the same for members and non-members), then
    optionally projected onto their first ``pca`` principal components (computed on the whole
    dataset, equally fixed); the target is standardised likewise unless ``standardize_target`` is
    false.

    Args:
        pca: project the features to this many principal components ``p_x`` (1-10; 0 = keep all 10).
        n_records: use only the first ``n_records`` records (0 = all), after the fixed preprocessing.
        standardize_target: standardise the target to mean 0 and variance 1 (the MSE then reads as
            the fraction of the target's variance left unexplained).
    """

    api_version = "1.0"

    def __init__(self, pca: int = 0, n_records: int = 0, standardize_target: bool = True):
        self.pca = pca
        self.n_records = n_records
        self.standardize_target = standardize_target

    def validate(self) -> None:
        if isinstance(self.pca, bool) or not isinstance(self.pca, int) or not 0 <= self.pca <= 10:
            raise ValueError(f"pca must be an integer in [0, 10] (0 = no projection), got {self.pca!r}")
        if isinstance(self.n_records, bool) or not isinstance(self.n_records, int) or self.n_records < 0 \
                or 0 < self.n_records < 4:
            raise ValueError(f"n_records must be 0 (all) or an integer >= 4, got {self.n_records!r}")

    def load(self) -> Records:
        from sklearn.datasets import load_diabetes

        self.validate()
        x, y = load_diabetes(return_X_y=True)
        x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-12)
        if self.pca:
            x = pca_project(x, self.pca)
        y = y.astype(np.float64)
        if self.standardize_target:
            y = (y - y.mean()) / y.std()
        if self.n_records:
            x, y = x[: self.n_records], y[: self.n_records]
        return Records.from_arrays(x, y, name="diabetes", task="regression")
