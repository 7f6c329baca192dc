"""The ``info`` estimator: the JS/TV bounds against closed forms (two-point and Gaussian pairs), the
kNN mutual information, histogram/KDE JS and cross-validated Bayes-error estimates against two
Gaussians with known means, the record half-sample interval, validation, the conformance kit and
the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, special, stats
from scipy.spatial.distance import jensenshannon
from sklearn.feature_selection import mutual_info_classif
from sklearn.metrics import mutual_info_score

from mia_core.testing import check_estimator
from mia_plugins.estimators.info import (
    InfoBounds,
    balanced_pairs,
    calibrate_per_record,
    cv_bayes,
    half_sample_interval,
    inference_gain,
    information_leakage,
    js_histogram,
    js_kde,
    js_of_binary_pair,
    mutual_information,
    sorted_probs,
    tv_bound_fano,
    tv_bound_pinsker,
)

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- references
def gauss_js(delta: float) -> float:
    """JS(N(0, 1) || N(delta, 1)) in nats by numerical integration (independent of the module)."""
    p = lambda x: stats.norm.pdf(x)  # noqa: E731
    q = lambda x: stats.norm.pdf(x, loc=delta)  # noqa: E731

    def f(x):
        a, b = p(x), q(x)
        m = (a + b) / 2
        return 0.5 * special.xlogy(a, a) + 0.5 * special.xlogy(b, b) - special.xlogy(m, m)

    return integrate.quad(f, -15.0, 15.0 + delta, points=[0.0, delta / 2, delta], limit=400)[0]


def gauss_tv(delta: float) -> float:
    """TV(N(0, 1), N(delta, 1)) = 2 Phi(delta / 2) - 1."""
    return 2.0 * stats.norm.cdf(abs(delta) / 2.0) - 1.0


def gauss_sample(delta: float, n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = np.r_[rng.normal(delta, 1.0, n), rng.normal(0.0, 1.0, n)]
    return x, np.r_[np.ones(n, bool), np.zeros(n, bool)]


# ----------------------------------------------------------------------------- bounds, closed forms
@settings(max_examples=40, deadline=None, derandomize=True)
@given(v=st.floats(0.0, 1.0))
def test_binary_pair_js_matches_scipy_and_the_fano_bound_is_tight_there(v):
    p = np.array([(1 + v) / 2, (1 - v) / 2])
    js = jensenshannon(p, p[::-1]) ** 2  # scipy gives the distance (square root), natural log
    assert js_of_binary_pair(tv=v) == pytest.approx(js, abs=1e-12)
    assert float(tv_bound_fano(information=js)) == pytest.approx(v, abs=1e-6)  # equality: the bound is tight


@settings(max_examples=60, deadline=None, derandomize=True)
@given(a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0))
def test_bounds_hold_on_every_bernoulli_pair(a, b):
    js = jensenshannon([a, 1 - a], [b, 1 - b]) ** 2
    tv = abs(a - b)
    fano, pinsker = float(tv_bound_fano(information=js)), float(tv_bound_pinsker(information=js))
    assert tv <= fano + 1e-9
    assert fano <= pinsker + 1e-12
    assert tv ** 2 <= 2 * js + 1e-12  # Pinsker's constant: TV^2 <= 2 JS (nats)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(delta=st.floats(0.0, 6.0))
def test_bounds_hold_on_two_gaussians(delta):
    js, tv = gauss_js(delta), gauss_tv(delta)
    assert tv ** 2 <= 2 * js + 1e-9
    assert tv <= float(tv_bound_fano(information=js)) + 1e-7 <= float(tv_bound_pinsker(information=js)) + 1e-7
    # and the optimal gain of Wang et al. Eq. (10) lies in [-log 4, 0]
    assert -math.log(4) - 1e-12 <= float(inference_gain(js=js)) <= 1e-12


def test_pinsker_constant_is_sharp_and_the_known_values():
    # TV^2 / JS -> 2 for nearly equal two-point distributions: no constant below 2 is valid
    v = 1e-3
    assert v ** 2 / js_of_binary_pair(tv=v) == pytest.approx(2.0, rel=1e-5)
    # N(0,1) vs N(1,1): TV = 0.3829, JS = 0.1114 nats; Fano 0.463 and Pinsker 0.472 both above TV
    js = gauss_js(1.0)
    assert js == pytest.approx(0.11142, abs=1e-4) and gauss_tv(1.0) == pytest.approx(0.38292, abs=1e-4)
    assert float(tv_bound_fano(information=js)) == pytest.approx(0.46307, abs=1e-4)
    assert float(tv_bound_pinsker(information=js)) == pytest.approx(math.sqrt(2 * js))


def test_bound_edge_cases_and_shapes():
    assert float(tv_bound_fano(information=0.0)) == 0.0
    assert float(tv_bound_fano(information=-0.1)) == 0.0
    assert float(tv_bound_fano(information=LN2)) == 1.0 and float(tv_bound_fano(information=5.0)) == 1.0
    assert float(tv_bound_pinsker(information=1.0)) == 1.0 and float(tv_bound_pinsker(information=-1)) == 0.0
    got = tv_bound_fano(information=np.array([[0.0, 0.01], [0.2, 1.0]]))
    assert got.shape == (2, 2) and np.all(np.diff(got.ravel()) > 0)
    assert float(inference_gain(js=0.0)) == pytest.approx(-math.log(4)) and float(inference_gain(js=LN2)) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        tv_bound_fano(information=float("nan"))


# ----------------------------------------------------------------------------- estimators vs closed forms
@pytest.mark.parametrize("delta", [0.5, 1.0, 2.0])
def test_estimates_match_two_gaussians(delta):
    x, b = gauss_sample(delta, 4000, seed=int(delta * 10))
    js, tv = gauss_js(delta), gauss_tv(delta)
    # I(S; B) = JS under the prior 1/2: the kNN, histogram and KDE estimates all target it
    assert mutual_information(x=x, membership=b, seed=0) == pytest.approx(js, abs=0.015)
    assert js_histogram(x=x, membership=b, bins=32) == pytest.approx(js, abs=0.015)
    assert js_kde(x=x, membership=b, seed=0) == pytest.approx(js, abs=0.015)
    cv = cv_bayes(x=x, membership=b, classifier="logistic", seed=0)
    assert cv["youden_j"] == pytest.approx(tv, abs=0.04)  # the Bayes rule is a threshold here
    assert cv["balanced_accuracy"] == pytest.approx((1 + tv) / 2, abs=0.02)
    assert cv["gain"] <= float(inference_gain(js=js)) + 0.01  # no classifier beats the optimal gain
    boost = cv_bayes(x=x, membership=b, classifier="boosting", seed=0)
    assert boost["youden_j"] == pytest.approx(tv, abs=0.05)
    assert boost["youden_j_best_threshold"] >= boost["youden_j"] - 1e-12
    # the bound from the estimate stays above the true advantage
    assert float(tv_bound_fano(information=mutual_information(x=x, membership=b))) >= tv - 0.02


def test_identical_distributions_give_no_information():
    rng = np.random.default_rng(3)
    x, b = rng.normal(size=6000), np.arange(6000) % 2 == 0
    assert mutual_information(x=x, membership=b) < 0.01
    assert js_histogram(x=x, membership=b) < 0.01
    assert abs(cv_bayes(x=x, membership=b, classifier="logistic")["youden_j"]) < 0.05


def test_one_feature_is_sklearns_estimator_and_the_joint_one_reduces_to_it():
    x, b = gauss_sample(1.0, 1500, seed=4)
    ref = mutual_info_classif(x[:, None], b.astype(int), n_neighbors=5, random_state=9)[0]
    assert mutual_information(x=x, membership=b, n_neighbors=5, seed=9) == ref
    # the joint (multi-feature) path on [x, constant]: the same neighbourhoods, so the same estimate
    joint = mutual_information(x=np.c_[x, np.zeros_like(x)], membership=b, n_neighbors=5, seed=9)
    assert joint == pytest.approx(ref, abs=1e-9)


def test_joint_information_sees_what_single_features_miss():
    # membership = sign(x1 * x2): each feature alone carries no information, the pair carries log 2
    rng = np.random.default_rng(5)
    z = rng.normal(size=(4000, 2))
    b = z[:, 0] * z[:, 1] > 0
    per_feature = mutual_info_classif(z, b.astype(int), random_state=0)
    assert per_feature.max() < 0.02
    assert mutual_information(x=z, membership=b) > 0.5
    assert js_kde(x=z, membership=b) > 0.2


def test_discrete_signal_uses_plug_in_estimates():
    rng = np.random.default_rng(6)
    b = np.arange(4000) % 2 == 0
    x = (rng.random(4000) < np.where(b, 0.9, 0.6)).astype(float)
    mi = mutual_information(x=x, membership=b, discrete=True)
    assert mi == pytest.approx(mutual_info_score(x, b))
    assert js_histogram(x=x, membership=b, discrete=True) == pytest.approx(mi, abs=1e-12)  # balanced: I = JS
    p, q = x[b].mean(), x[~b].mean()
    assert float(tv_bound_fano(information=mi)) >= abs(p - q) - 1e-9


def test_estimator_input_errors():
    x, b = gauss_sample(1.0, 50, seed=0)
    with pytest.raises(ValueError, match="members and non-members"):
        mutual_information(x=x, membership=np.ones_like(b))
    with pytest.raises(ValueError, match="x must be"):
        js_histogram(x=x[:10], membership=b)
    with pytest.raises(ValueError, match="finite"):
        mutual_information(x=np.r_[x[:-1], np.nan], membership=b)
    with pytest.raises(ValueError, match="n_neighbors must be an integer >= 1"):
        mutual_information(x=x, membership=b, n_neighbors=0)
    with pytest.raises(ValueError, match="bins must be an integer >= 2"):
        js_histogram(x=x, membership=b, bins=1)
    with pytest.raises(ValueError, match="one-feature signal"):
        js_histogram(x=np.c_[x, x], membership=b)
    with pytest.raises(ValueError, match="non-singular"):
        js_kde(x=np.c_[x, 2 * x], membership=b)
    with pytest.raises(ValueError, match="classifier must be one of boosting, logistic; got 'svm'"):
        cv_bayes(x=x, membership=b, classifier="svm")
    with pytest.raises(ValueError, match="membership must be boolean"):
        mutual_information(x=x, membership=np.full(b.shape, 2))


# ----------------------------------------------------------------------------- features and sampling
@settings(max_examples=40, deadline=None, derandomize=True)
@given(z=st.lists(st.floats(-30, 30), min_size=2, max_size=5), k=st.one_of(st.none(), st.integers(1, 6)))
def test_sorted_probs_are_the_logit_scaled_top_k(z, k):
    z = np.array(z)
    p = special.softmax(z)
    got = sorted_probs(probs=p[None], top_k=k)[0]
    keep = len(z) - 1 if k is None or k >= len(z) else k
    order = np.argsort(-p, kind="stable")[:keep]
    want = [z[i] - special.logsumexp(np.delete(z, i)) for i in order]
    assert got.shape == (keep,)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert np.all(np.diff(got) <= 1e-9)  # decreasing, as the probabilities


def test_sorted_probs_stay_exact_when_the_top_probability_rounds_to_one():
    z = np.array([60.0, 0.0, -1.0])
    got = sorted_probs(probs=special.softmax(z)[None], top_k=1)[0, 0]
    assert got == pytest.approx(60.0 - special.logsumexp([0.0, -1.0]), rel=1e-9)


def test_calibration_and_balanced_pairs():
    rng = np.random.default_rng(7)
    f = rng.normal(size=(8, 30, 2)) * rng.uniform(1, 5, size=(1, 30, 1)) + 3
    z = calibrate_per_record(features=f)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[M, N, F\]"):
        calibrate_per_record(features=f[0])
    keep = np.zeros((8, 30), bool)
    for j in range(30):
        keep[rng.permutation(8)[:4], j] = True
    recs = np.array([1, 4, 4, 9])
    mm, rr = balanced_pairs(keep=keep, records=recs, n_each=5, rng=np.random.default_rng(0))
    assert keep[mm, rr].sum() == 5 and (~keep[mm, rr]).sum() == 5 and set(rr) <= {1, 4, 9}
    mm2, rr2 = balanced_pairs(keep=keep, records=recs, n_each=5, rng=np.random.default_rng(0))
    assert np.array_equal(mm, mm2) and np.array_equal(rr, rr2)
    mm, rr = balanced_pairs(keep=keep, records=np.arange(30), n_each=10**6, rng=np.random.default_rng(0))
    assert mm.size == 8 * 30  # all pairs when fewer than asked


def _population(delta, m=16, n=600, seed=0, record_effect=0.0):
    rng = np.random.default_rng(seed)
    keep = np.zeros((m, n), bool)
    for j in range(n):
        keep[rng.permutation(m)[: m // 2], j] = True
    f = rng.normal(size=(m, n)) + delta * keep + record_effect * rng.normal(size=(1, n))
    return f[..., None], keep


def test_half_sample_interval():
    f, keep = _population(1.0, seed=1)
    mm, rr = balanced_pairs(keep=keep, records=np.arange(keep.shape[1]), n_each=10**6, rng=np.random.default_rng(0))
    x, b = f[mm, rr], keep[mm, rr]

    def est(a, c):
        return mutual_information(x=a, membership=c)

    v = est(x, b)
    iv, used = half_sample_interval(x=x, membership=b, records=rr, estimate=est, value=v, n_resamples=15, seed=2)
    assert used == 15 and iv[0] <= v <= iv[1] and iv[1] - iv[0] < 0.1
    assert half_sample_interval(x=x, membership=b, records=rr, estimate=est, value=v, n_resamples=15, seed=2)[0] == iv
    assert half_sample_interval(x=x, membership=b, records=rr, estimate=est, value=v, n_resamples=0) == (None, 0)
    with pytest.raises(ValueError, match="one id per pair"):
        half_sample_interval(x=x, membership=b, records=rr[:-1], estimate=est, value=v)


def test_information_leakage_on_a_population_with_known_answer():
    delta = 1.0
    f, keep = _population(delta, seed=3)
    rep = information_leakage(features=f, keep=keep, n_resamples=20, seed=0)
    js, tv = gauss_js(delta), gauss_tv(delta)
    assert rep["mi_nats"] == pytest.approx(js, abs=0.02) and rep["js_nats"] == pytest.approx(js, abs=0.02)
    assert rep["mi_interval"][0] <= js <= rep["mi_interval"][1]
    assert rep["mi_bits"] == pytest.approx(rep["mi_nats"] / LN2)
    assert rep["advantage_bound"] == rep["advantage_bounds"]["fano_mi"]
    assert all(v >= tv - 0.03 for v in rep["advantage_bounds"].values())
    assert all(rep["advantage_bounds"][f"fano_{s}"] <= rep["advantage_bounds"][f"pinsker_{s}"] for s in ("mi", "js"))
    assert rep["accuracy_bounds"]["fano_mi"] == pytest.approx((1 + rep["advantage_bound"]) / 2)
    assert rep["cv"]["youden_j"] == pytest.approx(tv, abs=0.05) and rep["cv"]["youden_j"] <= rep["advantage_bound"]
    assert rep["gain_optimal"] == pytest.approx(-math.log(4) + 2 * rep["js_nats"])
    assert rep["n_pairs"] == 16 * 600 and rep["n_resamples"] == 20
    small = information_leakage(features=f, keep=keep, max_samples=2000, n_resamples=0, seed=0)
    assert small["n_pairs"] == 2000 and small["mi_interval"] is None and small["advantage_bound_interval"] is None
    with pytest.raises(ValueError, match="js_method must be one of auto, histogram, kde"):
        information_leakage(features=f, keep=keep, js_method="knn")
    with pytest.raises(ValueError, match=r"features must be \[M, N, F\]"):
        information_leakage(features=f[..., 0], keep=keep)


# ----------------------------------------------------------------------------- the plugin
@pytest.mark.parametrize("params,match", [
    ({"signal": "entropy"}, "signal must be one of confidence, loss, correct, probs-sorted; got 'entropy'"),
    ({"calibrate": "model"}, "calibrate must be one of none, record"),
    ({"classifier": "svm"}, "classifier must be one of boosting, logistic"),
    ({"js_method": "knn"}, "js_method must be one of auto, histogram, kde"),
    ({"n_neighbors": 0}, "n_neighbors must be an integer >= 1, got 0"),
    ({"n_folds": 1}, "n_folds must be an integer >= 2"),
    ({"bins": 1}, "bins must be an integer >= 2"),
    ({"max_samples": 10}, "max_samples must be an integer >= 20"),
    ({"n_resamples": -1}, "n_resamples must be an integer >= 0"),
    ({"n_neighbors": True}, "n_neighbors must be an integer"),
    ({"top_k": 0}, "top_k must be an integer >= 1 or unset"),
    ({"confidence": 1.0}, r"confidence must be a number in \(0, 1\)"),
    ({"signal": "correct", "calibrate": "record"}, "calibrate=record needs a continuous signal"),
    ({"signal": "probs-sorted", "js_method": "histogram"}, "js_method=histogram needs a one-feature signal"),
])
def test_validation(params, match):
    with pytest.raises(ValueError, match=match):
        InfoBounds(**params).validate()


@pytest.mark.parametrize("params,min_value,min_j", [
    ({}, 0.05, 0.3),
    ({"signal": "loss", "classifier": "logistic", "n_resamples": 5}, 0.05, 0.3),
    ({"signal": "correct", "n_resamples": 5}, 0.05, 0.3),
    # label-free features: the planted models memorised random labels, which the top probabilities
    # alone hardly show (members and non-members are both predicted confidently)
    ({"signal": "probs-sorted", "top_k": None, "n_resamples": 5}, 0.005, 0.05),
    ({"calibrate": "record", "js_method": "kde", "n_resamples": 5}, 0.05, 0.3),
])
def test_conforms(params, min_value, min_j):
    out = check_estimator(InfoBounds, params=params)
    assert out["value"] > min_value
    assert out["interval"][0] <= out["value"] <= out["interval"][1]
    assert min_j < out["cv"]["youden_j"] <= out["advantage_bound"] + 0.05
    assert out["advantage_bound"] == out["advantage_bounds"]["fano_mi"]


def test_cli_run(tmp_path):
    from click.testing import CliRunner

    from mia_core.cli import main

    args = ["eval", "--attack", "lira", "--estimator", "info:n_resamples=5", "--dataset", "digits:n_records=300",
            "--model", "mlp:width=32", "--n-models", "6", "--epochs", "3", "--targets", "first:2", "-q",
            "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "info:n_resamples=5" in res.output
    run = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir() and not d.name.startswith("."))
    est = json.loads((run / "metrics.json").read_text())["estimators"]["info:n_resamples=5"]
    assert est["name"] == "info" and 0 <= est["advantage_bound"] <= 1 and est["report"]["signal"] == "confidence"
    bad = CliRunner().invoke(main, ["eval", "--estimator", "info:signal=entropy", "-q",
                                    "--out", str(tmp_path / "r2"), "--cache-dir", str(tmp_path / "c2")])
    assert bad.exit_code == 2 and "entropy" in bad.stderr
