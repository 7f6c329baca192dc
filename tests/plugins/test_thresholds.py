"""The metric-threshold attacks (confidence, entropy, mentr) and the gap attack: their statistics and
the threshold search against straightforward references, validation errors, behaviour on the planted
population, and one command-line run."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mia_core import metrics
from mia_core.engine import AttackContext
from mia_core.testing import check_attack, planted_population
from mia_plugins.attacks.thresholds import (
    LOG_FLOOR,
    ConfidenceAttack,
    EntropyAttack,
    GapAttack,
    MEntrAttack,
    best_threshold,
    class_thresholds,
    modified_entropy,
    prediction_entropy,
    true_label_probability,
)

CALIBRATED = (ConfidenceAttack, EntropyAttack, MEntrAttack)
SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------- references
def reference_threshold(values, is_member):
    """Every observed value tried as tau, balanced accuracy in exact fractions, smallest maximiser."""
    vals = [float(v) for v in np.ravel(values)]
    mem = [bool(m) for m in np.ravel(is_member)]
    ins = [v for v, m in zip(vals, mem) if m]
    outs = [v for v, m in zip(vals, mem) if not m]
    best, best_acc = None, None
    for tau in sorted(set(vals)):
        acc = Fraction(sum(v >= tau for v in ins), len(ins)) + Fraction(sum(v < tau for v in outs), len(outs))
        if best_acc is None or acc > best_acc:
            best, best_acc = tau, acc
    return best


def reference_mentr_row(p, y):
    """Song & Mittal's Mentr of one row, term by term with math.log (rows away from 0 and 1)."""
    out = -(1.0 - p[y]) * math.log(p[y])
    for i, pi in enumerate(p):
        if i != y:
            out -= pi * math.log(1.0 - pi)
    return out


def _softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


small_floats = st.floats(-3, 3, allow_nan=False, width=32)


@st.composite
def labelled_values(draw, max_size=30):
    """(values, is_member) with both classes present; values drawn from a small set so ties happen."""
    n = draw(st.integers(2, max_size))
    pool = draw(st.lists(small_floats, min_size=1, max_size=6))
    values = np.array(draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)))
    member = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    assume(member.any() and not member.all())
    return values, member


# ----------------------------------------------------------------------------- best_threshold
@SETTINGS
@given(data=labelled_values())
def test_best_threshold_matches_brute_force(data):
    values, member = data
    assert best_threshold(values=values, is_member=member) == reference_threshold(values, member)


@SETTINGS
@given(data=labelled_values())
def test_best_threshold_ignores_order_and_shape(data):
    values, member = data
    perm = np.random.default_rng(0).permutation(values.size)
    tau = best_threshold(values=values, is_member=member)
    assert best_threshold(values=values[perm], is_member=member[perm]) == tau
    if values.size % 2 == 0:
        assert best_threshold(values=values.reshape(2, -1), is_member=member.reshape(2, -1)) == tau


def test_best_threshold_small_cases():
    # one member, one non-member: perfect split at the member's value
    assert best_threshold(values=[1.0, 0.0], is_member=[True, False]) == 1.0
    # inverted: no threshold beats 1/2, the smallest value (everyone a member) is kept
    assert best_threshold(values=[0.0, 1.0], is_member=[True, False]) == 0.0
    # all tied: the only candidate
    assert best_threshold(values=[2.0, 2.0, 2.0], is_member=[True, False, True]) == 2.0
    # a member tied with a non-member at the best cut: TPR 1, TNR 1/2 beats TPR 1/2, TNR 1
    assert best_threshold(values=[0.0, 1.0, 1.0, 2.0], is_member=[False, False, True, True]) == 1.0


@pytest.mark.parametrize("values,member,message", [
    ([], [], "members and non-members"),
    ([1.0], [True], "members and non-members"),
    ([1.0, 2.0], [False, False], "members and non-members"),
    ([1.0, np.nan], [True, False], "finite"),
    ([1.0, np.inf], [True, False], "finite"),
    ([1.0, 2.0], [True], "same shape"),
])
def test_best_threshold_rejects(values, member, message):
    with pytest.raises(ValueError, match=message):
        best_threshold(values=np.array(values, dtype=float), is_member=np.array(member, dtype=bool))


@SETTINGS
@given(r=st.integers(2, 4), n=st.integers(1, 12), c=st.integers(1, 4), seed=st.integers(0, 2**16), per_class=st.booleans())
def test_class_thresholds_match_per_class_brute_force(r, n, c, seed, per_class):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=n)
    values = rng.integers(-3, 4, size=(r, n)).astype(float)  # small integers: ties
    member = np.zeros((r, n), dtype=bool)
    member[: r // 2] = True
    for j in range(n):  # every record IN for half of the models, as in the game
        member[:, j] = member[rng.permutation(r), j]
    got = class_thresholds(values=values, is_member=member, labels=labels, n_classes=c, per_class=per_class)
    pooled = reference_threshold(values, member)
    for k in range(c):
        cols = labels == k
        if per_class and cols.any():
            assert got[k] == reference_threshold(values[:, cols], member[:, cols])
        else:  # global mode, or a class without records: the pooled threshold
            assert got[k] == pooled


def test_class_thresholds_rejects():
    with pytest.raises(ValueError, match=r"\[R, N\]"):
        class_thresholds(values=np.zeros(3), is_member=np.zeros(3, bool), labels=np.zeros(3, int), n_classes=2)
    with pytest.raises(ValueError, match="labels must be in"):
        class_thresholds(values=np.zeros((2, 2)), is_member=np.eye(2, dtype=bool), labels=np.array([0, 2]), n_classes=2)
    with pytest.raises(ValueError, match="n_classes"):
        class_thresholds(values=np.zeros((2, 2)), is_member=np.eye(2, dtype=bool), labels=np.array([0, 0]), n_classes=0)


# ----------------------------------------------------------------------------- statistics
@st.composite
def prob_rows(draw, max_n=6, max_c=6):
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(2, max_c))
    z = np.array(draw(st.lists(st.lists(st.floats(-8, 8, allow_nan=False), min_size=c, max_size=c),
                               min_size=n, max_size=n)))
    y = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    return _softmax(z), y


@SETTINGS
@given(data=prob_rows())
def test_modified_entropy_matches_term_by_term_reference(data):
    p, y = data
    expected = [reference_mentr_row(p[j], y[j]) for j in range(len(y))]
    np.testing.assert_allclose(modified_entropy(probs=p, labels=y), expected, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(data=prob_rows())
def test_entropy_and_true_label_probability_match_loops(data):
    p, y = data
    np.testing.assert_allclose(prediction_entropy(probs=p),
                               [-sum(x * math.log(x) for x in row if x > 0) for row in p], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(true_label_probability(probs=p, labels=y), [p[j, y[j]] for j in range(len(y))])


def test_statistics_broadcast_over_leading_axes():
    rng = np.random.default_rng(0)
    p = _softmax(rng.normal(size=(3, 5, 4)))
    y = rng.integers(0, 4, size=5)
    m = modified_entropy(probs=p, labels=y)
    assert m.shape == (3, 5)
    for r in range(3):
        np.testing.assert_array_equal(m[r], modified_entropy(probs=p[r], labels=y))
        np.testing.assert_array_equal(true_label_probability(probs=p, labels=y)[r],
                                      true_label_probability(probs=p[r], labels=y))
    assert prediction_entropy(probs=p).shape == (3, 5)


def test_modified_entropy_limits():
    p = np.array([
        [1.0, 0.0, 0.0],    # certain and right: 0
        [0.0, 1.0, 0.0],    # certain and wrong: both logs floored, finite
        [0.5, 0.5, 0.0],    # an exact zero elsewhere contributes nothing
    ])
    y = np.array([0, 0, 0])
    m = modified_entropy(probs=p, labels=y)
    assert m[0] == 0.0
    floor = -math.log(LOG_FLOOR)
    assert m[1] == pytest.approx(2 * floor, rel=1e-12) and np.isfinite(m[1])
    assert m[2] == pytest.approx(reference_mentr_row([0.5, 0.5, 1e-300], 0), rel=1e-12)


def test_modified_entropy_keeps_a_confident_wrong_prediction_exact():
    """z = (0, 40, 0), y = 0: p_1 rounds to 1 in float64, so 1 - p_1 would be 0 and its log floored;
    the complement taken as the sum of the other entries gives Mentr = 40 + log(...) exactly."""
    z = np.array([[0.0, 40.0, 0.0], [0.0, 45.0, 0.0]])
    p = _softmax(z)
    assert p[0, 1] == 1.0
    got = modified_entropy(probs=p, labels=np.array([0, 0]))
    for k, zk in enumerate((40.0, 45.0)):
        lse = zk + math.log1p(2 * math.exp(-zk))  # log sum exp z
        log_p0 = -lse
        log_rest1 = math.log(2.0) - lse  # log(1 - p_1) = log(p_0 + p_2)
        expected = -(1 - math.exp(log_p0)) * log_p0 - math.exp(zk - lse) * log_rest1 - math.exp(log_p0) * math.log1p(-math.exp(log_p0))
        assert got[k] == pytest.approx(expected, rel=1e-12)
    assert got[1] > got[0]  # more confidently wrong: larger Mentr


@pytest.mark.parametrize("probs,labels,message", [
    (np.full(3, 1 / 3), np.array([0]), r"\[\.\.\., N, C\]"),
    (np.full((2, 3), 1 / 3), np.array([0]), "labels must be"),
    (np.full((2, 3), 1 / 3), np.array([0, 3]), "integers in"),
    (np.full((2, 3), 1 / 3), np.array([0.0, 1.0]), "integers in"),
])
def test_statistics_reject_bad_shapes(probs, labels, message):
    for fn in (modified_entropy, true_label_probability):
        with pytest.raises(ValueError, match=message):
            fn(probs=probs, labels=labels)


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("cls", CALIBRATED)
@pytest.mark.parametrize("params,message", [
    ({"thresholds": "per-class"}, "thresholds must be one of class, global, none; got 'per-class'"),
    ({"thresholds": None}, "thresholds must be one of"),
    ({"n_references": 3}, "positive even integer .* got 3"),
    ({"n_references": 0}, "got 0"),
    ({"n_references": -2}, "got -2"),
    ({"n_references": True}, "got True"),
    ({"n_references": 4.0}, "got 4.0"),
    ({"n_references": "4"}, "got '4'"),
])
def test_validate_rejects(cls, params, message):
    with pytest.raises(ValueError, match=message):
        cls(**params).validate()


class _Ctx:
    def __init__(self, n_models):
        self.n_models = n_models


@pytest.mark.parametrize("cls", CALIBRATED)
def test_fit_needs_references_only_when_calibrating(cls):
    assert cls.min_reference_models == 2 and cls.access == ("probs",) and cls.api_version == "1.0"
    with pytest.raises(ValueError, match=r"thresholds=class .*\(n_models >= 4\), got n_models=2"):
        cls().fit(_Ctx(2))
    with pytest.raises(ValueError, match="thresholds=global"):
        cls(thresholds="global").fit(_Ctx(2))
    assert cls(thresholds="none").fit(_Ctx(2)).tau_ == {}
    assert cls(thresholds="none", n_references=4).reference_budget() == (None, True)
    assert cls(n_references=4).reference_budget() == (4, True)


def test_gap_contract():
    assert GapAttack.access == ("label",) and GapAttack.min_reference_models == 0
    assert GapAttack().get_params() == {}
    assert "Choquette-Choo" in GapAttack.reference and "Yeom" in GapAttack.reference
    for cls in CALIBRATED:
        assert "Song" in cls.reference and cls().get_params() == {"thresholds": "class", "n_references": None}


# ----------------------------------------------------------------------------- planted population
@pytest.fixture(scope="module")
def planted():
    pop = planted_population()
    return pop, np.arange(pop.n_records)


def _pooled_auc(attack, pop, targets=(0, 1, 2, 3)):
    records = np.arange(pop.n_records)
    scores = np.concatenate([attack.score(t, records) for t in targets])
    return metrics.auc(scores, pop.keep[list(targets)].ravel())


@pytest.mark.parametrize("cls,params,low", [
    (ConfidenceAttack, {}, 0.85),
    (ConfidenceAttack, {"thresholds": "none"}, 0.85),
    (MEntrAttack, {}, 0.85),
    (MEntrAttack, {"thresholds": "global"}, 0.85),
    (MEntrAttack, {"n_references": 2}, 0.8),
    # label-blind: with random labels a non-member also gets a confident (wrong) prediction
    (EntropyAttack, {}, 0.52),
    (GapAttack, {}, 0.8),
])
def test_planted_members_score_higher(planted, cls, params, low):
    pop, _ = planted
    attack = cls(**params).fit(AttackContext(pop, cls.access, owner="test"))
    assert _pooled_auc(attack, pop) > low


@pytest.mark.parametrize("cls", CALIBRATED)
def test_class_scores_are_statistic_minus_reference_threshold(planted, cls):
    """score = s - tau_y with tau from the target's references only; score >= 0 is the paper's rule."""
    pop, records = planted
    ctx = AttackContext(pop, cls.access, owner="test")
    attack = cls(n_references=4).fit(ctx)
    t = 2
    got = attack.score(t, records)
    view = ctx.for_target(t, n_references=4, online=True)
    assert t not in view.references and (t ^ 1) not in view.references and len(view.references) == 4
    y = pop.records.y
    probs = view.ref_signal("probs")
    values = np.stack([attack.statistic(probs[r], y) for r in range(len(view.references))])
    tau = class_thresholds(values=values, is_member=view.ref_keep, labels=y, n_classes=pop.records.n_classes)
    np.testing.assert_array_equal(attack.tau_[t], tau)
    s = attack.statistic(view.target_signal("probs"), y)
    np.testing.assert_allclose(got, s - tau[y], rtol=0, atol=0)
    assert ((got >= 0) == (s >= tau[y])).all()
    # "none" is the raw statistic; a subset is scored as in the full call, from the cached thresholds
    raw = cls(thresholds="none").fit(ctx).score(t, records)
    np.testing.assert_array_equal(raw, s)
    np.testing.assert_array_equal(attack.score(t, records[::-7]), got[::-7])
    assert list(attack.tau_) == [t]


def test_global_threshold_keeps_the_ranking(planted):
    pop, records = planted
    ctx = AttackContext(pop, MEntrAttack.access, owner="test")
    g = MEntrAttack(thresholds="global").fit(ctx).score(0, records)
    n = MEntrAttack(thresholds="none").fit(ctx).score(0, records)
    assert np.ptp(g - n) < 1e-12  # one constant shift
    np.testing.assert_allclose(n, -modified_entropy(probs=pop.signals().probs[0], labels=pop.records.y))


def test_gap_is_correctness_and_a_single_roc_point(planted):
    pop, records = planted
    s = GapAttack().fit(AttackContext(pop, GapAttack.access, owner="test")).score(1, records)
    np.testing.assert_array_equal(s, pop.signals().correct[1])
    assert set(np.unique(s)) <= {0.0, 1.0}
    member = pop.keep[1]
    tpr, fpr = s[member].mean(), s[~member].mean()
    assert tpr > 0.8 and fpr < 0.5  # memorised members are classified right, non-members at chance


@pytest.mark.parametrize("cls,params", [(ConfidenceAttack, {"thresholds": "global"}), (MEntrAttack, {"thresholds": "none"}),
                                        (MEntrAttack, {"n_references": 2}), (GapAttack, {})])
def test_conformance_kit(cls, params):
    """Parameter sets beyond the defaults. The entropy attack is not here: it reaches only about 0.58
    on the planted population, under the kit's MIN_PLANTED_AUC = 0.6 (label-blind; see
    test_planted_members_score_higher)."""
    check_attack(cls, params=params)


# ----------------------------------------------------------------------------- command line
def test_cli_runs_every_threshold_attack(tmp_path):
    from plugin_fixtures import eval_attacks

    eval_attacks(tmp_path, "confidence", "entropy", "mentr", "gap", "mentr:thresholds=none", "confidence:n_references=2")
