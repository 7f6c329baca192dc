"""The quantile-regression attack (Bertran et al. 2023): its statistics against logit-based
references, the regressed quantile against the empirical one, the level-alpha property,
validation, populations with known answers and the command line."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core import metrics
from mia_core.base import Attack
from mia_core.testing import check_attack
from mia_plugins.attacks.quantile import QuantileAttack, membership_statistic, qmia_scores, regression_inputs


# ----------------------------------------------------------------------------- statistics
@st.composite
def _logits_case(draw):
    r = draw(st.integers(1, 2))
    n = draw(st.integers(1, 5))
    c = draw(st.integers(2, 4))
    # a small grid of logits, so ties between the true and the best other label are common
    z = np.array(draw(st.lists(st.sampled_from([-4.0, -1.0, 0.0, 0.0, 1.5, 6.0]), min_size=r * n * c,
                               max_size=r * n * c))).reshape(r, n, c)
    y = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    return z, y


@settings(max_examples=80, deadline=None, derandomize=True)
@given(case=_logits_case())
def test_statistics_match_their_logit_definitions(case):
    z, y = case
    p = scipy.special.softmax(z, axis=-1)
    r, n, c = z.shape
    hinge = np.array([[z[m, j, y[j]] - max(z[m, j, k] for k in range(c) if k != y[j]) for j in range(n)]
                      for m in range(r)])
    conf = np.array([[z[m, j, y[j]] - scipy.special.logsumexp([z[m, j, k] for k in range(c) if k != y[j]])
                      for j in range(n)] for m in range(r)])
    np.testing.assert_allclose(membership_statistic(probs=p, labels=y, statistic="hinge"), hinge, atol=1e-9)
    np.testing.assert_allclose(membership_statistic(probs=p, labels=y, statistic="confidence"), conf, atol=1e-9)
    np.testing.assert_allclose(membership_statistic(probs=p[0], labels=y), hinge[0], atol=1e-9)
    if c == 2:  # for two classes the hinge is the logit-scaled confidence
        np.testing.assert_allclose(hinge, conf, atol=1e-9)


def test_statistic_edge_cases():
    # a precomputed confidence signal is passed through
    got = membership_statistic(probs=np.full((1, 2), 0.5), labels=np.array([0]), statistic="confidence",
                               confidence=np.array([4.0]))
    np.testing.assert_array_equal(got, [4.0])
    # probabilities that underflowed to 0 give a large, finite statistic
    got = membership_statistic(probs=np.array([[1.0, 0.0, 0.0]]), labels=np.array([0]))
    assert np.isfinite(got).all() and got[0] > 700
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        membership_statistic(probs=np.ones((3, 1)), labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="labels must lie"):
        membership_statistic(probs=np.full((1, 2), 0.5), labels=np.array([2]))
    with pytest.raises(ValueError, match="probs must be"):
        membership_statistic(probs=np.full((2, 2), 0.5), labels=np.array([0]))
    with pytest.raises(ValueError, match="statistic must be one of hinge, confidence; got 'margin'"):
        membership_statistic(probs=np.full((1, 2), 0.5), labels=np.array([0]), statistic="margin")


def test_regression_inputs_append_the_label_one_hot():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    y = np.array([2, 0, 2])
    np.testing.assert_array_equal(regression_inputs(features=x, labels=y, n_classes=3, use_label=False), x)
    np.testing.assert_array_equal(regression_inputs(features=x, labels=y, n_classes=3, use_label=True),
                                  [[0, 1, 0, 0, 1], [2, 3, 1, 0, 0], [4, 5, 0, 0, 1]])


# ----------------------------------------------------------------------------- the regression
@settings(max_examples=40, deadline=None, derandomize=True)
@given(k=st.integers(2, 60), alpha=st.sampled_from([0.01, 0.05, 0.2, 0.5, 0.9]), seed=st.integers(0, 5),
       ties=st.booleans())
def test_constant_features_regress_the_empirical_quantile(k, alpha, seed, ties):
    """With nothing to split on, the pinball-loss minimiser is the sample (1 - alpha) quantile:
    any value between the order statistics around it (Koenker's quantile regression)."""
    rng = np.random.default_rng(seed)
    s = rng.integers(-2, 3, size=k).astype(float) if ties else rng.normal(size=k)
    out = qmia_scores(train_x=np.zeros((k, 1)), train_s=s, test_x=np.zeros((3, 1)), test_s=np.zeros(3), alpha=alpha,
                      max_iter=5)
    q = -out  # score = s - q with s = 0
    assert np.ptp(q) == 0
    lo, hi = np.quantile(s, 1 - alpha, method="lower"), np.quantile(s, 1 - alpha, method="higher")
    assert lo - 1e-9 <= q[0] <= hi + 1e-9


@settings(max_examples=20, deadline=None, derandomize=True)
@given(k=st.integers(2, 40), alpha=st.sampled_from([0.01, 0.1, 0.5]), seed=st.integers(0, 5))
def test_gaussian_variant_with_constant_features_is_a_z_score(k, alpha, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=k) * 2 + 1
    test_s = np.array([s.mean(), s.mean() + 1.0, s.mean() - 3.0])
    out = qmia_scores(train_x=np.zeros((k, 2)), train_s=s, test_x=np.zeros((3, 2)), test_s=test_s, alpha=alpha,
                      method="gaussian", max_iter=5)
    # mu is the mean, so the observed mean sits at -Phi^-1(1 - alpha); sigma is shared, so the
    # scores are affine in the observation, increasing
    assert out[0] == pytest.approx(-scipy.special.ndtri(1 - alpha), abs=1e-9)
    sigma = 1.0 / (out[1] - out[0])
    assert sigma > 0 and out[2] == pytest.approx(out[0] - 3.0 / sigma, abs=1e-9)


def test_quantile_follows_the_features_and_the_test_has_level_alpha():
    """Non-member statistics whose location and spread depend on a feature: the regressed
    quantile adapts per group, so threshold 0 flags about alpha of fresh non-members in each."""
    rng = np.random.default_rng(0)

    def draw(n):
        g = rng.integers(0, 2, size=n)
        return g[:, None].astype(float), np.where(g == 1, 5.0 + 2.0 * rng.normal(size=n), rng.normal(size=n)), g

    x, s, _ = draw(4000)
    xt, st_, gt = draw(4000)
    for method, alpha in (("quantile", 0.1), ("gaussian", 0.1), ("quantile", 0.02)):
        out = qmia_scores(train_x=x, train_s=s, test_x=xt, test_s=st_, alpha=alpha, method=method, seed=1)
        for g in (0, 1):
            assert abs((out[gt == g] > 0).mean() - alpha) < 0.03, (method, alpha, g)


def test_qmia_scores_input_errors():
    x, s = np.zeros((5, 1)), np.zeros(5)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\), got 1.0"):
        qmia_scores(train_x=x, train_s=s, test_x=x, test_s=s, alpha=1.0)
    with pytest.raises(ValueError, match="method must be one of quantile, gaussian; got 'median'"):
        qmia_scores(train_x=x, train_s=s, test_x=x, test_s=s, alpha=0.1, method="median")
    with pytest.raises(ValueError, match="at least 2 non-member rows"):
        qmia_scores(train_x=x[:1], train_s=s[:1], test_x=x, test_s=s, alpha=0.1)
    with pytest.raises(ValueError, match=r"train_x \[K, D\]"):
        qmia_scores(train_x=x, train_s=s[:4], test_x=x, test_s=s, alpha=0.1)
    with pytest.raises(ValueError, match=r"train_x \[K, D\]"):
        qmia_scores(train_x=x, train_s=s, test_x=np.zeros((5, 2)), test_s=s, alpha=0.1)


# ----------------------------------------------------------------------------- the plugin
@pytest.mark.parametrize("params,match", [
    (dict(alpha=0.0), r"alpha must be a number in \(0, 1\) \(the target false positive rate\), got 0.0"),
    (dict(alpha=1.5), r"alpha must be a number in \(0, 1\)"),
    (dict(alpha="0.1"), r"alpha must be a number in \(0, 1\)"),
    (dict(alpha=float("nan")), r"alpha must be a number in \(0, 1\)"),
    (dict(statistic="loss"), r"statistic must be one of hinge, confidence; got 'loss'"),
    (dict(method="median"), r"method must be one of quantile, gaussian; got 'median'"),
    (dict(use_label=1), r"use_label must be true or false, got 1"),
    (dict(reference_model=-1), r"reference_model must be an integer >= 0 .* got -1"),
    (dict(reference_model=True), r"reference_model must be an integer >= 0 .* got True"),
    (dict(max_iter=0), r"max_iter must be an integer >= 1, got 0"),
    (dict(max_leaf_nodes=1), r"max_leaf_nodes must be an integer >= 2, got 1"),
    (dict(min_samples_leaf=0), r"min_samples_leaf must be an integer >= 1, got 0"),
    (dict(learning_rate=0), r"learning_rate must be a number in \(0, 1\], got 0"),
])
def test_validate_rejects(params, match):
    with pytest.raises(ValueError, match=match):
        QuantileAttack(**params).validate()


def test_contract():
    a = QuantileAttack()
    assert isinstance(a, Attack) and a.api_version == "1.0" and a.access == ("probs",)
    assert a.get_params() == {"alpha": 0.01, "statistic": "hinge", "method": "quantile", "use_label": True,
                              "reference_model": None, "max_iter": 100, "learning_rate": 0.1,
                              "max_leaf_nodes": 8, "min_samples_leaf": 20}
    assert "Bertran" in a.reference and "NeurIPS 2023" in a.reference
    assert a.reference_budget() == (None, True)


class _FakeCtx:
    """Just enough of AttackContext: two classes, logits [h, 0] so the hinge of label 0 is h."""

    def __init__(self, keep, hinge, features, seed=0):
        self.keep_, self.features, self.seed = keep, features, seed
        self.n_models, self.n_records = keep.shape
        self.n_classes = 2
        self.labels = np.zeros(self.n_records, dtype=np.int64)
        z = np.stack([hinge, np.zeros_like(hinge)], axis=-1)
        self.probs = scipy.special.softmax(z, axis=-1)

    def for_target(self, t, n_references=None, online=True):
        refs = np.array([m for m in range(self.n_models) if m not in (t, t ^ 1)])
        return SimpleNamespace(target=t, references=refs, ref_keep=self.keep_[refs],
                               ref_signal=lambda name: self.probs[refs], target_signal=lambda name: self.probs[t])


def _feature_population(m=8, n=3000, shift=1.5, seed=0):
    """Record difficulty is a function of the features (3 x_0); members gain ``shift``."""
    from mia_core.engine.trainer import make_keep_matrix

    rng = np.random.default_rng(seed)
    keep = make_keep_matrix(m, n, rng)
    x = rng.normal(size=(n, 2))
    hinge = 3.0 * x[:, 0] + shift * keep + rng.normal(size=(m, n))
    return keep, hinge, x


@pytest.mark.parametrize("method", ["quantile", "gaussian"])
def test_regression_removes_feature_driven_difficulty(method):
    keep, hinge, x = _feature_population()
    attack = QuantileAttack(alpha=0.1, method=method, use_label=False).fit(_FakeCtx(keep, hinge, x))
    targets = range(4)
    scores = np.concatenate([attack.score(t, np.arange(keep.shape[1])) for t in targets])
    member = keep[list(targets)].ravel()
    auc = metrics.auc(scores, member)
    raw = metrics.auc(hinge[list(targets)].ravel(), member)
    # the Bayes AUC with the difficulty known: Phi(1.5 / sqrt 2) = 0.856; the raw hinge is fooled by it
    assert auc > 0.8 and auc > raw + 0.15
    # and threshold 0 is a test of level about alpha on the target's non-members
    assert abs((scores[~member] > 0).mean() - 0.1) < 0.03
    for t in targets:  # the reference model is never the target nor its partner
        assert attack.reference_models_[t] not in (t, t ^ 1)


def test_reference_model_is_a_position_in_the_target_s_reference_list():
    keep, hinge, x = _feature_population(n=400)
    ctx = _FakeCtx(keep, hinge, x)
    a = QuantileAttack(reference_model=0).fit(ctx)
    a.score(0, np.arange(3))
    a.score(3, np.arange(3))
    assert a.reference_models_ == {0: 2, 3: 0}
    with pytest.raises(ValueError, match=r"reference_model=6 is out of range: .* 6 references \(positions 0..5\)"):
        QuantileAttack(reference_model=6).fit(ctx)
    small = _FakeCtx(keep[:2], hinge[:2], x)
    with pytest.raises(ValueError, match="n_models >= 4"):
        QuantileAttack().fit(small)


@pytest.mark.parametrize("params", [{}, {"method": "gaussian", "statistic": "confidence"}])
def test_planted_population_members_score_higher(params):
    report = check_attack(QuantileAttack, params=params)  # contract, AUC, subset-independence, determinism, access
    assert report["auc"] > 0.75


def test_cli_end_to_end(tmp_path):
    from plugin_fixtures import eval_attacks

    eval_attacks(tmp_path, "quantile", "quantile:method=gaussian,alpha=0.05")
