"""Tests for mia_core.metrics: references from scikit-learn / scipy, brute force and hand computations."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import sklearn.metrics as skm
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from mia_core import metrics as M

SETTINGS = settings(deadline=None, max_examples=60, derandomize=True)


def make_data(seed, n, *, ties=False, shift=0.7, p_member=0.5):
    """Seeded (scores, membership) with both classes present; `ties` rounds scores to a coarse grid."""
    rng = np.random.default_rng(seed)
    m = rng.random(n) < p_member
    m[0], m[1] = True, False
    s = rng.normal(size=n) + shift * m
    if ties:
        s = np.round(s * 2) / 2
    return s, m


# ------------------------------------------------------------------------------------------------
# brute-force references
# ------------------------------------------------------------------------------------------------


def all_thresholds(s):
    return np.concatenate([[np.inf], np.unique(s)[::-1]])


def rates_at(s, m, t):
    pred = s >= t
    tp = int(np.sum(pred & m))
    fp = int(np.sum(pred & ~m))
    return tp, fp


def cp_upper_ref(k, n, confidence):
    return binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact").high


def brute_tpr_at_fpr(s, m, target):
    P, N = int(m.sum()), int((~m).sum())
    best = None  # (tp, threshold)
    for t in all_thresholds(s):
        tp, fp = rates_at(s, m, t)
        if fp / N <= target:
            if best is None or tp > best[0] or (tp == best[0] and t > best[1]):
                best = (tp, t)
    tp, t = best
    return tp / P, t, rates_at(s, m, t)[1] / N


def brute_epsilon(s, m, confidence, delta):
    P, N = int(m.sum()), int((~m).sum())
    best = 0.0
    for t in all_thresholds(s):
        tp, fp = rates_at(s, m, t)
        fpr_hi = cp_upper_ref(fp, N, confidence)
        fnr_hi = cp_upper_ref(P - tp, P, confidence)
        for num, den in ((1 - delta - fpr_hi, fnr_hi), (1 - delta - fnr_hi, fpr_hi)):
            if num > 0 and den > 0:
                best = max(best, math.log(num / den))
    return best


# ------------------------------------------------------------------------------------------------
# ROC / AUC against scikit-learn
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [2, 3, 17, 500])
@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_matches_sklearn(seed, n, ties):
    s, m = make_data(seed, n, ties=ties)
    fpr, tpr, thr = M.roc_curve(s, m)
    fpr_ref, tpr_ref, thr_ref = skm.roc_curve(m, s, drop_intermediate=False)
    assert thr[0] == np.inf and fpr[0] == 0 and tpr[0] == 0
    assert fpr[-1] == 1 and tpr[-1] == 1
    np.testing.assert_allclose(fpr, fpr_ref, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, tpr_ref, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], thr_ref[1:])
    assert len(thr) == len(np.unique(s)) + 1


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [2, 5, 33, 1000])
@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_sklearn(seed, n, ties):
    s, m = make_data(seed, n, ties=ties)
    assert M.auc(s, m) == pytest.approx(skm.roc_auc_score(m, s), abs=1e-12)


def test_accepts_int_membership_and_int_scores():
    s = [3, 1, 2, 2]
    m = [1, 0, 1, 0]
    assert M.auc(s, m) == M.auc(np.array(s, float), np.array(m, bool))


# ------------------------------------------------------------------------------------------------
# hand-computed cases
# ------------------------------------------------------------------------------------------------


def test_four_record_case_by_hand():
    # scores   0.8  0.6  0.6  0.2
    # member     1    1    0    0          P = 2 members, N = 2 non-members
    # thresholds (predict member iff score >= t), the 0.6 tie enters together:
    #   t=+inf: TP=0 FP=0 -> (FPR, TPR) = (0,   0)
    #   t=0.8 : TP=1 FP=0 -> (0,   0.5)
    #   t=0.6 : TP=2 FP=1 -> (0.5, 1)
    #   t=0.2 : TP=2 FP=2 -> (1,   1)
    # AUC (trapezoid) = 0 + 0.5*(0.5+1)/2 + 0.5*1 = 0.875
    #   = Mann-Whitney: pairs (0.8>0.6, 0.8>0.2, 0.6=0.6 -> 1/2, 0.6>0.2) = 3.5/4
    # advantage = max(0, 0.5, 0.5, 0) = 0.5, balanced accuracy = 0.75
    # TPR at FPR 0.25: only t=0.8 fits -> TPR 0.5 (N=2 < 4 non-members: not resolvable)
    # TPR at FPR 0.5: t=0.6 fits -> TPR 1.0, achieved FPR 0.5 (2 >= 1/0.5: resolvable)
    s = np.array([0.8, 0.6, 0.6, 0.2])
    m = np.array([True, True, False, False])
    fpr, tpr, thr = M.roc_curve(s, m)
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.6, 0.2])
    assert M.auc(s, m) == 0.875
    assert M.advantage(s, m) == 0.5
    assert M.balanced_accuracy(s, m) == 0.75

    with pytest.warns(M.MetricsWarning, match="only 2 non-members: TPR at 25% FPR needs at least 4"):
        r = M.tpr_at_fpr(s, m, 0.25)
    assert (r.tpr, r.threshold, r.achieved_fpr, r.resolvable) == (0.5, 0.8, 0.0, False)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = M.tpr_at_fpr(s, m, 0.5)
    assert (r.tpr, r.threshold, r.achieved_fpr, r.resolvable) == (1.0, 0.6, 0.5, True)
    # 0.49 cannot take the 0.6 tie group (it would bring FPR 0.5) -> back to t = 0.8
    with pytest.warns(M.MetricsWarning):
        assert M.tpr_at_fpr(s, m, 0.49).tpr == 0.5


def test_perfect_separation():
    s = np.arange(20.0)
    m = s >= 10
    assert M.auc(s, m) == 1.0
    assert M.advantage(s, m) == 1.0
    assert M.balanced_accuracy(s, m) == 1.0
    for f in (0.001, 0.05, 0.5, 0.99):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", M.MetricsWarning)
            r = M.tpr_at_fpr(s, m, f)
        assert r.tpr == 1.0 and r.achieved_fpr == 0.0 and r.threshold == 10.0
        assert r.ci_high == 1.0


def test_reversed_scores():
    s = np.arange(20.0)
    m = s < 10
    assert M.auc(s, m) == 0.0
    assert M.advantage(s, m) == 0.0
    assert M.balanced_accuracy(s, m) == 0.5
    assert M.epsilon_lower_bound(s, m) == 0.0
    r = M.tpr_at_fpr(s, m, 0.5)
    assert r.tpr == 0.0 and r.threshold == np.inf and r.ci_low == 0.0
    assert r.to_dict()["threshold"] is None


def test_all_equal_scores():
    s = np.full(50, 3.0)
    m = np.arange(50) % 3 == 0
    fpr, tpr, thr = M.roc_curve(s, m)
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(tpr, [0, 1])
    assert M.auc(s, m) == 0.5
    assert M.advantage(s, m) == 0.0
    assert M.balanced_accuracy(s, m) == 0.5
    assert M.epsilon_lower_bound(s, m) == 0.0
    assert M.tpr_at_fpr(s, m, 0.5).tpr == 0.0


def test_smallest_input():
    s, m = [0.3, 0.1], [True, False]
    assert M.auc(s, m) == 1.0
    assert M.advantage(s, m) == 1.0
    assert M.auc([0.1, 0.1], [True, False]) == 0.5


# ------------------------------------------------------------------------------------------------
# advantage / balanced accuracy against brute force
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_advantage_and_balanced_accuracy_brute_force(seed, ties):
    s, m = make_data(seed, 60, ties=ties, p_member=0.3 + 0.08 * seed)
    best_adv, best_bacc = 0.0, 0.0
    for t in all_thresholds(s):
        pred = s >= t
        tpr = np.sum(pred & m) / m.sum()
        fpr = np.sum(pred & ~m) / (~m).sum()
        best_adv = max(best_adv, tpr - fpr)
        best_bacc = max(best_bacc, skm.balanced_accuracy_score(m, pred))
    assert M.advantage(s, m) == pytest.approx(best_adv, abs=1e-12)
    assert M.balanced_accuracy(s, m) == pytest.approx(best_bacc, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Clopper-Pearson
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,n",
    [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (5, 10), (1, 1000), (999, 1000), (0, 1000), (500, 1000)],
)
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.999])
def test_clopper_pearson_matches_scipy(k, n, confidence):
    lo, hi = M.clopper_pearson(k, n, confidence=confidence)
    ref = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    assert lo == pytest.approx(ref.low, rel=1e-9, abs=1e-14)
    assert hi == pytest.approx(ref.high, rel=1e-9, abs=1e-14)
    assert lo <= k / n <= hi
    if k == 0:
        assert lo == 0.0
    if k == n:
        assert hi == 1.0
    assert isinstance(lo, float) and isinstance(hi, float)


def test_clopper_pearson_edges_and_errors():
    assert M.clopper_pearson(0, 0) == (0.0, 1.0)
    assert M.clopper_pearson(np.int64(2), np.int64(4))[0] > 0
    with pytest.raises(ValueError, match=r"0 <= k <= n.*k=5, n=4"):
        M.clopper_pearson(5, 4)
    with pytest.raises(ValueError, match=r"k=-1"):
        M.clopper_pearson(-1, 4)
    with pytest.raises(ValueError, match="integers"):
        M.clopper_pearson(1.5, 4)
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="confidence"):
            M.clopper_pearson(1, 4, confidence=bad)


# ------------------------------------------------------------------------------------------------
# TPR at FPR
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("target", [0.01, 0.05, 0.1, 0.3, 0.5])
def test_tpr_at_fpr_brute_force(seed, ties, target):
    s, m = make_data(seed, 120, ties=ties, shift=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.MetricsWarning)
        r = M.tpr_at_fpr(s, m, target, confidence=0.9)
    tpr, thr, achieved = brute_tpr_at_fpr(s, m, target)
    P, N = int(m.sum()), int((~m).sum())
    assert r.tpr == pytest.approx(tpr, abs=1e-15)
    assert r.threshold == thr
    assert r.achieved_fpr == pytest.approx(achieved, abs=1e-15)
    assert r.achieved_fpr <= target
    assert (r.n_members, r.n_nonmembers) == (P, N)
    ref = binomtest(round(tpr * P), P).proportion_ci(confidence_level=0.9, method="exact")
    assert (r.ci_low, r.ci_high) == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12))
    assert r.resolvable == (N >= 1 / target)


def test_tpr_at_fpr_resolvable_and_warning():
    rng = np.random.default_rng(0)
    m = np.r_[np.ones(100, bool), np.zeros(899, bool)]
    s = rng.normal(size=m.size) + m
    with pytest.warns(
        M.MetricsWarning,
        match=r"only 899 non-members: TPR at 0\.1% FPR needs at least 1000 to be resolved",
    ):
        r = M.tpr_at_fpr(s, m, 0.001)
    assert r.resolvable is False
    assert r.achieved_fpr == 0.0

    m = np.r_[np.ones(100, bool), np.zeros(1000, bool)]
    s = rng.normal(size=m.size) + m
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = M.tpr_at_fpr(s, m, 0.001)
    assert r.resolvable is True


def test_tpr_at_fpr_to_dict_is_plain_json():
    s, m = make_data(3, 300, shift=2.0)
    d = M.tpr_at_fpr(s, m, 0.1).to_dict()
    assert set(d) == {
        "fpr_target", "tpr", "ci_low", "ci_high", "threshold", "achieved_fpr",
        "n_members", "n_nonmembers", "resolvable",
    }
    json.dumps(d, allow_nan=False)
    assert type(d["n_members"]) is int and type(d["resolvable"]) is bool and type(d["tpr"]) is float


# ------------------------------------------------------------------------------------------------
# epsilon lower bound
# ------------------------------------------------------------------------------------------------


def test_epsilon_useless_attack():
    s, m = make_data(0, 2000, shift=0.0)
    assert M.epsilon_lower_bound(s, m) < 0.2
    assert M.epsilon_lower_bound(np.zeros(100), np.arange(100) % 2 == 0) == 0.0


def test_epsilon_perfect_attack_many_samples():
    s = np.arange(2000.0)
    m = s >= 1000
    eps = M.epsilon_lower_bound(s, m)
    # FPR_hi = FNR_hi = 1 - 0.025**(1/1000) ~ 3.68e-3 -> eps = log((1 - 3.68e-3) / 3.68e-3) ~ 5.6
    assert eps > 5.0
    assert M.epsilon_lower_bound(s, m, confidence=0.5) > eps


def test_epsilon_hand_computation():
    # Perfect separation, P = N = 10, confidence 0.95 (alpha/2 = 0.025 per side).
    # At the separating threshold FP = FN = 0, and the Clopper-Pearson upper end for 0 of 10 is
    # 1 - 0.025**(1/10) =: 1 - a  (a ~ 0.6915). Every other threshold has more FP or more FN, so
    # eps = log((1 - delta - (1 - a)) / (1 - a)) = log((a - delta) / (1 - a)) ~ 0.807 for delta = 0.
    s = np.arange(20.0)
    m = s >= 10
    a = 0.025 ** (1 / 10)
    assert M.epsilon_lower_bound(s, m) == pytest.approx(math.log(a / (1 - a)), rel=1e-10)
    assert M.epsilon_lower_bound(s, m) == pytest.approx(0.8071, abs=1e-3)
    assert M.epsilon_lower_bound(s, m, delta=0.1) == pytest.approx(math.log((a - 0.1) / (1 - a)), rel=1e-10)
    # A 4-record case, one threshold at a time (confidence 0.5 -> quantiles at 0.25 / 0.75):
    # scores 4 3 2 1, members 1 1 0 0 (P = N = 2). At t = 3: FP = 0/2, FN = 0/2, upper ends
    # 1 - 0.25**(1/2) = 0.5 each -> log((1 - 0.5)/0.5) = 0. Other thresholds are worse -> 0.
    assert M.epsilon_lower_bound([4.0, 3, 2, 1], [1, 1, 0, 0], confidence=0.5) == 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("confidence,delta", [(0.95, 0.0), (0.8, 0.0), (0.95, 1e-3), (0.5, 0.2)])
def test_epsilon_brute_force(seed, ties, confidence, delta):
    s, m = make_data(seed, 50, ties=ties, shift=1.0 + seed)
    got = M.epsilon_lower_bound(s, m, confidence=confidence, delta=delta)
    assert got == pytest.approx(brute_epsilon(s, m, confidence, delta), rel=1e-9, abs=1e-12)


def test_epsilon_delta_validation():
    s, m = make_data(0, 10)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            M.epsilon_lower_bound(s, m, delta=bad)
    with pytest.raises(ValueError, match="confidence"):
        M.epsilon_lower_bound(s, m, confidence=1.0)


# ------------------------------------------------------------------------------------------------
# summarize
# ------------------------------------------------------------------------------------------------


def test_summarize_consistent_and_json():
    s, m = make_data(1, 2000, shift=1.0, p_member=0.6)  # ~800 non-members
    with pytest.warns(M.MetricsWarning, match=r"TPR at 0\.1% FPR needs at least 1000") as rec:
        out = M.summarize(s, m)
    assert len([w for w in rec if issubclass(w.category, M.MetricsWarning)]) == 1
    json.dumps(out, allow_nan=False)
    assert set(out["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
    assert out["auc"] == M.auc(s, m)
    assert out["advantage"] == M.advantage(s, m)
    assert out["balanced_accuracy"] == M.balanced_accuracy(s, m)
    assert out["epsilon_lower_bound"] == M.epsilon_lower_bound(s, m)
    assert out["n_members"] == int(m.sum()) and out["n_nonmembers"] == int((~m).sum())
    assert out["n_nonmembers"] < 1000
    assert out["tpr_at_fpr"]["0.01"] == M.tpr_at_fpr(s, m, 0.01).to_dict()
    assert out["tpr_at_fpr"]["0.001"]["resolvable"] is False
    assert out["warnings"] == [
        f"only {out['n_nonmembers']} non-members: TPR at 0.1% FPR needs at least 1000 to be "
        "resolved (the value shown is the TPR at zero false positives and may overstate it)"
    ]
    for key in ("auc", "balanced_accuracy", "advantage", "epsilon_lower_bound", "confidence"):
        assert type(out[key]) is float
    assert type(out["n_members"]) is int


def test_summarize_no_warning_when_resolvable_and_custom_fprs():
    s, m = make_data(2, 400, shift=1.0, p_member=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = M.summarize(s, m, fprs=(0.1, 0.3), confidence=0.9)
    assert list(out["tpr_at_fpr"]) == ["0.1", "0.3"]
    assert out["warnings"] == []
    assert out["confidence"] == 0.9
    with pytest.raises(ValueError, match="fprs"):
        M.summarize(s, m, fprs=(0.1, 1.0))
    with pytest.raises(ValueError, match="duplicates"):
        M.summarize(s, m, fprs=(0.1, 0.1))


# ------------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------------

FUNCS = [
    M.roc_curve,
    M.auc,
    M.advantage,
    M.balanced_accuracy,
    lambda s, m: M.tpr_at_fpr(s, m, 0.1),
    M.epsilon_lower_bound,
    M.summarize,
]


@pytest.mark.parametrize("func", FUNCS)
def test_input_validation(func):
    s = np.linspace(0, 1, 20)
    m = np.arange(20) % 2 == 0
    bad = s.copy()
    bad[[17, 18, 19]] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match=r"scores contains 3 NaN/inf values \(first at index 17\)"):
        func(bad, m)
    with pytest.raises(ValueError, match="same length, got 20 and 19"):
        func(s, m[:-1])
    with pytest.raises(ValueError, match="no non-members"):
        func(s, np.ones(20, bool))
    with pytest.raises(ValueError, match="no members"):
        func(s, np.zeros(20, int))
    with pytest.raises(ValueError, match=r"scores must be a 1-D array, got shape \(10, 2\)"):
        func(s.reshape(10, 2), m)
    with pytest.raises(ValueError, match=r"membership must be a 1-D array, got shape \(10, 2\)"):
        func(s, m.reshape(10, 2))
    with pytest.raises(ValueError, match="got value 2 at index 3"):
        func(s, np.where(np.arange(20) == 3, 2, np.arange(20) % 2))
    with pytest.raises(ValueError, match="membership must be boolean"):
        func(s, m.astype(float))
    with pytest.raises(ValueError, match="scores must be real numbers"):
        func(np.array(["a"] * 20), m)
    with pytest.raises(ValueError, match="no members"):
        func([], [])


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.01, 1.5, float("nan")])
def test_tpr_at_fpr_out_of_range(fpr):
    s, m = make_data(0, 20)
    with pytest.raises(ValueError, match=r"fpr must be in \(0, 1\)"):
        M.tpr_at_fpr(s, m, fpr)


def test_keyword_only():
    s, m = make_data(0, 20)
    with pytest.raises(TypeError):
        M.epsilon_lower_bound(s, m, 0.95)  # type: ignore[misc]
    with pytest.raises(TypeError):
        M.clopper_pearson(1, 4, 0.95)  # type: ignore[misc]
    with pytest.raises(TypeError):
        M.tpr_at_fpr(s, m, 0.1, 0.95)  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------


@st.composite
def labelled(draw, elements):
    n = draw(st.integers(2, 40))
    scores = draw(st.lists(elements, min_size=n, max_size=n))
    membership = [True, False] + draw(st.lists(st.booleans(), min_size=n - 2, max_size=n - 2))
    perm = draw(st.permutations(range(n)))
    return np.asarray(scores, dtype=float), np.asarray(membership)[perm]


FLOATS = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
SMALL_INTS = st.integers(-20, 20)


@SETTINGS
@given(labelled(FLOATS))
def test_property_ranges_and_reversal(data):
    s, m = data
    a = M.auc(s, m)
    assert 0.0 <= a <= 1.0
    assert a + M.auc(-s, m) == pytest.approx(1.0, abs=1e-12)
    adv = M.advantage(s, m)
    assert 0.0 <= adv <= 1.0
    assert M.balanced_accuracy(s, m) == pytest.approx((1 + adv) / 2)
    assert M.epsilon_lower_bound(s, m) >= 0.0
    fpr, tpr, thr = M.roc_curve(s, m)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    # advantage lower-bounds the area above the diagonal: AUC - 1/2 <= advantage
    assert a - 0.5 <= adv + 1e-12


def _metrics(s, m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.MetricsWarning)
        t = M.tpr_at_fpr(s, m, 0.1)
    return (
        M.auc(s, m),
        M.advantage(s, m),
        M.balanced_accuracy(s, m),
        M.epsilon_lower_bound(s, m),
        t.tpr,
        t.achieved_fpr,
        t.ci_low,
        t.ci_high,
    )


@SETTINGS
@given(
    labelled(SMALL_INTS),
    st.sampled_from(
        [
            lambda x: 3 * x - 1,
            lambda x: x**3,
            lambda x: np.exp(x / 4),
            np.arctan,
            lambda x: np.where(x > 0, 100 * x, x),
        ]
    ),
)
def test_property_invariant_under_increasing_transform(data, f):
    s, m = data
    t = np.asarray(f(s), dtype=float)
    assume(len(np.unique(t)) == len(np.unique(s)))  # the transform is strictly increasing in floats
    assert _metrics(t, m) == _metrics(s, m)


@SETTINGS
@given(labelled(st.one_of(FLOATS, SMALL_INTS.map(float))), st.randoms(use_true_random=False))
def test_property_permutation_symmetric(data, rnd):
    s, m = data
    perm = list(range(len(s)))
    rnd.shuffle(perm)
    assert _metrics(s[perm], m[perm]) == _metrics(s, m)
    fpr, tpr, thr = M.roc_curve(s, m)
    fpr2, tpr2, thr2 = M.roc_curve(s[perm], m[perm])
    np.testing.assert_array_equal(fpr, fpr2)
    np.testing.assert_array_equal(tpr, tpr2)
    np.testing.assert_array_equal(thr, thr2)


@SETTINGS
@given(labelled(SMALL_INTS.map(float)))
def test_property_matches_sklearn(data):
    s, m = data
    assert M.auc(s, m) == pytest.approx(skm.roc_auc_score(m, s), abs=1e-12)
    fpr, tpr, _ = M.roc_curve(s, m)
    fpr_ref, tpr_ref, _ = skm.roc_curve(m, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_ref, atol=1e-15)
    np.testing.assert_allclose(tpr, tpr_ref, atol=1e-15)


# ----------------------------------------------------------------- AUC bootstrap interval, slices
def _naive_auc_weighted(s, m, w):
    """Mann-Whitney over all weighted pairs, ties 1/2."""
    pos, neg = np.flatnonzero(m), np.flatnonzero(~m)
    num = sum(w[i] * w[j] * ((s[i] > s[j]) + 0.5 * (s[i] == s[j])) for i in pos for j in neg)
    return num / (w[pos].sum() * w[neg].sum())


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(2, 25), n_groups=st.integers(1, 8), seed=st.integers(0, 10_000), ties=st.booleans())
def test_auc_interval_resamples_match_a_naive_weighted_auc(n, n_groups, seed, ties):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
    m = rng.random(n) < 0.5
    m[0], m[1] = True, False
    g = rng.integers(0, n_groups, n)
    lo, hi = M.auc_interval(scores=s, membership=m, groups=g, n_boot=7, seed=seed, confidence=0.5)
    # replay the resamples with the same generator and check the quantiles from naive AUCs
    _, cl = np.unique(g, return_inverse=True)
    k = cl.max() + 1
    counts = np.random.default_rng(seed).multinomial(k, np.full(k, 1.0 / k), size=7).astype(float)
    naive = []
    for c in counts:
        w = c[cl]
        if w[m].sum() > 0 and w[~m].sum() > 0:
            naive.append(_naive_auc_weighted(s, m, w))
    if not naive:
        assert np.isnan(lo) and np.isnan(hi)
    else:
        assert lo == pytest.approx(np.quantile(naive, 0.25)) and hi == pytest.approx(np.quantile(naive, 0.75))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(2, 25), n_rows=st.integers(1, 5), n_cols=st.integers(1, 8), seed=st.integers(0, 10_000),
       ties=st.booleans())
def test_crossed_auc_interval_resamples_match_a_naive_weighted_auc(n, n_rows, n_cols, seed, ties):
    """The pigeonhole resamples, replayed: rows drawn, then columns, each score weighing the product
    of its row's and its column's multiplicities; the quantiles of naive weighted AUCs."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
    m = rng.random(n) < 0.5
    m[0], m[1] = True, False
    r, c = rng.integers(0, n_rows, n), rng.integers(0, n_cols, n)
    lo, hi = M.crossed_auc_interval(scores=s, membership=m, rows=r, cols=c, n_boot=7, seed=seed, confidence=0.5)
    replay = np.random.default_rng(seed)
    weights = np.ones((7, n))
    for g in (r, c):
        _, idx = np.unique(g, return_inverse=True)
        k = idx.max() + 1
        weights *= replay.multinomial(k, np.full(k, 1.0 / k), size=7).astype(float)[:, idx]
    naive = [_naive_auc_weighted(s, m, w) for w in weights if w[m].sum() > 0 and w[~m].sum() > 0]
    if not naive:
        assert np.isnan(lo) and np.isnan(hi)
    else:
        assert lo == pytest.approx(np.quantile(naive, 0.25)) and hi == pytest.approx(np.quantile(naive, 0.75))


def test_crossed_mean_interval_covers_under_crossed_effects_where_one_factor_does_not():
    """y = a_model + b_record + noise with known mean 0: the pigeonhole interval covers it about 95%
    of the time; resampling the records alone (the model effects held fixed) covers far less."""
    rng = np.random.default_rng(0)
    rows, cols = np.repeat(np.arange(12), 30), np.tile(np.arange(30), 12)
    covered, covered_cols = 0, 0
    for sim in range(100):
        y = rng.normal(size=12)[rows] + rng.normal(size=30)[cols] + rng.normal(size=rows.size)
        lo, hi = M.crossed_mean_interval(values=y, rows=rows, cols=cols, n_boot=200, seed=sim)
        covered += lo <= 0 <= hi
        lo, hi = M.crossed_mean_interval(values=y, rows=np.zeros_like(rows), cols=cols, n_boot=200, seed=sim)
        covered_cols += lo <= 0 <= hi
    assert covered >= 90 and covered_cols <= 85, (covered, covered_cols)
    with pytest.raises(ValueError, match="rows must have one id per score"):
        M.crossed_mean_interval(values=y, rows=[0], cols=cols)
    with pytest.raises(ValueError, match="non-empty array of finite numbers"):
        M.crossed_mean_interval(values=[np.nan], rows=[0], cols=[0])


def test_auc_interval_covers_the_auc_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 5000):
        m = rng.random(n) < 0.5
        s = rng.normal(size=n) + 0.5 * m
        lo, hi = M.auc_interval(scores=s, membership=m, seed=1)
        assert lo <= M.auc(s, m) <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1"):
        M.auc_interval(scores=s, membership=m, n_boot=0)
    with pytest.raises(ValueError, match="groups must have one id per score"):
        M.auc_interval(scores=s, membership=m, groups=[0, 1])


def test_slices_are_the_metrics_of_the_subset():
    rng = np.random.default_rng(2)
    m = rng.random(400) < 0.5
    s = rng.normal(size=400) + m
    cls = rng.integers(0, 3, 400)
    out = M.slice_metrics(scores=s, membership=m, slices={f"class={k}": cls == k for k in range(3)}
                                | {"none": np.zeros(400, bool)}, fprs=(0.01,))
    for k in range(3):
        sel = cls == k
        e = out[f"class={k}"]
        assert e["auc"] == M.auc(s[sel], m[sel]) and e["advantage"] == M.advantage(s[sel], m[sel])
        assert e["n_members"] + e["n_nonmembers"] == sel.sum()
        assert e["tpr_at_fpr"]["0.01"]["resolvable"] == ((~m[sel]).sum() >= 100)
    assert out["none"] == {"n_members": 0, "n_nonmembers": 0}


def test_summary_records_the_epsilon_method_and_delta():
    rng = np.random.default_rng(3)
    m = rng.random(300) < 0.5
    s = rng.normal(size=300) + 2 * m
    doc, _ = M.summarize_with_curve(s, m, delta=1e-5)
    assert doc["epsilon"]["delta"] == 1e-5 and "Jagielski" in doc["epsilon"]["method"]
    assert doc["epsilon"]["value"] == M.epsilon_lower_bound(s, m, delta=1e-5) == doc["epsilon_lower_bound"]
    assert doc["auc_ci"][0] <= doc["auc"] <= doc["auc_ci"][1] and "bootstrap" in doc["auc_ci_method"]


def test_dp_audit_compares_every_attacks_lower_bound_with_the_accountant():
    from mia_core.engine.stages import dp_audit

    rng = np.random.default_rng(5)
    m = rng.random(4000) < 0.5
    strong = rng.normal(size=4000) + 3.0 * m  # far more distinguishable than epsilon = 0.5 allows
    weak = rng.normal(size=4000)
    report = [{"name": "dp-sgd", "report": {"epsilon": 0.5, "delta": 1e-5}}]
    assert dp_audit([], {"a": weak}, m, confidence=0.95) is None
    assert dp_audit([{"name": "weight-decay", "report": {"lam": 0.1}}], {"a": weak}, m, confidence=0.95) is None
    ok = dp_audit(report, {"weak": weak}, m, confidence=0.95)
    assert ok["consistent"] and ok["best_lower_bound"] <= 0.5 and "as it must be" in ok["message"]
    assert ok["lower_bounds"]["weak"] == M.epsilon_lower_bound(weak, m, delta=1e-5)
    bad = dp_audit(report, {"weak": weak, "strong": strong}, m, confidence=0.95)
    assert not bad["consistent"] and bad["best_attack"] == "strong"
    assert bad["message"].startswith("DP AUDIT FAILED: attack 'strong'")
