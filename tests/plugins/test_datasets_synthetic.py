"""diabetes and synthetic datasets: shapes, determinism, validation; regression Records."""

from __future__ import annotations

import numpy as np
import pytest

from mia_core.data import DataError, Records
from mia_plugins.datasets.sklearn_data import Diabetes, pca_project
from mia_plugins.datasets.synthetic import Synthetic, gaussian_mixture


def test_diabetes():
    r = Diabetes().load()
    assert (r.n, r.n_features, r.n_classes, r.task) == (442, 10, 1, "regression")
    assert r.y.dtype == np.float64 and r.x.dtype == np.float32
    np.testing.assert_allclose(r.x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(r.x.std(0), 1, atol=1e-4)
    np.testing.assert_allclose([r.y.mean(), r.y.std()], [0, 1], atol=1e-9)
    raw = Diabetes(standardize_target=False).load()
    assert raw.y.min() == 25 and raw.fingerprint() != r.fingerprint()
    assert Diabetes(n_records=100).load().n == 100
    assert Diabetes().load().fingerprint() == r.fingerprint()


def test_diabetes_pca():
    r3 = Diabetes(pca=3).load()
    assert r3.n_features == 3
    np.testing.assert_array_equal(r3.x, Diabetes(pca=3).load().x)
    cov = np.cov(r3.x.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-4)  # uncorrelated components
    assert np.all(np.diff(np.diag(cov)) < 0)  # by decreasing variance
    full = Diabetes().load().x.astype(np.float64)
    np.testing.assert_allclose(np.abs(pca_project(full, 3)), np.abs(r3.x), atol=1e-4)
    # all 10 components: a rotation, distances preserved
    r10 = Diabetes(pca=10).load().x.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(r10, axis=1), np.linalg.norm(full, axis=1), rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({"pca": 11}, "pca must be"), ({"pca": -1}, "pca must be"), ({"n_records": 2}, "n_records must be"),
])
def test_diabetes_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Diabetes(**kwargs).validate()


@pytest.mark.parametrize("kind", ["mixture", "classification", "regression"])
def test_synthetic_kinds_deterministic(kind):
    a = Synthetic(kind=kind, n_records=120, dim=5, n_classes=3, seed=7).load()
    b = Synthetic(kind=kind, n_records=120, dim=5, n_classes=3, seed=7).load()
    c = Synthetic(kind=kind, n_records=120, dim=5, n_classes=3, seed=8).load()
    assert (a.n, a.n_features) == (120, 5)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    if kind == "regression":
        assert a.task == "regression" and a.n_classes == 1 and a.y.dtype == np.float64
    else:
        assert a.task == "classification" and a.n_classes == 3 and set(np.unique(a.y)) == {0, 1, 2}


def test_mixture_geometry():
    x, y = gaussian_mixture(n_records=30000, dim=6, n_classes=3, separation=4.0, noise=0.0, seed=1)
    assert np.bincount(y).tolist() == [10000] * 3  # balanced without label noise
    mu = np.stack([x[y == k].mean(0) for k in range(3)])
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert abs(np.linalg.norm(mu[i] - mu[j]) - 4.0) < 0.1
    np.testing.assert_allclose(np.var(x[y == 0] - mu[0], axis=0), 1.0, atol=0.06)
    _, y_noisy = gaussian_mixture(n_records=30000, dim=6, n_classes=3, separation=4.0, noise=0.3, seed=1)
    assert 0.15 < np.mean(y_noisy != y) < 0.25  # 30% redrawn, two thirds of those change
    xs, _ = gaussian_mixture(n_records=50, dim=2, n_classes=5, separation=1.0, noise=0.0, seed=0)  # K > dim
    assert xs.shape == (50, 2)


def test_synthetic_regression_noise():
    clean = Synthetic(kind="regression", noise=0.0, n_records=500, dim=4).load()
    noisy = Synthetic(kind="regression", noise=0.5, n_records=500, dim=4).load()
    np.testing.assert_allclose([clean.y.mean(), clean.y.std()], [0, 1], atol=1e-9)
    assert 0.35 < np.std(noisy.y - clean.y) < 0.65


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "spiral"}, "kind must be"), ({"n_records": 3}, "n_records"), ({"dim": 0}, "dim"),
    ({"n_classes": 1}, "n_classes"), ({"kind": "classification", "dim": 2, "n_classes": 5}, "2\\*\\*dim"),
    ({"separation": -1.0}, "separation"), ({"noise": 1.5}, "noise must be a fraction"),
    ({"kind": "regression", "noise": -0.1}, "noise must be a finite number"), ({"seed": -1}, "seed"),
])
def test_synthetic_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Synthetic(**kwargs).validate()


def test_regression_records_validation():
    x = np.zeros((4, 2))
    with pytest.raises(DataError, match="constant"):
        Records.from_arrays(x, np.ones(4), name="t", task="regression")
    with pytest.raises(DataError, match="non-finite regression targets"):
        Records.from_arrays(x, np.array([0.0, 1.0, np.nan, 2.0]), name="t", task="regression")
    with pytest.raises(DataError, match="one output"):
        Records.from_arrays(x, np.arange(4.0), name="t", task="regression", n_classes=3)
    with pytest.raises(DataError, match="task must be"):
        Records.from_arrays(x, np.arange(4), name="t", task="ranking")
    r = Records.from_arrays(x, np.array([0.5, 1.5, 0.25, 3.0]), name="t", task="regression")
    assert r.is_regression and r.y.dtype == np.float64
    c = Records.from_arrays(x, np.array([0, 1, 0, 1]), name="t")
    assert c.task == "classification" and not c.is_regression
