"""kl-leakage: the per-record Gaussian KL against an independent float64 numpy reference, its convergence to
the closed form of the true distributions as the number of models grows, the bounds, the bootstrap, the PCA,
validation errors, the access each mode declares, the conformance kit and one command-line run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mia_core.engine import AccessError, EstimatorContext
from mia_core.testing import check_estimator, planted_population
from mia_plugins.estimators import kl_leakage as kl
from mia_plugins.estimators.kl_leakage import (
    KLLeakage,
    bootstrap_mean_interval,
    fit_record_gaussians,
    kl_advantage_bound,
    max_full_dim,
    pca_project,
    per_record_kl,
    pinsker_advantage_bound,
    resolve_covariance,
    rho_kl,
    shuffled_keep,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------- references (numpy, float64)
def ref_kl(mu_a, cov_a, mu_b, cov_b) -> float:
    """KL(N(mu_a, cov_a) || N(mu_b, cov_b)), closed form with explicit inverses and log-determinants."""
    d = mu_a.size
    inv_b = np.linalg.inv(cov_b)
    dm = mu_b - mu_a
    return 0.5 * (np.trace(inv_b @ cov_a) + dm @ inv_b @ dm - d + np.linalg.slogdet(cov_b)[1]
                  - np.linalg.slogdet(cov_a)[1])


def ref_record_kl(x, keep, covariance, ridge):
    """Per-record (KL(p1||p0), KL(p0||p1)), one record at a time with np.cov, following the documented
    fit: unbiased covariances (diagonal only for "diag") plus ridge times the pooled within-group variances
    (the variance over all models where that is 0, and 1 where that is 0 too)."""
    m, n = keep.shape
    x = np.broadcast_to(x, (m, n, x.shape[2]))
    fwd, rev = [], []
    for j in range(n):
        a, b = x[keep[:, j], j], x[~keep[:, j], j]
        ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
        if covariance == "diag":
            ca, cb = np.diag(np.diag(ca)), np.diag(np.diag(cb))
        pooled = ((len(a) - 1) * np.diag(ca) + (len(b) - 1) * np.diag(cb)) / (m - 2)
        total = np.atleast_1d(np.var(x[:, j], axis=0, ddof=1))
        scale = np.where(pooled > 1e-300, pooled, np.where(total > 1e-300, total, 1.0))
        ca, cb = ca + ridge * np.diag(scale), cb + ridge * np.diag(scale)
        fwd.append(ref_kl(a.mean(0), ca, b.mean(0), cb))
        rev.append(ref_kl(b.mean(0), cb, a.mean(0), ca))
    return np.array(fwd), np.array(rev)


def random_keep(rng, m, n, min_group=2):
    """bool [m, n] with between min_group and m - min_group IN models per record."""
    keep = np.zeros((m, n), bool)
    for j in range(n):
        k = rng.integers(min_group, m - min_group + 1)
        keep[rng.permutation(m)[:k], j] = True
    return keep


def pair_keep(rng, m, n):
    """A complementary-pair keep matrix, as the engine draws it: each record IN for exactly m/2 models."""
    half = rng.random((m // 2, n)) < 0.5
    return np.concatenate([half, ~half])


# ----------------------------------------------------------------------------- the kernel path vs the reference
@SETTINGS
@given(m=st.integers(2, 6).map(lambda h: 2 * h), n=st.integers(1, 6), d=st.integers(1, 3),
       covariance=st.sampled_from(["diag", "full"]), ridge=st.sampled_from([0.0, 1e-3, 0.5]),
       shared=st.booleans(), seed=st.integers(0, 2**16))
def test_per_record_kl_matches_float64_reference(m, n, d, covariance, ridge, shared, seed):
    rng = np.random.default_rng(seed)
    keep = random_keep(rng, m, n)
    n_min = int(min(keep.sum(0).min(), (~keep).sum(0).min()))
    assume(ridge > 0 or covariance == "diag" or n_min > d)  # a plain full fit needs more draws than dimensions
    scale = np.exp(rng.normal(size=d))  # coordinates on different scales
    x = rng.normal(size=(m, 1 if shared else n, d)) * scale + rng.normal(size=d)
    got = per_record_kl(values=x, keep=keep, covariance=covariance, ridge=ridge)
    want_fwd, want_rev = ref_record_kl(x, keep, covariance, ridge)
    np.testing.assert_allclose(got.kl_in_out, want_fwd, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got.kl_out_in, want_rev, rtol=1e-7, atol=1e-9)
    assert got.covariance == ("univariate" if d == 1 else covariance) and got.dim == d
    assert rho_kl(values=x, keep=keep, covariance=covariance, ridge=ridge) == pytest.approx(
        float((want_fwd + want_rev).mean()), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("covariance,d", [("diag", 1), ("diag", 4), ("full", 3)])
def test_native_and_torch_backends_agree(covariance, d):
    rng = np.random.default_rng(3)
    keep = pair_keep(rng, 16, 50)
    x = rng.normal(size=(16, 50, d))
    native = per_record_kl(values=x, keep=keep, covariance=covariance, backend="auto")
    torch_ = per_record_kl(values=x, keep=keep, covariance=covariance, backend="torch")
    np.testing.assert_allclose(native.symmetric, torch_.symmetric, rtol=1e-10)


def test_shared_values_chunks_and_two_dim_input_agree(monkeypatch):
    rng = np.random.default_rng(5)
    keep = pair_keep(rng, 8, 37)
    theta = rng.normal(size=(8, 1, 5))
    whole = per_record_kl(values=theta, keep=keep, covariance="diag")
    tiled = per_record_kl(values=np.repeat(theta, 37, axis=1), keep=keep, covariance="diag")
    np.testing.assert_allclose(whole.symmetric, tiled.symmetric, rtol=1e-12)
    monkeypatch.setattr(kl, "CHUNK_ELEMENTS", 7)  # one or two records per chunk
    chunked = per_record_kl(values=theta, keep=keep, covariance="diag")
    np.testing.assert_allclose(chunked.symmetric, whole.symmetric, rtol=1e-12)
    flat = rng.normal(size=(8, 37))
    np.testing.assert_array_equal(per_record_kl(values=flat, keep=keep).symmetric,
                                  per_record_kl(values=flat[:, :, None], keep=keep).symmetric)


# ----------------------------------------------------------------------------- convergence to the closed form
def _true_gaussians(rng, n, d, diagonal):
    mu1 = rng.normal(size=(n, d))
    mu0 = mu1 + rng.normal(scale=0.7, size=(n, d))
    covs = []
    for extra in (1.0, 1.5):
        a = rng.normal(scale=0.3, size=(n, d, d))
        c = np.einsum("nij,nkj->nik", a, a) + extra * np.eye(d)
        covs.append(c * np.eye(d) if diagonal else c)
    return mu1, covs[0], mu0, covs[1]


@pytest.mark.parametrize("d,covariance", [(1, "auto"), (2, "full"), (3, "diag")])
def test_rho_kl_converges_to_the_closed_form_as_models_grow(d, covariance):
    """Records whose IN and OUT models draw from known Gaussians: rho_KL's error against the closed form of
    the true distributions falls as M = 8, 64, 512, and is within 10% at 512 (the plug-in estimate carries
    an O(d/n) upward bias, n = M/2 models per group, plus the sampling error of n draws)."""
    rng = np.random.default_rng(11)
    n = 60
    mu1, s1, mu0, s0 = _true_gaussians(rng, n, d, diagonal=covariance == "diag")
    truth = float(np.mean([ref_kl(mu1[j], s1[j], mu0[j], s0[j]) + ref_kl(mu0[j], s0[j], mu1[j], s1[j])
                           for j in range(n)]))
    errors = []
    for m in (8, 64, 512):
        r = np.random.default_rng([m, d])
        keep = pair_keep(r, m, n)
        z = r.normal(size=(m, n, d))
        x = np.where(keep[:, :, None], mu1 + np.einsum("nij,mnj->mni", np.linalg.cholesky(s1), z),
                     mu0 + np.einsum("nij,mnj->mni", np.linalg.cholesky(s0), z))
        errors.append(abs(rho_kl(values=x, keep=keep, covariance=covariance) - truth))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1 * truth, (errors, truth)


# ----------------------------------------------------------------------------- properties of the fit
@SETTINGS
@given(seed=st.integers(0, 2**16), covariance=st.sampled_from(["diag", "full"]))
def test_kl_is_invariant_to_rescaling_and_shifting_a_coordinate(seed, covariance):
    rng = np.random.default_rng(seed)
    keep = random_keep(rng, 10, 4)
    x = rng.normal(size=(10, 4, 3))
    y = x * np.array([1e3, 1.0, 1e-4]) + np.array([5.0, -2.0, 1e6 * 1e-4])
    a = per_record_kl(values=x, keep=keep, covariance=covariance, ridge=1e-2).symmetric
    b = per_record_kl(values=y, keep=keep, covariance=covariance, ridge=1e-2).symmetric
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_degenerate_records():
    keep = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], bool)
    same = np.full((4, 2), 3.0)  # every model agrees: no information, KL 0
    np.testing.assert_array_equal(per_record_kl(values=same, keep=keep).symmetric, [0.0, 0.0])
    split = np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0]])  # perfectly separated, no spread
    got = per_record_kl(values=split, keep=keep, ridge=1e-3).symmetric
    assert np.all(np.isfinite(got)) and np.all(got > 100)  # of order 1/ridge: scale-free, finite
    with pytest.raises(ValueError, match="positive finite variance"):
        per_record_kl(values=same, keep=keep, ridge=0.0)
    g = fit_record_gaussians(values=same, keep=keep, covariance="full")
    assert g.cov_in.shape == (2, 1, 1) and g.kind == "full" and g.n_in.tolist() == [2, 2]


@pytest.mark.parametrize("kwargs,message", [
    ({"values": np.zeros((4, 3, 2, 1))}, r"values must be \[M, N\]"),
    ({"values": np.zeros((4, 2))}, "has 2 records but keep has 3"),
    ({"values": np.zeros((5, 3))}, r"keep must be bool \[M, N\] with M = 5"),
    ({"values": np.full((4, 3), np.nan)}, "12 non-finite entries"),
    ({"keep": np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)}, "record 0 has 3 IN and 1 OUT"),
    ({"keep": np.full((4, 3), 2)}, "booleans"),
    ({"ridge": -1.0}, "ridge must be a finite number >= 0"),
    ({"ridge": float("inf")}, "ridge must be"),
    ({"covariance": "spherical"}, "covariance must be one of auto, full, diag; got 'spherical'"),
    ({"values": np.zeros((4, 3, 129)), "covariance": "full"}, "at most 128 dimensions"),
])
def test_per_record_kl_rejects(kwargs, message):
    args = {"values": np.random.default_rng(0).normal(size=(4, 3)),
            "keep": np.array([[1, 1, 1], [1, 1, 0], [0, 0, 1], [0, 0, 0]], bool), **kwargs}
    with pytest.raises(ValueError, match=message):
        per_record_kl(**args)


def test_resolve_covariance_and_max_full_dim():
    assert [max_full_dim(n) for n in (2, 4, 5, 8, 32, 256)] == [1, 1, 1, 2, 14, 126]
    assert resolve_covariance("auto", dim=1, n_min=8) == "univariate"
    assert resolve_covariance("auto", dim=2, n_min=8) == "full"
    assert resolve_covariance("auto", dim=3, n_min=8) == "diag"
    assert resolve_covariance("auto", dim=129, n_min=10**4) == "diag"
    assert resolve_covariance("full", dim=10, n_min=8) == "full"  # asked for: ridge keeps it definite
    assert per_record_kl(values=np.zeros((4, 0)), keep=np.zeros((4, 0), bool)).symmetric.shape == (0,)
    assert rho_kl(values=np.zeros((4, 0)), keep=np.zeros((4, 0), bool)) == 0.0


# ----------------------------------------------------------------------------- bounds, bootstrap, PCA
def test_advantage_bounds():
    assert kl_advantage_bound(rho=0.0) == 0.0
    assert kl_advantage_bound(rho=0.16) == pytest.approx(0.2)
    assert kl_advantage_bound(rho=4.0) == 1.0 and kl_advantage_bound(rho=1e9) == 1.0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rho must be"):
            kl_advantage_bound(rho=bad)
    assert pinsker_advantage_bound(kl_in_out=np.array([0.02, 8.0]), kl_out_in=np.array([0.5, 100.0])) == \
        pytest.approx((0.1 + 1.0) / 2)
    assert pinsker_advantage_bound(kl_in_out=np.zeros(0), kl_out_in=np.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        pinsker_advantage_bound(kl_in_out=np.zeros(2), kl_out_in=np.zeros(3))


@SETTINGS
@given(a=st.lists(st.floats(0, 50), min_size=1, max_size=30), b=st.lists(st.floats(0, 50), min_size=1, max_size=30))
def test_pinsker_bound_never_exceeds_theorem_1(a, b):
    k = min(len(a), len(b))
    fwd, rev = np.array(a[:k]), np.array(b[:k])
    assert pinsker_advantage_bound(kl_in_out=fwd, kl_out_in=rev) <= \
        kl_advantage_bound(rho=float((fwd + rev).mean())) + 1e-12


@SETTINGS
@given(v=st.lists(st.floats(0, 100), min_size=1, max_size=40), seed=st.integers(0, 100))
def test_bootstrap_interval_holds_the_mean_and_is_seeded(v, seed):
    arr = np.array(v)
    lo, hi = bootstrap_mean_interval(per_record=arr, n_boot=50, seed=seed)
    assert lo <= arr.mean() <= hi and arr.min() - 1e-9 <= lo and hi <= arr.max() + 1e-9
    assert (lo, hi) == bootstrap_mean_interval(per_record=arr, n_boot=50, seed=seed)


def test_bootstrap_rejects_and_edges():
    assert bootstrap_mean_interval(per_record=np.zeros(0)) == (0.0, 0.0)
    assert bootstrap_mean_interval(per_record=np.array([2.5]), n_boot=10) == (2.5, 2.5)
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1"):
        bootstrap_mean_interval(per_record=np.ones(3), n_boot=0)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        bootstrap_mean_interval(per_record=np.ones(3), confidence=1.0)
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_mean_interval(per_record=np.ones((2, 2)))


def test_pca_project():
    rng = np.random.default_rng(2)
    theta = rng.normal(size=(8, 50)) @ np.diag(np.linspace(3, 0.1, 50))
    z, ratio = pca_project(params=theta, dim=3)
    centred = theta - theta.mean(0)
    vt = np.linalg.svd(centred, full_matrices=False)[2][:3]
    np.testing.assert_allclose(np.abs(z), np.abs(centred @ vt.T), rtol=1e-9, atol=1e-12)
    assert np.all(np.diff(ratio) <= 0) and 0 < ratio.sum() <= 1
    z7, ratio7 = pca_project(params=theta, dim=7)
    assert ratio7.sum() == pytest.approx(1.0)  # 8 centred models span 7 directions
    assert pca_project(params=np.ones((4, 3)), dim=1)[1].tolist() == [0.0]
    for bad in (0, 8, True):
        with pytest.raises(ValueError, match=r"dim must be an integer in \[1, min\(M - 1, D\)\] = \[1, 7\]"):
            pca_project(params=theta, dim=bad)


def test_shuffled_keep_keeps_the_counts():
    keep = random_keep(np.random.default_rng(0), 10, 30)
    shuffled = shuffled_keep(keep=keep, seed=4)
    assert (shuffled.sum(0) == keep.sum(0)).all() and (shuffled != keep).any()
    np.testing.assert_array_equal(shuffled, shuffled_keep(keep=keep, seed=4))


# ----------------------------------------------------------------------------- the plugin
@pytest.mark.parametrize("params,message", [
    ({"source": "grads"}, "source must be one of signal, params; got 'grads'"),
    ({"signal": "probs"}, "signal must be one of confidence, loss, logits; got 'probs'"),
    ({"covariance": "spherical"}, "covariance must be one of auto, full, diag"),
    ({"source": "params", "dim": -1}, "dim must be none .* got -1"),
    ({"source": "params", "dim": 2.5}, "dim must be none"),
    ({"dim": 2}, "dim=2 applies to source=params only"),
    ({"ridge": -0.1}, "ridge must be a finite number >= 0, got -0.1"),
    ({"ridge": float("nan")}, "ridge must be"),
    ({"n_bootstrap": 5}, "n_bootstrap must be an integer >= 10, got 5"),
    ({"confidence": 1.5}, r"confidence must be a number in \(0, 1\), got 1.5"),
    ({"top_k": -1}, "top_k must be an integer >= 0, got -1"),
])
def test_validate_rejects(params, message):
    with pytest.raises(ValueError, match=message):
        KLLeakage(**params).validate()


def test_access_follows_the_mode():
    assert KLLeakage.access == ("params", "logits")  # everything some mode reads: what `miafw info` shows
    assert KLLeakage().access == ("probs",)  # the default: logit-scaled confidence, black-box
    assert KLLeakage(signal="loss").access == ("loss",)
    assert KLLeakage(signal="logits").access == ("logits",)
    assert KLLeakage(source="params").access == ("params",)


@pytest.fixture(scope="module")
def planted():
    return planted_population()


def test_signal_mode_reads_only_its_signal_and_finds_the_planted_leak(planted):
    est = KLLeakage()
    out = est.estimate(EstimatorContext(planted, est.access, owner="test"))
    assert out["value"] > 3 * out["null_value"]  # members memorised random labels: far above the floor
    assert out["interval"][0] <= out["value"] <= out["interval"][1]
    assert out["advantage_bound"] == kl_advantage_bound(rho=out["value"])
    assert out["advantage_bound_pinsker"] <= out["advantage_bound"]
    assert out["rho_mi_bound"] == out["value"] / 4
    assert out["kl_in_out"] + out["kl_out_in"] == pytest.approx(out["value"])
    assert len(out["most_exposed"]) == 10
    assert {r["record"] for r in out["most_exposed"]} <= set(planted.records.index.tolist())
    kls = [r["kl"] for r in out["most_exposed"]]
    assert kls == sorted(kls, reverse=True) and kls[0] == pytest.approx(out["per_record"]["max"])
    assert out["fit"]["covariance"] == "univariate" and out["fit"]["n_in_min"] == 4
    json.dumps(out)
    with pytest.raises(AccessError):  # the black-box mode is held to black-box access
        KLLeakage(source="params").estimate(EstimatorContext(planted, est.access, owner="test"))


def test_params_mode(planted):
    est = KLLeakage(source="params")
    out = est.estimate(EstimatorContext(planted, est.access, owner="test"))
    fit = out["fit"]
    assert fit["n_parameters"] == 10 * 64 + 64 + 64 * 4 + 4 and fit["dimension"] == max_full_dim(4) == 1
    assert fit["projection"].startswith("pca (1 of 964") and len(fit["explained_variance_ratio"]) == 1
    raw = KLLeakage(source="params", dim=0, top_k=0)
    out = raw.estimate(EstimatorContext(planted, raw.access, owner="test"))
    assert out["fit"]["covariance"] == "diag" and out["fit"]["dimension"] == 964 and out["most_exposed"] == []
    with pytest.raises(ValueError, match="dim=8 exceeds the 7 principal components"):
        KLLeakage(source="params", dim=8).estimate(EstimatorContext(planted, ("params",), owner="test"))


@pytest.mark.parametrize("params", [
    {},
    {"signal": "logits"},
    {"signal": "loss", "ridge": 0.1},
    {"source": "params"},
    {"source": "params", "dim": 3, "covariance": "full"},
    {"source": "params", "dim": 0},
])
def test_conformance_kit(params):
    out = check_estimator(KLLeakage, params=params)
    assert math.isfinite(out["value"]) and out["value"] >= 0 and 0 <= out["advantage_bound"] <= 1


def test_cli_shows_both_modes(tmp_path):
    from click.testing import CliRunner

    from mia_core.cli import main

    specs = ["kl-leakage", "kl-leakage:source=params,n_bootstrap=50"]
    args = ["eval", "--attack", "lira", "--dataset", "digits:n_records=300", "--model", "mlp:width=32",
            "--n-models", "6", "--epochs", "3", "--targets", "first:2", "-q", "--out", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache")]
    for s in specs:
        args += ["--estimator", s]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for s in specs:
        assert s in res.output
    run = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir() and not d.name.startswith("."))
    ests = json.loads((run / "metrics.json").read_text())["estimators"]
    assert set(ests) == set(specs)
    assert ests["kl-leakage:source=params,n_bootstrap=50"]["report"]["fit"]["source"] == "params"
    for e in ests.values():
        assert e["interval"][0] <= e["value"] <= e["interval"][1] and 0 <= e["advantage_bound"] <= 1
