"""RMIA: the pairwise dominance count against dense references (ties at γ, self exclusion), the
marginals Pr(x) and the temperature softmax against direct formulas, offline-a tuning, the
ranking claim of the docstring, validation, the planted population and the CLI."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core import metrics
from mia_plugins.attacks.rmia import (
    OFFLINE_A_GRID,
    RMIA,
    dominance_fraction,
    dominance_fraction_dense,
    log_marginal_offline,
    log_marginal_online,
    true_label_log_prob,
    tune_offline_a,
)

HYP = settings(max_examples=80, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------- dominance
def _loop_reference(lx, lz, gamma, self_index):
    """Pair by pair: LR(x, z) >= gamma decided as log r_z <= log r_x - log gamma, x's own pair skipped."""
    lg = math.log(gamma)
    out = []
    for i, x in enumerate(lx):
        own = -1 if self_index is None else int(self_index[i])
        count = total = 0
        for j, z in enumerate(lz):
            if j == own:
                continue
            total += 1
            count += bool(z <= x - lg)
        out.append(count / total if total else 0.0)
    return np.array(out, dtype=np.float64)


# a few repeated values so that ties (equal ratios, ratios exactly log gamma apart) are common
_VALUES = st.one_of(st.sampled_from([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, math.log(2.0), -math.log(2.0)]),
                    st.floats(-50, 50, allow_nan=False))
_GAMMAS = st.sampled_from([1.0, 2.0, 0.5, math.e, 1.0 + 1e-12]) | st.floats(1e-3, 1e3)


@st.composite
def _dominance_case(draw):
    lz = np.array(draw(st.lists(_VALUES, min_size=0, max_size=12)))
    n = draw(st.integers(0, 12))
    use_self = draw(st.booleans())
    if use_self and lz.size:
        si = np.array(draw(st.lists(st.integers(-1, lz.size - 1), min_size=n, max_size=n)), dtype=np.int64)
        lx = np.array([lz[k] if k >= 0 else draw(_VALUES) for k in si])  # a record in Z has its own ratio there
    else:
        si = None
        lx = np.array(draw(st.lists(_VALUES, min_size=n, max_size=n)))
    return lx.astype(np.float64), lz.astype(np.float64), draw(_GAMMAS), si


@HYP
@given(case=_dominance_case())
def test_dominance_matches_pairwise_reference(case):
    lx, lz, gamma, si = case
    want = _loop_reference(lx, lz, gamma, si)
    got = dominance_fraction(log_ratio_x=lx, log_ratio_z=lz, gamma=gamma, self_index=si)
    dense = dominance_fraction_dense(log_ratio_x=lx, log_ratio_z=lz, gamma=gamma, self_index=si)
    assert got.shape == lx.shape and got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dense, want)
    assert ((got >= 0) & (got <= 1)).all()


@HYP
@given(k_x=st.lists(st.integers(-32, 32), min_size=1, max_size=10),
       k_z=st.lists(st.integers(-32, 32), min_size=1, max_size=10),
       gamma=st.sampled_from([1.0, 2.0, 0.5, 3.0, 10.0]))
def test_dominance_equals_the_ratio_test_on_exact_inputs(k_x, k_z, gamma):
    """On log ratios that are multiples of 1/8 (exact differences, never an ulp from log gamma for
    these gammas) the count is exactly #{z : r_x / r_z >= gamma} computed on the ratios themselves."""
    lx, lz = np.array(k_x) / 8.0, np.array(k_z) / 8.0
    natural = ((lx[:, None] - lz[None, :]) >= math.log(gamma)).mean(axis=1)  # log(r_x / r_z) >= log(gamma)
    np.testing.assert_array_equal(dominance_fraction(log_ratio_x=lx, log_ratio_z=lz, gamma=gamma), natural)


def test_tie_exactly_at_gamma_counts():
    gamma = 2.0
    lx = np.array([0.3, -1.7, 5.0])
    at = lx - math.log(gamma)  # LR(x, z) == gamma in the function's own arithmetic
    for i in range(3):
        lz = np.array([at[i], np.nextafter(at[i], np.inf), np.nextafter(at[i], -np.inf)])
        got = dominance_fraction(log_ratio_x=lx[i:i + 1], log_ratio_z=lz, gamma=gamma)
        assert got[0] == pytest.approx(2 / 3)  # the tie and the one below; not the one above
    # gamma = 1: equal ratios dominate each other
    assert dominance_fraction(log_ratio_x=[0.25], log_ratio_z=[0.25, 0.25, 1.0], gamma=1.0)[0] == pytest.approx(2 / 3)


def test_self_is_excluded_from_its_own_population():
    lr = np.array([0.0, 1.0, 2.0, 3.0])
    # gamma <= 1: LR(x, x) = 1 >= gamma would count, and must not
    got = dominance_fraction(log_ratio_x=lr, log_ratio_z=lr, gamma=1.0, self_index=np.arange(4))
    np.testing.assert_array_equal(got, [0, 1 / 3, 2 / 3, 1])
    # without exclusion, each record counts itself
    np.testing.assert_array_equal(dominance_fraction(log_ratio_x=lr, log_ratio_z=lr, gamma=1.0), [0.25, 0.5, 0.75, 1])
    # the only population record is x itself: empty population, score 0
    assert dominance_fraction(log_ratio_x=[1.0], log_ratio_z=[1.0], gamma=1.0, self_index=[0])[0] == 0.0
    assert dominance_fraction(log_ratio_x=[1.0], log_ratio_z=[], gamma=1.0).tolist() == [0.0]
    assert dominance_fraction(log_ratio_x=[], log_ratio_z=[1.0, 2.0], gamma=1.0).shape == (0,)


@HYP
@given(lr=st.lists(_VALUES, min_size=1, max_size=15), gamma=_GAMMAS)
def test_score_is_monotone_in_the_ratio_with_every_record_in_z(lr, gamma):
    """The docstring's claim: with Z = every record (self excluded) the score is a non-decreasing
    function of r_x, whatever gamma, and with gamma = 1 it separates every distinct ratio."""
    lr = np.array(lr)
    s = dominance_fraction(log_ratio_x=lr, log_ratio_z=lr, gamma=gamma, self_index=np.arange(lr.size))
    order = np.argsort(lr, kind="stable")
    assert (np.diff(s[order]) >= 0).all()
    equal = lr[:, None] == lr[None, :]
    assert (s[:, None] == s[None, :])[equal].all()
    if gamma == 1.0:
        assert ((s[:, None] < s[None, :]) == (lr[:, None] < lr[None, :])).all()


@HYP
@given(lx=st.lists(_VALUES, min_size=1, max_size=12), lz=st.lists(_VALUES, min_size=1, max_size=12),
       g1=_GAMMAS, g2=_GAMMAS)
def test_gamma_never_reorders_records_for_a_fixed_population(lx, lz, g1, g2):
    lx, lz = np.array(lx), np.array(lz)
    s1 = dominance_fraction(log_ratio_x=lx, log_ratio_z=lz, gamma=g1)
    s2 = dominance_fraction(log_ratio_x=lx, log_ratio_z=lz, gamma=g2)
    assert not ((s1[:, None] < s1[None, :]) & (s2[:, None] > s2[None, :])).any()


def test_sampled_population_moves_inside_records_by_less_than_one_pair():
    rng = np.random.default_rng(0)
    lr = rng.normal(size=200)
    pop = np.sort(rng.choice(200, size=20, replace=False))
    si = np.full(200, -1)
    si[pop] = np.arange(20)
    for gamma in (0.5, 1.0, 2.0):
        s = dominance_fraction(log_ratio_x=lr, log_ratio_z=lr[pop], gamma=gamma, self_index=si)
        order = np.argsort(lr)
        assert (np.diff(s[order]) > -1 / 19).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(log_ratio_x=[np.nan], log_ratio_z=[0.0], gamma=1.0), "NaN"),
    (dict(log_ratio_x=[0.0], log_ratio_z=[0.0], gamma=0.0), "gamma must be a finite number > 0"),
    (dict(log_ratio_x=[0.0], log_ratio_z=[0.0], gamma=float("inf")), "gamma"),
    (dict(log_ratio_x=[0.0], log_ratio_z=[0.0], gamma=True), "gamma"),
    (dict(log_ratio_x=[[0.0]], log_ratio_z=[0.0], gamma=1.0), "1-D"),
    (dict(log_ratio_x=[0.0], log_ratio_z=[0.0], gamma=1.0, self_index=[1]), "self_index entries"),
    (dict(log_ratio_x=[0.0], log_ratio_z=[0.0], gamma=1.0, self_index=[0, 0]), "self_index must be"),
    (dict(log_ratio_x=[0.0], log_ratio_z=[0.0], gamma=1.0, self_index=[0.0]), "integer array"),
])
def test_dominance_input_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dominance_fraction(**kwargs)


def test_dominance_scales_without_a_pair_matrix():
    """1e5 x 1e5 pairs (a 10 GB bool matrix, densely) in well under a second and O(N) memory."""
    import time
    import tracemalloc

    rng = np.random.default_rng(0)
    lr = rng.normal(size=100_000)
    tracemalloc.start()
    t0 = time.perf_counter()
    s = dominance_fraction(log_ratio_x=lr, log_ratio_z=lr, gamma=1.0, self_index=np.arange(lr.size))
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * lr.nbytes  # a handful of length-N arrays
    assert elapsed < 5.0  # generous: a shared 2-core machine
    np.testing.assert_allclose(np.sort(s), np.arange(lr.size) / (lr.size - 1))


# ----------------------------------------------------------------------------- Pr(x|θ) and Pr(x)
@HYP
@given(seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([0.5, 1.0, 2.0, 3.7]),
       c=st.integers(1, 5), scale=st.sampled_from([1.0, 30.0]))
def test_true_label_log_prob_is_the_temperature_softmax(seed, temperature, c, scale):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(3, 4, c)) * scale
    y = rng.integers(0, c, size=4)
    logp = scipy.special.log_softmax(z, axis=-1)
    loss = -np.take_along_axis(logp, y[None, :, None], axis=-1)[..., 0]
    want = np.take_along_axis(scipy.special.log_softmax(z / temperature, axis=-1), y[None, :, None], axis=-1)[..., 0]
    got = true_label_log_prob(loss=loss, probs=np.exp(logp), labels=y, temperature=temperature)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_true_label_log_prob_stays_finite_when_the_probability_underflows():
    loss = np.array([800.0, 0.0])  # p_y = e^-800 is 0.0 in float64
    probs = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert true_label_log_prob(loss=loss).tolist() == [-800.0, -0.0]
    got = true_label_log_prob(loss=loss, probs=probs, labels=np.array([0, 0]), temperature=2.0)
    assert np.isfinite(got).all() and got[0] == pytest.approx(-400.0)
    with pytest.raises(ValueError, match="temperature must be"):
        true_label_log_prob(loss=loss, temperature=0.0)
    with pytest.raises(ValueError, match="needs probs"):
        true_label_log_prob(loss=loss, temperature=2.0)


def _ref_case(seed, r=6, n=9):
    rng = np.random.default_rng(seed)
    p = rng.uniform(1e-3, 1.0, size=(r, n))
    keep = np.zeros((r, n), dtype=bool)
    for j in range(n):
        keep[rng.choice(r, size=r // 2, replace=False), j] = True
    return p, keep


@pytest.mark.parametrize("seed", range(5))
def test_marginals_match_direct_formulas(seed):
    p, keep = _ref_case(seed)
    for j in range(p.shape[1]):
        p_in, p_out = p[keep[:, j], j].mean(), p[~keep[:, j], j].mean()
        on = log_marginal_online(log_p_ref=np.log(p), ref_in=keep)[j]
        assert math.exp(on) == pytest.approx((p_in + p_out) / 2, rel=1e-12)
        assert math.exp(on) == pytest.approx(p[:, j].mean(), rel=1e-12)  # balanced: the plain mean
        for a in (0.0, 0.3, 1.0):
            off = log_marginal_offline(log_p_ref=np.log(p), ref_in=keep, a=a)[j]
            assert math.exp(off) == pytest.approx(((1 + a) * p_out + (1 - a)) / 2, rel=1e-12)


def test_marginals_errors_and_extremes():
    p, keep = _ref_case(0)
    with pytest.raises(ValueError, match="one IN and one OUT"):
        log_marginal_online(log_p_ref=np.log(p), ref_in=np.zeros_like(keep))
    with pytest.raises(ValueError, match="one OUT"):
        log_marginal_offline(log_p_ref=np.log(p), ref_in=np.ones_like(keep), a=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_marginal_offline(log_p_ref=np.log(p), ref_in=keep, a=1.5)
    with pytest.raises(ValueError, match=r"\[R, N\]"):
        log_marginal_online(log_p_ref=np.log(p), ref_in=keep[:, :3])
    tiny = np.full((2, 1), -900.0)  # probabilities far below float64's range: still a finite log mean
    assert log_marginal_online(log_p_ref=tiny, ref_in=np.array([[True], [False]]))[0] == pytest.approx(-900.0)
    assert log_marginal_offline(log_p_ref=tiny, ref_in=np.array([[True], [False]]), a=1.0)[0] == pytest.approx(-900.0)


def test_tune_offline_a_takes_the_best_auc_of_the_grid():
    rng = np.random.default_rng(3)
    r, n = 6, 120
    member = rng.random(n) < 0.5
    keep = np.zeros((r, n), dtype=bool)
    for j in range(n):
        keep[rng.choice(r, size=r // 2, replace=False), j] = True
    base = rng.normal(size=n) * 2
    lp_ref = np.log(scipy.special.expit(base + 2.0 * keep + rng.normal(size=(r, n)) * 0.5))
    lp_pseudo = np.log(scipy.special.expit(base + 2.0 * member + rng.normal(size=n) * 0.5))
    pop, si = np.arange(n), np.arange(n)
    a, aucs = tune_offline_a(log_p_pseudo=lp_pseudo, member=member, log_p_ref=lp_ref, ref_in=keep,
                             population=pop, self_index=si, gamma=1.0)
    by_hand = []
    for g in OFFLINE_A_GRID:
        lr = lp_pseudo - np.log(((1 + g) * np.where(~keep, np.exp(lp_ref), 0).sum(0) / (~keep).sum(0) + (1 - g)) / 2)
        by_hand.append(metrics.auc(dominance_fraction_dense(log_ratio_x=lr, log_ratio_z=lr, gamma=1.0,
                                                            self_index=si), member))
    np.testing.assert_allclose(aucs, by_hand, rtol=0, atol=1e-12)
    assert a == OFFLINE_A_GRID[int(np.argmax(by_hand))] and aucs.max() > 0.8
    with pytest.raises(ValueError, match="grid"):
        tune_offline_a(log_p_pseudo=lp_pseudo, member=member, log_p_ref=lp_ref, ref_in=keep, population=pop,
                       self_index=si, gamma=1.0, grid=())


# ----------------------------------------------------------------------------- the plugin
@pytest.mark.parametrize("params,match", [
    (dict(online="yes"), "online must be true or false"),
    (dict(gamma=0.0), "gamma must be a finite number > 0"),
    (dict(gamma=float("nan")), "gamma must be"),
    (dict(online=False, offline_a=1.5), r"offline_a must be a number in \[0, 1\]"),
    (dict(online=False, offline_a=-0.1), "offline_a must be"),
    (dict(offline_a=0.3), "applies only with online=false"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be"),
    (dict(n_references=0), "n_references must be a positive integer"),
    (dict(n_references=True), "n_references must be"),
    (dict(n_references=3), "even number"),
    (dict(online=False, n_references=1), "tuning offline_a needs n_references >= 2"),
    (dict(population_size=0), "population_size must be a positive integer"),
    (dict(population_size=2.5), "population_size must be"),
])
def test_validate_rejects(params, match):
    with pytest.raises(ValueError, match=match):
        RMIA(**params).validate()


def test_validate_accepts():
    for params in ({}, dict(online=False), dict(online=False, offline_a=0.0), dict(online=False, offline_a=1),
                   dict(online=False, n_references=1, offline_a=0.5), dict(n_references=2, gamma=2, temperature=2.0),
                   dict(population_size=1)):
        RMIA(**params).validate()


def test_contract():
    at = RMIA()
    assert at.api_version == "1.0" and at.access == ("probs",) and at.min_reference_models == 2
    assert "Zarifzadeh" in at.reference and "2312.03262" in at.reference
    assert at.get_params() == dict(online=True, gamma=1.0, offline_a=None, temperature=1.0, n_references=None,
                                   population_size=None)


class _FakeCtx:
    """Just enough of AttackContext: the loss signal of a synthetic population (no access rules)."""

    def __init__(self, keep, loss, seed=0):
        self._keep, self._loss = keep, loss
        self.n_models, self.n_records = keep.shape
        self.seed = seed

    def for_target(self, t, *, n_references=None, online=True):
        refs = np.array([m for m in range(self.n_models) if m not in (t, t ^ 1)])
        return SimpleNamespace(target=t, references=refs, ref_keep=self._keep[refs],
                               ref_signal=lambda name: self._loss[refs], target_signal=lambda name: self._loss[t])


def _synthetic(m=16, n=400, shift=2.0, seed=0):
    """Pr(x|θ) = sigmoid(difficulty_j + shift * member + noise): only references remove difficulty."""
    from mia_core.engine.trainer import make_keep_matrix

    rng = np.random.default_rng(seed)
    keep = make_keep_matrix(m, n, rng)
    base = rng.normal(scale=3.0, size=n)
    logit = base + shift * keep + rng.normal(size=(m, n)) * 0.7
    return keep, -np.log(scipy.special.expit(logit))  # the loss, -log Pr(x|θ)


@pytest.mark.parametrize("params", [dict(), dict(online=False), dict(online=False, offline_a=0.5),
                                    dict(population_size=50), dict(gamma=2.0)])
def test_rmia_removes_record_difficulty(params):
    keep, loss = _synthetic()
    at = RMIA(**params).fit(_FakeCtx(keep, loss))
    scores = np.concatenate([at.score(t, np.arange(keep.shape[1])) for t in range(4)])
    auc = metrics.auc(scores, keep[:4].ravel())
    raw = metrics.auc(-loss[:4].ravel(), keep[:4].ravel())  # a global threshold on Pr(x|θ)
    assert auc > raw + 0.1 and auc > 0.8, (auc, raw)
    if not params.get("online", True) and "offline_a" not in params:
        assert set(at.offline_a_) == {0, 1, 2, 3} and set(at.offline_a_.values()) <= set(OFFLINE_A_GRID)


def test_rmia_is_chance_without_signal():
    keep, loss = _synthetic(shift=0.0, n=2000)
    at = RMIA().fit(_FakeCtx(keep, loss))
    scores = np.concatenate([at.score(t, np.arange(keep.shape[1])) for t in range(4)])
    assert abs(metrics.auc(scores, keep[:4].ravel()) - 0.5) < 0.03


def test_population_subset_is_seeded_and_checked():
    keep, loss = _synthetic(n=100)
    a = RMIA(population_size=30).fit(_FakeCtx(keep, loss, seed=5))
    b = RMIA(population_size=30).fit(_FakeCtx(keep, loss, seed=5))
    c = RMIA(population_size=30).fit(_FakeCtx(keep, loss, seed=6))
    assert a.population_.size == 30 and np.unique(a.population_).size == 30
    np.testing.assert_array_equal(a.population_, b.population_)
    assert not np.array_equal(a.population_, c.population_)
    assert (a.self_index_[a.population_] == np.arange(30)).all() and (a.self_index_ >= 0).sum() == 30
    np.testing.assert_array_equal(RMIA().fit(_FakeCtx(keep, loss)).population_, np.arange(100))
    with pytest.raises(ValueError, match="exceeds the 100 records"):
        RMIA(population_size=101).fit(_FakeCtx(keep, loss))
    with pytest.raises(ValueError, match="n_models >= 4"):
        RMIA().fit(_FakeCtx(keep[:2], loss[:2]))
    with pytest.raises(ValueError, match="2 reference pairs"):
        RMIA(online=False).fit(_FakeCtx(keep[:4], loss[:4]))
    RMIA(online=False, offline_a=0.5).fit(_FakeCtx(keep[:4], loss[:4]))


def test_planted_population_conformance_and_tuned_a():
    """The conformance kit (contract, planted AUC, determinism, subset independence, access), and
    the offline a the tuning picks on the planted population (memorised random labels: a member's
    Pr(x|θ) is near 1, so small a — Pr_IN near 1 — fits)."""
    from mia_core.engine import AttackContext
    from mia_core.testing import check_attack, planted_population

    assert check_attack(RMIA)["auc"] > 0.85
    assert check_attack(RMIA, params={"online": False})["auc"] > 0.85
    pop = planted_population()
    at = RMIA(online=False).fit(AttackContext(pop, RMIA.access))
    for t in range(pop.n_models):
        at.score(t, np.arange(pop.n_records))
    assert set(at.offline_a_.values()) <= {0.0, 0.1, 0.2, 0.3}, at.offline_a_


def test_plugin_scores_follow_the_ratio_for_any_gamma():
    from mia_core.engine import AttackContext
    from mia_core.testing import planted_population

    pop = planted_population()
    ctx = AttackContext(pop, RMIA.access)
    recs = np.arange(pop.n_records)
    s1 = RMIA(gamma=1.0).fit(ctx).score(0, recs)
    s2 = RMIA(gamma=2.0).fit(ctx).score(0, recs)
    s3 = RMIA(gamma=0.25).fit(ctx).score(0, recs)
    for other in (s2, s3):
        assert not ((s1[:, None] < s1[None, :]) & (other[:, None] > other[None, :])).any()
    assert np.unique(s1).size >= np.unique(s2).size  # gamma = 1 keeps the finest resolution


def test_cli_end_to_end(tmp_path):
    from plugin_fixtures import eval_attacks

    eval_attacks(tmp_path, "rmia", "rmia:online=false,population_size=100")


def test_cli_refuses_offline_tuning_without_two_reference_pairs_before_training(tmp_path):
    from click.testing import CliRunner

    from mia_core.cli import main

    res = CliRunner().invoke(main, ["eval", "--attack", "rmia:online=false", "--n-models", "4", "-q",
                                    "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2
    assert ("attack 'rmia:online=false' needs 2 reference pairs besides the target's; a population of 4 models "
            "has 1: use --n-models 6 or more") in res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
