"""LiRA's maths against scipy.stats, and the attack on synthetic populations with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core import metrics
from mia_core.stats import fit_gaussians, gaussian_logpdf, lira_offline, lira_online, normal_logsf


@settings(max_examples=60, deadline=None, derandomize=True)
@given(x=st.floats(-50, 50), mu=st.floats(-10, 10), std=st.floats(0.01, 10))
def test_gaussian_helpers_match_scipy(x, mu, std):
    assert np.isclose(gaussian_logpdf(x, mu=mu, std=std), scipy.stats.norm.logpdf(x, mu, std), rtol=1e-10, atol=1e-10)
    assert np.isclose(normal_logsf(x, mu=mu, std=std), scipy.stats.norm.logsf(x, mu, std), rtol=1e-8, atol=1e-10)


def _reference_lira(ref, ref_in, obs, online):
    """Record-by-record reference with scipy, written independently of the vectorised code."""
    out = []
    for j in range(ref.shape[1]):
        s_in, s_out = ref[ref_in[:, j], j], ref[~ref_in[:, j], j]
        mo, so = s_out.mean(), s_out.std(ddof=1)
        if online:
            mi, si = s_in.mean(), s_in.std(ddof=1)
            out.append(scipy.stats.norm.logpdf(obs[j], mi, si) - scipy.stats.norm.logpdf(obs[j], mo, so))
        else:
            out.append(-scipy.stats.norm.logsf(obs[j], mo, so))
    return np.array(out)


@pytest.mark.parametrize("online", [True, False])
def test_per_example_lira_matches_reference(online):
    rng = np.random.default_rng(1)
    r, n = 12, 40
    ref = rng.normal(size=(r, n)) * rng.uniform(0.5, 2, size=n) + rng.normal(size=n)
    ref_in = np.zeros((r, n), dtype=bool)
    for j in range(n):
        ref_in[rng.choice(r, size=6, replace=False), j] = True
    obs = rng.normal(size=n)
    fit = fit_gaussians(ref_scores=ref, ref_in=ref_in, variance="per-example")
    got = lira_online(obs=obs, fit=fit) if online else lira_offline(obs=obs, fit=fit)
    np.testing.assert_allclose(got, _reference_lira(ref, ref_in, obs, online), rtol=1e-9, atol=1e-9)


def test_global_variance_is_pooled_within_record():
    ref = np.array([[0.0, 10.0], [2.0, 14.0], [5.0, 0.0], [7.0, 2.0]])
    ref_in = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=bool)
    fit = fit_gaussians(ref_scores=ref, ref_in=ref_in, variance="global")
    # IN residuals: record 0 -> +-1, record 1 -> +-2: (1+1+4+4)/(1+1) = 5
    assert np.allclose(fit.std_in, np.sqrt(5.0))
    assert np.allclose(fit.std_out, np.sqrt((1 + 1 + 1 + 1) / 2))
    np.testing.assert_allclose(fit.mu_in, [1.0, 12.0])


def test_per_example_needs_two_per_side():
    ref = np.zeros((3, 2))
    ref_in = np.array([[1, 0], [0, 1], [0, 0]], dtype=bool)
    with pytest.raises(ValueError, match="at least 2 IN and 2 OUT"):
        fit_gaussians(ref_scores=ref, ref_in=ref_in, variance="per-example")


def _planted_population(m=16, n=400, shift=3.0, seed=0):
    """A population whose confidence on a record is N(base_j + shift*member, 1)."""
    from mia_core.engine.trainer import make_keep_matrix

    rng = np.random.default_rng(seed)
    keep = make_keep_matrix(m, n, rng)
    base = rng.normal(scale=3.0, size=n)  # record difficulty: only reference models can remove it
    conf = base + shift * keep + rng.normal(size=(m, n))
    return keep, conf


class _FakeCtx:
    """Just enough of AttackContext for the planted test (the real one is tested end to end)."""

    def __init__(self, keep, conf):
        self._keep, self._conf = keep, conf
        self.n_models = keep.shape[0]

    def for_target(self, t, n_references=None, online=True):
        from types import SimpleNamespace

        refs = np.array([i for i in range(self.n_models) if i != t])
        return SimpleNamespace(
            target=t, references=refs, ref_keep=self._keep[refs],
            ref_signal=lambda name: self._conf[refs], target_signal=lambda name: self._conf[t],
        )


@pytest.mark.parametrize("params", [dict(online=True, variance="per-example"), dict(online=True, variance="global"),
                                    dict(online=False, variance="global")])
def test_lira_separates_planted_members(params):
    from mia_plugins.attacks.lira import LiRA

    keep, conf = _planted_population()
    attack = LiRA(**params).fit(_FakeCtx(keep, conf))
    scores = np.concatenate([attack.score(t, np.arange(conf.shape[1])) for t in range(4)])
    member = keep[:4].ravel()
    auc = metrics.auc(scores, member)
    # the best any test can do on N(base + 3, 1) vs N(base, 1) with known base: Phi(3 / sqrt 2) = 0.983
    bayes = scipy.stats.norm.cdf(3.0 / np.sqrt(2.0))
    assert bayes - 0.03 < auc <= bayes + 0.01
    # a global threshold on the raw confidence is fooled by record difficulty; LiRA is not
    raw = metrics.auc(conf[:4].ravel(), member)
    assert auc > raw + 0.1


def test_lira_is_chance_without_signal():
    from mia_plugins.attacks.lira import LiRA

    keep, conf = _planted_population(shift=0.0, n=2000)
    attack = LiRA().fit(_FakeCtx(keep, conf))
    scores = np.concatenate([attack.score(t, np.arange(conf.shape[1])) for t in range(4)])
    assert abs(metrics.auc(scores, keep[:4].ravel()) - 0.5) < 0.03


@pytest.mark.parametrize("n_models,expected", [(16, "global"), (62, "global"), (64, "per-example"), (66, "per-example")])
def test_auto_variance_switches_at_64_models(n_models, expected):
    """The paper's rule counts models (64 shadow models), so 64 models = 63 references is per-example."""
    from mia_plugins.attacks.lira import LiRA

    class Ctx:
        pass

    ctx = Ctx()
    ctx.n_models = n_models
    assert LiRA().fit(ctx).variance_ == expected


# ----------------------------------------------------------------- centre, budgets, one reference
@settings(max_examples=40, deadline=None, derandomize=True)
@given(r=st.integers(2, 7), n=st.integers(1, 6), seed=st.integers(0, 1000))
def test_median_centre_matches_numpy_per_record(r, n, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(r, n))
    k = rng.random((r, n)) < 0.5
    k[0], k[1] = True, False  # at least one reference per side
    fit = fit_gaussians(ref_scores=s, ref_in=k, variance="global", stat="median")
    for j in range(n):
        assert fit.mu_in[j] == pytest.approx(np.median(s[k[:, j], j]))
        assert fit.mu_out[j] == pytest.approx(np.median(s[~k[:, j], j]))


def test_one_reference_per_record_uses_the_variance_across_records():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 50))
    k = np.zeros((2, 50), dtype=bool)
    k[0, ::2] = True
    k[1, 1::2] = True  # one IN and one OUT reference per record
    fit = fit_gaussians(ref_scores=s, ref_in=k, variance="global")
    assert np.allclose(fit.std_in, s[k].std(ddof=1)) and np.allclose(fit.std_out, s[~k].std(ddof=1))
    with pytest.raises(ValueError, match="per-example variance needs at least 2 IN and 2 OUT"):
        fit_gaussians(ref_scores=s, ref_in=k, variance="per-example")
    with pytest.raises(ValueError, match="stat must be 'mean' or 'median'"):
        fit_gaussians(ref_scores=s, ref_in=k, stat="mode")


def test_lira_budget_uses_the_selected_references_only():
    from mia_core.engine.contexts import AttackContext
    from mia_core.testing import planted_population
    from mia_plugins.attacks.lira import LiRA

    pop = planted_population()
    ctx = AttackContext(pop, ("logits",), owner="attack lira")
    n = pop.n_records
    for k, online in ((1, False), (2, False), (2, True)):
        scores = LiRA(online=online, n_references=k).fit(ctx).score(0, np.arange(n))
        view = ctx.for_target(0, n_references=k, online=online)
        assert len(view.references) == (k if online else 2 * k)
        fit = fit_gaussians(ref_scores=view.ref_signal("confidence"), ref_in=view.ref_keep, variance="global")
        obs = view.target_signal("confidence")
        expected = lira_online(obs=obs, fit=fit) if online else lira_offline(obs=obs, fit=fit)
        assert np.allclose(scores, expected)
        assert metrics.auc(scores, pop.keep[0]) > 0.7


@pytest.mark.parametrize("params,match", [
    (dict(n_references=0), "n_references must be a positive integer"),
    (dict(n_references=2, variance="per-example"), "n_references >= 4 online"),
    (dict(online=False, n_references=1, variance="per-example"), "n_references >= 2 offline"),
    (dict(stat="mode"), "stat must be one of mean, median"),
    (dict(augment="rotate"), "augment must be one of none, mirror, mirror-shift"),
])
def test_lira_rejects_bad_parameters(params, match):
    from mia_plugins.attacks.lira import LiRA

    with pytest.raises(ValueError, match=match):
        LiRA(**params).validate()


def test_cli_refuses_a_budget_the_population_cannot_meet(tmp_path):
    from click.testing import CliRunner

    from mia_core.cli import main

    res = CliRunner().invoke(main, ["eval", "--attack", "lira:n_references=8", "--n-models", "6", "-q",
                                    "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2
    assert "attack 'lira:n_references=8': n_references=8 needs 4 reference pairs but a population of 6 models has 2" \
        in res.stderr
    assert not (tmp_path / "runs").exists()
