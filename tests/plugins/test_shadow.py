"""The shadow-model attack (Shokri et al. 2017): its features against a record-by-record
reference, the attack classifiers, per-class fallback, validation, the planted population and
the command line."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core import metrics
from mia_core.base import Attack
from mia_core.testing import check_attack
from mia_plugins.attacks.shadow import (
    CLASSIFIERS,
    FEATURES,
    MIN_CLASS_ROWS,
    ShadowAttack,
    attack_features,
    fit_attack_models,
    member_score,
    parse_features,
    score_with_models,
)


# ----------------------------------------------------------------------------- features
def _reference_features(p, y, names):
    """One record at a time, in plain Python: what each feature means."""
    row = []
    c = len(p)
    for name in names:
        if name == "sorted-probs":
            row += sorted(p, reverse=True)
        elif name == "logits":
            logs = [math.log(v) for v in p]
            row += [v - sum(logs) / c for v in logs]
        elif name == "entropy":
            row.append(-sum(v * math.log(v) for v in p if v > 0))
        elif name == "confidence":
            row.append(math.log(p[y]) - math.log(sum(v for i, v in enumerate(p) if i != y)))
        elif name == "true-prob":
            row.append(p[y])
        elif name == "loss":
            row.append(-math.log(p[y]))
        elif name == "label":
            row += [1.0 if i == y else 0.0 for i in range(c)]
    return row


@st.composite
def _probs_case(draw):
    r = draw(st.integers(1, 2))
    n = draw(st.integers(1, 5))
    c = draw(st.integers(2, 4))
    # logits from a small grid, so equal probabilities (ties) are common
    z = np.array(draw(st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.0, 2.0, 5.0]), min_size=r * n * c,
                               max_size=r * n * c))).reshape(r, n, c)
    y = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    names = draw(st.lists(st.sampled_from(FEATURES), min_size=1, max_size=len(FEATURES), unique=True))
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True), y, names


@settings(max_examples=80, deadline=None, derandomize=True)
@given(case=_probs_case())
def test_attack_features_match_record_by_record_reference(case):
    p, y, names = case
    got = attack_features(probs=p, labels=y, features=names)
    r, n, _ = p.shape
    want = np.array([[_reference_features(list(p[m, j]), int(y[j]), names) for j in range(n)] for m in range(r)])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # one model ([N, C]) gives the same rows as the first of R models
    np.testing.assert_allclose(attack_features(probs=p[0], labels=y, features=names), got[0], rtol=0, atol=0)


def test_precomputed_signals_are_used_and_sorted_probs_descend():
    p = np.array([[0.2, 0.5, 0.3]])
    out = attack_features(probs=p, labels=np.array([0]), features=["loss", "confidence", "sorted-probs"],
                          loss=np.array([7.0]), confidence=np.array([-9.0]))
    np.testing.assert_allclose(out, [[7.0, -9.0, 0.5, 0.3, 0.2]])


def test_features_stay_finite_when_probabilities_underflow():
    p = np.array([[1.0, 0.0, 0.0]])  # a softmax that rounded the other classes to 0
    out = attack_features(probs=p, labels=np.array([0]), features=list(FEATURES))
    assert np.isfinite(out).all()
    out = attack_features(probs=p, labels=np.array([1]), features=["loss", "confidence", "logits"])
    assert np.isfinite(out).all() and out[0, 0] > 700  # -log(tiny)


def test_attack_features_input_errors():
    with pytest.raises(ValueError, match="probs must be"):
        attack_features(probs=np.ones((2, 3)) / 3, labels=np.array([0]), features=["loss"])
    with pytest.raises(ValueError, match="labels must lie"):
        attack_features(probs=np.ones((1, 3)) / 3, labels=np.array([3]), features=["loss"])
    with pytest.raises(ValueError, match="unknown feature"):
        attack_features(probs=np.ones((1, 3)) / 3, labels=np.array([0]), features=["margin"])


@pytest.mark.parametrize("text,expected", [
    ("sorted-probs,loss", ("sorted-probs", "loss")),
    (" loss , label ", ("loss", "label")),
    ("entropy+confidence+true-prob", ("entropy", "confidence", "true-prob")),
    ("logits", ("logits",)),
])
def test_parse_features(text, expected):
    assert parse_features(text) == expected


@pytest.mark.parametrize("text,match", [
    ("sorted-probs,margin", r"unknown feature 'margin' in 'sorted-probs,margin'; allowed: sorted-probs, logits"),
    ("", r"unknown feature '' in ''"),
    ("loss,,label", r"unknown feature ''"),
    ("loss,loss", r"names a feature twice"),
    ("label", r"has no model signal"),
    (3, r"features must be a comma-separated string"),
])
def test_parse_features_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_features(text)


# ----------------------------------------------------------------------------- classifiers
def _separable(n=300, seed=0):
    rng = np.random.default_rng(seed)
    member = rng.random(n) < 0.5
    x = rng.normal(size=(n, 3)) + 2.0 * member[:, None]
    return x, member


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_every_classifier_learns_and_scores_are_finite_and_seeded(classifier):
    x, member = _separable()
    labels = np.zeros(len(x), dtype=np.int64)
    models = fit_attack_models(x=x, member=member, labels=labels, classifier=classifier, per_class=False,
                               max_train=1000, seed=3)
    assert set(models) == {None}
    xt, mt = _separable(seed=1)
    s = score_with_models(models, x=xt, labels=np.zeros(len(xt), dtype=np.int64))
    assert s.shape == (len(xt),) and np.isfinite(s).all()
    assert metrics.auc(s, mt) > 0.9
    again = fit_attack_models(x=x, member=member, labels=labels, classifier=classifier, per_class=False,
                              max_train=1000, seed=3)
    np.testing.assert_array_equal(score_with_models(again, x=xt, labels=np.zeros(len(xt), dtype=np.int64)), s)


def test_member_score_is_the_log_odds_of_the_member_probability():
    x, member = _separable()
    model = fit_attack_models(x=x, member=member, labels=np.zeros(len(x), dtype=np.int64), classifier="logreg",
                              per_class=False, max_train=1000, seed=0)[None]
    p = model.predict_proba(x)[:, 1]
    np.testing.assert_allclose(member_score(model, x), np.log(p) - np.log1p(-p), rtol=1e-6, atol=1e-8)
    rf = fit_attack_models(x=x, member=member, labels=np.zeros(len(x), dtype=np.int64), classifier="rf",
                           per_class=False, max_train=1000, seed=0)[None]
    np.testing.assert_array_equal(member_score(rf, x), rf.predict_proba(x)[:, 1])
    assert member_score(model, np.zeros((0, 3))).shape == (0,)


def test_max_train_caps_the_rows_with_a_seeded_subsample():
    x, member = _separable(n=500)
    labels = np.zeros(len(x), dtype=np.int64)
    fits = [fit_attack_models(x=x, member=member, labels=labels, classifier="logreg", per_class=False,
                              max_train=40, seed=s)[None] for s in (0, 0, 1)]
    assert all(f[0].n_samples_seen_ == 40 for f in fits)
    np.testing.assert_array_equal(fits[0][-1].coef_, fits[1][-1].coef_)
    assert not np.array_equal(fits[0][-1].coef_, fits[2][-1].coef_)


def test_per_class_models_fall_back_to_the_global_model():
    rng = np.random.default_rng(0)
    n = 400
    labels = np.repeat([0, 1, 2], [200, 180, 20])
    member = rng.random(n) < 0.5
    member[labels == 1] = np.arange(180) < MIN_CLASS_ROWS - 1  # class 1: too few IN rows
    x = rng.normal(size=(n, 2)) + member[:, None]
    models = fit_attack_models(x=x, member=member, labels=labels, classifier="logreg", per_class=True,
                               max_train=1000, seed=0)
    # class 2 has 20 rows: about 10 IN, 10 OUT; it gets its own model only with >= MIN_CLASS_ROWS of each
    n_in2 = int(member[labels == 2].sum())
    has2 = min(n_in2, 20 - n_in2) >= MIN_CLASS_ROWS
    assert set(models) == ({0, 2, None} if has2 else {0, None})
    s = score_with_models(models, x=x, labels=labels)
    np.testing.assert_array_equal(s[labels == 0], member_score(models[0], x[labels == 0]))
    np.testing.assert_array_equal(s[labels == 1], member_score(models[None], x[labels == 1]))
    # the global model is trained on every row, including class 1's
    assert models[None][0].n_samples_seen_ == n
    # every class with enough rows: no global model at all
    ok = fit_attack_models(x=x[labels == 0], member=member[labels == 0], labels=labels[labels == 0],
                           classifier="logreg", per_class=True, max_train=1000, seed=0)
    assert set(ok) == {0}


def test_fit_attack_models_input_errors():
    with pytest.raises(ValueError, match="both IN and OUT"):
        fit_attack_models(x=np.zeros((30, 2)), member=np.ones(30, dtype=bool), labels=np.zeros(30, dtype=np.int64),
                          classifier="logreg", per_class=False, max_train=100, seed=0)
    with pytest.raises(ValueError, match="x must be"):
        fit_attack_models(x=np.zeros(30), member=np.ones(30, dtype=bool), labels=np.zeros(30, dtype=np.int64),
                          classifier="logreg", per_class=False, max_train=100, seed=0)
    x, member = _separable(50)
    with pytest.raises(ValueError, match="classifier must be one of logreg, svc, mlp, rf, hgb; got 'knn'"):
        fit_attack_models(x=x, member=member, labels=np.zeros(50, dtype=np.int64), classifier="knn",
                          per_class=False, max_train=100, seed=0)


# ----------------------------------------------------------------------------- the plugin
@pytest.mark.parametrize("params,match", [
    (dict(features="loss,margin"), r"features: unknown feature 'margin'"),
    (dict(features="label"), r"has no model signal"),
    (dict(classifier="knn"), r"classifier must be one of logreg, svc, mlp, rf, hgb; got 'knn'"),
    (dict(per_class="yes"), r"per_class must be true or false, got 'yes'"),
    (dict(n_references=3), r"n_references must be a positive even integer .* got 3"),
    (dict(n_references=0), r"n_references must be a positive even integer .* got 0"),
    (dict(n_references=True), r"n_references must be a positive even integer .* got True"),
    (dict(max_train=5), r"max_train must be an integer >= 20, got 5"),
    (dict(max_train=1e4), r"max_train must be an integer >= 20, got 10000.0"),
])
def test_validate_rejects(params, match):
    with pytest.raises(ValueError, match=match):
        ShadowAttack(**params).validate()


def test_contract():
    a = ShadowAttack()
    assert isinstance(a, Attack) and a.api_version == "1.0" and a.access == ("probs",)
    assert a.get_params() == {"features": "sorted-probs,loss", "classifier": "logreg", "per_class": False,
                              "n_references": None, "max_train": 20000}
    assert "Shokri" in a.reference and "S&P 2017" in a.reference
    assert a.reference_budget() == (None, True)
    assert ShadowAttack(n_references=4).reference_budget() == (4, True)


class _Ctx:
    n_models = 2
    seed = 0


def test_fit_needs_references():
    with pytest.raises(ValueError, match="at least 2 reference models .* got n_models=2"):
        ShadowAttack().fit(_Ctx())
    ctx = _Ctx()
    ctx.n_models = 6
    with pytest.raises(ValueError, match="n_references=6 exceeds the 4 references"):
        ShadowAttack(n_references=6).fit(ctx)


@pytest.mark.parametrize("params", [{}, {"per_class": True, "features": "logits,label"}])
def test_planted_population_members_score_higher(params):
    report = check_attack(ShadowAttack, params=params)  # contract, AUC, subset-independence, determinism, access
    assert report["auc"] > 0.8


def test_scores_are_cached_per_target_and_independent_of_the_call():
    from mia_core.engine import AttackContext
    from mia_core.testing import planted_population

    pop = planted_population(0)
    a = ShadowAttack(n_references=2).fit(AttackContext(pop, ShadowAttack.access))
    full = a.score(3, np.arange(pop.n_records))
    assert set(a.scores_) == {3}
    np.testing.assert_array_equal(a.score(3, np.array([5, 1])), full[[5, 1]])
    assert a.score(3, np.array([], dtype=np.int64)).shape == (0,)
    assert metrics.auc(full, pop.keep[3]) > 0.7


def test_cli_end_to_end(tmp_path):
    from plugin_fixtures import eval_attacks

    eval_attacks(tmp_path, "shadow", 'shadow:features="logits,entropy",per_class=true')
